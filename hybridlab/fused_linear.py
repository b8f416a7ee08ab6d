"""Dense KL straight from the student's last hidden states and LM head, in token chunks.

    KL_i = KL(softmax(h_i W^T / tau) || teacher_i),   h: [N, H], W: [V, H]

The [N, V] student logits never exist in full: per chunk of C rows,

    logits_c  = h_c W^T (+ b)                      [C, V], the only vocabulary-wide student buffer
    kl_c, G_c = dense KL and its closed-form logit gradient (Triton kernel or torch), G_c overwriting logits_c
    G_c      *= w_c                                 per-row weights (see below)
    dL/dh_c   = G_c W                               [C, H]
    dL/dW    += G_c^T h_c                           [V, H], accumulated in fp32 across chunks
    dL/db    += sum_rows G_c                        [V], fp32

so the extra memory is one [C, V] buffer (plus the teacher's chunk) and an fp32 [V, H] accumulator. Summing
bf16-rounded per-chunk products would bias the weight gradient; the accumulator stays fp32 and is rounded
once, at the end.

The teacher is one of
- teacher logits (or log-probs) [N, V];
- a tuple (teacher_hidden [N, H'], teacher_weight [V, H']) or (..., teacher_bias [V]): teacher logits are
  computed per chunk too, so neither side's [N, V] logits exist;
- a `TopKTeacher(logprobs [N, K], ids [N, K])`: the tail-bucket lower bound of `hybridlab.topk`.

Upstream gradients. The loss is L = sum_i g_i KL_i with g = dL/dKL, known only in backward. dL/dh_i = g_i G_i W
is per row, but dL/dW = sum_i g_i G_i^T h_i mixes rows, so gradients computed in forward are only right if
g is known there. The forward therefore computes them for the weights w = row_weights (default: ones, 0 on
masked rows), and backward checks that g equals c * w for one scalar c (to 1e-6 relative on every active row:
the rounding of forming w / denominator). That covers every loss of the form (KL * w).sum() * c, e.g. the
mean, sum, or a token-weighted mean: backward then only rescales by c (no rescale at all when row_weights
already carries the loss weights). Any other g (a per-row factor the forward did not know) falls back to
recomputing the chunks in backward with w = g: always exact, one more pass of matmuls.
`precompute_grads=False` skips the forward gradients and always recomputes in backward (the fp32 [V, H]
accumulator then lives only during backward).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._checks import (
    check_float,
    check_mask,
    check_teacher_floor,
    check_temperature,
    check_tensor,
    describe_nonfinite,
    first_order_only,
    shape_of,
)
from .dense import _IMPLS as DENSE_IMPLS
from .dense import resolve_backend
from .topk import TopKTeacher, check_topk_teacher, teacher_log_tail, topk_kl_impl

DEFAULT_CHUNK = 1024
# Relative tolerance of "the upstream gradient is c * row_weights" (see the module docstring).
PROPORTIONAL_RTOL = 1e-6

_OUT_DTYPE_MM = True  # CUDA's addmm with out_dtype=fp32 for bf16/fp16 operands; cleared if unsupported


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to a's dtype first."""
    global _OUT_DTYPE_MM
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _OUT_DTYPE_MM:
        try:  # bf16 x bf16 -> fp32 C in cuBLAS: no upcast copies
            torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, AttributeError):
            _OUT_DTYPE_MM = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Teacher:
    """The teacher's tensors as [N, ...] rows, and how to produce a chunk of them."""

    def __init__(self, teacher, n: int, v: int, student_name: str, student_device, logprob_precision="auto"):
        self.kind = "logits"
        self.log_qt = None
        self.precision = logprob_precision  # of a top-k teacher's log-probs (see `hybridlab.topk`)
        if isinstance(teacher, TopKTeacher):
            self.kind = "topk"
            self.tensors = (teacher.logprobs.detach(), teacher.ids)
        elif isinstance(teacher, tuple):
            self.kind = "hidden"
            if len(teacher) not in (2, 3):
                raise ValueError(
                    "teacher as a tuple must be (teacher_hidden [N, H'], teacher_weight [V, H'][, teacher_bias [V]]), "
                    f"got {len(teacher)} items"
                )
            self.tensors = tuple(x.detach() for x in teacher)
        else:
            check_tensor("teacher", teacher)
            self.tensors = (teacher.detach(),)
        for x in self.tensors:
            if x.device != student_device:
                raise ValueError(
                    f"device mismatch: teacher tensor on {x.device}, {student_name} on {student_device}"
                )

    def validate(self, batch_shape: torch.Size, v: int, mask) -> None:
        if self.kind == "logits":
            (t,) = self.tensors
            check_float("teacher", t)
            if tuple(t.shape) != (*batch_shape, v):
                raise ValueError(
                    f"shape mismatch: teacher logits {shape_of(t)} must be [{', '.join(map(str, batch_shape))}, {v}] "
                    "(hidden's rows by weight's vocabulary)"
                )
        elif self.kind == "hidden":
            th, tw = self.tensors[:2]
            check_float("teacher_hidden", th)
            check_float("teacher_weight", tw)
            if (
                th.shape[:-1] != batch_shape
                or tw.dim() != 2
                or tw.shape[0] != v
                or tw.shape[1] != th.shape[-1]
            ):
                raise ValueError(
                    f"shape mismatch: teacher_hidden {shape_of(th)} and teacher_weight {shape_of(tw)} must be "
                    f"[{', '.join(map(str, batch_shape))}, H'] and [{v}, H']"
                )
            if th.dtype != tw.dtype:
                raise ValueError(f"dtype mismatch: teacher_hidden {th.dtype} vs teacher_weight {tw.dtype}")
            if len(self.tensors) == 3 and tuple(self.tensors[2].shape) != (v,):
                raise ValueError(f"teacher_bias {shape_of(self.tensors[2])} must be [{v}]")
        else:
            lq, ids = self.tensors
            ids = check_topk_teacher(
                lq, ids, batch_shape, v, lq.device, mask, f"hidden @ weight.T [..., {v}]"
            )
            self.tensors = (lq, ids)

    def flatten(self, n: int, active: torch.Tensor | None = None) -> None:
        """[..., X] -> [N, X] (explicit sizes: N may be 0); a top-k teacher's tail mass is bounded with the
        resolution guessed on the counted rows (`active`) only: placeholders on padding cannot void it."""
        if self.kind == "logits":
            t = self.tensors[0]
            self.tensors = (t.reshape(n, t.shape[-1]),)
        elif self.kind == "hidden":
            th = self.tensors[0]
            self.tensors = (th.reshape(n, th.shape[-1]), *self.tensors[1:])
        else:
            lq, ids = self.tensors
            k = lq.shape[-1]
            lq, ids = lq.reshape(n, k), ids.reshape(n, k)
            self.tensors = (lq, ids)
            self.log_qt = teacher_log_tail(lq, self.precision, None, active)

    def chunk(self, rows):
        """Teacher data for the given rows (a slice or an index tensor)."""
        if self.kind == "logits":
            return self.tensors[0][rows]
        if self.kind == "hidden":
            th, tw = self.tensors[:2]
            logits = th[rows] @ tw.t()
            if len(self.tensors) == 3:
                logits += self.tensors[2]
            return logits
        lq, ids = self.tensors
        return lq[rows], ids[rows], self.log_qt[rows]


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: _Teacher,
    active: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    tau: float,
    floor: float | None,
    backend: str,
    chunk_size: int,
    want: tuple[bool, bool, bool],
):
    """One pass over the token chunks. Returns (kl [N] fp32, grad_h | None, grad_W fp32 | None, grad_b fp32 | None).

    `row_scale` [N] fp32 multiplies each row's logit gradient before the matmuls (the row weights in forward,
    the upstream gradient when recomputing in backward).
    """
    n = hidden.shape[0]
    v = weight.shape[0]
    need_h, need_w, need_b = want
    need_grad = need_h or need_w or need_b
    kl = torch.zeros(
        n, dtype=torch.float32 if hidden.dtype != torch.float64 else torch.float64, device=hidden.device
    )
    acc_dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dt, device=weight.device) if need_w else None
    grad_b = torch.zeros(v, dtype=acc_dt, device=weight.device) if need_b else None
    rows_all = None if active is None else active.nonzero().squeeze(1)  # masked rows cost no matmul at all
    n_rows = n if rows_all is None else rows_all.numel()
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        rows = slice(start, stop) if rows_all is None else rows_all[start:stop]
        h_c = hidden[rows]
        logits = h_c @ weight.t()
        if bias is not None:
            logits += bias
        t_c = teacher.chunk(rows)
        if teacher.kind == "topk":
            lq, ids, log_qt = t_c
            kl_c, g = topk_kl_impl(backend, logits, lq, ids, log_qt, None, tau, need_grad)
        elif backend == "triton" and logits.dtype != torch.float64 and t_c.dtype != torch.float64:
            from .kernels.dense_kl_triton import dense_kl_triton_impl

            # The gradient overwrites the chunk's logits: one [C, V] student buffer in all.
            kl_c, g = dense_kl_triton_impl(
                logits, t_c, None, tau, need_grad, floor, out=logits if need_grad else None
            )
        else:
            kl_c, g = DENSE_IMPLS[backend](logits, t_c, None, tau, need_grad, floor)
        if not torch.isfinite(kl_c).all():
            raise ValueError(
                _diagnose(hidden, weight, logits if g is not logits else None, t_c, teacher.kind)
            )
        kl[rows] = kl_c.to(kl.dtype)
        if not need_grad:
            continue
        if row_scale is not None:
            g.mul_(row_scale[rows].to(torch.float32 if g.dtype != torch.float64 else g.dtype)[:, None])
        if need_h:
            grad_h[rows] = g @ weight
        if need_w:
            _accumulate_mm(grad_w, g.t(), h_c)
        if need_b:
            grad_b += g.sum(0, dtype=acc_dt)
    return kl, grad_h, grad_w, grad_b


