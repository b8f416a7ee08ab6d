"""The one-pass hybrid rows by generated code: `backend="compiled"` (opt-in; torch.compile with Inductor).

The same row quantities as `_onepass` (see its docstring), written as two whole-tensor functions that Inductor
fuses into one loop nest each, so nothing [N, V] is materialised between the elementwise steps:

    forward   (z, t, y) -> KL, log p(y), log q(y), lse_x, lse_t      [N] each; reads z and t once (2U)
    backward  (z, t, y, lse_x, lse_t, KL, a, b) -> dL/dz              reads z and t, writes the gradient (3U)

with x = z / tau, log p = x - lse_x, log q = t - lse_t and

    dL/dz_j = (1 / tau) [ a p_j (log p_j - log q_j - KL) + b (1[j = y] - p_j) ].

Saving the two log-sum-exps per row (not the [N, V] probabilities) is what lets backward be one elementwise pass.
Inductor's own count of the bytes its kernels move is 2U forward + 3U backward (`generated_bytes`; the aten
counter of `hybridlab.bench` cannot see inside generated code).

Why opt-in: the first call in a process traces and compiles (seconds; tens of seconds with a cold on-disk cache)
and on CPU needs a C++ compiler. `backend="auto"` never picks it. The careful cases of the eager path (a -inf or
non-finite entry on an active row, |log-sum-exp| > OFFSET_LIMIT, a teacher floor, fp64 inputs) are not handled
here: such calls run the eager torch path instead, decided per call from the forward's [N] row scalars.
"""

from __future__ import annotations

import torch

from ._onepass import OFFSET_LIMIT

_COMPILED: dict[str, object] = {}


def cpu_compiler_available() -> bool:
    """Whether Inductor can build CPU code here: a C++ compiler on PATH ($CXX, g++, c++ or clang++)."""
    import os
    import shutil

    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return any(n and shutil.which(n) for n in names)


def _rows_forward(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, inv_tau: torch.Tensor):
    x = z.float() * inv_tau
    tt = t.float()
    lse_x = torch.logsumexp(x, -1)
    lse_t = torch.logsumexp(tt, -1)
    p = torch.exp(x - lse_x[:, None])
    # <p, x - t> = KL + lse_x - lse_t: one reduction over the row, fused with the two log-sum-exps' reads.
    kl = (p * (x - tt)).sum(-1) - (lse_x - lse_t)
    x_y = x.gather(1, y[:, None])[:, 0]
    t_y = tt.gather(1, y[:, None])[:, 0]
    return kl, x_y - lse_x, t_y - lse_t, lse_x, lse_t


def _rows_backward(z, t, y, active, lse_x, lse_t, kl, a, b, inv_tau: torch.Tensor):
    x = z.float() * inv_tau
    lp = x - lse_x[:, None]
    lq = t.float() - lse_t[:, None]
    p = torch.exp(lp)
    hot = torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]
    g = (a * inv_tau)[:, None] * p * (lp - lq - kl[:, None]) + (b * inv_tau)[:, None] * (hot.float() - p)
    # Inactive rows are exactly 0, whatever their logits hold (padding may be garbage, even NaN).
    return torch.where(active[:, None], g, 0.0).to(z.dtype)


def _compiled(name: str):
    """The torch.compile'd function `name`, built once per process (dynamic shapes: one graph per dtype)."""
    fn = _COMPILED.get(name)
    if fn is None:
        fn = torch.compile({"forward": _rows_forward, "backward": _rows_backward}[name], dynamic=True)
        _COMPILED[name] = fn
    return fn


def _call(name: str, *args):
    try:
        return _compiled(name)(*args)
    # a missing C++ compiler, an unsupported platform: say so, do not fall back silently
    except Exception as e:
        raise RuntimeError(
            f"backend='compiled' could not compile its {name} function with torch.compile "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); on CPU Inductor needs a "
            "C++ compiler (g++ or clang++ on PATH). Use backend='torch' (the eager one-pass path) instead"
        ) from e


def _inv_tau(tau: float, device) -> torch.Tensor:
    # A 0-d tensor, not a Python float: a float argument would be baked into the graph (one compile per tau).
    return torch.tensor(1.0 / tau, dtype=torch.float32, device=device)


