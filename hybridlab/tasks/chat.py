"""A verifiable chat task for real instruct models: addition questions with a short, checkable answer.

    fmt="number":    "What is 17 + 25? Answer with the number only."     reference: "42"
    fmt="equation":  "What is 17 + 25? Answer with the equation only."   reference: "17 + 25 = 42"

The operands have `digits` digits (1: 0-9, 2: 10-99, 3: 100-999). The student sees the question as a single
user turn of the model's chat template. The teacher is the same model with `k` worked examples before it
(context distillation): earlier user/assistant turns in the same chat, the last user turn being the student's
question, so the student's response tokens follow either prefix at aligned positions.

Reward (`exact_reward`, the `hybridlab.tasks.rewards` signature): 1.0 iff the response (text before EOS) is the
reference in its format: the bare sum, or "a + b = sum" with the question's operands in order (spaces around
"+" and "=" optional); one trailing "." and surrounding whitespace are allowed; 0.0 otherwise (an
explanation, a wrong number, the other format). The reference is the row's answer when given, else it is solved
from the last question in the prompt text. `loose_reward` (the last integer in the response is the sum) is a
diagnostic, not a training reward: it also pays "The answer is 42." and long explanations ending in the sum.

Splits (`make_splits`): eval and train questions are disjoint, and neither contains a demonstration
question; everything is a pure function of (digits, seed, k_demos).
"""

from __future__ import annotations

import bisect
import json
import random
import re
from collections.abc import Sequence
from collections.abc import Sequence as SequenceABC
from pathlib import Path

from .toy import TASKS_DIR

FORMATS = {
    "number": "Answer with the number only.",
    "equation": "Answer with the equation only.",
}
QUESTION = "What is {a} + {b}? {instruction}"
_QUESTION_RE = re.compile(r"What is (\d+) \+ (\d+)\? (Answer with the (?:number|equation) only\.)")
_NUMBER_RE = re.compile(r"\s*(-?\d+)\.?\s*")
_EQUATION_RE = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*(-?\d+)\.?\s*")
_INT_RE = re.compile(r"-?\d+")
DIGITS = (1, 2, 3)


def _check_digits(digits: int) -> tuple[int, int]:
    if digits not in DIGITS:
        raise ValueError(f"digits must be one of {DIGITS}, got {digits!r}")
    return (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    return fmt


def question(a: int, b: int, fmt: str = "number") -> str:
    """The user turn for a + b, asking for the answer in format `fmt` ("number" or "equation")."""
    if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative ints, got a={a!r}, b={b!r}")
    return QUESTION.format(a=a, b=b, instruction=FORMATS[_check_fmt(fmt)])


def answer_text(a: int, b: int, fmt: str = "number") -> str:
    """The reference answer: "42" (number) or "17 + 25 = 42" (equation)."""
    return str(a + b) if _check_fmt(fmt) == "number" else f"{a} + {b} = {a + b}"


def parse_question(text: str) -> tuple[int, int, str]:
    """(a, b, fmt) of the *last* question in `text` (a question, or a whole rendered prompt with demos)."""
    found = _QUESTION_RE.findall(text)
    if not found:
        raise ValueError(f"no 'What is a + b? Answer with the ... only.' question in {text[-120:]!r}")
    a, b, instruction = found[-1]
    fmt = next(k for k, v in FORMATS.items() if v == instruction)
    return int(a), int(b), fmt


def solve(text: str) -> int:
    """The sum asked by the last question in `text`."""
    a, b, _ = parse_question(text)
    return a + b


def parse_answer(response: str) -> tuple[int, ...] | None:
    """The integers of a well-formed answer: (n,) for a bare number, (a, b, c) for "a + b = c" (optionally
    with one trailing "." and surrounding whitespace); None for anything else."""
    for pattern in (_NUMBER_RE, _EQUATION_RE):
        m = pattern.fullmatch(response)
        if m:
            return tuple(int(x) for x in m.groups())
    return None


def _references(prompts: Sequence[str], answers: Sequence[str | None] | None) -> list[tuple[int, ...]]:
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"answers ({len(answers)}) and prompts ({len(prompts)}) must have the same length")
    out = []
    for i, p in enumerate(prompts):
        a = None if answers is None else answers[i]
        ref = parse_answer(answer_text(*parse_question(p)) if a is None else str(a))
        if ref is None:
            raise ValueError(f"answer {a!r} of row {i} is neither a number nor an equation 'a + b = c'")
        out.append(ref)
    return out


def exact_reward(
    prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None] | None = None
) -> list[float]:
    """1.0 where the response is the reference answer in its format (see the module docstring), else 0.0."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length"
        )
    return [float(parse_answer(r) == ref) for r, ref in zip(responses, _references(prompts, answers))]


def loose_reward(
    prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None] | None = None
) -> list[float]:
    """Diagnostic: 1.0 where the last integer in the response is the sum, whatever else it says."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length"
        )
    out = []
    for r, ref in zip(responses, _references(prompts, answers)):
        ints = _INT_RE.findall(r)
        out.append(float(bool(ints) and int(ints[-1]) == ref[-1]))
    return out


