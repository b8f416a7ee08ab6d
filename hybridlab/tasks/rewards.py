"""Reward functions for `hybridlab.train`, and loading one from a dotted path.

A reward function takes the batch's prompts, the decoded responses (text before EOS, special tokens skipped)
and the answers from the prompts file (`None` where a row has no "answer"), and returns one float per response:

    def my_reward(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]

Shipped here:
    exact_match        1.0 iff the response equals the row's answer (surrounding whitespace ignored)
    reverse, sort, add the toy tasks' verifiable exact rewards (`hybridlab.tasks.reward`, solved from the prompt)
    reverse_partial, sort_partial, add_partial   their per-position partial-credit variants

A config names one as "module:function" or "module.function", e.g. "hybridlab.tasks.rewards:exact_match" or
"my_project.rewards.f1" (the module must be importable: installed, or on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from .toy import rewards as _task_rewards

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], Sequence[float]]


def exact_match(
    prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None]
) -> list[float]:
    """1.0 where response.strip() == answer.strip(), else 0.0. Every row needs an "answer"."""
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise ValueError(
            f"exact_match needs an 'answer' for every prompt; rows {missing[:5]} of this batch have none "
            '(add "answer" to the prompts JSONL or choose another reward)'
        )
    return [float(r.strip() == str(a).strip()) for r, a in zip(responses, answers)]


def _task_reward(task: str, kind: str) -> RewardFn:
    def fn(prompts, responses, answers=None):
        return _task_rewards(task, list(prompts), list(responses), kind)

    fn.__name__ = task if kind == "exact" else f"{task}_{kind}"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"The {task!r} toy task's {kind} reward, solved from the prompt (answers are ignored)."
    return fn


reverse = _task_reward("reverse", "exact")
sort = _task_reward("sort", "exact")
add = _task_reward("add", "exact")
reverse_partial = _task_reward("reverse", "partial")
sort_partial = _task_reward("sort", "partial")
add_partial = _task_reward("add", "partial")


def load_reward(spec: str) -> RewardFn:
    """The callable named by "package.module:function" or "package.module.function".

    Raises ValueError naming `spec` when the module cannot be imported, has no such attribute, or the attribute
    is not callable. (Importing a module runs its code: name only modules you trust.)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"reward must be a dotted path like 'hybridlab.tasks.rewards:exact_match', got {spec!r}"
        )
    spec = spec.strip()
    if ":" in spec:
        module, _, attr = spec.partition(":")
    else:
        module, _, attr = spec.rpartition(".")
    if not module or not attr or ":" in attr:
        raise ValueError(
            f"reward {spec!r} must look like 'module:function' or 'module.function' "
            "(e.g. 'hybridlab.tasks.rewards:exact_match')"
        )
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module!r} ({e})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_reward(
    fn: RewardFn,
    prompts: Sequence[str],
    responses: Sequence[str],
    answers: Sequence[str | None],
    name: str = "reward",
) -> list[float]:
    """fn(prompts, responses, answers), checked: one finite float per response."""
    out = fn(list(prompts), list(responses), list(answers))
    try:
        vals = [float(x) for x in out]
    except TypeError as e:
        raise ValueError(
            f"reward {name} must return a list of floats, got {type(out).__name__} ({e})"
        ) from None
    if len(vals) != len(responses):
        raise ValueError(f"reward {name} returned {len(vals)} values for {len(responses)} responses")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"reward {name} returned NaN or inf for responses {bad[:5]}: {[vals[i] for i in bad[:5]]}"
        )
    return vals


__all__ = [
    "RewardFn",
    "add",
    "add_partial",
    "call_reward",
    "exact_match",
    "load_reward",
    "reverse",
    "reverse_partial",
    "sort",
    "sort_partial",
]
