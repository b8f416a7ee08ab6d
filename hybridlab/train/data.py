"""Prompt data: JSONL rows, a resumable shuffled order, and the per-step sampling seed."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

# A prompt row: {"prompt": str, "answer": str | None[, "teacher_messages": [{"role": str, "content": str}, ...]]}
Row = dict


def load_prompts(path: str | os.PathLike) -> list[Row]:
    """Rows {"prompt": str, "answer": str | None} from a JSONL file; ValueError naming the bad line."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f'prompts {str(p)!r} is a folder: give a JSONL file, one {{"prompt": ...}} per line')
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
                raise ValueError(
                    f'{p}:{i}: each line must be an object with a string "prompt", got {line.strip()[:80]!r}'
                )
            rows.append(as_row(r))
    if not rows:
        raise ValueError(f"prompts file {str(p)!r} has no rows")
    return rows


def as_row(x: str | dict) -> Row:
    """A prompt string or a mapping with "prompt" (and optionally "answer", "teacher_messages") as a row.

    "teacher_messages": the teacher's own whole chat for this row (e.g. worked examples as earlier user/assistant
    turns, then the student's question as the last user turn), rendered with the chat template
    (chat_template=true): the teacher scores the student's response after it (context distillation)."""
    if isinstance(x, str):
        return {"prompt": x, "answer": None}
    a = x.get("answer")
    row = {"prompt": x["prompt"], "answer": None if a is None else str(a)}
    tm = x.get("teacher_messages")
    if tm is not None:
        ok = (
            isinstance(tm, list)
            and tm
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in tm
            )
        )
        if not ok:
            raise ValueError(
                'teacher_messages must be a non-empty list of {"role": str, "content": str}, got '
                f"{str(tm)[:80]!r} (row with prompt {x['prompt'][:60]!r})"
            )
        row["teacher_messages"] = [{"role": m["role"], "content": m["content"]} for m in tm]
    return row


def rows_digest(rows: list[Row]) -> str:
    """sha256 of the rows (a resumed run warns when its prompts changed)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


class PromptOrder:
    """Shuffled epochs over n prompts from a seed; the whole state is the number of prompts consumed."""

    def __init__(self, n: int, seed: int, consumed: int = 0):
        self.n, self.seed, self.consumed = n, seed, consumed
        self._perm: tuple[int, list[int]] | None = None

    def _epoch(self, e: int) -> list[int]:
        if self._perm is None or self._perm[0] != e:
            order = list(range(self.n))
            random.Random(f"hybridlab-prompts:{self.seed}:{e}").shuffle(order)
            self._perm = (e, order)
        return self._perm[1]

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            e, i = divmod(self.consumed, self.n)
            out.append(self._epoch(e)[i])
            self.consumed += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, st: dict[str, int]) -> None:
        if int(st["n"]) != self.n or int(st["seed"]) != self.seed:
            raise ValueError(
                f"checkpoint's data order is over {st['n']} prompts with seed {st['seed']}, this run has "
                f"{self.n} prompts and seed {self.seed}: resume with the same prompts file and seed"
            )
        self.consumed = int(st["consumed"])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of a step's sampling on one process (well mixed; independent of the world size)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
