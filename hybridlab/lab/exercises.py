"""Exercises a learner solves: a stub to fill in (a function, or a number to predict) and a checker that says
right or wrong, with a hint.

Every checker compares the learner's answer with an **independent** reference computed inside the checker: exact
enumeration of a tiny toy, autograd through a formula written out in plain torch, an explicit loop. It never
compares with a number the notebook already printed. The reference solutions live in
`hybridlab.lab.solutions`, never in the notebook (nothing of them shows in nbconvert or nbviewer).

The switch: with ``HYBRIDLAB_SOLUTIONS=1`` in the environment, `exercise` and `predict` hand back the reference
solution instead of the learner's stub, so a notebook runs end to end with every exercise solved (``make
test-notebooks`` sets it). Untouched, a stub returns ``None`` (a body of ``...``) or is the literal ``...``, and its
checker fails; ``tests/test_exercises.py`` proves that for every stub in the notebooks, that every reference
solution passes, and that the common wrong answers listed in `solutions.WRONG` fail with their hint.

Writing an exercise cell (the exact pattern; `X` is this module)::

    from hybridlab.lab import exercises as X

    # a function to write
    @X.exercise("03.forward_grad")
    def forward_kl_logit_grad(z, q):
        \"\"\"z [N, V] student logits, q [N, V] teacher probabilities -> d KL(q || softmax(z)) / dz, [N, V].\"\"\"
        ...  # your code here


    X.check("03.forward_grad", forward_kl_logit_grad)

    # a number (or a dict of True/False) to predict
    c = X.predict("02.grpo_constant", ...)  # replace ... with your number
    X.check("02.grpo_constant", c)

Rules for a new exercise (for example for notebooks 06-08):

1. the stub: a ``def`` decorated with ``@X.exercise(KEY)`` whose body is a docstring (with shapes) and ``...``, or
   ``X.predict(KEY, ...)``; the cell ends with ``X.check(KEY, answer)``. Later cells must not use the answer:
   an unsolved exercise must not break the rest of the notebook;
2. the checker: a function ``checker(answer, **context) -> str`` registered with ``@register(KEY, kind, title)``
   in `hybridlab.lab.exercise_checks` (or a new module imported by `_load`). It computes its own reference
   (enumeration, autograd, a loop) from ``context`` or from a default context it builds itself, raises
   ``Wrong("hint")`` for a wrong answer (say *what* is off and what to look at, without giving the answer away)
   and returns a short message when right. It must run in well under a second or two on a CPU;
3. the reference solution: ``SOLUTIONS[KEY]`` in `hybridlab.lab.solutions`; one or two typical wrong answers in
   ``WRONG[KEY]`` with a fragment of the hint each must produce (the test checks both);
4. notebook keys are ``"NN.name"`` with NN the notebook's number.

`check` prints one line and returns a `Result` (truthy when right). It never raises for a wrong answer while a
learner works (so "Run all" goes on), but with the switch on a failing check raises AssertionError: there, a
failure means a reference solution or a checker is broken.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SOLUTIONS_ENV = "HYBRIDLAB_SOLUTIONS"
KINDS = ("function", "value")


class Wrong(Exception):  # noqa: N818 (a verdict, not an error of the program)
    """Raised by a checker: the answer is wrong; the message is the hint shown to the learner."""


@dataclass(frozen=True)
class Exercise:
    key: str  # "NN.name"
    kind: str  # "function" (a stub to write) or "value" (a number / answers to predict)
    title: str  # one line, shown by `check`
    checker: Callable[..., str]  # checker(answer, **context) -> message; raises Wrong(hint)


@dataclass(frozen=True)
class Result:
    key: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "right" if self.passed else "not yet"
        return f"[{mark}] exercise {self.key}: {self.message}"

    def _ipython_display_(self) -> None:
        # `check` has printed the verdict already; as a cell's last value the result would add a raw repr below it
        pass


REGISTRY: dict[str, Exercise] = {}
_LOADED = False


def register(key: str, kind: str, title: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Decorator: register `checker` under `key` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(checker: Callable[..., str]) -> Callable[..., str]:
        if key in REGISTRY:
            raise ValueError(f"exercise {key!r} is registered twice")
        REGISTRY[key] = Exercise(key, kind, title, checker)
        return checker

    return deco


def _load() -> None:
    """Import the checker modules once (they fill REGISTRY)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from . import exercise_checks  # noqa: F401  (registers the notebooks' exercises)


