"""`python -m hybridlab.bench hybrid`: the complete `hybrid_loss`, forward + backward, path against path.

Workload: B sequences x T tokens (N = B * T rows), vocabulary V; student and teacher logits 3 * randn, actions
sampled from the student's softmax, one reward per sequence, beta = lam = 1, the analytic future KL. Rows:

- `hybrid_loss (torch)` / `(triton)`: this project's one-pass paths (row scalars forward, the combined gradient
  written once in backward);
- `autograd surrogate`: the same objective by autograd: log_softmax of both sides, the analytic KL, the
  sampled-token log-prob by gather, the same detached advantages (`hybridlab.hybrid.assemble`);
- `trl GRPO + GKD jsd(beta=1)`: the nearest peer at the logits: TRL's `selective_log_softmax` and GRPO's
  clipped surrogate for the score term, TRL GKD's `generalized_jsd_loss(beta=1)` (the reverse KL) for the
  dense one (the full-vocabulary divergence TRL offers on logits; its chunked divergence needs hidden states).

Columns: median ms over the repeats; `x auto` = autograd's time / this row's (> 1: faster); peak MB above the
inputs (CUDA: the allocator's peak; CPU: the process's peak resident set, reset through /proc/self/clear_refs,
so it includes allocator slack); `bytes` = aten bytes on [., V] tensors during forward + backward in units U of
one [N, V] tensor in the input dtype (`AtenBytes`; Triton kernels are not aten ops, so for the Triton path it
is what moves outside the kernels: the kernels themselves move 5U, two reads forward, two reads and a write
backward).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that move only the elements they index, not the whole [., V] operand.
_SPARSE = {"gather", "scatter", "scatter_add", "scatter_add_", "scatter_", "index_select", "take_along_dim"}
_FREE = {"view", "_unsafe_view", "reshape", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose",
         "permute", "as_strided", "alias", "detach", "empty", "empty_like", "empty_strided", "_reshape_alias",
         "lift_fresh", "split", "unbind", "narrow", "diagonal", "view_as", "contiguous"}  # fmt: skip


class AtenBytes(TorchDispatchMode):
    """Bytes moved by aten ops on tensors whose last dimension is V: each [., V] input read once, each output
    written once, in-place operands read and written; views and allocations move nothing; gather / scatter
    count twice the elements they index. A lower bound for multi-pass kernels (softmax reads its row twice,
    from cache when the row fits)."""

    def __init__(self, v: int):
        super().__init__()
        self.v = v
        self.bytes = 0
        self.by_op: dict[str, int] = {}
        self.paused = 0  # > 0 inside a Triton launch (the CPU interpreter's own copies are the kernel's)

    def _wide(self, x) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.v and x.numel() >= self.v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name in _FREE or self.paused:
            return out
        flat_in = [
            a
            for a in list(args) + list(kwargs.values())
            for a in (a if isinstance(a, (list, tuple)) else [a])
        ]
        outs = out if isinstance(out, (list, tuple)) else [out]
        n = 0
        if name in _SPARSE:
            idx = [a for a in flat_in if isinstance(a, torch.Tensor) and not a.dtype.is_floating_point]
            if idx and any(self._wide(a) for a in flat_in + list(outs)):
                elem = max(
                    a.element_size() for a in flat_in if isinstance(a, torch.Tensor) and a.is_floating_point()
                )
                n = 2 * idx[0].numel() * elem
        else:
            written = set()
            for arg, a in zip(func._schema.arguments, args):
                if arg.alias_info is not None and arg.alias_info.is_write and self._wide(a):
                    written.add(id(a))
            seen = set()
            for a in flat_in:
                if self._wide(a) and id(a) not in seen:
                    seen.add(id(a))
                    n += a.numel() * a.element_size() * (2 if id(a) in written else 1)
            for o in outs:
                if self._wide(o) and id(o) not in seen:
                    n += o.numel() * o.element_size()
        if n:
            self.bytes += n
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def count_bytes(step: Callable[[], None], v: int) -> AtenBytes:
    """AtenBytes of one call of step(). Under Triton's CPU interpreter the aten ops it runs to stage a kernel's
    arguments are not counted: on a GPU a launch is no aten op at all. Nor are the ops inside backend="compiled"'s
    two torch.compile'd functions (under a dispatch mode they run unfused, op by op): Inductor counts the bytes
    of the kernels it generates for them (`hybridlab._compiled.generated_bytes`)."""
    counter = AtenBytes(v)
    grid = None
    try:
        from triton.runtime import interpreter

        grid = interpreter.GridExecutor
    except Exception:
        pass
    orig = grid.__call__ if grid is not None else None

    def launch(self, *args, **kwargs):
        counter.paused += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    from .. import _compiled

    call = _compiled._call

    def compiled_call(*args, **kwargs):  # generated code is counted by Inductor (`_compiled.generated_bytes`)
        counter.paused += 1
        try:
            return call(*args, **kwargs)
        finally:
            counter.paused -= 1

    if grid is not None:
        grid.__call__ = launch
    _compiled._call = compiled_call
    try:
        with counter:
            step()
    finally:
        if grid is not None:
            grid.__call__ = orig
        _compiled._call = call
    return counter


def _rss(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one step above what was live before it (MB): CUDA's allocator peak, or on Linux the
    process's peak resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs). None when unavailable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss("VmRSS:")
    step()
    top = _rss("VmHWM:")
    return None if base is None or top is None else (top - base) / 2**20


def time_ms(step: Callable[[], None], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def workload(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0, seqs: int = 8):
    """(z [B, T, V], t [B, T, V], actions [B, T], rewards [B]) with actions sampled from softmax(z)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = seqs if n % seqs == 0 else 1
    z = 3 * torch.randn(b, n // b, v, generator=g)
    t = 3 * torch.randn(b, n // b, v, generator=g)
    y = torch.empty(n, dtype=torch.long)
    flat = z.reshape(n, v)
    for s in range(0, n, 64):  # chunked: no [N, V] probability tensor
        y[s : s + 64] = torch.multinomial(torch.softmax(flat[s : s + 64], -1), 1, generator=g)[:, 0]
    r = torch.rand(b, generator=g)
    return z.to(device, dtype), t.to(device, dtype), y.reshape(b, n // b).to(device), r.to(device)


def autograd_surrogate(z, t, y, r, tau: float = 1.0):
    """The hybrid objective by autograd through log_softmax (the usual way), the same detached advantages."""
    from ..hybrid import _normalizer, assemble

    mask = torch.ones(y.shape, dtype=torch.bool, device=y.device)
    lp = torch.log_softmax(z.float() / tau, -1)
    lq = torch.log_softmax(t.float(), -1)
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    logp = lp.gather(-1, y[..., None])[..., 0]
    tlogp = lq.gather(-1, y[..., None])[..., 0].detach()
    c = _normalizer("sequences", mask, None, kl.dtype)
    return assemble(kl, logp, tlogp, r, mask, c, beta=1.0, lam=1.0, future="analytic", gamma=1.0,
                    baseline="none", group_size=None).loss  # fmt: skip


def trl_peer():
    """TRL's GRPO surrogate (selective_log_softmax, clipped ratio, advantages = reward - group mean) plus TRL
    GKD's generalized_jsd_loss(beta=1) (reverse KL, full vocabulary), or a note why it is absent."""
    try:
        from importlib.metadata import version

        from trl.experimental.gkd.gkd_trainer import GKDTrainer
        from trl.trainer.utils import selective_log_softmax
    except Exception as e:  # optional: a missing or different TRL becomes a note
        return f"not importable ({type(e).__name__})"

    def fn(z, t, y, r):
        logp = selective_log_softmax(z, y)
        adv = (r - r.mean())[:, None]
        ratio = torch.exp(logp - logp.detach())
        pg = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv).sum() / z.shape[0]
        jsd = GKDTrainer.generalized_jsd_loss(z, t, beta=1.0, reduction="sum") / z.shape[0]
        return pg + jsd

    fn.note = f"trl {version('trl')}"
    return fn


def methods(device: torch.device, with_triton: bool) -> dict:
    from ..hybrid import hybrid_loss

    out: dict = {
        "hybrid_loss (torch)": lambda z, t, y, r: hybrid_loss(z, t, y, r, backend="torch").loss,
        "hybrid_loss (compiled)": lambda z, t, y, r: hybrid_loss(z, t, y, r, backend="compiled").loss,
        "hybrid_loss (triton)": (lambda z, t, y, r: hybrid_loss(z, t, y, r, backend="triton").loss)
        if with_triton
        else "skipped (size too large for the CPU interpreter)",
        "autograd surrogate": autograd_surrogate,
        "trl GRPO + GKD jsd(beta=1)": trl_peer(),
    }
    return out


def bench_hybrid(device, n, v, dtype, reps, warmup, with_triton, byte_size=(64, 4096)):
    """[(method, ms, peak MB, bytes in U, note)] at N x V; bytes counted at `byte_size` (per U, size-free).
    Times are taken in interleaved rounds (each method once per round, median over `reps` rounds), so that a
    shared machine's load falls on every method alike."""
    rows, steps = [], {}
    z, t, y, r = workload(n, v, dtype, device)
    bn, bv = byte_size
    zb, tb, yb, rb = workload(bn, bv, dtype, device, seed=1)
    for name, fn in methods(device, with_triton).items():
        if isinstance(fn, str):
            rows.append([name, None, None, None, fn])
            continue

        def step(fn=fn, z=z, t=t, y=y, r=r):
            zz = z.detach().requires_grad_(True)
            fn(zz, t, y, r).backward()

        try:
            for _ in range(max(warmup, 1)):
                step()
            mem = peak_mb(step, device)
            u = count_bytes(lambda: step(z=zb, t=tb, y=yb, r=rb), bv).bytes / (bn * bv * zb.element_size())
            note = getattr(fn, "note", "")
            if "(compiled)" in name:  # add what its generated kernels move, by Inductor's count
                from .._compiled import generated_bytes

                try:
                    gen = generated_bytes(bn, bv, dtype, device)["total"]
                    note = f"{u:.1f}U aten + {gen:.1f}U generated (Inductor's count)"
                    u += gen
                    step()  # generated_bytes reset the compiled functions: compile again before timing
                except Exception as e:  # keep the row's time; say why its bytes are incomplete
                    note = f"aten bytes only; Inductor's count failed: {type(e).__name__}"
            rows.append([name, None, mem, u, note])
            steps[name] = step
        except Exception as e:  # an optional peer with another API version: report, keep going
            rows.append(
                [name, None, None, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"]
            )
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(time_ms(step, device, 1))
    for row in rows:
        if row[0] in times:
            row[1] = statistics.median(times[row[0]])
    return [tuple(row) for row in rows]


def fused_methods(device: torch.device) -> dict:
    """name -> fn(h, w, th, tw, y [N], r [B]) -> loss, all from hidden states and LM heads (or a note)."""
    from ..fused_hybrid import fused_hybrid_loss
    from ..hybrid import hybrid_loss

    backend = "triton" if device.type == "cuda" else "torch"
    b = 8

    def bt(x):  # [N, ...] -> [B, T, ...]
        return x.reshape(b, x.shape[0] // b, *x.shape[1:])

    out: dict = {
        f"fused_hybrid_loss ({backend})": lambda h, w, th, tw, y, r: (
            fused_hybrid_loss(bt(h), w, (bt(th), tw), bt(y), r, backend=backend).loss
        ),
        f"materialised + hybrid_loss ({backend})": lambda h, w, th, tw, y, r: (
            hybrid_loss(bt(h @ w.t()), bt(th @ tw.t()), bt(y), r, backend=backend).loss
        ),
        "materialised + autograd surrogate": lambda h, w, th, tw, y, r: autograd_surrogate(
            bt(h @ w.t()), bt(th @ tw.t()), bt(y), r
        ),
    }
    try:
        from importlib.metadata import version

        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl_fn(h, w, th, tw, y, r):
            logp = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096)[0]
            adv = (r - r.mean()).repeat_interleave(h.shape[0] // b)
            ratio = torch.exp(logp - logp.detach())
            pg = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv).sum() / b
            div, _entropy = ChunkedDivergenceFunction.apply(h, w, None, th, tw, None, 1.0, 1.0)
            return pg + div.sum() / b

        trl_fn.note = f"trl {version('trl')}: chunked log-prob + GRPO clip, chunked divergence(beta=1)"
        out["trl chunked logprob + divergence"] = trl_fn
    except Exception as e:
        out["trl chunked logprob + divergence"] = f"not importable ({type(e).__name__})"
    return out


def bench_fused_hybrid(device, n, v, h, dtype, reps, warmup):
    """[(method, ms, peak MB, None, note)] for the fused-linear hybrid loss at N x V with hidden size H."""
    g = torch.Generator(device="cpu").manual_seed(3)
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device, dtype)  # noqa: E731
    hid, th = mk(n, h), mk(n, h)
    w, tw = mk(v, h, scale=3 * h**-0.5), mk(v, h, scale=3 * h**-0.5)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    r = torch.rand(8, generator=g).to(device)
    rows = []
    for name, fn in fused_methods(device).items():
        if isinstance(fn, str):
            rows.append((name, None, None, None, fn))
            continue

        def step(fn=fn):
            hh, ww = hid.detach().requires_grad_(True), w.detach().requires_grad_(True)
            fn(hh, ww, th, tw, y, r).backward()

        try:
            for _ in range(max(warmup, 1)):
                step()
            mem = peak_mb(step, device)
            rows.append((name, time_ms(step, device, reps), mem, None, getattr(fn, "note", "")))
        except Exception as e:
            rows.append(
                (name, None, None, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
            )
    return rows


def dense_ratio(device, n, v, dtype, reps, warmup):
    """(ms of dense_kl(torch), ms of autograd through log_softmax) at N x V: KL.sum() forward + backward."""
    from ..dense import dense_kl, dense_kl_reference

    g = torch.Generator(device="cpu").manual_seed(2)
    z = (3 * torch.randn(n, v, generator=g)).to(device, dtype)
    t = (3 * torch.randn(n, v, generator=g)).to(device, dtype)
    res = []
    for fn in (lambda a, b: dense_kl(a, b, backend="torch"), dense_kl_reference):

        def step(fn=fn):
            zz = z.detach().requires_grad_(True)
            fn(zz, t).sum().backward()

        for _ in range(max(warmup, 1)):
            step()
        res.append(time_ms(step, device, reps))
    return tuple(res)


def _f(x, spec):
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def print_hybrid_table(device_name, dtype_name, n, v, rows, file=None, h=None):
    file = file or sys.stdout
    auto = next((r for r in rows if "autograd surrogate" in r[0] and r[1]), None)
    what = "complete hybrid_loss" if h is None else f"fused-linear hybrid loss (H={h}, both LM heads)"
    print(f"\n# {what} fwd+bwd on {device_name}: N={n} (8 sequences), V={v}, {dtype_name}", file=file)
    print("# bytes: aten bytes on [., V] tensors, fwd+bwd, in U = one [N, V] tensor (Triton: outside the kernels)",
          file=file)  # fmt: skip
    head = f"| {'path':<36} | {'ms':>9} | {'x auto':>6} | {'peak MB':>8} | {'peak/auto':>9} | {'bytes U':>7} | note"
    print(head, file=file)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:]), file=file)
    for name, ms, mem, u, note in rows:
        speed = auto[1] / ms if (auto and ms) else None
        rel = mem / auto[2] if (auto and mem is not None and auto[2]) else None
        print(f"| {name:<36} | {_f(ms, '9.1f')} | {_f(speed, '6.2f')} | {_f(mem, '8.0f')} | {_f(rel, '9.2f')} | "
              f"{_f(u, '7.1f')} | {note}", file=file)  # fmt: skip
    return auto


