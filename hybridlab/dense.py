"""Dense gradient: the full-vocabulary reverse KL per visited state and its closed-form logit gradient.

For student logits z in R^V at sampling temperature tau, p = softmax(z / tau), and teacher probabilities q,

    KL(p || q)          = sum_j p_j (log p_j - log q_j)
    d KL / d z_j        = (1 / tau) * p_j * (log p_j - log q_j - KL)

with 0 log 0 = 0: a -inf logit (padded or banned token) on either side is legal where the student gives it
probability 0. A teacher probability of 0 where the student has mass makes the KL infinite: that is an error
unless `teacher_floor` asks for an explicit clamp of log q.

Two implementations live behind one `autograd.Function`:
- "torch": the closed form in PyTorch, chunked over rows so a 150k vocabulary costs one [chunk, V] fp32
  workspace, not several [N, V] ones;
- "triton": the fused kernel in `hybridlab.kernels.dense_kl_triton` (loss and gradient in one launch).
`dense_kl_reference` is the plain autograd-through-log_softmax version most code uses; tests and benchmarks
compare against it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import (
    check_actions,
    check_logits_pair,
    check_mask,
    check_teacher_floor,
    check_temperature,
    describe_nonfinite,
    describe_temperature_overflow,
    first_order_only,
    shape_of,
)
from ._logits import CHUNK_ELEMENTS, add_score_grad, compute_dtype, row_logsumexp, selected_logprob
from ._onepass import dense_kl_fast_torch

# impl(student [N,V], teacher [N,V], active_rows [N] bool | None, temperature, need_grad, teacher_floor)
#   -> (kl [N] fp32/fp64 with 0 on inactive rows, grad [N,V] in student's dtype (0 on inactive rows) | None)
DenseImpl = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]

TORCH_CHUNK_ELEMENTS = CHUNK_ELEMENTS  # rows per chunk = CHUNK_ELEMENTS // V


def dense_kl_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(z / tau) || softmax(t)) per row by autograd through log_softmax (the usual way).

    Shapes: [..., V] x [..., V] -> [...]. Computed in fp32 (fp64 for fp64 inputs); 0 log 0 = 0.
    """
    cdt = compute_dtype(student_logits, teacher_logits)
    logp = F.log_softmax(student_logits.to(cdt) / temperature, dim=-1)
    logq = F.log_softmax(teacher_logits.to(cdt), dim=-1)
    p = logp.exp()
    live = p > 0
    # where() on both logs keeps -inf - -inf = NaN out of the forward *and* the backward pass.
    diff = torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0)
    return (p * diff).sum(-1)


# The closed form in PyTorch lives below this module and the kernels (no import circle): the fast chunked path
# (softmax, two row dot products, softmax's backward for the gradient), which hands the chunks that need care
# (offsets, -inf entries, a floor, fp64) to the centred `dense_kl_torch`.
_torch_impl = dense_kl_fast_torch


def _triton_impl(*args, **kwargs):
    from .kernels.dense_kl_triton import dense_kl_triton_impl

    return dense_kl_triton_impl(*args, **kwargs)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ("auto", "torch", "triton", "compiled")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on. "compiled" (torch.compile of the one-pass rows, opt-in: the first call in a
    process compiles) serves dense_kl, hybrid_loss and their fused-linear forms; the top-k bound runs torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported (Triton's CPU interpreter); use backend='torch' or CUDA tensors"
            )
    return backend


def _compiled_impl(*args, **kwargs):
    from ._compiled import dense_kl_compiled

    return dense_kl_compiled(*args, **kwargs)


_IMPLS: dict[str, DenseImpl] = {"torch": _torch_impl, "triton": _triton_impl, "compiled": _compiled_impl}


class DenseKLFunction(torch.autograd.Function):
    """Loss and closed-form gradient in the forward pass; backward scales the saved gradient by the upstream one.

    With `actions` it also returns log pi(a_t | s_t) at the sampled tokens, and its backward adds the score
    gradient (onehot(a) - p) / tau into the *same* saved [N, V] buffer: the whole hybrid loss then costs one
    [N, V] gradient buffer instead of three (dense, sparse and their sum).
    """

    @staticmethod
    def forward(
        ctx, student, teacher, active, actions, temperature, teacher_floor, backend, inplace, grad_on
    ):
        ctx.set_materialize_grads(False)
        need_grad = ctx.needs_input_grad[0] and grad_on  # grad mode is off inside forward: the caller says
        kl, grad = _IMPLS[backend](student, teacher, active, temperature, need_grad, teacher_floor)
        if not torch.isfinite(kl).all():  # one cheap check on [N]; the costly diagnosis only on failure
            raise ValueError(_diagnose(student, teacher, active, kl, temperature))
        ctx.inplace = inplace
        ctx.consumed = False
        ctx.temperature = temperature
        logp = lse = shift = None
        if actions is not None:
            shift, lse = row_logsumexp(student, temperature, active)
            if not torch.isfinite(lse).all():
                raise ValueError(_diagnose(student, teacher, active, lse, temperature))
            logp = selected_logprob(student, actions, shift, lse, temperature, active)
        if need_grad:  # the logits themselves are kept only when the score gradient will need them
            keep = actions is not None
            ctx.save_for_backward(grad, student if keep else None, actions, shift, lse, active)
        return kl, logp

    @staticmethod
    @first_order_only("dense_kl")  # closed-form backward: a second derivative through it would be wrong
    @once_differentiable
    def backward(ctx, grad_kl, grad_logp):
        if ctx.consumed:
            raise RuntimeError(
                "dense_kl's saved gradient was already used by a backward pass (it is scaled in place to save "
                "an [N, V] buffer); call dense_kl(..., inplace_backward=False) to backpropagate more than once"
            )
        grad, student, actions, shift, lse, active = ctx.saved_tensors
        out = grad if ctx.inplace else grad.clone()
        ctx.consumed = ctx.inplace
        # The saved gradient is d KL / dz; the upstream gradient g [N] scales its rows. With log-probs
        # (hybrid_loss: g = beta * c_b) the scale is folded into the score-gradient pass that runs anyway;
        # without, no pass over [N, V] is spent when g is 1 on every active row (a plain .sum() of the KL: a
        # cheap [N] check). Only a weighted KL without log-probs pays one in-place multiply.
        g = None
        if grad_kl is None:
            out.zero_()
        else:
            g = grad_kl.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
        if grad_logp is not None:
            add_score_grad(out, student, actions, shift, lse, grad_logp, ctx.temperature, active, out_scale=g)
        elif g is not None:
            ones = g == 1
            if active is not None:
                ones = ones | ~active  # inactive rows are zero whatever their upstream gradient
            if not bool(ones.all()):
                out.mul_(g[:, None])  # bf16/fp16 x fp32 is computed in fp32 and rounded once into the buffer
        return out, None, None, None, None, None, None, None, None


