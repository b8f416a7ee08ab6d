"""The whole hybrid logit gradient in one pass: row scalars in forward, the combined gradient in backward.

For student logits z [N, V] at temperature tau (x = z / tau, p = softmax(x)), teacher logits t (q = softmax(t))
and sampled tokens y [N], the forward pass keeps only scalars per row:

    KL_r = sum_j p_j (log p_j - log q_j),     log p(y_r),     log q(y_r)

Both terms of `hybrid_loss` are functions of them: dense = sum_r a_r KL_r, sparse = sum_r b_r log p(y_r), with
a_r = beta c_b and b_r = -c_b A_t (A_t detached, formed from the forward's [B, T] KL and log-probs). So backward,
given the upstream gradients a = dL/dKL and b = dL/dlog p(y), writes the whole logit gradient in one pass:

    dL/dz_j = (1 / tau) [ a p_j (log p_j - log q_j - KL) + b (1[j = y] - p_j) ]

No [N, V] tensor is kept between the passes: backward re-reads z and t and writes the gradient once.

Two implementations behind one autograd Function:
- "torch" (CPU and the fallback), chunked over rows so every temporary is a cache-sized [C, V] block. Its fast
  path uses one identity: softmax's backward s(G, p) = p * (G - <G, p>) is blind to row constants in G, so with
      G_j = a (x_j - t_j) + (b / p_y) 1[j = y]
  s(G, p) / tau is exactly the gradient above (a p (x - t - <x - t, p>) is the dense part, (b / p_y) p (e_y - p_y)
  = b (e_y - p) the score part). Forward: softmax(x), the teacher's log-sum-exp, the row sums of p (x - t). Backward:
  softmax(x), G, softmax's backward written into the gradient. A chunk takes the careful path instead (centred
  logits, log_softmax on both sides, 0 log 0 = 0 by selection, the explicit teacher floor) when any of its rows
  has a -inf or non-finite entry, a log-sum-exp beyond +-OFFSET_LIMIT (large offsets: rounding at their scale
  would cost ulp(offset) per log-prob), p(y) below P_Y_MIN (b / p_y would lose range), a floor, or fp64 inputs
  (exact enumeration, where speed does not matter and the careful arithmetic does).
- "triton": `hybridlab.kernels.hybrid_triton`, a forward kernel that emits the row scalars in one read of z and t
  and a backward kernel that writes the gradient in one more read and one write (5U in all, U = one [N, V] tensor).

Validation happens in the public functions (`hybrid_loss`): everything here trusts its caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._checks import first_order_only

# Elements per row chunk of the torch path: a few [C, V] fp32 blocks of this size stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 16
OFFSET_LIMIT = 32.0  # |log-sum-exp| above this takes the centred path (rounding at the scale of the offset)
P_Y_MIN = 1e-30  # p(y) below this: the score term is formed without dividing by p(y)


@dataclass
class RowPlan:
    """How the rows are visited: `chunks` are slices (contiguous runs of active rows) or index tensors, `idle`
    the slices of inactive rows (zeroed in the gradient), `index` True when the chunks are index tensors."""

    chunks: list
    idle: list
    index: bool


def row_plan(n: int, v: int, active: torch.Tensor | None, chunk_elements: int = CHUNK_ELEMENTS) -> RowPlan:
    """Chunks over the active rows. Response masks are contiguous runs (one per sequence), so the chunks are
    slices of those runs: views, no copies. A mask fragmented into many short runs uses index tensors."""
    step = max(1, chunk_elements // max(v, 1))
    if active is None:
        return RowPlan([slice(s, min(s + step, n)) for s in range(0, n, step)], [], False)
    a = active.to(torch.int8)
    edges = torch.diff(a, prepend=a.new_zeros(1), append=a.new_zeros(1)).nonzero().squeeze(1).tolist()
    runs = list(zip(edges[0::2], edges[1::2]))  # [start, stop) of every run of active rows
    n_active = sum(e - s for s, e in runs)
    if len(runs) > max(4, n_active // 8):  # fragmented: gather the rows instead
        rows = active.nonzero().squeeze(1)
        return RowPlan([rows[s : s + step] for s in range(0, rows.numel(), step)], [], True)
    chunks = [slice(s, min(s + step, e)) for s, e in runs for s in range(s, e, step)]
    idle, prev = [], 0
    for s, e in runs:
        if s > prev:
            idle.append(slice(prev, s))
        prev = e
    if prev < n:
        idle.append(slice(prev, n))
    return RowPlan(chunks, idle, False)


def _cdt(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _scaled(zc: torch.Tensor, cdt, tau: float) -> torch.Tensor:
    x = zc if zc.dtype == cdt else zc.to(cdt)
    return x if tau == 1.0 else x * (1.0 / tau)


def _careful_rows(zc, tc, yc, tau: float, floor, cdt):
    """(log p, log q, p, log-ratio with 0 log 0 = 0, KL) of a chunk, the maxima subtracted before scaling."""
    x = zc.to(cdt)
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=cdt, device=x.device))
    lp = torch.log_softmax((x - m) / tau, dim=-1)
    lq = torch.log_softmax(tc.to(cdt), dim=-1)
    if floor is not None:
        lq = lq.clamp_min(floor)
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, 0.0)  # 0 log 0 = 0, also when both sides are -inf
    return lp, lq, p, diff, (p * diff).sum(-1)


def _fast_forward(zc, tc, yc, tau: float, cdt):
    """(kl, logp_y, tlogp_y) of a chunk by the fast path, or None when a row needs the careful one."""
    x = _scaled(zc, cdt, tau)
    tt = tc if tc.dtype == cdt else tc.to(cdt)
    p = torch.softmax(x, dim=-1)
    lse_t = torch.logsumexp(tt, dim=-1)
    p_y = p.gather(1, yc[:, None])[:, 0]
    x_y = x.gather(1, yc[:, None])[:, 0]
    logp_y = torch.log(p_y)
    lse_x = x_y - logp_y
    # <p, x - t> = KL + lse_x - lse_t. torch's sum is a cascade (error ~ u log V); a BLAS dot product
    # (bmm, mv) here erred by 1e-3 at V = 32k in fp32.
    kl = torch.sub(x, tt).mul_(p).sum(-1) - (lse_x - lse_t)
    ok = torch.isfinite(kl).all() & (p_y >= P_Y_MIN).all()
    ok &= (lse_x.abs().amax() <= OFFSET_LIMIT) & (lse_t.abs().amax() <= OFFSET_LIMIT)
    if not bool(ok):
        return None
    tlogp_y = tt.gather(1, yc[:, None])[:, 0] - lse_t
    return kl, logp_y, tlogp_y


def forward_torch(z, t, y, active, tau: float, floor):
    """Row scalars of [N, V] student / teacher logits: (kl, logp_y, tlogp_y) [N] in the compute dtype (0 on
    inactive rows), and the plan for backward (which chunks took the fast path)."""
    n, v = z.shape
    cdt = _cdt(z, t)
    plan = row_plan(n, v, active)
    kl = torch.zeros(n, dtype=cdt, device=z.device)
    logp = torch.zeros(n, dtype=cdt, device=z.device)
    tlogp = torch.zeros(n, dtype=cdt, device=z.device)
    fast = []
    for sel in plan.chunks:
        zc, tc, yc = z[sel], t[sel], y[sel]
        res = None if (floor is not None or cdt == torch.float64) else _fast_forward(zc, tc, yc, tau, cdt)
        fast.append(res is not None)
        if res is None:
            lp, lq, _, _, kl_c = _careful_rows(zc, tc, yc, tau, floor, cdt)
            res = kl_c, lp.gather(1, yc[:, None])[:, 0], lq.gather(1, yc[:, None])[:, 0]
        kl[sel], logp[sel], tlogp[sel] = res
    return kl, logp, tlogp, plan, fast


def backward_torch(z, t, y, plan: RowPlan, fast: list, tau: float, floor, a, b, out=None):
    """The combined gradient [N, V] in z's dtype (zeros on inactive rows) for upstream gradients a, b [N].
    `out` may be z itself (the fused linear path overwrites its temporary logits): each chunk is read before
    it is written."""
    n, v = z.shape
    cdt = _cdt(z, t)
    if out is None:
        out = torch.zeros_like(z) if plan.index else torch.empty_like(z)
    elif plan.index:
        out.zero_()  # rows outside the chunks are inactive
    for sl in plan.idle:
        out[sl] = 0
    a, b = a.to(cdt), b.to(cdt)
    for sel, is_fast in zip(plan.chunks, fast):
        zc, tc, yc = z[sel], t[sel], y[sel]
        a_c, b_c = a[sel] / tau, b[sel] / tau
        if is_fast:
            x = _scaled(zc, cdt, tau)
            p = torch.softmax(x, dim=-1)
            g = torch.sub(x, tc).mul_(a_c[:, None])
            p_y = p.gather(1, yc[:, None])
            g.scatter_add_(1, yc[:, None], b_c[:, None] / p_y)
            if out.dtype == cdt and not plan.index:
                torch.ops.aten._softmax_backward_data.out(g, p, -1, cdt, grad_input=out[sel])
                continue
            res = torch._softmax_backward_data(g, p, -1, cdt)
        else:
            _, _, p, diff, kl_c = _careful_rows(zc, tc, yc, tau, floor, cdt)
            res = diff.sub_(kl_c[:, None]).mul_(a_c[:, None]).sub_(b_c[:, None]).mul_(p)
            res.scatter_add_(1, yc[:, None], b_c[:, None])
        out[sel] = res.to(out.dtype)  # one rounding into the student's dtype (index_put wants equal dtypes)
    return out


def dense_kl_fast_torch(student, teacher, active, temperature: float, need_grad: bool, teacher_floor):
    """The dense backend contract of `hybridlab.dense` (kl [N], grad [N, V] | None; 0 on inactive rows) by the
    fast chunked path: p = softmax(x), KL from two row dot products and the log-sum-exps, the gradient as
    softmax's backward of G = (x - t) / tau in one op. Chunks that need care (see the module docstring) and
    every call with a floor or fp64 inputs take the centred closed form `_torch_ref.dense_kl_torch`."""
    from ._torch_ref import dense_kl_torch

    n, v = student.shape
    cdt = _cdt(student, teacher)
    if teacher_floor is not None or cdt == torch.float64:
        return dense_kl_torch(student, teacher, active, temperature, need_grad, teacher_floor)
    tau = temperature
    plan = row_plan(n, v, active)
    kl = torch.zeros(n, dtype=cdt, device=student.device)
    grad = None
    if need_grad:
        grad = torch.zeros_like(student) if plan.index else torch.empty_like(student)
        for sl in plan.idle:
            grad[sl] = 0
    for sel in plan.chunks:
        zc, tc = student[sel], teacher[sel]
        x = _scaled(zc, cdt, tau)
        tt = tc if tc.dtype == cdt else tc.to(cdt)
        p = torch.softmax(x, dim=-1)
        m_x, j = x.max(-1)
        lse_x = m_x - torch.log(p.gather(1, j[:, None])[:, 0])  # p at the maximum is >= 1 / V: no underflow
        lse_t = torch.logsumexp(tt, dim=-1)
        d = torch.sub(x, tt)
        kl_c = (p * d).sum(-1) - (lse_x - lse_t)  # a cascade sum, not a BLAS dot (see `_fast_forward`)
        ok = torch.isfinite(kl_c).all()
        ok &= (lse_x.abs().amax() <= OFFSET_LIMIT) & (lse_t.abs().amax() <= OFFSET_LIMIT)
        if not bool(ok):
            kl_c, g_c = dense_kl_torch(zc, tc, None, tau, need_grad, None)
            kl[sel] = kl_c
            if need_grad:
                grad[sel] = g_c
            continue
        kl[sel] = kl_c
        if not need_grad:
            continue
        g = d if tau == 1.0 else d.mul_(1.0 / tau)
        if grad.dtype == cdt and not plan.index:
            torch.ops.aten._softmax_backward_data.out(g, p, -1, cdt, grad_input=grad[sel])
        else:
            grad[sel] = torch._softmax_backward_data(g, p, -1, cdt).to(grad.dtype)
    return kl, grad


class HybridRowsFunction(torch.autograd.Function):
    """(kl, logp_y, tlogp_y) [N] from z, t [N, V]; backward writes the combined gradient (see the module
    docstring). tlogp_y (the teacher's) carries no gradient. Nothing [N, V] is saved but the inputs."""

    @staticmethod
    def forward(ctx, z, t, active, y, tau, floor, backend):
        ctx.set_materialize_grads(False)
        kl, logp, tlogp, ctx.state = rows_forward(z, t, y, active, tau, floor, backend)
        if not torch.isfinite(kl).all():  # one cheap check on [N]; the costly diagnosis only on failure
            from .dense import _diagnose

            raise ValueError(_diagnose(z, t, active, kl, tau))
        ctx.tau, ctx.floor = tau, floor
        ctx.save_for_backward(z, t, y, active, kl)
        ctx.mark_non_differentiable(tlogp)
        return kl, logp, tlogp

    @staticmethod
    @first_order_only("hybrid_loss")  # closed-form backward: a second derivative through it would be wrong
    @once_differentiable
    def backward(ctx, g_kl, g_lp, _g_t):
        z, t, y, active, kl = ctx.saved_tensors
        if g_kl is None and g_lp is None:
            return None, None, None, None, None, None, None
        zeros = torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
        a = zeros if g_kl is None else g_kl
        b = zeros if g_lp is None else g_lp
        if active is not None:  # inactive rows get exactly 0, whatever their upstream gradient
            a = torch.where(active, a, 0.0)
            b = torch.where(active, b, 0.0)
        grad = rows_backward(z, t, y, active, ctx.tau, ctx.floor, ctx.state, a, b)
        return grad, None, None, None, None, None, None


def rows_forward(z, t, y, active, tau: float, floor, backend: str):
    """(kl, logp_y, tlogp_y) [N] of [N, V] logits by `backend`, and the state `rows_backward` needs. fp64 inputs
    always take the torch path (exact enumeration: the careful arithmetic matters, speed does not)."""
    fp64 = z.dtype == torch.float64 or t.dtype == torch.float64
    if backend == "triton" and not fp64:
        from .kernels.hybrid_triton import hybrid_rows_forward

        kl, logp, tlogp, state = hybrid_rows_forward(z, t, y, active, tau, floor)
        return kl, logp, tlogp, ("triton", state)
    if backend == "compiled" and not fp64 and floor is None:
        from ._compiled import forward_compiled

        res = forward_compiled(z, t, y, active, tau)
        if res is not None:  # else a row needs the careful arithmetic of the eager path
            return *res[:3], ("compiled", res[3])
    kl, logp, tlogp, plan, fast = forward_torch(z, t, y, active, tau, floor)
    return kl, logp, tlogp, ("torch", (plan, fast))


def rows_backward(z, t, y, active, tau: float, floor, state, a, b, out=None):
    """The combined gradient [N, V] for upstream gradients a, b [N] (0 on inactive rows), by the backend that
    ran the forward. `out` (torch and Triton paths) may be z itself: each chunk is read before it is written."""
    kind, st = state
    if kind == "triton":
        from .kernels.hybrid_triton import hybrid_rows_backward

        return hybrid_rows_backward(z, t, y, active, tau, floor, st, a, b, out=out)
    if kind == "compiled":
        from ._compiled import backward_compiled

        return backward_compiled(z, t, y, active, tau, st, a, b)
    plan, fast = st
    return backward_torch(z, t, y, plan, fast, tau, floor, a, b, out=out)


def hybrid_rows(student, teacher, actions, mask, tau: float, floor, backend: str):
    """(KL_t, log pi(y_t), log pi_T(y_t)) for [..., V] logits and [...] actions (all validated by the caller),
    each [...] in fp32 (fp64 for fp64 inputs), 0 where `mask` is False; the first two are differentiable
    w.r.t. `student` through the one-pass backward."""
    batch = student.shape[:-1]
    v = student.shape[-1]
    z = student.reshape(-1, v)
    t = teacher.detach().reshape(-1, v)
    y = actions.reshape(-1).clamp(0, v - 1)
    active = None if mask is None else mask.reshape(-1)
    kl, logp, tlogp = HybridRowsFunction.apply(z, t, active, y, tau, floor, backend)
    return kl.reshape(batch), logp.reshape(batch), tlogp.reshape(batch)


class FusedLinearHybridFunction(torch.autograd.Function):
    """(kl, logp_y, tlogp_y) [N] from hidden [N, H] and the LM head weight [V, H] (+ bias [V]), in row chunks.

    Student LM-head matmuls: forward 1 (the chunk's logits, reduced to row scalars and dropped); backward 3
    (the logits again, then dL/dh = G W and dL/dW += G^T h with G the combined gradient, written over the
    logits buffer with the upstream gradients a, b as its row scales: no pass of its own)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, active, y, tau, floor, backend, chunk):
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        kl, logp, tlogp = (torch.zeros(n, dtype=cdt, device=hidden.device) for _ in range(3))
        states = []
        for rows in _fused_chunks(n, active, chunk):
            logits = hidden[rows] @ weight.t()
            if bias is not None:
                logits += bias
            k, lp, tl, st = rows_forward(logits, teacher.chunk(rows), y[rows], None, tau, floor, backend)
            if not torch.isfinite(k).all():
                from .fused_linear import _diagnose

                raise ValueError(_diagnose(hidden, weight, logits, teacher.chunk(rows), teacher.kind))
            kl[rows], logp[rows], tlogp[rows] = k.to(cdt), lp.to(cdt), tl.to(cdt)
            states.append(st)
        ctx.states, ctx.args = states, (teacher, active, tau, floor, backend, chunk)
        ctx.save_for_backward(hidden, weight, bias, y)
        ctx.mark_non_differentiable(tlogp)
        return kl, logp, tlogp

    @staticmethod
    @first_order_only("fused_hybrid_loss")
    @once_differentiable
    def backward(ctx, g_kl, g_lp, _g_t):
        from .fused_linear import _accumulate_mm

        hidden, weight, bias, y = ctx.saved_tensors
        teacher, active, tau, floor, backend, chunk = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        a = zeros if g_kl is None else g_kl
        b = zeros if g_lp is None else g_lp
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for rows, st in zip(_fused_chunks(n, active, chunk), ctx.states):
            h_c = hidden[rows]
            logits = h_c @ weight.t()
            if bias is not None:
                logits += bias
            g = rows_backward(
                logits, teacher.chunk(rows), y[rows], None, tau, floor, st, a[rows], b[rows], out=logits
            )  # the chunk's temporary logits: overwritten
            if need_h:
                gh[rows] = g @ weight
            if need_w:
                _accumulate_mm(gw, g.t(), h_c)
            if need_b:
                gb += g.sum(0, dtype=acc)
        return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
                None, None, None, None, None, None, None)  # fmt: skip


def _fused_chunks(n: int, active, chunk: int):
    rows_all = None if active is None else active.nonzero().squeeze(1)  # masked rows cost no matmul at all
    n_rows = n if rows_all is None else rows_all.numel()
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        yield slice(start, stop) if rows_all is None else rows_all[start:stop]


def fused_hybrid_rows(
    hidden, weight, bias, teacher, actions, mask, tau: float, floor, backend: str, chunk: int
):
    """`hybrid_rows` from hidden states [..., H] and an LM head (validated by the caller; `teacher` a flattened
    `fused_linear._Teacher` of logits or hidden states): (KL, log pi(y), log pi_T(y)), each [...]."""
    batch = hidden.shape[:-1]
    n = batch.numel()
    v = weight.shape[0]
    h = hidden.reshape(n, hidden.shape[-1])
    y = actions.reshape(n).clamp(0, v - 1)
    active = None if mask is None else mask.reshape(n)
    kl, logp, tlogp = FusedLinearHybridFunction.apply(h, weight, bias, teacher, active, y, tau, floor, backend,
                                                      int(chunk))  # fmt: skip
    return kl.reshape(batch), logp.reshape(batch), tlogp.reshape(batch)