def print_targets(rows, dense, file=None, gpu: tuple[int, int, int, float] | None = None):
    """The targets, met or missed, from the rows measured side by side in this run. `gpu`: (N, V, element
    bytes, copy GB/s) on a GPU, for the bandwidth target against the 5U byte model and the peer comparison."""
    file = file or sys.stdout
    by = {r[0]: r for r in rows}
    auto, tor, tri, comp = (
        by.get("autograd surrogate"),
        by.get("hybrid_loss (torch)"),
        by.get("hybrid_loss (triton)"),
        by.get("hybrid_loss (compiled)"),
    )
    print("\n# targets (this run, side by side)", file=file)

    def line(what, value, ok):
        state = "-" if value is None else ("met" if ok else "MISSED")
        print(f"| {what:<62} | {value or '-':>14} | {state} |", file=file)

    for label, row, bytes_what in (
        ("torch", tor, "aten bytes"),
        ("compiled", comp, "aten + generated bytes"),
    ):
        if auto and row and auto[1] and row[1]:
            s = auto[1] / row[1]
            line(f"hybrid_loss({label}) fwd+bwd speed-up over autograd (>= 1.5x)", f"{s:.2f}x", s >= 1.5)
            if auto[2] and row[2] is not None:
                m = row[2] / auto[2]
                line(f"hybrid_loss({label}) peak memory / autograd's (<= 0.33)", f"{m:.2f}", m <= 1 / 3)
        if row and row[3] is not None:
            line(f"{bytes_what}, hybrid_loss({label}) fwd+bwd (<= 12U)", f"{row[3]:.1f}U", row[3] <= 12)
    if tri and tri[3] is not None:
        line("aten bytes outside the kernels, hybrid_loss(triton) (<= 2U)", f"{tri[3]:.1f}U", tri[3] <= 2)
    if dense:
        s = dense[1] / dense[0]
        line("dense_kl(torch) speed-up over autograd log_softmax (>= 1.2x)", f"{s:.2f}x", s >= 1.2)
    if gpu and tri and tri[1]:
        n, v, elem, copy_gbs = gpu
        gbs = (
            5 * n * v * elem / (tri[1] * 1e-3) / 1e9
        )  # 5U: z, t read twice (forward, backward), grad written
        line(f"hybrid_loss(triton) GB/s vs copy {copy_gbs:.0f} GB/s, 5U model (>= 60%)",
             f"{100 * gbs / copy_gbs:.0f}%", gbs >= 0.6 * copy_gbs)  # fmt: skip
        peer = by.get("trl GRPO + GKD jsd(beta=1)")
        if peer and peer[1]:
            line("hybrid_loss(triton) faster than TRL GRPO + GKD loss path", f"{peer[1] / tri[1]:.2f}x",
                 tri[1] < peer[1])  # fmt: skip


