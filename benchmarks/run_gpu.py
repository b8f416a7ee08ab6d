"""Every GPU figure in one command: `make bench-gpu` (or `python benchmarks/run_gpu.py`), about 8 minutes on one H100.

Steps, in order of priority (each gets what is left of --budget seconds, capped by its own limit):

1. install   the `bench` extra of pyproject.toml (liger-kernel, trl) when they do not import yet; torch itself
             comes from `make install` (TORCH_SPEC). No network is fine: the optional rows then say so.
2. tests     the GPU-marked tests (`pytest -m gpu`): the kernel against torch and the fp64 truth at real sizes.
3. hybrid    the complete `hybrid_loss` forward + backward at 8192 x 152064, bf16 (torch, compiled (Inductor's
             Triton code; its first call compiles), Triton, autograd through the same surrogate, TRL's GRPO + GKD
             loss), the fused-linear hybrid table, and the targets: Triton against copy bandwidth (5U model) and
             against TRL.
4. dense     the dense-KL grid (incl. the odd vocabulary 50257), bf16: Triton dense_kl (autograd) and the
             kernel alone, torch closed form, autograd, torch.compile, Liger JSD end to end.
5. tune      the kernel's (BLOCK, num_warps) sweep at 8192 x 152064.
6. fused     the fused-linear tables against materialised logits, Liger's fused-linear JSD, TRL's chunked divergence.
7. train     training throughput and peak memory, fused_linear false / true (benchmarks/train_throughput.py).

Each step's output is shown live and kept; at the end one dated section with the device's name, the versions
and every table is appended to benchmarks/RESULTS.md (existing text is never rewritten). A failing step is
recorded with its exit code and the run goes on. `--dry-run` prints every step (commands, limits, the section
header it would write), checks the benchmark arguments and the training configs, and runs nothing on a GPU.

This file uses only the standard library at import time: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DENSE_SIZES = ["4096:32000", "8192:50257", "8192:128256", "8192:152064"]
FUSED_SIZES = ["8192:128256:4096", "8192:151936:896"]
TRAIN_ARGS = ["--steps", "6", "--skip", "2", "--max-new-tokens", "128"]


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: int  # the most this step may take, whatever budget is left
    what: str
    env: dict[str, str] = field(default_factory=dict)
    keep_tail: int = 200  # lines of output written to RESULTS.md


def plan(py: str) -> list[Step]:
    bench = [py, "-m", "hybridlab.bench"]
    steps = [
        Step(
            "tests",
            [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:randomly", "tests"],
            150,
            "GPU-marked tests (kernel vs torch and the fp64 truth at real sizes)",
            keep_tail=15,
        ),
        Step(
            "hybrid",
            [*bench, "hybrid", "--sizes", "8192:152064"],
            150,  # the compiled row's first call compiles (Inductor generates and tunes Triton code)
            "complete hybrid_loss fwd+bwd (torch / compiled / triton / autograd / TRL), fused-linear hybrid, targets",
        ),  # fmt: skip
        Step("dense", [*bench, "dense", "--no-fused", "--sizes", *DENSE_SIZES], 170, "dense-KL grid, bf16"),
        Step("tune", [*bench, "tune", "--sizes", "8192:152064"], 40, "kernel launch sweep"),
    ]
    for s in FUSED_SIZES:
        steps.append(Step(f"fused {s}", [*bench, "fused", "--fused-size", s], 60, "fused-linear table"))
    steps.append(
        Step(
            "train",
            [py, "benchmarks/train_throughput.py", *TRAIN_ARGS],
            240,
            "training tokens/s and peak memory (Qwen2-0.5B-shaped student, 1.5B-shaped teacher)",
            keep_tail=12,
        )
    )
    return steps


def _probe(py: str, code: str) -> str | None:
    """stdout of `py -c code`, or None if it fails (used before and after installing)."""
    try:
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


VERSIONS = """
import importlib.metadata as m, torch
def v(p):
    try: return m.version(p)
    except Exception: return "not installed"
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(dev); print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {v('triton')}, "
      f"liger-kernel {v('liger-kernel')}, trl {v('trl')}, transformers {v('transformers')}")
