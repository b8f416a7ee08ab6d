"""Benchmarks for the dense KL: `python -m hybridlab.bench dense [--cpu] [--sizes N:V ...] [--dtype bf16]`.

Prints one table per workload: forward + backward time (median), peak memory, achieved bandwidth against the
bytes the algorithm must move, and how many times faster the Triton kernel is than each method.

Byte model (dense): the KL and its gradient must read the student logits z and the teacher logits t once and
write the gradient once: 3 * N * V * elem bytes (elem = 2 for bf16). Any method that moves more (a second
read of the row, fp32 intermediates, autograd buffers) shows up as a lower GB/s. The copy bandwidth line is a
`copy_` between two large tensors (read + write), the practical ceiling for a streaming kernel on this device.

Fused linear (`--fused`, default on CUDA): N tokens, hidden H, vocabulary V, teacher given as its own hidden
states + head. The matmuls it must do are four [N, H] x [H, V] products (student logits, teacher logits,
grad hidden, grad weight); their standalone time is reported as the floor.

`python -m hybridlab.bench tune` (CUDA) sweeps the kernel's block size and warps at one size.

Methods are skipped with a note where a package is not installed (Liger-Kernel, TRL) or a size does not fit.
On CPU the Triton kernel runs through its interpreter: its times there say nothing about GPU speed.
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


def _measure(name: str, make_step, device, reps, warmup) -> Result:
    """make_step() builds the inputs and returns a fwd+bwd closure; failures become a note, not a crash."""
    try:
        step = make_step()
        mem = peak_mb(step, device)
        ms = time_ms(step, device, reps, warmup)
        return Result(name, ms, mem)
    except torch.cuda.OutOfMemoryError:
        return Result(name, note="out of memory")
    except Exception as e:  # an optional baseline with another API version: report, keep going
        return Result(name, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- dense: methods ------------------------------------------------------------------------------------------


def dense_methods(device: torch.device, with_triton: bool) -> dict[str, Callable | str]:
    """name -> fn(z, t) returning something to .sum().backward() through z, or a note why it is absent."""
    from .dense import dense_kl, dense_kl_reference

    methods: dict[str, Callable | str] = {}
    if with_triton:
        methods["triton kernel"] = lambda z, t: dense_kl(z, t, backend="triton")
    else:
        methods["triton kernel"] = "skipped (size too large for the CPU interpreter)"
    methods["torch closed form"] = lambda z, t: dense_kl(z, t, backend="torch")
    methods["autograd log_softmax"] = dense_kl_reference
    if device.type == "cuda":
        compiled = torch.compile(dense_kl_reference, dynamic=False)
        methods["torch.compile(autograd)"] = compiled
    else:
        methods["torch.compile(autograd)"] = "skipped on CPU (GPU baseline)"
    try:
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=1.0)  # beta = 1: KL(student || teacher), inputs are log-probs
        methods["liger JSD(beta=1)"] = lambda z, t: jsd(
            torch.log_softmax(z.float(), -1), torch.log_softmax(t.float(), -1)
        )
    except Exception:
        methods["liger JSD(beta=1)"] = "not installed (pip install liger-kernel)"
    try:
        from liger_kernel.transformers import LigerKLDIVLoss

        kld = LigerKLDIVLoss(reduction="sum", log_target=True)
        # Its gradient flows to y_pred, KL(y_true || y_pred): the forward KL on given log-probs. Not the same
        # maths, but the same bytes (read two rows, write one): the closest pure-kernel comparison.
        methods["liger kl_div (bytes-equal)"] = lambda z, t: kld(z, t)
    except Exception:
        methods["liger kl_div (bytes-equal)"] = "not installed"
    return methods


def bench_dense(device, sizes, dtype, reps, warmup, interp_max_elems) -> list[tuple[int, int, list[Result]]]:
    out = []
    for n, v in sizes:
        with_triton = device.type == "cuda" or n * v <= interp_max_elems
        results = []
        for name, fn in dense_methods(device, with_triton).items():
            if isinstance(fn, str):
                results.append(Result(name, note=fn))
                continue

            def make_step(fn=fn, n=n, v=v):
                g = torch.Generator(device=device).manual_seed(0)
                z = (3 * torch.randn(n, v, device=device, generator=g)).to(dtype).requires_grad_(True)
                t = (3 * torch.randn(n, v, device=device, generator=g)).to(dtype)

                def step():
                    fn(z, t).sum().backward()
                    z.grad = None

                return step

            results.append(_measure(name, make_step, device, reps, warmup))
        out.append((n, v, results))
    return out


# ---- fused linear ------------------------------------------------------------------------------------------


def fused_methods(device: torch.device) -> dict[str, Callable | str]:
    """name -> fn(h, w, th, tw) returning something to .sum().backward() through h and w."""
    from .dense import dense_kl, dense_kl_reference
    from .fused_linear import fused_linear_dense_kl

    backend = "triton" if device.type == "cuda" else "torch"
    methods: dict[str, Callable | str] = {
        f"fused linear ({backend})": lambda h, w, th, tw: fused_linear_dense_kl(
            h, w, (th, tw), backend=backend
        ),
        f"materialised + dense_kl ({backend})": lambda h, w, th, tw: dense_kl(
            h @ w.t(), th @ tw.t(), backend=backend
        ),
        "materialised + autograd": lambda h, w, th, tw: dense_kl_reference(h @ w.t(), th @ tw.t()),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        ljsd = LigerFusedLinearJSD(jsd_beta=1.0)
        methods["liger fused-linear JSD(beta=1)"] = lambda h, w, th, tw: ljsd(h, w, th, tw)
    except Exception:
        methods["liger fused-linear JSD(beta=1)"] = "not installed (pip install liger-kernel)"
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def trl_fn(h, w, th, tw):
            div, _entropy = ChunkedDivergenceFunction.apply(h, w, None, th, tw, None, 1.0, 1.0)
            return div

        methods["trl chunked divergence(beta=1)"] = (
            trl_fn if device.type == "cuda" else "skipped on CPU (Triton)"
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
    for name, fn in fused_methods(device).items():
        if isinstance(fn, str):
            results.append(Result(name, note=fn))
            continue

        def make_step(fn=fn):
            hh = hid.detach().requires_grad_(True)
            ww = w.detach().requires_grad_(True)

            def step():
                fn(hh, ww, th, tw).sum().backward()
                hh.grad = ww.grad = None

            return step

        results.append(_measure(name, make_step, device, reps, warmup))

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


def print_dense_table(device_name, dtype, rows, copy_gbs, file=sys.stdout):
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
        tri = next((r.ms for r in results if r.method == "triton kernel" and r.ms), None)
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


def print_fused_table(device_name, dtype, size, results, floor_ms, file=sys.stdout):
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
    from .kernels.dense_kl_triton import dense_kl_triton_impl

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hybridlab.bench", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["dense", "tune"])
    p.add_argument("--cpu", action="store_true", help="run on CPU with tiny sizes (default without CUDA)")
    p.add_argument("--sizes", nargs="+", help="N:V pairs (default: the issue's grid on GPU, tiny on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None, help="fused-linear table")
    p.add_argument("--fused-size", help="N:V:H for the fused-linear table")
    p.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads (default 1)")
    args = p.parse_args(argv)

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

    if args.what == "tune":
        if cpu:
            raise SystemExit("tune needs a CUDA GPU")
        n, v = _parse_sizes(args.sizes)[0] if args.sizes else (8192, 152064)
        tune(device, n, v, dtype, reps)
        return

    sizes = _parse_sizes(args.sizes) if args.sizes else (CPU_SIZES if cpu else GPU_SIZES)
    copy_gbs = copy_bandwidth_gbs(device, reps)
    rows = bench_dense(device, sizes, dtype, reps, warmup, interp_max_elems=1 << 20)
    print_dense_table(name, dtype, rows, copy_gbs)
    if cpu:
        print("# CPU: the Triton kernel runs in its interpreter here; its time is not a speed measurement.")
    if args.fused if args.fused is not None else True:
        fsize = (
            _parse_sizes([args.fused_size], fused=True)[0]
            if args.fused_size
            else (CPU_FUSED if cpu else GPU_FUSED)
        )
        results, floor = bench_fused(device, fsize, dtype, reps, warmup)
        print_fused_table(name, dtype, fsize, results, floor)


if __name__ == "__main__":
    main()
