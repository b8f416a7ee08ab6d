"""Dense KL against a top-k teacher (API or server teachers return only the top-k log-probabilities).

Collapse everything outside the teacher's top-k into one "tail" category on both sides. With
p = softmax(z / tau) over the full vocabulary, the teacher's log-probabilities lq_k at ids i_k and its tail
mass Q_T = 1 - sum_k exp(lq_k),

    KL_topk = sum_k p_{i_k} (log p_{i_k} - lq_k) + P_T (log P_T - log Q_T),     P_T = 1 - sum_k p_{i_k}
    dKL/dz_j = (1 / tau) p_j (r_j - KL_topk),
        r_j = log p_j - lq_k          for j = i_k (a top-k token)
        r_j = log P_T - log Q_T       for j in the tail (one shared coarse log-ratio)

By the data-processing inequality (coarsening both distributions by the same map cannot increase a KL),
KL_topk <= KL(p || q_full) for every full teacher distribution q_full consistent with the top-k: it is a lower
bound, and it is tight when the student and teacher agree on the shape of the tail.

Numerics:
- P_T is summed directly over the tail (never as 1 - P_top), so small tails keep their relative precision.
- Real teachers send *rounded* log-probabilities (a bf16 model's top-k, an API's 4 decimals): their top-k
  masses may sum to a hair above 1, and 1 - sum exp(lq) says nothing about a tail smaller than that rounding.
  Each given lq_k lies within delta_k of the exact value, where delta_k is the input's resolution
  (`logprob_precision`: inferred from the values by default; see `logprob_resolution`). The exact tail mass is
  then at most Q_T^up = max(1 - sum exp(lq), 0) + sum_k exp(lq_k) (1 - exp(-delta_k)), and that is what we use:
  a larger Q_T only lowers P_T log(P_T / Q_T), and the top-k terms move by at most sum_k p_k delta_k. Hence

        dense_kl_topk  <=  KL(p || q_full) + sum_k p_{i_k} delta_k  <=  KL(p || q_full) + max_k delta_k

  for every full teacher consistent with the given (rounded) top-k: the slack is the size of the input's own
  rounding (about 0.004 |lq| for bf16, 5e-5 for 4 decimals, 6e-8 |lq| for fp32). Errors made *before* the
  rounding (e.g. the teacher's own log-sum-exp) are not covered. `tail_floor` is an optional extra lower clamp.
  The guarantee holds row by row: "auto" guesses each row's resolution from that row's values alone.
- Inputs that void the bound under "auto" (the guess cannot see their error; a `ResolutionWarning` is raised
  for rows guessed as unrounded fp32/fp64): log-probs rounded to 6 or more decimals and stored in fp32 (their
  step is below what fp32 shows at |lq| > 1: up to 2.3 nats over in a measured case); a teacher's own fp32
  log-softmax (its error is about an ulp of the *logits*, not of the log-prob: 0.12 nats over measured);
  fp64 log-probs whose tail mass is below 1e-18 (below fp64's resolution of the top-k mass). For these, pass
  `logprob_precision` explicitly (every entry point takes it: `dense_kl_topk`, `fused_linear_dense_kl`,
  `fused_hybrid_loss`), e.g. 5e-7 for 6 decimals or 1e-5 for a server's fp32 log-softmax.
- Teacher log-probability -inf at a top-k token where the student has mass gives an infinite KL: an error.

`dense_kl_topk_renormalized` (renormalise both sides over the top-k ids) is offered for comparison only: it is
NOT a bound on the full KL and ignores the student's mass outside the top-k.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ._checks import (
    check_float,
    check_mask,
    check_temperature,
    check_tensor,
    describe_nonfinite,
    describe_temperature_overflow,
    first_order_only,
    shape_of,
)
from ._torch_ref import topk_kl_torch
from .dense import compute_dtype, resolve_backend

# Unit roundoff (half an ulp, relative) of the formats teachers send log-probabilities in.
UNIT_ROUNDOFF = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}
# A row whose top-k probabilities sum above 1 + this is not a set of log-probabilities (logits passed?).
MASS_TOLERANCE = 0.02


class TopKTeacher(NamedTuple):
    """A teacher known by its top-k log-probabilities: logprobs [..., K] (float) at ids [..., K] (int64)."""

    logprobs: torch.Tensor
    ids: torch.Tensor


class ResolutionWarning(UserWarning):
    """logprob_precision="auto" could not tell how some rows' top-k log-probabilities were rounded."""