def forward_compiled(
    z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, active: torch.Tensor | None, tau: float
):
    """Row scalars (kl, logp_y, tlogp_y) [N] fp32 (0 on inactive rows) of [N, V] z, t and y [N], and the state
    for `backward_compiled`; None when an active row needs the eager path's careful arithmetic."""
    kl, logp, tlogp, lse_x, lse_t = _call("forward", z, t, y, _inv_tau(tau, z.device))
    bad = (
        ~(torch.isfinite(kl) & torch.isfinite(logp))
        | (lse_x.abs() > OFFSET_LIMIT)
        | (lse_t.abs() > OFFSET_LIMIT)
    )
    if active is not None:  # inactive rows may hold anything (padding): only active rows decide
        bad &= active
    if bool(bad.any()):
        return None
    if active is not None:
        kl, logp, tlogp = (torch.where(active, x, 0.0) for x in (kl, logp, tlogp))
    return kl, logp, tlogp, (lse_x, lse_t, kl)


def backward_compiled(z, t, y, active, tau: float, state, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The combined gradient [N, V] in z's dtype for upstream gradients a, b [N] (0 on inactive rows)."""
    lse_x, lse_t, kl = state
    act = torch.ones(z.shape[0], dtype=torch.bool, device=z.device) if active is None else active
    return _call("backward", z, t, y, act, lse_x, lse_t, kl, a.float(), b.float(), _inv_tau(tau, z.device))


def dense_kl_compiled(student, teacher, active, temperature: float, need_grad: bool, teacher_floor):
    """The dense backend contract of `hybridlab.dense` (kl [N], grad [N, V] | None; 0 on inactive rows) by the
    two compiled functions (the score part switched off: b = 0). Calls with a floor, fp64 inputs or rows that
    need care take the eager fast path `_onepass.dense_kl_fast_torch`."""
    from ._onepass import dense_kl_fast_torch

    fp64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    if teacher_floor is not None or fp64:
        return dense_kl_fast_torch(student, teacher, active, temperature, need_grad, teacher_floor)
    n = student.shape[0]
    y = torch.zeros(n, dtype=torch.long, device=student.device)
    res = forward_compiled(student, teacher, y, active, temperature)
    if res is None:
        return dense_kl_fast_torch(student, teacher, active, temperature, need_grad, teacher_floor)
    kl, _, _, state = res
    if not need_grad:
        return kl, None
    one = torch.ones(n, dtype=torch.float32, device=student.device)
    a = one if active is None else torch.where(active, one, 0.0)
    return kl, backward_compiled(student, teacher, y, active, temperature, state, a, torch.zeros_like(one))


def generated_bytes(n: int, v: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                    ) -> dict[str, float]:  # fmt: skip
    """Bytes Inductor's generated kernels read and write in `forward` and `backward` at [n, v], in U (one [n, v]
    tensor of `dtype`), by Inductor's own count of each scheduled kernel's buffers (compiled afresh, static
    shapes, the on-disk cache off: a cached graph is not re-scheduled and would count nothing). Resets
    torch._dynamo (every compiled function of the process recompiles on its next call): for benchmarks."""
    import logging

    from torch._inductor import config as inductor_config
    from torch._inductor import metrics

    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g).to(device, dtype)
    t = torch.randn(n, v, generator=g).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    act = torch.ones(n, dtype=torch.bool, device=device)
    r = torch.ones(n, device=device)
    inv = _inv_tau(1.0, z.device)
    out = {}
    # Inductor counts bytes only when its metrics log is on at INFO; a logger of our own level, no handler and
    # no propagation keeps the count without printing it.
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    saved = (inductor_config.fx_graph_cache, log.level, log.propagate)
    torch._dynamo.reset()  # compiled code of these functions already in the process would be reused, unscheduled
    _COMPILED.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    inductor_config.fx_graph_cache = False
    try:
        _, _, _, lse_x, lse_t = _rows_forward(z, t, y, inv)  # eager: the backward's inputs
        for name, fn, args in (
            ("forward", _rows_forward, (z, t, y, inv)),
            ("backward", _rows_backward, (z, t, y, act, lse_x, lse_t, r, r, r, inv)),
        ):
            metrics.reset()
            torch.compile(fn, dynamic=False)(*args)
            out[name] = metrics.num_bytes_accessed / (n * v * z.element_size())
    finally:
        inductor_config.fx_graph_cache, lvl, log.propagate = saved
        log.setLevel(lvl)
        torch._dynamo.reset()
    out["total"] = out["forward"] + out["backward"]
    return out
