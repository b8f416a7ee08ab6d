"""The benchmark harness compares fairly (issue 17) and `make bench-gpu` is ready to run (issue 13).

No timing is asserted anywhere: these tests check what is measured and how, never how fast."""

import sys
import types
from pathlib import Path

import pytest
import torch

import hybridlab.bench as bench

ROOT = Path(__file__).resolve().parent.parent


def _run_gpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run_gpu
    finally:
        sys.path.pop(0)
    return run_gpu


def test_bench_gpu_dry_run_prints_every_step_and_writes_nothing(capsys):
    run_gpu = _run_gpu()
    before = run_gpu.RESULTS.read_bytes()
    assert run_gpu.main(["--dry-run", "--python", sys.executable]) == 0
    out = capsys.readouterr().out
    for step in run_gpu.plan(sys.executable):
        assert f"[dry-run] {step.name}: " in out, step.name
    for needle in ("-m gpu", "bench dense", "8192:50257", "bench tune", "bench fused", "train_throughput.py",
                   "hybridlab.train --config", "fused_true", "## GPU run", "<device name>"):  # fmt: skip
        assert needle in out, needle
    assert run_gpu.RESULTS.read_bytes() == before  # a dry run appends nothing


def test_bench_gpu_dry_run_catches_a_wrong_benchmark_flag(monkeypatch):
    """Negative control: the dry run really parses each benchmark's arguments."""
    run_gpu = _run_gpu()
    real = run_gpu.plan

    def broken(py):
        steps = real(py)
        steps[1].argv.append("--no-such-flag")
        return steps

    monkeypatch.setattr(run_gpu, "plan", broken)
    with pytest.raises(SystemExit):
        run_gpu.main(["--dry-run", "--python", sys.executable])


def test_bench_gpu_section_records_device_steps_and_failures():
    run_gpu = _run_gpu()
    steps = run_gpu.plan("/venv/bin/python")
    records = [(steps[0], 0, 12.3, "x\n1 passed"), (steps[1], 1, 4.0, "boom"), (steps[2], None, 40.0, "t")]
    records.append((steps[3], -999, 0.0, ""))
    text = run_gpu.section("NVIDIA H100 80GB HBM3", "torch 2.13.0", records, "2026-01-01 00:00 UTC")
    assert "## GPU run 2026-01-01 00:00 UTC on NVIDIA H100 80GB HBM3" in text
    names = [s.name for s in steps[:4]]
    assert names == ["tests", "hybrid", "dense", "tune"]  # the priority order (each gets what is left)
    assert "| tests | 0 | 12 | `python -m pytest" in text and "| hybrid | 1 |" in text
    assert "| dense | timeout |" in text and "| tune | not run |" in text
    assert "1 passed" in text and "boom" in text and "/venv/bin" not in text


def test_compile_gets_a_fresh_cache_per_size_and_never_runs_eager_silently():
    """Ten shapes, one after another, each compiled (dynamo's recompile limit is 8). The negative control, the
    same without the reset, fails at the 9th shape instead of silently running eager."""
    for i in range(10):
        fn = bench.compiled_reference(backend="eager")
        fn(torch.randn(2, 10 + i), torch.randn(2, 10 + i))
    from torch._dynamo import reset

    reset()
    done = []
    with pytest.raises(Exception) as err:  # noqa: B017 - dynamo's hard failure, or the harness's own
        for i in range(10):
            fn = bench.compiled_reference(backend="eager", reset=False)
            fn(torch.randn(2, 10 + i), torch.randn(2, 10 + i))
            done.append(i)
    reset()
    assert len(done) == 8, done
    assert "RecompileLimit" in type(err.value).__name__ or "eager" in str(err.value), repr(err.value)