def _decimal_rows(x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Per row of x [N, K]: the number of decimals d if every seen value is a multiple of 10^-d (and some value
    needs all d), else 0. [N] int64.

    Only d whose step is well above the storage precision counts, so ordinary fp32 values are never mistaken
    for rounded decimals (6 decimals in fp32 are therefore not recognised: see the module docstring)."""
    x64 = torch.where(seen, x.to(torch.float64), 0.0)
    err = x64.abs() * torch.finfo(x.dtype).eps  # storage error of a rounded decimal, per value
    out = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    undecided = seen.any(-1)
    for d in range(1, 9):
        step = 10.0**-d
        tol = err / step  # in units of the step
        undecided &= ~(tol.amax(-1) > 0.1)  # the step is too fine for this storage to tell
        scaled = x64 / step
        multiple = ((scaled - scaled.round()).abs() <= tol).all(-1)
        coarser = scaled / 10
        needs_d = ((coarser - coarser.round()).abs() > tol / 10).any(-1)
        hit = undecided & multiple
        out = torch.where(hit & needs_d, d, out)
        undecided &= ~hit
    return out


def _auto_resolution(lq: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """The "auto" resolution, guessed row by row (a placeholder or a differently rounded row cannot change
    another row's guess): [N, K] -> delta [N, K] fp64. Warns (`ResolutionWarning`) when counted rows look like
    unrounded fp32 / fp64 values, the case the guess cannot check."""
    lq64 = lq.to(torch.float64).abs()
    seen = torch.isfinite(lq) & (lq != 0)
    # Per row, every format its values are consistent with; the coarsest wins (bf16 values are also decimals).
    u = torch.full(lq.shape[:1], UNIT_ROUNDOFF[lq.dtype], dtype=torch.float64, device=lq.device)
    tiny = torch.full_like(u, torch.finfo(lq.dtype).tiny)
    decided = torch.zeros(lq.shape[:1], dtype=torch.bool, device=lq.device)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if torch.finfo(dt).bits > torch.finfo(lq.dtype).bits:
            break
        fits = ((lq.to(dt).to(lq.dtype) == lq) | ~seen).all(-1) & ~decided
        u = torch.where(fits, UNIT_ROUNDOFF[dt], u)
        tiny = torch.where(fits, torch.finfo(dt).tiny, tiny)
        decided |= fits
    delta = (lq64 * (u / (1 - u))[:, None]).clamp_min(tiny[:, None])
    if lq.dtype in (torch.float32, torch.float64):
        d = _decimal_rows(lq, seen)
        half_step = torch.where(d > 0, 0.5 * 10.0 ** (-d.to(torch.float64)), 0.0)
        delta = torch.maximum(delta, half_step[:, None])
        # Rows guessed as unrounded fp32 / fp64 values: true, or a rounding the guess cannot see.
        plain = (u <= UNIT_ROUNDOFF[torch.float32]) & (d == 0) & seen.any(-1)
        if active is not None:
            plain &= active
        n_plain = int(plain.sum())
        if n_plain:
            warnings.warn(
                f"logprob_precision='auto': {n_plain} of {lq.shape[0]} rows of teacher_topk_logprobs "
                f"{shape_of(lq)} look like unrounded {lq.dtype} values; the lower bound then assumes they are "
                "exact to half an ulp. It does not hold for log-probs rounded to 6 or more decimals and stored "
                "in fp32, for a teacher's own fp32 log-softmax (its error is about an ulp of the logits), or "
                "for fp64 values with a tail mass below 1e-18. Pass logprob_precision explicitly (e.g. 5e-7 "
                "for 6 decimals, 1e-5 for a server's fp32 log-softmax, or the dtype they were rounded to).",
                ResolutionWarning,
                stacklevel=4,
            )
    return delta


def logprob_resolution(
    lq: torch.Tensor, precision: str | torch.dtype | float = "auto", active: torch.Tensor | None = None
) -> torch.Tensor:
    """delta [N, K] fp64: how far each given top-k log-probability may lie from the exact one (its rounding).

    precision: a float (absolute: 5e-5 for log-probs given to 4 decimals); a dtype (the format the values were
    rounded to, e.g. torch.bfloat16 for a bf16 teacher's log-probs stored in fp32); or "auto": per row, the
    coarsest resolution that row's finite nonzero values are consistent with (rounded decimals, else bf16 or
    fp16 if every value is exactly representable there, else the tensor's own dtype). Guessing too coarse only
    loosens the bound; guessing too fine would break it, hence the coarsest consistent guess, row by row (one
    placeholder or one differently rounded row cannot change the guess of another). Decimals finer than the
    storage can show (6 decimals in fp32) are not recognised; a `ResolutionWarning` says when counted rows
    (`active` [N] bool, default all) look unrounded: pass the resolution explicitly then.
    """
    lq64 = lq.to(torch.float64).abs()
    if isinstance(precision, (int, float)) and not isinstance(precision, bool):
        if not (0.0 < float(precision) < 1.0):
            raise ValueError(f"logprob_precision as a number must lie in (0, 1), got {precision!r}")
        return torch.full_like(lq64, float(precision))
    if isinstance(precision, str) and precision == "auto":
        return _auto_resolution(lq, active)
    if precision not in UNIT_ROUNDOFF:
        raise ValueError(
            f"logprob_precision must be 'auto', a float dtype {list(UNIT_ROUNDOFF)} or a positive number "
            f"(the absolute resolution), got {precision!r}"
        )
    u = UNIT_ROUNDOFF[precision]
    tiny = torch.finfo(precision).tiny
    return (lq64 * (u / (1 - u))).clamp_min(tiny)


def teacher_log_tail(
    lq: torch.Tensor,
    precision: str | torch.dtype | float = "auto",
    tail_floor: float | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, K] top-k log-probabilities -> [N] log Q_T^up, an upper bound on the teacher's exact tail mass.

    Q_T^up = max(1 - sum exp(lq), 0) + sum_k exp(lq_k) (1 - exp(-delta_k)), delta = `logprob_resolution`
    (see the module docstring: using an upper bound on the tail keeps the lower bound on the KL), then at least
    `tail_floor` if given; `active` [N] bool restricts the "auto" precision guess to counted rows (padding may
    hold placeholders). -expm1(logsumexp) in fp64: exact even when the top-k holds all but 1e-12 of the mass.
    Returned in fp32 (fp64 for fp64 log-probs).
    """
    lq64 = lq.to(torch.float64)
    delta = logprob_resolution(lq, precision, active)
    q_tail = (-torch.expm1(torch.logsumexp(lq64, dim=-1))).clamp_min(0.0)
    slack = (lq64.exp() * -torch.expm1(-delta)).sum(-1)
    q_up = q_tail + slack
    if tail_floor is not None:
        q_up = q_up.clamp_min(tail_floor)
    return q_up.log().to(torch.float32 if lq.dtype != torch.float64 else torch.float64)


_topk_torch_impl = topk_kl_torch  # the closed form in PyTorch (below this module and the kernels)


def _topk_triton_impl(*args, **kwargs):
    from .kernels.topk_triton import topk_kl_triton_impl

    return topk_kl_triton_impl(*args, **kwargs)


# The top-k bound has no compiled form: backend="compiled" (one setting for a whole run, see TrainConfig) runs
# the torch one here.
_IMPLS = {"torch": _topk_torch_impl, "triton": _topk_triton_impl, "compiled": _topk_torch_impl}


def topk_kl_impl(backend: str, student, lq, ids, log_qt, active, temperature, need_grad):
    """Dispatch for callers that already validated their inputs (the fused linear path)."""
    return _IMPLS[backend](student, lq, ids, log_qt, active, temperature, need_grad)


class TopKKLFunction(torch.autograd.Function):
    """Loss and closed-form gradient in forward; backward scales the saved gradient by the upstream one."""

    @staticmethod
    def forward(ctx, student, lq, ids, log_qt, active, temperature, backend, grad_enabled):
        # needs_input_grad is True under torch.no_grad too: the caller says whether a backward can follow.
        need_grad = ctx.needs_input_grad[0] and grad_enabled
        kl, grad = _IMPLS[backend](student, lq, ids, log_qt, active, temperature, need_grad)
        if not torch.isfinite(kl).all():
            raise ValueError(_diagnose(student, lq, active, kl, temperature))
        ctx.consumed = False
        if need_grad:
            ctx.save_for_backward(grad)
        return kl

    @staticmethod
    @first_order_only("dense_kl_topk")
    @once_differentiable
    def backward(ctx, grad_kl):
        if ctx.consumed:
            raise RuntimeError("dense_kl_topk's saved gradient was already used (it is scaled in place)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        scale = grad_kl.to(torch.float32 if grad.dtype != torch.float64 else grad.dtype)[:, None]
        return grad.mul_(scale), None, None, None, None, None, None, None


def _diagnose(student, lq, active, kl, temperature) -> str:
    msg = describe_nonfinite("student_logits", student, active) or describe_temperature_overflow(
        student, temperature, active
    )
    if msg:
        return msg
    bad = (~torch.isfinite(kl)).nonzero()
    r = int(bad[0, 0]) if bad.numel() else -1
    return (
        f"infinite KL: teacher_topk_logprobs {shape_of(lq)} gives log-probability -inf (or a zero tail mass) "
        f"where student_logits {shape_of(student)} have mass (first such row: {r}); mask those rows"
    )


def check_topk_inputs(
    student: torch.Tensor, lq: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Validate a top-k teacher against student logits [..., V]; returns ids as int64. Errors name shapes."""
    check_float("student_logits", student)
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(
            f"student_logits must have a non-empty vocabulary dimension, got {shape_of(student)}"
        )
    return check_topk_teacher(
        lq,
        ids,
        student.shape[:-1],
        student.shape[-1],
        student.device,
        mask,
        f"student_logits {shape_of(student)}",
    )


def check_topk_teacher(
    lq: torch.Tensor,
    ids: torch.Tensor,
    batch_shape: torch.Size,
    v: int,
    device: torch.device,
    mask: torch.Tensor | None,
    student_desc: str,
) -> torch.Tensor:
    """Validate teacher_topk_logprobs / teacher_topk_ids [..., K] for a student of batch shape [...] and
    vocabulary V (described as `student_desc` in errors); returns ids as int64."""
    check_float("teacher_topk_logprobs", lq)
    check_tensor("teacher_topk_ids", ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype} {shape_of(ids)}")
    if lq.shape != ids.shape:
        raise ValueError(
            f"shape mismatch: teacher_topk_logprobs {shape_of(lq)} vs teacher_topk_ids {shape_of(ids)}"
        )
    if lq.dim() != len(batch_shape) + 1 or lq.shape[:-1] != batch_shape:
        raise ValueError(
            f"shape mismatch: teacher_topk_logprobs {shape_of(lq)} must be [{', '.join(map(str, batch_shape))}, K] "
            f"to match {student_desc}"
        )
    k = lq.shape[-1]
    if k == 0 or k > v:
        raise ValueError(f"need 1 <= K <= V: teacher_topk_ids {shape_of(ids)}, {student_desc} has V={v}")
    for name, x in (("teacher_topk_logprobs", lq), ("teacher_topk_ids", ids)):
        if x.device != device:
            raise ValueError(f"device mismatch: {name} on {x.device}, {student_desc} on {device}")
    check_mask(mask, batch_shape, "student_logits", device)
    ids = ids.to(torch.int64)
    # Values are checked on counted rows only: padded positions may hold any placeholder ids/log-probs.
    ids_c, lq_c = (ids, lq) if mask is None else (ids[mask], lq[mask])
    if ids_c.numel():
        lo, hi = int(ids_c.min()), int(ids_c.max())
        if lo < 0 or hi >= v:
            raise ValueError(
                f"teacher_topk_ids {shape_of(ids)} out of range: values in [{lo}, {hi}] but {student_desc} "
                f"has V={v} (ids must lie in [0, {v - 1}])"
            )
        srt = ids_c.sort(dim=-1).values
        if k > 1 and (srt[..., 1:] == srt[..., :-1]).any():
            raise ValueError(
                f"teacher_topk_ids {shape_of(ids)} has a repeated id within a row (ids must be distinct)"
            )
    if torch.isnan(lq_c).any():
        raise ValueError(f"teacher_topk_logprobs {shape_of(lq)} contains NaN")
    if (lq_c > 1e-6).any():
        raise ValueError(
            f"teacher_topk_logprobs {shape_of(lq)} has values > 0 (max {float(lq_c.max()):.3g}): "
            "pass log-probabilities (log_softmax), not logits"
        )
    if lq_c.numel():
        mass = torch.logsumexp(lq_c.to(torch.float64), dim=-1).exp()
        if (mass > 1 + MASS_TOLERANCE).any():
            raise ValueError(
                f"teacher_topk_logprobs {shape_of(lq)}: top-k probabilities sum to {float(mass.max()):.4g} > 1 "
                "in some row; pass log-probabilities of one distribution"
            )
    return ids


def dense_kl_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    logprob_precision: str | torch.dtype | float = "auto",
    tail_floor: float | None = None,
) -> torch.Tensor:
    """Tail-bucket KL(student || top-k teacher) per position: a lower bound on the full-vocabulary KL.

    The bound holds up to the rounding of the given log-probabilities: value <= KL + sum_k p_k delta_k, where
    delta_k is their resolution (see the module docstring). Rounded input is accepted, never refused.

    Args:
        student_logits: [..., V] float; receives the closed-form gradient.
        teacher_topk_logprobs: [..., K] teacher log-probabilities (<= 0) at `teacher_topk_ids`; no gradient.
        teacher_topk_ids: [..., K] integer token ids in [0, V), distinct within a row.
        temperature: the student's sampling temperature tau.
        mask: [...] bool; False positions get KL 0 and gradient 0 and are not computed. An all-False mask
            (a micro-batch without response tokens) is legal: KL 0 everywhere, zero gradient.
        backend: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton".
        logprob_precision: how precise the given log-probabilities are: "auto" (inferred from the values),
            the dtype they were rounded to (e.g. torch.bfloat16), or an absolute resolution (5e-5 for 4
            decimals). It sets the upper bound used for the teacher's tail mass.
        tail_floor: optional extra lower clamp on the teacher's tail mass (raising it keeps the bound).

    Returns:
        [...] KL in fp32 (fp64 for fp64 student logits).
    """
    ids = check_topk_inputs(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask)
    tau = check_temperature(temperature)
    if tail_floor is not None and not (0.0 < tail_floor < 1.0):
        raise ValueError(f"tail_floor must lie in (0, 1), got {tail_floor!r}")
    name = resolve_backend(backend, student_logits.device)
    batch_shape = student_logits.shape[:-1]
    v, k = student_logits.shape[-1], ids.shape[-1]
    z = student_logits.reshape(-1, v)
    lq = teacher_topk_logprobs.detach().reshape(-1, k)
    ids = ids.reshape(-1, k)
    active = None if mask is None else mask.reshape(-1)
    log_qt = teacher_log_tail(lq, logprob_precision, tail_floor, active)
    if z.dtype == torch.float64:
        log_qt = log_qt.double()
    kl = TopKKLFunction.apply(z, lq, ids, log_qt, active, tau, name, torch.is_grad_enabled())
    return kl.reshape(batch_shape)


def dense_kl_topk_reference(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    temperature: float = 1.0,
    logprob_precision: str | torch.dtype | float = "auto",
    tail_floor: float | None = None,
) -> torch.Tensor:
    """The tail-bucket KL by plain autograd (gather + logsumexp), for tests: [..., V], [..., K] -> [...].

    The teacher's tail mass is the same constant as in `dense_kl_topk` (`teacher_log_tail`)."""
    cdt = compute_dtype(student_logits, teacher_topk_logprobs)
    logp = torch.log_softmax(student_logits.to(cdt) / temperature, dim=-1)
    logp_k = logp.gather(-1, teacher_topk_ids)
    logp_t = logp.scatter(-1, teacher_topk_ids, float("-inf")).logsumexp(-1)
    lq = teacher_topk_logprobs.to(cdt)
    k = lq.shape[-1]
    log_qt = teacher_log_tail(lq.reshape(-1, k), logprob_precision, tail_floor)
    log_qt = log_qt.reshape(lq.shape[:-1]).to(cdt)
    p_k, p_t = logp_k.exp(), logp_t.exp()
    live_k, live_t = p_k > 0, p_t > 0
    r_k = torch.where(live_k, logp_k, 0.0) - torch.where(live_k, lq, 0.0)
    r_t = torch.where(live_t, logp_t, 0.0) - torch.where(live_t, log_qt, 0.0)
    return (p_k * r_k).sum(-1) + p_t * r_t


def dense_kl_topk_renormalized(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL between the student and teacher both renormalised over the teacher's top-k ids. NOT A BOUND.

    This is what many distillation codes do with API teachers. It is neither a lower nor an upper bound on the
    full KL and it ignores the student's probability outside the top-k (the student can put mass anywhere
    else at no cost). Offered to compare against `dense_kl_topk`; plain autograd, [..., V] -> [...].
    """
    ids = check_topk_inputs(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask)
    tau = check_temperature(temperature)
    cdt = compute_dtype(student_logits, teacher_topk_logprobs)
    logp = torch.log_softmax(student_logits.gather(-1, ids).to(cdt) / tau, dim=-1)
    logq = torch.log_softmax(teacher_topk_logprobs.detach().to(cdt), dim=-1)
    p = logp.exp()
    live = p > 0
    kl = (p * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0))).sum(-1)
    return kl if mask is None else torch.where(mask, kl, 0.0)


def topk_from_logits(teacher_logits: torch.Tensor, k: int) -> TopKTeacher:
    """What an API teacher would return: the top-k log-probabilities of full logits [..., V] and their ids."""
    lq, ids = torch.log_softmax(teacher_logits.to(compute_dtype(teacher_logits)), dim=-1).topk(k, dim=-1)
    return TopKTeacher(lq, ids)
