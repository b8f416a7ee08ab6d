"""Benchmarks for the dense KL: `python -m hybridlab.bench dense [--cpu] [--sizes N:V ...] [--dtype bf16]`.

Prints one table per workload: forward + backward time (median), peak memory (after warm-up), achieved
bandwidth against the bytes the algorithm must move, and how many times faster the Triton dense_kl (through its
autograd Function) is than each method. The kernel alone (one launch writing KL and gradient into preallocated
buffers, as `tune` times it) is reported beside it.

Byte model (dense): the KL and its gradient must read the student logits z and the teacher logits t once and
write the gradient once: 3 * N * V * elem bytes (elem = 2 for bf16). Any method that moves more (a second
read of the row, fp32 intermediates, autograd buffers) shows up as a lower GB/s. The copy bandwidth line is a
`copy_` between two large tensors (read + write), the practical ceiling for a streaming kernel on this device.

Fused linear (`--fused`, default on CUDA): N tokens, hidden H, vocabulary V, teacher given as its own hidden
states + head. The matmuls it must do are four [N, H] x [H, V] products (student logits, teacher logits,
grad hidden, grad weight); their standalone time is reported as the floor.

`python -m hybridlab.bench fused --fused-size N:V:H` prints the fused-linear table alone.
`python -m hybridlab.bench hybrid [--sizes N:V] [--fused-size N:V:H]` times the complete `hybrid_loss` forward +
backward (torch, Triton, fused linear) against an autograd surrogate and TRL's path, with the byte model and the
CPU targets (`hybridlab.bench.hybrid`).
`python -m hybridlab.bench tune` (CUDA) sweeps the kernel's block size and warps at one size.

Methods are skipped with a note where a package is not installed (Liger-Kernel, TRL) or a size does not fit.
On CPU the Triton kernel runs through its interpreter: its times there say nothing about GPU speed.

Fairness: torch.compile gets a fresh dynamo cache per size (otherwise the 9th shape hits the recompile limit and
silently runs eager) and the row fails if no graph was compiled for that size; Liger's JSD takes log-probs, so
its row includes a torch log_softmax forward + backward of both inputs (end to end) and records Liger's version
and the autograd node its output came from; peak memory is measured on a call after the warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SIZES = [(n, v) for n in (1024, 4096, 8192) for v in (32000, 128256, 152064)]
CPU_SIZES = [(64, 4096), (16, 32000)]
GPU_FUSED = (8192, 128256, 4096)
CPU_FUSED = (256, 4096, 256)


@dataclass
class Result:
    method: str
    ms: float | None = None
    peak_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Method:
    """A benchmarked method: fn(z, t) -> something to .sum().backward() through z, or (raw=True) a function
    of (z, t, grad_buffer) that does all the work itself. `note()` is printed beside the row after it ran."""

    fn: Callable
    raw: bool = False
    note: Callable[[], str] = lambda: ""


# ---- measurement -------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], None], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of step() in ms: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory allocated by one step above what was live before it (MB); None on CPU (not tracked)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, reps: int) -> float:
    """GB/s of y.copy_(x) (one read + one write, like a clone into a preallocated buffer) on tensors large
    enough to defeat the caches: the practical ceiling for a streaming kernel."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    x = torch.ones(n // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, reps, 2)
    return 2 * n / (ms * 1e-3) / 1e9