def _diagnose(student, teacher, active, kl, temperature) -> str:
    rows = active
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        msg = describe_nonfinite(name, x, rows)
        if msg:
            return msg
    msg = describe_temperature_overflow(student, temperature, rows)
    if msg:
        return msg
    bad = (~torch.isfinite(kl)).nonzero()
    r = int(bad[0, 0]) if bad.numel() else -1
    return (
        f"infinite KL: teacher_logits {shape_of(teacher)} gives probability 0 (a -inf logit) to a token the "
        f"student_logits {shape_of(student)} give mass (first such row: {r}); pass teacher_floor=<log-prob, "
        "e.g. -30.0> to clamp log q explicitly, or mask those rows"
    )


def dense_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    teacher_floor: float | None = None,
    inplace_backward: bool = True,
) -> torch.Tensor:
    """Full-vocabulary reverse KL(softmax(student / temperature) || softmax(teacher)) per position.

    Args:
        student_logits: [..., V], any float dtype; receives the closed-form gradient.
        teacher_logits: [..., V] logits or log-probs (log_softmax is idempotent); never receives a gradient.
        temperature: the student's sampling temperature tau (the teacher is taken as given).
        mask: [...] bool; False positions get KL 0 and gradient 0 and are not computed. An all-False mask
            (a micro-batch without response tokens) is legal: KL 0 everywhere, zero gradient.
        backend: "auto" (Triton on CUDA, torch otherwise), "torch", "triton" or "compiled" (torch.compile of
            the same closed form, opt-in: the first call in a process compiles for seconds; on CPU it needs a
            C++ compiler).
        teacher_floor: None (an infinite KL is an error) or a finite log-probability < 0 at which log q is
            clamped. NaN, +inf or all -inf teacher rows are an error with or without it.
        inplace_backward: scale the saved [N, V] gradient in place (saves memory; one backward only).

    Returns:
        [...] KL in fp32 (fp64 for fp64 inputs).
    """
    kl, _ = _apply(
        student_logits, teacher_logits, None, temperature, mask, backend, teacher_floor, inplace_backward
    )
    return kl


def dense_kl_and_logprobs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    actions: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    teacher_floor: float | None = None,
    inplace_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_kl` plus log pi(actions | s) at temperature tau, sharing one [N, V] gradient buffer.

    Shapes: [..., V], [..., V], [...] long -> ([...] KL, [...] log-prob); both differentiable w.r.t. the student
    logits. This is what `hybrid_loss` uses: its dense term needs the KL, its sparse term the log-probs.
    """
    return _apply(
        student_logits, teacher_logits, actions, temperature, mask, backend, teacher_floor, inplace_backward
    )


def _apply(
    student_logits, teacher_logits, actions, temperature, mask, backend, teacher_floor, inplace_backward
):
    """Validate, then `apply_checked`: (kl, logp | None)."""
    check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    tau = check_temperature(temperature)
    batch_shape = student_logits.shape[:-1]
    dev = student_logits.device
    check_mask(mask, batch_shape, "student_logits", dev)
    if actions is not None:
        check_actions(actions, batch_shape, student_logits.shape[-1], dev, mask, "student_logits")
    floor = check_teacher_floor(teacher_floor)
    name = resolve_backend(backend, dev)
    return apply_checked(student_logits, teacher_logits, actions, tau, mask, name, floor, inplace_backward)


def apply_checked(student_logits, teacher_logits, actions, tau, mask, name, floor, inplace_backward):
    """Flatten to [N, V] rows, run `DenseKLFunction`, restore the batch shape: (kl, logp | None).

    Trusts its caller (`_apply`, `hybrid_loss`): the inputs are validated, `tau` and `floor` checked floats,
    `name` a resolved backend."""
    batch_shape = student_logits.shape[:-1]
    v = student_logits.shape[-1]
    a = None if actions is None else actions.reshape(-1).clamp(0, v - 1)
    z = student_logits.reshape(-1, v)
    t = teacher_logits.detach().reshape(-1, v)
    active = None if mask is None else mask.reshape(-1)
    kl, logp = DenseKLFunction.apply(
        z, t, active, a, tau, floor, name, inplace_backward, torch.is_grad_enabled()
    )
    return kl.reshape(batch_shape), None if logp is None else logp.reshape(batch_shape)
