"""A verifiable chat task for real instruct models: addition questions with a number-only answer.

    student's user turn:  "What is 17 + 25? Answer with the number only."      answer: "42"

The operands have `digits` digits (1: 0-9, 2: 10-99, 3: 100-999). The student sees the question as a single
user turn of the model's chat template. The teacher is the same model with `k` worked examples before it
(context distillation): earlier user/assistant turns in the same chat, the last user turn being the student's
question, so the student's response tokens follow either prefix at aligned positions.

Reward (`exact_reward`, the `hybridlab.rewards` signature): 1.0 iff the response (text before EOS) is the
sum written as a plain integer, optionally followed by one "." and surrounding whitespace; 0.0 otherwise
(an explanation, a wrong number, or more than the number). The sum comes from the row's answer when given,
else it is solved from the last question in the prompt text. `contains_reward` (the first integer in the
response is the sum) is a looser diagnostic, not a training reward: it pays "17 + 25 = 42" and a long
explanation that happens to start with the right number alike.

Splits (`make_splits`): eval and train questions are disjoint, and neither contains a demonstration
question; everything is a pure function of (digits, seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

QUESTION = "What is {a} + {b}? Answer with the number only."
_QUESTION_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
_ANSWER_RE = re.compile(r"\s*(-?\d+)\.?\s*")
_FIRST_INT_RE = re.compile(r"-?\d+")
DIGITS = (1, 2, 3)


def _check_digits(digits: int) -> tuple[int, int]:
    if digits not in DIGITS:
        raise ValueError(f"digits must be one of {DIGITS}, got {digits!r}")
    return (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)


def question(a: int, b: int) -> str:
    """The user turn for a + b."""
    if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative ints, got a={a!r}, b={b!r}")
    return QUESTION.format(a=a, b=b)


def solve(text: str) -> int:
    """The sum asked by the *last* "What is a + b?" in `text` (a question, or a whole rendered prompt)."""
    found = _QUESTION_RE.findall(text)
    if not found:
        raise ValueError(f"no 'What is a + b?' question in {text[-120:]!r}")
    a, b = found[-1]
    return int(a) + int(b)


def parse_answer(response: str) -> int | None:
    """The integer if `response` is just an integer (optionally with one trailing "." and whitespace)."""
    m = _ANSWER_RE.fullmatch(response)
    return int(m.group(1)) if m else None


def _targets(prompts: Sequence[str], answers: Sequence[str | None] | None) -> list[int]:
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"answers ({len(answers)}) and prompts ({len(prompts)}) must have the same length")
    out = []
    for i, p in enumerate(prompts):
        a = None if answers is None else answers[i]
        out.append(solve(p) if a is None else int(str(a).strip()))
    return out


def exact_reward(
    prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None] | None = None
) -> list[float]:
    """1.0 where the response is exactly the sum (see the module docstring), else 0.0."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length"
        )
    return [float(parse_answer(r) == t) for r, t in zip(responses, _targets(prompts, answers))]


def contains_reward(
    prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None] | None = None
) -> list[float]:
    """Diagnostic: 1.0 where the first integer in the response is the sum."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts ({len(prompts)}) and responses ({len(responses)}) must have the same length"
        )
    out = []
    for r, t in zip(responses, _targets(prompts, answers)):
        m = _FIRST_INT_RE.search(r)
        out.append(float(m is not None and int(m.group()) == t))
    return out


def _pairs(
    digits: int, seed: int, n: int, exclude: set[tuple[int, int]], label: str
) -> list[tuple[int, int]]:
    lo, hi = _check_digits(digits)
    pool = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if (a, b) not in exclude]
    if n > len(pool):
        raise ValueError(f"{label}: asked for {n} distinct {digits}-digit questions, only {len(pool)} remain")
    return random.Random(f"chat_add{digits}:{label}:{seed}").sample(pool, n)


def demonstrations(k: int = 2, digits: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """`k` fixed worked examples (question, answer) for the teacher's prefix."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return [(question(a, b), str(a + b)) for a, b in _pairs(digits, seed, k, set(), "demos")]


def make_splits(
    n_train: int = 2000, n_eval: int = 40, digits: int = 2, seed: int = 0, k_demos: int = 2
) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "eval": [...]} rows {"prompt": question, "answer": sum}; disjoint, demos excluded."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    demo_pairs = set(_pairs(digits, seed, k_demos, set(), "demos"))
    ev = _pairs(digits, seed, n_eval, demo_pairs, "eval")
    tr = _pairs(digits, seed, n_train, demo_pairs | set(ev), "train")

    def rows(pairs):
        return [{"prompt": question(a, b), "answer": str(a + b)} for a, b in pairs]

    return {"train": rows(tr), "eval": rows(ev)}


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
    "QUESTION",
    "contains_reward",
    "demonstrations",
    "exact_reward",
    "make_splits",
    "parse_answer",
    "question",
    "render",
    "solve",
    "student_messages",
    "teacher_messages",
]