def _measure(name: str, make_step, device, reps, warmup, note=lambda: "") -> Result:
    """make_step() builds the inputs and returns a fwd+bwd closure; failures become a note, not a crash.
    Warm-up first (compilation, autotuning, allocator growth), then peak memory of one call, then the timing."""
    try:
        step = make_step()
        for _ in range(max(warmup, 1)):
            step()
        mem = peak_mb(step, device)
        ms = time_ms(step, device, reps, 0)
        return Result(name, ms, mem, note=note())
    except torch.cuda.OutOfMemoryError:
        return Result(name, note="out of memory")
    except Exception as e:  # an optional baseline with another API version: report, keep going
        return Result(name, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- dense: methods ------------------------------------------------------------------------------------------


TRITON_AUTOGRAD = "triton dense_kl (autograd)"


def compiled_reference(backend: str = "inductor", reset: bool = True) -> Callable:
    """torch.compile(dense_kl_reference) for one size, refusing to run eager without saying so.

    With `reset` the dynamo cache starts empty (each size compiles its own graph; without it the 9th shape
    passes dynamo's recompile limit and silently falls back to eager). The returned function raises if no
    graph was compiled since this call (fullgraph=True: a graph break raises too)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ..dense import dense_kl_reference

    if reset:
        torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dense_kl_reference, dynamic=False, fullgraph=True, backend=backend)

    def fn(z, t):
        out = compiled(z, t)
        if counters["stats"]["unique_graphs"] < 1:
            raise RuntimeError("torch.compile ran eager (no graph compiled for this size)")
        return out

    return fn


def _liger_jsd():
    """Liger's JSD(beta=1) = KL(student || teacher) on log-probs, end to end from logits, with a note of the
    version and the autograd node its output came from (its Triton Function, or whatever it dispatched to)."""
    from importlib.metadata import version

    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0)
    seen = {}

    def fn(z, t):
        out = jsd(torch.log_softmax(z.float(), -1), torch.log_softmax(t.float(), -1))
        seen["node"] = type(out.grad_fn).__name__ if out.grad_fn is not None else "no grad_fn"
        return out

    note = lambda: (
        f"end to end: + torch log_softmax fwd/bwd of z and t (fp32); liger-kernel {version('liger-kernel')}, "
        f"output from {seen.get('node', '?')}"
    )
    return Method(fn, note=note)


def dense_methods(device: torch.device, with_triton: bool) -> dict[str, Method | str]:
    """name -> Method, or a note why it is absent. Built per size (torch.compile gets a fresh cache each time)."""
    from ..dense import dense_kl, dense_kl_reference

    methods: dict[str, Method | str] = {}
    if with_triton:
        from ..kernels.dense_kl_triton import dense_kl_triton_impl

        methods[TRITON_AUTOGRAD] = Method(lambda z, t: dense_kl(z, t, backend="triton"))
        methods["triton kernel alone"] = Method(
            lambda z, t, g: dense_kl_triton_impl(z, t, None, 1.0, True, None, out=g),
            raw=True,
            note=lambda: "one launch: KL + gradient into a preallocated buffer, no autograd",
        )
    else:
        methods[TRITON_AUTOGRAD] = "skipped (size too large for the CPU interpreter)"
        methods["triton kernel alone"] = "skipped (size too large for the CPU interpreter)"
    methods["torch closed form"] = Method(lambda z, t: dense_kl(z, t, backend="torch"))
    methods["autograd log_softmax"] = Method(dense_kl_reference)
    if device.type == "cuda":
        try:
            methods["torch.compile(autograd)"] = Method(compiled_reference())
        except Exception as e:
            methods["torch.compile(autograd)"] = f"failed: {type(e).__name__}: {e}"[:90]
    else:
        methods["torch.compile(autograd)"] = "skipped on CPU (GPU baseline)"
    try:
        methods["liger JSD(beta=1) end to end"] = _liger_jsd()
    except Exception:
        methods["liger JSD(beta=1) end to end"] = "not installed (pip install liger-kernel)"
    return methods


def bench_dense(device, sizes, dtype, reps, warmup, interp_max_elems) -> list[tuple[int, int, list[Result]]]:
    out = []
    for n, v in sizes:
        with_triton = device.type == "cuda" or n * v <= interp_max_elems
        results = []
        for name, m in dense_methods(device, with_triton).items():
            if isinstance(m, str):
                results.append(Result(name, note=m))
                continue

            def make_step(m=m, n=n, v=v):
                g = torch.Generator(device=device).manual_seed(0)
                z = (3 * torch.randn(n, v, device=device, generator=g)).to(dtype)
                t = (3 * torch.randn(n, v, device=device, generator=g)).to(dtype)
                if m.raw:
                    buf = torch.empty_like(z)
                    return lambda: m.fn(z, t, buf)
                z.requires_grad_(True)

                def step():
                    m.fn(z, t).sum().backward()
                    z.grad = None

                return step

            results.append(_measure(name, make_step, device, reps, warmup, m.note))
        out.append((n, v, results))
    return out


# ---- fused linear ------------------------------------------------------------------------------------------


def fused_methods(device: torch.device) -> dict[str, Method | str]:
    """name -> fn(h, w, th, tw) returning something to .sum().backward() through h and w."""
    from ..dense import dense_kl, dense_kl_reference
    from ..fused_linear import fused_linear_dense_kl

    backend = "triton" if device.type == "cuda" else "torch"
    methods: dict[str, Method | str] = {
        f"fused linear ({backend})": Method(
            lambda h, w, th, tw: fused_linear_dense_kl(h, w, (th, tw), backend=backend)
        ),
        f"materialised + dense_kl ({backend})": Method(
            lambda h, w, th, tw: dense_kl(h @ w.t(), th @ tw.t(), backend=backend)
        ),
        "materialised + autograd": Method(lambda h, w, th, tw: dense_kl_reference(h @ w.t(), th @ tw.t())),
    }
    try:
        from importlib.metadata import version

        from liger_kernel.transformers import LigerFusedLinearJSD

        ljsd = LigerFusedLinearJSD(jsd_beta=1.0)
        methods["liger fused-linear JSD(beta=1)"] = Method(
            lambda h, w, th, tw: ljsd(h, w, th, tw), note=lambda: f"liger-kernel {version('liger-kernel')}"
        )
    except Exception:
        methods["liger fused-linear JSD(beta=1)"] = "not installed (pip install liger-kernel)"
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def trl_fn(h, w, th, tw):
            div, _entropy = ChunkedDivergenceFunction.apply(h, w, None, th, tw, None, 1.0, 1.0)
            return div

        from importlib.metadata import version

        methods["trl chunked divergence(beta=1)"] = (
            Method(trl_fn, note=lambda: f"trl {version('trl')}")
            if device.type == "cuda"
            else "skipped on CPU (Triton)"
        )
    except Exception:
        methods["trl chunked divergence(beta=1)"] = "not installed (TRL >= 1.16)"
    return methods


def bench_fused(device, size, dtype, reps, warmup):
    n, v, h = size
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, device=device, generator=g)).to(dtype)
    hid, th = mk(n, h), mk(n, h)
    w, tw = mk(v, h, scale=h**-0.5 * 3), mk(v, h, scale=h**-0.5 * 3)
    results = []
    for name, m in fused_methods(device).items():
        if isinstance(m, str):
            results.append(Result(name, note=m))
            continue

        def make_step(fn=m.fn):
            hh = hid.detach().requires_grad_(True)
            ww = w.detach().requires_grad_(True)

            def step():
                fn(hh, ww, th, tw).sum().backward()
                hh.grad = ww.grad = None

            return step

        results.append(_measure(name, make_step, device, reps, warmup, m.note))

    def matmuls():  # the four [N, H] x [H, V] products any exact method must do
        logits = hid @ w.t()
        _ = th @ tw.t()
        _ = logits @ w
        _ = logits.t() @ hid

    floor = time_ms(matmuls, device, reps, warmup)
    return results, floor


# ---- tables ------------------------------------------------------------------------------------------------


def _fmt(x, spec):
    """format(x, spec), or a '-' padded to the same width when x is missing."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[
        dtype
    ]


