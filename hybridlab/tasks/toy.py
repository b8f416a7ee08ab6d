"""Toy tasks with verifiable rewards on a character vocabulary.

Every task maps a prompt string (ending in "=") to a unique answer string, and its reward is computed from
the prompt alone (the answer is *solved*, never looked up), so any response can be checked:

    reverse   "40213="   -> "31204"     (digit strings of 3-6 characters)
    sort      "40213="   -> "01234"     (digits in ascending order)
    add       "57+168="  -> "225"       (two numbers of 1-3 digits)

Rewards (`reward(task, prompt, response)`, in [0, 1]):
    "exact"    1.0 iff the response (the text before EOS) equals the answer, else 0.0 — the default.
    "partial"  per-position credit: #{i : response[i] == answer[i]} / max(len(response), len(answer)),
               so 1.0 iff exact; a wrong length costs the missing or extra characters. Denser but gameable
               by nothing (every extra or missing character lowers it).

Splits are written to `data/tasks/<task>_s<seed>_{train,eval}.jsonl` ({"prompt": ..., "answer": ...} per
line); eval prompts are disjoint from train prompts, and the files are regenerated identically from the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Repository `data/` folder (the package lives at <repo>/hybridlab).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
TASKS_DIR = DATA_DIR / "tasks"

#: Characters the tasks use (the tokenizer adds <pad>, <bos>, <eos>).
CHARS = "0123456789+="
SEP = "="
REWARD_KINDS = ("exact", "partial")


@dataclass(frozen=True)
class Task:
    """A task: `sample(rng) -> prompt` and `solve(prompt) -> answer`; `max_answer_len` bounds answers."""

    name: str
    sample: Callable[[random.Random], str]
    solve: Callable[[str], str]
    max_answer_len: int
    max_prompt_len: int

    def example(self, rng: random.Random) -> tuple[str, str]:
        p = self.sample(rng)
        return p, self.solve(p)


def _digits(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi))) + SEP


def _body(prompt: str) -> str:
    if not prompt.endswith(SEP):
        raise ValueError(f"prompt must end with {SEP!r}, got {prompt!r}")
    return prompt[:-1]


def _solve_reverse(prompt: str) -> str:
    return _body(prompt)[::-1]


def _solve_sort(prompt: str) -> str:
    return "".join(sorted(_body(prompt)))


def _sample_add(rng: random.Random) -> str:
    return f"{rng.randint(0, 999)}+{rng.randint(0, 999)}="


def _solve_add(prompt: str) -> str:
    a, sep, b = _body(prompt).partition("+")
    if not sep or not a.isdigit() or not b.isdigit():
        raise ValueError(f"add prompt must look like '12+345=', got {prompt!r}")
    return str(int(a) + int(b))


TASKS: dict[str, Task] = {
    "reverse": Task("reverse", _digits, _solve_reverse, max_answer_len=6, max_prompt_len=7),
    "sort": Task("sort", _digits, _solve_sort, max_answer_len=6, max_prompt_len=7),
    "add": Task("add", _sample_add, _solve_add, max_answer_len=4, max_prompt_len=8),
}


def get_task(task: str | Task) -> Task:
    """Look a task up by name (or pass a `Task` through)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


def reward(task: str | Task, prompt: str, response: str, kind: str = "exact") -> float:
    """Verifiable reward of `response` (the text before EOS) to `prompt`; see the module docstring.

    >>> reward("reverse", "123=", "321"), reward("reverse", "123=", "312"), reward("reverse", "123=", "31", "partial")
    (1.0, 0.0, 0.3333333333333333)
    """
    answer = get_task(task).solve(prompt)
    if kind == "exact":
        return float(response == answer)
    if kind == "partial":
        hits = sum(a == b for a, b in zip(response, answer))
        return hits / max(len(response), len(answer), 1)
    raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")


def rewards(task: str | Task, prompts: list[str], responses: list[str], kind: str = "exact") -> list[float]:
    """`reward` over a batch: len(prompts) == len(responses) -> list of floats."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length"
        )
    t = get_task(task)
    return [reward(t, p, r, kind) for p, r in zip(prompts, responses)]


def generate_examples(
    task: str | Task, n: int, seed: int, exclude: set[str] | None = None
) -> list[dict[str, str]]:
    """`n` distinct examples {"prompt", "answer"} from a fixed seed, skipping prompts in `exclude`."""
    t = get_task(task)
    rng = random.Random(f"{t.name}:{seed}")
    seen = set(exclude or ())
    out: list[dict[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {t.name!r} prompts (got {len(out)})")
        p, a = t.example(rng)
        if p in seen:
            continue
        seen.add(p)
        out.append({"prompt": p, "answer": a})
    return out


def split_paths(task: str, seed: int, root: Path | str | None = None) -> dict[str, Path]:
    root = TASKS_DIR if root is None else Path(root)
    return {s: root / f"{task}_s{seed}_{s}.jsonl" for s in ("train", "eval")}


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    tmp.replace(path)  # atomic


def make_splits(
    task: str,
    n_train: int = 3000,
    n_eval: int = 200,
    seed: int = 0,
    root: Path | str | None = None,
    write: bool = True,
) -> dict[str, list[dict[str, str]]]:
    """Train/eval splits of `task` ({"train": [...], "eval": [...]}), read from `root` or generated.

    Eval prompts are drawn first and excluded from train. Files that exist with at least the requested
    number of rows are read (and their first rows returned); otherwise the splits are generated from the seed
    and, with `write`, saved. Generation is deterministic: the same (task, seed) always gives the same rows.
    """
    t = get_task(task)
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got n_train={n_train}, n_eval={n_eval}")
    paths = split_paths(t.name, seed, root)
    if all(p.exists() for p in paths.values()):
        tr, ev = _read_jsonl(paths["train"]), _read_jsonl(paths["eval"])
        if len(tr) >= n_train and len(ev) >= n_eval:
            return {"train": tr[:n_train], "eval": ev[:n_eval]}
    ev = generate_examples(t, n_eval, seed=seed * 2 + 1)
    tr = generate_examples(t, n_train, seed=seed * 2, exclude={r["prompt"] for r in ev})
    if write:
        _write_jsonl(paths["train"], tr)
        _write_jsonl(paths["eval"], ev)
    return {"train": tr, "eval": ev}