def _diagnose(hidden, weight, logits, t_c, kind) -> str:
    if logits is not None:
        msg = describe_nonfinite(
            f"student logits (hidden {shape_of(hidden)} @ weight {shape_of(weight)}.T)", logits
        )
        if msg:
            return msg
    for name, x in (("hidden", hidden), ("weight", weight)):
        msg = describe_nonfinite(name, x)
        if msg:
            return msg
    if kind != "topk":
        msg = describe_nonfinite("teacher logits", t_c)
        if msg:
            return msg
    return (
        "infinite KL: the teacher gives probability 0 to a token the student gives mass; pass teacher_floor "
        "(logits teachers) or mask those rows"
    )


class FusedLinearDenseKLFunction(torch.autograd.Function):
    """See the module docstring for how the upstream gradient is applied."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, teacher, active, row_weights, tau, floor, backend, chunk_size, precompute
    ):
        want = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        eager = precompute and any(want)
        kl, gh, gw, gb = _run_chunks(
            hidden,
            weight,
            bias,
            teacher,
            active,
            row_weights,
            tau,
            floor,
            backend,
            chunk_size,
            want if eager else (False, False, False),
        )
        ctx.args = (teacher, active, tau, floor, backend, chunk_size, want)
        ctx.eager = eager
        # The forward's gradients are intermediates (not inputs or outputs): kept on ctx, outside autograd's
        # version tracking, so backward can rescale them in place and drop them after one use.
        ctx.grads = (gh, gw, gb)
        ctx.save_for_backward(hidden, weight, bias, row_weights)
        return kl

    @staticmethod
    @first_order_only("fused_linear_dense_kl")
    @once_differentiable
    def backward(ctx, grad_kl):
        hidden, weight, bias, row_weights = ctx.saved_tensors
        teacher, active, tau, floor, backend, chunk_size, want = ctx.args
        g = grad_kl.to(torch.float32 if hidden.dtype != torch.float64 else torch.float64)
        # The forward's gradients serve one backward (they are rescaled in place); a second one recomputes.
        gh, gw, gb = ctx.grads
        ctx.grads = (None, None, None)
        have = ctx.eager and any(x is not None for x in (gh, gw, gb))
        c = _proportional(g, row_weights, active) if have else None
        if c is None:  # recompute, exactly, with the upstream gradient as the row weights
            _, gh, gw, gb = _run_chunks(
                hidden, weight, bias, teacher, active, g, tau, floor, backend, chunk_size, want
            )
            c = 1.0
        out_h = None if gh is None else (gh if c == 1.0 else (gh * c).to(hidden.dtype))
        out_w = None if gw is None else gw.mul_(c).to(weight.dtype)
        out_b = None if gb is None else gb.mul_(c).to(bias.dtype)
        return out_h, out_w, out_b, None, None, None, None, None, None, None, None


def _proportional(g: torch.Tensor, w: torch.Tensor | None, active: torch.Tensor | None) -> float | None:
    """The scalar c with g == c * w on every active row (to PROPORTIONAL_RTOL), or None if there is none."""
    if w is None:
        w = torch.ones_like(g)
    if active is not None:
        g, w = g[active], w[active]
    if g.numel() == 0:
        return 0.0
    j = int(w.abs().argmax())
    if w[j] == 0:
        return 0.0 if bool((g == 0).all()) else None
    c = g[j] / w[j]
    ok = ((g - c * w).abs() <= PROPORTIONAL_RTOL * g.abs()).all()
    return float(c) if bool(ok) else None


def fused_linear_dense_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    teacher_floor: float | None = None,
    backend: str = "auto",
    precompute_grads: bool = True,
    logprob_precision: str | torch.dtype | float = "auto",
) -> torch.Tensor:
    """Per-position KL(softmax((hidden @ weight.T + bias) / tau) || teacher) without materialising the logits.

    Args:
        hidden: [..., H] student's last hidden states (fp32/bf16/fp16); receives a gradient.
        weight: [V, H] LM-head weight, same dtype as hidden; receives a gradient (fp32-accumulated).
        teacher: teacher logits [..., V]; or (teacher_hidden [..., H'], teacher_weight [V, H'][, teacher_bias [V]]);
            or `TopKTeacher(logprobs [..., K], ids [..., K])`. Never receives a gradient.
        temperature: the student's sampling temperature tau.
        mask: [...] bool; False rows get KL 0, gradient 0 and cost no matmul.
        chunk_size: rows per chunk; the vocabulary-wide workspace is about chunk_size x V elements.
        bias: optional [V] LM-head bias.
        row_weights: [...] float, the per-row weights the caller will put on the KL in its loss (e.g. 1 / n_seqs);
            used to compute the gradients in forward. Any other upstream gradient is still handled exactly.
        teacher_floor: clamp of log q for logits teachers (see `dense_kl`): a finite log-probability < 0.
        backend: "auto" (Triton on CUDA), "torch" or "triton".
        precompute_grads: compute gradients in forward (saves a matmul); False always recomputes in backward.
        logprob_precision: for a `TopKTeacher`, the resolution of its log-probs (see `dense_kl_topk`):
            "auto" (guessed per counted row), a dtype, or an absolute resolution.

    Returns:
        [...] KL in fp32 (fp64 for fp64 inputs).
    """
    tau, name, t = check_dense_kl_args(
        hidden, weight, teacher, temperature, mask, chunk_size, bias, row_weights, backend, logprob_precision
    )
    teacher_floor = check_teacher_floor(teacher_floor)
    return dense_kl_checked(hidden, weight, t, tau, name, mask, chunk_size, bias, row_weights, teacher_floor,
                            precompute_grads)  # fmt: skip


def check_dense_kl_args(
    hidden,
    weight,
    teacher,
    temperature,
    mask,
    chunk_size,
    bias,
    row_weights,
    backend,
    logprob_precision="auto",
):
    """Validate `fused_linear_dense_kl`'s arguments once (errors name the argument and the shapes); returns
    (tau, backend name, the teacher wrapped and checked) for `dense_kl_checked`, which trusts them."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"shape mismatch: hidden {shape_of(hidden)} must be [..., H] and weight {shape_of(weight)} [V, H]"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"dtype mismatch: hidden {hidden.dtype} vs weight {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"device mismatch: hidden on {hidden.device}, weight on {weight.device}")
    v = weight.shape[0]
    if v == 0:
        raise ValueError(f"weight {shape_of(weight)} has an empty vocabulary")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (v,) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias {shape_of(bias)} {bias.dtype} must be [{v}] {weight.dtype} on {weight.device}"
            )
    batch_shape = hidden.shape[:-1]
    check_mask(mask, batch_shape, "hidden", hidden.device)
    if row_weights is not None:
        check_float("row_weights", row_weights)
        if row_weights.shape != batch_shape or row_weights.device != hidden.device:
            raise ValueError(
                f"row_weights {shape_of(row_weights)} must be hidden's shape without H: {list(batch_shape)}"
            )
        if not torch.isfinite(row_weights).all():
            raise ValueError(f"row_weights {shape_of(row_weights)} contains NaN or inf")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    tau = check_temperature(temperature)
    name = resolve_backend(backend, hidden.device)
    t = _Teacher(teacher, batch_shape.numel(), v, "hidden", hidden.device, logprob_precision)
    t.validate(batch_shape, v, mask)
    return tau, name, t


def dense_kl_checked(hidden, weight, t: _Teacher, tau, name, mask, chunk_size, bias, row_weights, teacher_floor,
                     precompute_grads=True) -> torch.Tensor:  # fmt: skip
    """`fused_linear_dense_kl` on arguments `check_dense_kl_args` has already validated (no checks here)."""
    batch_shape = hidden.shape[:-1]
    n = batch_shape.numel()
    active = None if mask is None else mask.reshape(n)
    t.flatten(n, active)
    h = hidden.reshape(n, hidden.shape[-1])
    w = (
        None
        if row_weights is None
        else row_weights.reshape(n).to(torch.float32 if h.dtype != torch.float64 else h.dtype)
    )
    floor = None if teacher_floor is None else float(teacher_floor)
    # Under torch.no_grad there is no backward: skip the forward gradients (needs_input_grad does not know).
    precompute = precompute_grads and torch.is_grad_enabled()
    kl = FusedLinearDenseKLFunction.apply(
        h, weight, bias, t, active, w, tau, floor, name, int(chunk_size), precompute
    )
    return kl.reshape(batch_shape)