def print_dense_table(device_name, dtype, rows, copy_gbs, file=None):
    file = file or sys.stdout  # looked up per call: a default bound at import misses a redirected stdout
    elem = torch.empty((), dtype=dtype).element_size()
    print(f"# dense KL fwd+bwd on {device_name}, {_short(dtype)}", file=file)
    print(
        f"# byte model 3*N*V*{elem} B (read z, read t, write grad); copy bandwidth {copy_gbs:.1f} GB/s (copy_)",
        file=file,
    )
    head = (
        f"| {'device':<22} | {'N':>5} | {'V':>6} | {'dtype':<5} | {'method':<28} | {'ms':>9} | {'peak MB':>8} "
        f"| {'GB/s':>7} | {'% copy':>6} | {'triton x':>8} | note"
    )
    print(head, file=file)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:]), file=file)
    for n, v, results in rows:
        tri = next((r.ms for r in results if r.method == TRITON_AUTOGRAD and r.ms), None)
        for r in results:
            gbs = 3 * n * v * elem / (r.ms * 1e-3) / 1e9 if r.ms else None
            pct = 100 * gbs / copy_gbs if gbs else None
            ratio = r.ms / tri if (r.ms and tri) else None  # how many times the kernel is faster
            print(
                f"| {device_name[:22]:<22} | {n:>5} | {v:>6} | {_short(dtype):<5} | {r.method:<28} | "
                f"{_fmt(r.ms, '9.3f')} | {_fmt(r.peak_mb, '8.0f')} | {_fmt(gbs, '7.2f')} | {_fmt(pct, '6.1f')} "
                f"| {_fmt(ratio, '8.2f')} | {r.note}",
                file=file,
            )


