"""`fused_hybrid_loss`: `hybrid_loss` from the student's last hidden states and LM head, no [N, V] student logits.

    dense  = beta * sum_b c_b sum_t KL_t            (closed-form logit gradient)
    sparse = -sum_b c_b sum_t log pi(y_t|s_t) A_t    (score function, A_t detached)

Teacher logits or hidden states: one chunked pass (`hybridlab._onepass.FusedLinearHybridFunction`). Forward
computes each chunk's logits, keeps only its row scalars (KL_t, log pi(y_t), log pi_T(y_t)) and drops the
logits; backward, once every upstream gradient is known (the sparse term's -c_b A_t depends through the
analytic future KL on the KL of *later* rows), recomputes each chunk's logits and writes the combined dense +
score gradient over them, scaled per row by the upstream gradients inside the kernel (no pass of its own).
Student LM-head matmuls ([N, H] x [H, V]) per micro-batch: forward 1, backward 3 (recompute, dL/dh, dL/dW): 4,
against 3 for materialised logits. Per chunk of C rows the vocabulary-wide memory is one [C, V] logits buffer
(plus the teacher's chunk and the torch path's cache-sized workspace); nothing [N, V] exists on the student side.

A top-k teacher (`TopKTeacher`) keeps two chunked passes: the tail-bucket KL from `fused_linear_dense_kl`
(gradient precomputed in forward for the known row weights beta * c_b: 3 matmuls) and the sampled-token
log-probs from `fused_linear_logprobs` (1 + 3): 7.

`hybrid_loss` is the reference: the same inputs through materialised logits give the same loss and gradients
(tests/test_train.py checks it). Everything here is torch only (plus the Triton kernels when backend resolves
to "triton").
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._checks import (
    check_actions,
    check_float,
    check_mask,
    check_teacher_floor,
    check_temperature,
    first_order_only,
    shape_of,
)
from ._logits import row_shift
from ._onepass import fused_hybrid_rows
from .fused_linear import DEFAULT_CHUNK, _accumulate_mm, check_dense_kl_args, dense_kl_checked
from .hybrid import HybridLossOutput, _normalizer, assemble, check_batch, check_future_norm, check_weights
from .topk import TopKTeacher


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(n: int, active: torch.Tensor | None, chunk: int):
    rows_all = None if active is None else active.nonzero().squeeze(1)
    n_rows = n if rows_all is None else rows_all.numel()
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        yield slice(start, stop) if rows_all is None else rows_all[start:stop]


class _FusedLinearLogprob(torch.autograd.Function):
    """log softmax((h W^T + b) / tau)[a] per row, chunked; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, actions, active, tau, chunk):
        n = hidden.shape[0]
        cdt = _cdt(hidden)
        logp = torch.zeros(n, dtype=cdt, device=hidden.device)
        lse = torch.zeros(n, dtype=cdt, device=hidden.device)
        shift = torch.zeros(n, dtype=cdt, device=hidden.device)
        for rows in _chunks(n, active, chunk):
            logits = hidden[rows] @ weight.t()
            if bias is not None:
                logits += bias
            zc = logits.to(cdt)
            m = row_shift(zc)  # centred before dividing by tau: no rounding at the scale of 1e4 / tau
            z = zc.sub_(m).div_(tau)
            lse_c = torch.logsumexp(z, dim=-1)
            if not torch.isfinite(lse_c).all():
                raise ValueError(
                    f"student logits (hidden {shape_of(hidden)} @ weight {shape_of(weight)}.T) are not finite "
                    "on some rows (NaN or inf in the hidden states or the LM head)"
                )
            lse[rows] = lse_c
            shift[rows] = m[:, 0]
            logp[rows] = z.gather(1, actions[rows][:, None])[:, 0] - lse_c
        ctx.save_for_backward(hidden, weight, bias, actions, active, shift, lse)
        ctx.tau, ctx.chunk = tau, chunk
        return logp

    @staticmethod
    @first_order_only("the fused-linear hybrid loss")
    @once_differentiable
    def backward(ctx, g):
        hidden, weight, bias, actions, active, shift, lse = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cdt = _cdt(hidden)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        g = g.to(cdt)
        for rows in _chunks(hidden.shape[0], active, chunk):
            h_c = hidden[rows]
            logits = h_c @ weight.t()
            if bias is not None:
                logits += bias
            g_c = g[rows] / tau
            # d log p(a) / dz = (onehot(a) - p) / tau, scaled by the upstream gradient; one fp32 [C, V] buffer.
            z = logits.to(cdt).sub_(shift[rows][:, None]).div_(tau)
            grad = z.sub_(lse[rows][:, None]).exp_().mul_(-g_c[:, None])
            grad.scatter_add_(1, actions[rows][:, None], g_c[:, None])
            grad = grad.to(hidden.dtype)
            if need_h:
                gh[rows] = grad @ weight
            if need_w:
                _accumulate_mm(gw, grad.t(), h_c)
            if need_b:
                gb += grad.sum(0, dtype=acc)
        return (
            gh,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    actions: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / tau)[actions] without the [N, V] logits.

    Shapes: hidden [..., H], weight [V, H], actions [...] long, mask [...] bool -> [...] fp32 (fp64 for fp64
    inputs), 0 on masked rows. Differentiable w.r.t. hidden, weight and bias (fp32-accumulated weight gradient).
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden {shape_of(hidden)} {hidden.dtype} and weight {shape_of(weight)} {weight.dtype} must be "
            "[..., H] and [V, H] of one dtype"
        )
    batch = hidden.shape[:-1]
    v = weight.shape[0]
    check_mask(mask, batch, "hidden", hidden.device)
    check_actions(actions, batch, v, hidden.device, mask, "hidden")
    tau = check_temperature(temperature)
    return _logprobs_checked(hidden, weight, actions, tau, mask, bias, chunk_size)