class _PairPool(SequenceABC):
    """The pairs (a, b), lo <= a, b <= hi, in lexicographic order without `exclude`, as a lazy sequence
    (random.sample reads only the items it draws: no list of 810,000 three-digit pairs)."""

    def __init__(self, lo: int, hi: int, exclude: set[tuple[int, int]]):
        self.lo, self.m = lo, hi - lo + 1
        self.skip = sorted(
            (a - lo) * self.m + (b - lo) for a, b in exclude if lo <= a <= hi and lo <= b <= hi
        )
        self.n = self.m * self.m - len(self.skip)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple[int, int]:
        if not 0 <= j < self.n:
            raise IndexError(j)
        # The j-th kept index is the least fixed point of i = j + #(skipped <= i) (the least one is never a
        # skipped index: i - 1 would be a fixed point too); iterating from i = j reaches it from below.
        i = j
        while (k := bisect.bisect_right(self.skip, i)) != i - j:
            i = j + k
        return self.lo + i // self.m, self.lo + i % self.m


def _pairs(
    digits: int, seed: int, n: int, exclude: set[tuple[int, int]], label: str
) -> list[tuple[int, int]]:
    lo, hi = _check_digits(digits)
    pool = _PairPool(lo, hi, exclude)
    if n > len(pool):
        raise ValueError(f"{label}: asked for {n} distinct {digits}-digit questions, only {len(pool)} remain")
    return random.Random(f"chat_add{digits}:{label}:{seed}").sample(pool, n)


def demonstrations(k: int = 2, digits: int = 2, seed: int = 0, fmt: str = "number") -> list[tuple[str, str]]:
    """`k` fixed worked examples (question, answer) for the teacher's prefix."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return [(question(a, b, fmt), answer_text(a, b, fmt)) for a, b in _pairs(digits, seed, k, set(), "demos")]


def make_splits(
    n_train: int = 2000,
    n_eval: int = 40,
    digits: int = 2,
    seed: int = 0,
    k_demos: int = 2,
    fmt: str = "number",
) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "eval": [...]} rows {"prompt": question, "answer": reference}; disjoint, the `k_demos`
    demonstration questions excluded from both."""
    _check_fmt(fmt)
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    demo_pairs = set(_pairs(digits, seed, k_demos, set(), "demos"))
    ev = _pairs(digits, seed, n_eval, demo_pairs, "eval")
    tr = _pairs(digits, seed, n_train, demo_pairs | set(ev), "train")

    def rows(pairs):
        return [{"prompt": question(a, b, fmt), "answer": answer_text(a, b, fmt)} for a, b in pairs]

    return {"train": rows(tr), "eval": rows(ev)}


def split_paths(digits: int, fmt: str, seed: int = 0, root: str | Path | None = None) -> dict[str, Path]:
    """data/tasks/chat_add<digits>_<fmt>_s<seed>_{train,eval}.jsonl (or under `root`)."""
    root = TASKS_DIR if root is None else Path(root)
    return {s: root / f"chat_add{digits}_{_check_fmt(fmt)}_s{seed}_{s}.jsonl" for s in ("train", "eval")}


def with_teacher_messages(rows: list[dict[str, str]], demos: Sequence[tuple[str, str]]) -> list[dict]:
    """The rows with "teacher_messages": the teacher's chat (the demonstrations, then the row's question), which
    `hybridlab.train` renders with the chat template as the teacher's prompt (context distillation)."""
    return [{**r, "teacher_messages": teacher_messages(r["prompt"], demos)} for r in rows]


def write_splits(
    n_train: int, n_eval: int, digits: int, fmt: str, seed: int = 0, k_demos: int = 2, root=None
) -> dict[str, Path]:
    """Write `make_splits(...)` as JSONL prompt files for `hybridlab.train`: {"prompt", "answer"} per line, plus
    "teacher_messages" (the `k_demos` demonstrations before the question) when k_demos > 0."""
    splits = make_splits(n_train, n_eval, digits, seed, k_demos=k_demos, fmt=fmt)
    demos = demonstrations(k_demos, digits, seed, fmt)
    paths = split_paths(digits, fmt, seed, root)
    for name, path in paths.items():
        rows = with_teacher_messages(splits[name], demos) if k_demos else splits[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return paths


def student_messages(q: str) -> list[dict[str, str]]:
    """The student's chat: one user turn."""
    return [{"role": "user", "content": q}]


def teacher_messages(q: str, demos: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The teacher's chat: each demonstration as a user/assistant exchange, then the student's question."""
    msgs: list[dict[str, str]] = []
    for dq, da in demos:
        msgs += [{"role": "user", "content": dq}, {"role": "assistant", "content": da}]
    return msgs + student_messages(q)


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat-template text of `messages`, ending where the assistant's reply begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat_template (an instruct model's tokenizer is needed)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


__all__ = [
    "FORMATS",
    "QUESTION",
    "answer_text",
    "loose_reward",
    "parse_question",
    "demonstrations",
    "exact_reward",
    "make_splits",
    "parse_answer",
    "question",
    "render",
    "split_paths",
    "solve",
    "student_messages",
    "teacher_messages",
    "with_teacher_messages",
    "write_splits",
]