def print_fused_table(device_name, dtype, size, results, floor_ms, file=None):
    file = file or sys.stdout
    n, v, h = size
    print(f"\n# fused linear KL fwd+bwd on {device_name}: N={n}, V={v}, H={h}, {_short(dtype)}", file=file)
    print(f"# matmul floor (4 x [N,H]x[H,V] products, standalone): {floor_ms:.3f} ms", file=file)
    head = f"| {'method':<34} | {'ms':>9} | {'peak MB':>8} | {'x floor':>7} | {'fused x':>7} | note"
    print(head, file=file)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:]), file=file)
    ours = next((r.ms for r in results if r.method.startswith("fused linear") and r.ms), None)
    for r in results:
        print(
            f"| {r.method:<34} | {_fmt(r.ms, '9.3f')} | {_fmt(r.peak_mb, '8.0f')} | "
            f"{_fmt(r.ms / floor_ms if r.ms else None, '7.2f')} | "
            f"{_fmt(r.ms / ours if (r.ms and ours) else None, '7.2f')} | {r.note}",
            file=file,
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"


def _parse_sizes(items, fused=False):
    out = []
    for s in items:
        parts = [int(p) for p in s.split(":")]
        if len(parts) != (3 if fused else 2):
            raise SystemExit(f"--sizes takes N:V items (--fused-size N:V:H), got {s!r}")
        out.append(tuple(parts))
    return out


# ---- kernel launch sweep (GPU) -----------------------------------------------------------------------------


def tune(device, n, v, dtype, reps):
    from ..kernels.dense_kl_triton import dense_kl_triton_impl

    z = torch.randn(n, v, device=device).to(dtype)
    t = torch.randn(n, v, device=device).to(dtype)
    grad = torch.empty_like(z)
    elem = z.element_size()
    print(f"# dense kernel launch sweep on {_device_name(device)}: N={n}, V={v}, {_short(dtype)}")
    print(f"| {'BLOCK':>6} | {'warps':>5} | {'ms':>8} | {'GB/s':>7} |")
    print("|--------|-------|----------|---------|")
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]:
        ms = time_ms(
            lambda b=block, w=warps: dense_kl_triton_impl(
                z, t, None, 1.0, True, None, block=b, num_warps=w, out=grad
            ),
            device,
            reps,
            3,
        )
        print(f"| {block:>6} | {warps:>5} | {ms:8.3f} | {3 * n * v * elem / ms / 1e6:7.1f} |")


# ---- entry point -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hybridlab.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "what", choices=["dense", "fused", "tune", "hybrid"], help="fused: the fused-linear table only"
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU with tiny sizes (default without CUDA)")
    p.add_argument("--sizes", nargs="+", help="N:V pairs (default: the standard grid on GPU, tiny on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None, help="fused-linear table")
    p.add_argument("--fused-size", help="N:V:H for the fused-linear table")
    p.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads (default 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        # Before anything imports triton: the kernel then runs through its CPU interpreter (slow; correctness only).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # One thread by default: OpenMP's spinning barriers make multi-threaded timings erratic on a shared box.
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if cpu else "cuda")
    dtype = DTYPES[args.dtype or ("fp32" if cpu else "bf16")]
    reps = args.reps or (5 if cpu else 20)
    warmup = 1 if cpu else 3
    name = _device_name(device)

    if args.what == "hybrid":
        from .hybrid import main_hybrid

        main_hybrid(args, device, dtype, name)
        return

    if args.what == "tune":
        if cpu:
            raise SystemExit("tune needs a CUDA GPU")
        n, v = _parse_sizes(args.sizes)[0] if args.sizes else (8192, 152064)
        tune(device, n, v, dtype, reps)
        return

    if args.what == "dense":
        sizes = _parse_sizes(args.sizes) if args.sizes else (CPU_SIZES if cpu else GPU_SIZES)
        copy_gbs = copy_bandwidth_gbs(device, reps)
        rows = bench_dense(device, sizes, dtype, reps, warmup, interp_max_elems=1 << 20)
        print_dense_table(name, dtype, rows, copy_gbs)
        if cpu:
            print(
                "# CPU: the Triton kernel runs in its interpreter here; its time is not a speed measurement."
            )
    if args.what == "fused" or (args.fused if args.fused is not None else True):
        fsize = (
            _parse_sizes([args.fused_size], fused=True)[0]
            if args.fused_size
            else (CPU_FUSED if cpu else GPU_FUSED)
        )
        results, floor = bench_fused(device, fsize, dtype, reps, warmup)
        print_fused_table(name, dtype, fsize, results, floor)


if __name__ == "__main__":
    main()
