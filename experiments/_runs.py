"""What the experiment programs share: their argument parser, the flags of the objective J, the --shipped / --out
rule, an atomic JSON writer and the resumable loop over runs (one JSON file per finished run).

Kept free of torch and hybridlab imports, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m <prog>`: `description` (the module docstring) kept as written, defaults shown."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)


def add_objective_args(ap: argparse.ArgumentParser) -> None:
    """--lam, --beta (the weights of J = lam E[R] - beta KL) and --lr, with the defaults every study uses."""
    ap.add_argument("--lam", type=float, default=3.0, help="weight of the task reward in J")
    ap.add_argument("--beta", type=float, default=1.0, help="weight of the KL to the teacher in J")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")


def resolve_out(
    ap: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    shipped: Path,
    shipped_text: str,
    default: str,
    data_dir: Path,
    regenerate: str = "regenerate it",
) -> None:
    """Set `args.out`: `shipped` with --shipped, else --out, else `default`. Tracked data are rewritten only on
    purpose: --shipped together with --out, or an --out inside `data_dir` without --shipped, is a usage error
    (`shipped_text` names the shipped file in the message)."""
    if args.shipped and args.out is not None:
        ap.error(f"--shipped writes {shipped_text}: give either --shipped or --out")
    args.out = str(shipped) if args.shipped else (args.out or default)
    if Path(args.out).resolve().is_relative_to(data_dir.resolve()) and not args.shipped:
        ap.error(f"--out {args.out} lies in the shipped data/ folder: pass --shipped to {regenerate}")


def write_json(path: Path, obj: dict) -> None:
    """Atomic: a reader (or a crash) never sees a half-written file (a temporary file per process, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def resumable_runs(
    jobs: Iterable[tuple], path_of: Callable[..., Path], run: Callable[..., dict]
) -> Iterator[tuple[tuple, dict, bool]]:
    """(job, record, new) for each job in order: the record is read back from `path_of(*job)` where an earlier,
    interrupted invocation finished that run, else `run(*job)` computes it and it is written (atomically) before
    it is yielded, so that a stopped study resumes where it stopped and loses at most the run in progress."""
    for job in jobs:
        path = path_of(*job)
        if path.exists():
            yield job, json.loads(path.read_text()), False
        else:
            rec = run(*job)
            write_json(path, rec)
            yield job, rec, True


def progress(records: list[dict], jobs: list) -> dict:
    """The fields a partial results file carries: whether runs are missing, how many are done, their wall time."""
    return {
        "partial": len(records) < len(jobs),
        "runs_done": len(records),
        "runs_planned": len(jobs),
        "run_wall_s": round(sum(r["wall_s"] for r in records), 1),
    }