"""


def install_step(py: str) -> Step | None:
    """pip install -e .[bench] when liger-kernel or trl does not import (None: nothing to install)."""
    if _probe(py, "import liger_kernel, trl") is not None:
        return None
    return Step("install", [py, "-m", "pip", "install", "-q", "-e", ".[bench]"], 180, "the bench extra")


def run_step(step: Step, timeout: float) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, seconds, output) of one step, its output streamed as it comes."""
    t0 = time.monotonic()
    lines: list[str] = []
    env = {**os.environ, **step.env}
    env.pop("TRITON_INTERPRET", None)  # the real kernels, not the CPU interpreter
    proc = subprocess.Popen(
        step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
            if time.monotonic() - t0 > timeout:
                raise subprocess.TimeoutExpired(step.argv, timeout)
        rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    return rc, time.monotonic() - t0, "\n".join(lines)


def section(device: str, versions: str, records: list[tuple[Step, int | None, float, str]], now: str) -> str:
    """The Markdown appended to RESULTS.md: a summary table of the steps, then each step's output."""
    out = [
        f"\n## GPU run {now} on {device} (`make bench-gpu`)\n",
        f"{versions}. Command per step below; tables as printed (bf16 unless a table says otherwise).\n",
        "| step | exit | seconds | command |",
        "|---|---:|---:|---|",
    ]
    for step, rc, secs, _ in records:
        code = "timeout" if rc is None else ("not run" if rc == -999 else str(rc))
        out.append(f"| {step.name} | {code} | {secs:.0f} | `{shlex.join(_rel(step.argv))}` |")
    for step, rc, _, text in records:
        if rc == -999:
            continue
        tail = "\n".join(text.splitlines()[-step.keep_tail :])
        out += [f"\n### {step.name}: {step.what}\n", "```text", tail, "```"]
    return "\n".join(out) + "\n"


def _rel(argv: list[str]) -> list[str]:
    """argv with the interpreter shown as `python` (the path is the machine's business)."""
    return ["python", *argv[1:]] if argv and "python" in Path(argv[0]).name else argv


def dry_run(py: str, steps: list[Step], budget: float, results: Path) -> int:
    """Print the plan, check every benchmark's arguments and the training configs, run nothing."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput

    from hybridlab.bench import build_parser

    inst = install_step(py)
    print(f"[dry-run] budget {budget:.0f} s; results would be appended to {results}")
    if inst is None:
        print("[dry-run] install: skipped (liger-kernel and trl already import)")
    else:
        print(f"[dry-run] install: {shlex.join(inst.argv)}   (limit {inst.limit_s} s)")
    for s in steps:
        print(f"[dry-run] {s.name}: {shlex.join(s.argv)}   (limit {s.limit_s} s; {s.what})")
        if s.argv[1:3] == ["-m", "hybridlab.bench"]:
            build_parser().parse_args(s.argv[3:])  # a wrong flag fails here, not on the GPU
        elif s.name == "train":
            train_throughput.main([*s.argv[2:], "--dry-run"])
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    dummy = [(s, -999, 0.0, "") for s in steps]
    print("[dry-run] section header it would append:")
    print(section("<device name>", "<versions>", dummy, now))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print every step, check arguments, run nothing")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the project's environment")
    ap.add_argument(
        "--budget", type=float, default=480.0, help="seconds for all steps together (default 480)"
    )
    ap.add_argument("--only", nargs="+", help="run only the steps whose name starts with one of these")
    ap.add_argument("--no-install", action="store_true", help="never pip install (use what is there)")
    ap.add_argument("--results", default=str(RESULTS), help="Markdown file the dated section is appended to")
    args = ap.parse_args(argv)

    steps = plan(args.python)
    if args.only:
        steps = [s for s in steps if any(s.name.startswith(o) for o in args.only)]
    if args.dry_run:
        return dry_run(args.python, steps, args.budget, Path(args.results))

    info = _probe(args.python, VERSIONS)
    if info is None or info.splitlines()[0] == "no CUDA device":
        print("bench-gpu needs torch with a CUDA device in this environment (make install TORCH_SPEC=...);")
        print("use --dry-run to see the steps on a CPU machine.")
        return 2
    t_start = time.monotonic()
    records = []
    inst = None if args.no_install else install_step(args.python)
    if inst is not None:
        rc, secs, text = run_step(inst, inst.limit_s)
        records.append((inst, rc, secs, text))  # a failure (no network) is recorded; optional rows say so
        info = _probe(args.python, VERSIONS) or info
    device, versions = info.splitlines()[0], info.splitlines()[1]
    print(f"# {device}: {versions}", flush=True)
    for s in steps:
        left = args.budget - (time.monotonic() - t_start)
        if left < 10:
            records.append((s, -999, 0.0, ""))
            print(f"# {s.name}: not run (budget of {args.budget:.0f} s spent)", flush=True)
            continue
        print(f"\n# {s.name}: {shlex.join(s.argv)}", flush=True)
        rc, secs, text = run_step(s, min(s.limit_s, left))
        records.append((s, rc, secs, text))
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = section(device, versions, records, now)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(text)
    print(f"\n# appended the {device} section to {args.results} ({time.monotonic() - t_start:.0f} s in all)")
    return 0 if all(rc == 0 for _, rc, _, _ in records) else 1


if __name__ == "__main__":
    sys.exit(main())