def get(key: str) -> Exercise:
    """The registered exercise `key`; a clear error naming the known keys otherwise."""
    _load()
    if key not in REGISTRY:
        raise KeyError(f"no exercise {key!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[key]


def solutions_enabled() -> bool:
    """Whether HYBRIDLAB_SOLUTIONS asks for the reference solutions (1 / true / yes)."""
    return os.environ.get(SOLUTIONS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def reference(key: str) -> Any:
    """The reference solution of exercise `key` (a function or a value), from `hybridlab.lab.solutions`."""
    from .solutions import SOLUTIONS

    get(key)
    if key not in SOLUTIONS:
        raise KeyError(f"exercise {key!r} has no reference solution in hybridlab.lab.solutions")
    return SOLUTIONS[key]


def exercise(key: str) -> Callable[[Callable], Callable]:
    """Decorator for a function stub: returns the learner's function, or with the switch on the reference."""
    if get(key).kind != "function":
        raise ValueError(f"exercise {key!r} asks for a value: use X.predict({key!r}, ...)")

    def deco(stub: Callable) -> Callable:
        return reference(key) if solutions_enabled() else stub

    return deco


def predict(key: str, value: Any) -> Any:
    """A predicted value: the learner's `value`, or with the switch on the reference value."""
    if get(key).kind != "value":
        raise ValueError(f"exercise {key!r} asks for a function: decorate it with @X.exercise({key!r})")
    return reference(key) if solutions_enabled() else value


def unanswered(answer: Any) -> bool:
    """True for an untouched stub's answer: None, ..., or a container holding one of them."""
    if answer is None or answer is Ellipsis:
        return True
    if isinstance(answer, dict):
        return any(unanswered(v) for v in answer.values())
    if isinstance(answer, (list, tuple)):
        return any(unanswered(v) for v in answer)
    return False


def grade(key: str, answer: Any, **context: Any) -> Result:
    """Run the checker of `key` on `answer`; never raises for a wrong answer (see `check`)."""
    ex = get(key)
    if unanswered(answer):
        what = "write the function's body" if ex.kind == "function" else "replace the ... with your answer"
        return Result(key, False, f"{ex.title} -- not answered yet: {what}, then run the cell again.")
    try:
        message = ex.checker(answer, **context)
    except Wrong as verdict:
        return Result(key, False, f"{ex.title} -- {verdict}")
    except Exception as err:  # the learner's code raised: show where, as a hint
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return Result(key, False, f"{ex.title} -- your code raised {last}")
    return Result(key, True, f"{ex.title} -- {message}")


def check(key: str, answer: Any, **context: Any) -> Result:
    """Grade `answer`, print the verdict; with the switch on, a failure raises AssertionError."""
    result = grade(key, answer, **context)
    print(result)
    if solutions_enabled() and not result.passed:
        raise AssertionError(f"{SOLUTIONS_ENV} is set but exercise {key} fails: {result.message}")
    return result


def result_of(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function; `Wrong` when it returns None (the stub's body is still ``...``)."""
    out = fn(*args, **kwargs)
    if out is None:
        raise Wrong(
            "not answered yet: your function returns None (its body is still `...`, or it has no `return`)."
        )
    return out


def mistakes(key: str) -> dict[str, Any]:
    """The typical wrong answers of exercise `key` (from `solutions.WRONG`), by a one-line description: a
    notebook can show them failing with `grade` (e.g. the two classic bugs of the surrogate)."""
    from .solutions import WRONG

    get(key)
    out = {}
    for answer, _ in WRONG.get(key, []):
        doc = (getattr(answer, "__doc__", None) or "").strip().splitlines()
        out[doc[0] if callable(answer) and doc else repr(answer)] = answer
    return out