def main_hybrid(args, device, dtype, name) -> None:
    """The `hybrid` subcommand of `python -m hybridlab.bench` (arguments parsed there)."""
    cpu = device.type != "cuda"
    sizes = [tuple(int(p) for p in s.split(":")) for s in args.sizes] if args.sizes else (
        [(1024, 49152)] if cpu else [(8192, 152064)])  # fmt: skip
    reps = args.reps or (3 if cpu else 10)
    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    all_rows = []
    for n, v in sizes:
        with_triton = not cpu or os.environ.get("TRITON_INTERPRET") == "1" and n * v <= 1 << 16
        rows = bench_hybrid(device, n, v, dtype, reps, 1, with_triton)
        if cpu and not with_triton:  # the Triton path's byte count needs no speed: count it at a small size
            from ..hybrid import hybrid_loss

            zb, tb, yb, rb = workload(64, 4096, dtype, device, seed=1)
            zz = zb.detach().requires_grad_(True)
            u = count_bytes(
                lambda zz=zz, tb=tb, yb=yb, rb=rb: hybrid_loss(
                    zz, tb, yb, rb, backend="triton"
                ).loss.backward(),
                4096,
            ).bytes
            k = next(i for i, row in enumerate(rows) if row[0] == "hybrid_loss (triton)")
            rows[k] = (
                rows[k][0],
                None,
                None,
                u / zb.numel() / zb.element_size(),
                "bytes at N=64, V=4096 (interpreter)",
            )
        print_hybrid_table(name, dname, n, v, rows)
        all_rows = rows
    if args.fused_size or not cpu or args.fused:
        n, v, h = (
            int(p) for p in (args.fused_size or ("256:4096:256" if cpu else "8192:151936:896")).split(":")
        )
        print_hybrid_table(name, dname, n, v, bench_fused_hybrid(device, n, v, h, dtype, reps, 1), h=h)
    dense = dense_ratio(device, 512, 32000, dtype, reps, 1) if cpu else None
    if dense:
        print(
            f"\n# dense_kl(torch) {dense[0]:.1f} ms vs autograd log_softmax {dense[1]:.1f} ms (N=512, V=32000)"
        )
    gpu = None
    if not cpu and all_rows:
        from . import copy_bandwidth_gbs

        gpu = (n, v, torch.finfo(dtype).bits // 8, copy_bandwidth_gbs(device, reps))
    print_targets(all_rows, dense, gpu=gpu)