def test_peak_memory_is_measured_after_the_warm_up(monkeypatch):
    calls = []
    peaks = []
    monkeypatch.setattr(bench, "peak_mb", lambda step, device: peaks.append(len(calls)) or 1.0)
    r = bench._measure("m", lambda: lambda: calls.append(1), torch.device("cpu"), reps=2, warmup=3)
    assert peaks == [3] and r.peak_mb == 1.0 and r.ms is not None  # 3 warm-up calls before the peak


def test_dense_methods_are_named_for_what_they_measure(monkeypatch):
    """No 'bytes-equal' kl_div row (other maths, other bytes); the kernel alone beside the autograd path; the
    Liger JSD row says it is end to end and records Liger's version and the node its output came from."""
    fake = types.ModuleType("liger_kernel.transformers")

    class LigerJSD:
        def __init__(self, beta):
            self.beta = beta

        def __call__(self, a, b):
            return (a.exp() * (a - b)).sum(-1)

    fake.LigerJSD = LigerJSD
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda p: "9.9.9" if p == "liger-kernel" else "0")
    methods = bench.dense_methods(torch.device("cpu"), with_triton=True)
    assert not any("bytes-equal" in k or "kl_div" in k for k in methods)
    assert bench.TRITON_AUTOGRAD in methods and methods["triton kernel alone"].raw
    rows = bench.bench_dense(torch.device("cpu"), [(2, 40)], torch.float32, 1, 1, interp_max_elems=1 << 20)
    by = {r.method: r for r in rows[0][2]}
    liger = by["liger JSD(beta=1) end to end"]
    assert liger.ms is not None, liger.note
    assert "liger-kernel 9.9.9" in liger.note and "log_softmax" in liger.note and "SumBackward" in liger.note
    assert by["triton kernel alone"].ms is not None and by[bench.TRITON_AUTOGRAD].ms is not None


def test_hybrid_gpu_targets_are_judged_from_the_rows():
    """The GPU lines of the hybrid table: bandwidth against the 5U model and the TRL comparison, met and missed."""
    import io

    from hybridlab.bench.hybrid import print_targets

    n, v, elem = 8192, 152064, 2
    ms_at_copy = 5 * n * v * elem / 1e9 / 1000.0 * 1e3  # ms that 5U takes at 1000 GB/s
    rows = [("hybrid_loss (triton)", ms_at_copy / 0.7, 1.0, 0.0, ""),
            ("trl GRPO + GKD jsd(beta=1)", ms_at_copy * 3, 1.0, 50.0, "")]  # fmt: skip
    out = io.StringIO()
    print_targets(rows, None, file=out, gpu=(n, v, elem, 1000.0))
    text = out.getvalue()
    assert "70%" in text and text.count("| met |") == 3  # bandwidth, TRL, bytes outside the kernels
    slow = [("hybrid_loss (triton)", ms_at_copy / 0.5, 1.0, 0.0, ""), rows[1]]
    out = io.StringIO()
    print_targets(slow, None, file=out, gpu=(n, v, elem, 1000.0))
    assert "50%" in out.getvalue() and "MISSED" in out.getvalue()  # negative control


def test_compiled_rows_are_judged_like_the_torch_path():
    """The compiled path's lines: speed-up and memory against autograd, bytes (aten + generated) against 12U."""
    import io

    from hybridlab.bench.hybrid import print_targets

    auto = ("autograd surrogate", 100.0, 1000.0, 36.0, "")
    good = ("hybrid_loss (compiled)", 20.0, 200.0, 5.0, "")
    out = io.StringIO()
    print_targets([auto, good], None, file=out)
    lines = [x for x in out.getvalue().splitlines() if "compiled" in x]
    assert len(lines) == 3 and all(x.endswith("| met |") for x in lines), lines
    bad = ("hybrid_loss (compiled)", 80.0, 500.0, 14.0, "")
    out = io.StringIO()
    print_targets([auto, bad], None, file=out)
    lines = [x for x in out.getvalue().splitlines() if "compiled" in x]
    assert len(lines) == 3 and all(x.endswith("| MISSED |") for x in lines), lines  # negative control