def _logprobs_checked(hidden, weight, actions, tau: float, mask, bias, chunk_size) -> torch.Tensor:
    """`fused_linear_logprobs` on validated arguments (its callers checked them once)."""
    batch, v = hidden.shape[:-1], weight.shape[0]
    n = batch.numel()
    a = actions.reshape(n).clamp(0, v - 1)
    active = None if mask is None else mask.reshape(n)
    h = hidden.reshape(n, hidden.shape[-1])  # explicit sizes: N may be 0
    out = _FusedLinearLogprob.apply(h, weight, bias, a, active, tau, int(chunk_size))
    return out.reshape(batch)


@torch.no_grad()
def teacher_selected_logprobs(
    teacher,
    actions: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    teacher_floor: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """log softmax(teacher)[actions] for teacher logits [..., V] or (hidden [..., H'], weight [V, H'][, bias]).

    Chunked over rows: never more than a [C, V] fp32 buffer. Returns [...] fp32 (fp64 for an fp64 teacher), 0 on masked rows.
    """
    if isinstance(teacher, tuple):
        th, tw = teacher[:2]
        tb = teacher[2] if len(teacher) == 3 else None
        batch, v = th.shape[:-1], tw.shape[0]
        flat = th.reshape(batch.numel(), th.shape[-1])
        cdt = _cdt(th)

        def logits_of(rows):
            z = flat[rows] @ tw.t()
            return z + tb if tb is not None else z
    else:
        batch, v = teacher.shape[:-1], teacher.shape[-1]
        flat = teacher.reshape(batch.numel(), v)
        cdt = _cdt(teacher)

        def logits_of(rows):
            return flat[rows]

    n = batch.numel()
    a = actions.reshape(n).clamp(0, v - 1)
    active = None if mask is None else mask.reshape(n)
    out = torch.zeros(n, dtype=cdt, device=actions.device)
    for rows in _chunks(n, active, chunk_size):
        logq = torch.log_softmax(logits_of(rows).to(cdt), dim=-1).gather(1, a[rows][:, None])[:, 0]
        out[rows] = logq if teacher_floor is None else logq.clamp_min(teacher_floor)
    return out.reshape(batch)


def fused_hybrid_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    beta: float | torch.Tensor = 1.0,
    lam: float = 1.0,
    future: str = "analytic",
    gamma: float = 1.0,
    baseline: str | torch.Tensor = "none",
    group_size: int | None = None,
    temperature: float = 1.0,
    normalize: str | float = "sequences",
    seq_weights: torch.Tensor | None = None,
    backend: str = "auto",
    teacher_floor: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    logprob_precision: str | torch.dtype | float = "auto",
    future_norm: str = "sum",
) -> HybridLossOutput:
    """`hybrid_loss` with the student given as hidden states [B, T, H] and LM head weight [V, H] (+ bias [V]).

    `teacher` is teacher logits [B, T, V] or (teacher_hidden [B, T, H'], teacher_weight [V, H'][, bias [V]])
    (then neither side's [B, T, V] logits exist), or a `TopKTeacher` (future="analytic" or "none";
    `logprob_precision` is its log-probs' resolution, as in `dense_kl_topk`). All other arguments and the returned `HybridLossOutput` are
    those of `hybrid_loss` (an all-False mask gives loss 0 and zero gradients; with a top-k teacher `logratio`
    is zeros; `grad_norms` is None).
    """
    # validated once here: hidden, weight, bias, teacher, mask, temperature (the fused KL's checks), then the batch
    tau, name, teacher_rows = check_dense_kl_args(hidden, weight, teacher, temperature, mask, chunk_size, bias, None,
                                                  backend, logprob_precision)  # fmt: skip
    teacher_floor = check_teacher_floor(teacher_floor)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {shape_of(hidden)}")
    b, t, _ = hidden.shape
    v = weight.shape[0]
    mask = check_batch(b, t, v, hidden.device, actions, rewards, mask, seq_weights, baseline, future, gamma,
                       "hidden", mask_checked=True)  # fmt: skip
    check_weights(beta, lam, b)
    check_future_norm(future_norm)
    dtype = _cdt(hidden)
    c = _normalizer(normalize, mask, seq_weights, dtype)  # [B]
    if not isinstance(teacher, TopKTeacher):  # one pass: row scalars forward, the combined gradient backward
        teacher_rows.flatten(b * t, mask.reshape(-1))
        kl, logp, t_logp = fused_hybrid_rows(hidden, weight, bias, teacher_rows, actions, mask, tau, teacher_floor,
                                             name, chunk_size)  # fmt: skip
        return assemble(kl.to(dtype), logp.to(dtype), t_logp.to(dtype), rewards, mask, c, beta=beta, lam=lam,
                        future=future, gamma=gamma, baseline=baseline, group_size=group_size,
                        future_norm=future_norm)  # fmt: skip
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    row_w = torch.where(mask, c[:, None].expand(b, t), zero).detach()

    # log-probs first: autograd then runs the dense node's backward first, which frees its precomputed fp32
    # [V, H] weight gradient before the log-prob backward allocates its own.
    logp = _logprobs_checked(hidden, weight, actions, tau, mask, bias, chunk_size)
    kl = dense_kl_checked(
        hidden, weight, teacher_rows, tau, name, mask, chunk_size, bias, row_w, teacher_floor
    )
    kl, logp = kl.to(dtype), logp.to(dtype)
    t_logp = None
    if future in ("k1", "k3") and isinstance(teacher, TopKTeacher):
        raise ValueError(f"future={future!r} needs the teacher's full log-prob at each sampled token; a top-k "
                         "teacher lacks it for tokens outside its top-k: use future='analytic'")  # fmt: skip
    if future in ("k1", "k3"):  # an extra pass over the teacher's vocabulary, only when needed
        with torch.no_grad():
            t_logp = teacher_selected_logprobs(
                teacher, actions, mask=mask, teacher_floor=teacher_floor, chunk_size=chunk_size
            ).to(dtype)
    return assemble(kl, logp, t_logp, rewards, mask, c, beta=beta, lam=lam, future=future, gamma=gamma,
                    baseline=baseline, group_size=group_size, future_norm=future_norm)  # fmt: skip


__all__ = ["fused_hybrid_loss", "fused_linear_logprobs", "teacher_selected_logprobs"]
