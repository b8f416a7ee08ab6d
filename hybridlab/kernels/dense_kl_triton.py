"""Fused dense-KL kernel: per row, KL(softmax(z / tau) || softmax(t)) and d KL / d z in one launch.

For one row with x = z / tau (student, scaled) and t (teacher logits or log-probs), the closed form is

    KL        = sum_j p_j (log p_j - log q_j),     p = softmax(x), q = softmax(t)
    dKL/dz_j  = (1 / tau) p_j (log p_j - log q_j - KL)

One program handles one row in two sweeps over vocabulary blocks of BLOCK columns:

1. statistics, online (flash-softmax style), all in fp32 whatever the input dtype:
       m_p, s_p = sum_j exp(x_j - m_p)               student max and sum of exponentials
       m_q, s_q = sum_j exp(t_j - m_q)               teacher max and sum of exponentials
       a        = sum_j exp(x_j - m_p) ((x_j - m_p) - (t_j - m_q))
   each rescaled when a block raises a running max. Then
       KL = a / s_p - log s_p + log s_q
   because log p_j - log q_j = (x_j - m_p) - (t_j - m_q) - log s_p + log s_q. Centring the log-ratio on the
   running maxima (rather than accumulating sum e_j (x_j - t_j)) keeps the sum free of the cancellation that
   logits of size 1e4 would otherwise cause in fp32.
2. gradient: re-read the row (last block first, so the blocks the first sweep touched most recently are
   still in L2 on a GPU) and write (1 / tau) p_j (log p_j - log q_j - KL) in the student dtype.

Bytes moved per row: two reads of z and t and one write of the gradient; the algorithmic minimum is one read
of each and one write (3 * V * elem), which `hybridlab.bench` uses as its byte model.

Conventions (the same as `hybridlab.dense._torch_impl`):
- 0 log 0 = 0: a -inf logit on either side is legal; entries with p_j = 0 add nothing to KL or gradient.
- p_j > 0 with q_j = 0 gives KL = +inf (dense.py turns that into a ValueError naming the inputs), unless
  `teacher_floor` clamps log q_j from below; then the kernel needs log-sum-exp(t) before it can clamp, and
  takes a third sweep (statistics, KL, gradient).
- NaN or +inf logits make the row's KL NaN, which dense.py reports as an error.
- Inactive rows (active[r] == False) do no reads: KL 0 and, when a gradient is wanted, a zero row.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dense_kl_kernel(
    z_ptr,
    t_ptr,
    grad_ptr,
    kl_ptr,
    active_ptr,
    V,
    stride_zr,
    stride_zc,
    stride_tr,
    stride_tc,
    stride_gr,
    inv_tau,
    floor,
    HAS_ACTIVE: tl.constexpr,
    HAS_FLOOR: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N * V passes 2**31 at 16k rows of a 150k vocabulary
    z_row = z_ptr + row * stride_zr
    t_row = t_ptr + row * stride_tr
    g_row = grad_ptr + row * stride_gr
    cols = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(V, BLOCK)

    is_active = True
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0

    if is_active:
        neg_inf = -float("inf")
        m_p = tl.full((), neg_inf, tl.float32)  # running maxima (may stay -inf while blocks are all -inf)
        m_q = tl.full((), neg_inf, tl.float32)
        # Sums are kept per lane ([BLOCK] vectors) and reduced once after the sweep: per block only the two
        # maxima need a cross-warp reduction, and a scalar rescale of the vectors is a multiply, not an exp.
        sp_vec = tl.zeros((BLOCK,), tl.float32)
        sq_vec = tl.zeros((BLOCK,), tl.float32)
        a_vec = tl.zeros((BLOCK,), tl.float32)
        # Sweep 1: online statistics of both sides.
        for b in range(0, n_blocks):
            offs = b * BLOCK + cols
            inb = offs < V
            x = tl.load(z_row + offs * stride_zc, mask=inb, other=neg_inf).to(tl.float32) * inv_tau
            t = tl.load(t_row + offs * stride_tc, mask=inb, other=neg_inf).to(tl.float32)
            new_mp = tl.maximum(m_p, tl.max(x, 0))
            new_mq = tl.maximum(m_q, tl.max(t, 0))
            # A max that is still -inf would make exp(-inf - -inf) = NaN: shift by 0 instead.
            sh_p = tl.where(new_mp == neg_inf, 0.0, new_mp)
            sh_q = tl.where(new_mq == neg_inf, 0.0, new_mq)
            old_p = tl.where(m_p == neg_inf, 0.0, m_p)
            old_q = tl.where(m_q == neg_inf, 0.0, m_q)
            alpha_p = tl.exp(m_p - sh_p)  # 0 while nothing was accumulated
            alpha_q = tl.exp(m_q - sh_q)
            xs = x - sh_p
            ts = t - sh_q
            e = tl.exp(xs)
            if not HAS_FLOOR:  # with a floor the log-ratio needs log-sum-exp(t) first: a sweep of its own
                # Re-centre the old sum on the new maxima, then rescale it: sum e (xs - ts) shifts by
                # (old_p - sh_p) - (old_q - sh_q) per unit of s_p.
                shift = (old_p - sh_p) - (old_q - sh_q)
                # 0 log 0 = 0: select before subtracting, so -inf - -inf never makes a NaN.
                live = e > 0
                d = tl.where(live, xs, 0.0) - tl.where(live, ts, 0.0)
                # alpha_p == 0: the max jumped so far that every earlier entry has p = 0 in fp32 (dead, as in
                # the torch backend); drop them rather than compute 0 * inf = NaN from a -inf teacher entry.
                a_vec = tl.where(alpha_p > 0, alpha_p * (a_vec + shift * sp_vec), 0.0) + e * d
            sp_vec = alpha_p * sp_vec + e
            sq_vec = alpha_q * sq_vec + tl.exp(ts)
            m_p = new_mp
            m_q = new_mq
        s_p = tl.sum(sp_vec, 0)
        s_q = tl.sum(sq_vec, 0)
        a = tl.sum(a_vec, 0)
        sh_p = tl.where(m_p == neg_inf, 0.0, m_p)
        sh_q = tl.where(m_q == neg_inf, 0.0, m_q)
        lse_p = sh_p + tl.log(s_p)  # -inf for an all -inf row, which makes KL NaN: reported upstream
        lse_q = sh_q + tl.log(s_q)
        if HAS_FLOOR:
            kl = tl.zeros((), tl.float32)
            for b in range(0, n_blocks):
                offs = b * BLOCK + cols
                inb = offs < V
                x = tl.load(z_row + offs * stride_zc, mask=inb, other=neg_inf).to(tl.float32) * inv_tau
                t = tl.load(t_row + offs * stride_tc, mask=inb, other=neg_inf).to(tl.float32)
                logp = x - lse_p
                logq = tl.maximum(t - lse_q, floor)
                p = tl.exp(logp)
                live = p > 0
                kl += tl.sum(p * (tl.where(live, logp, 0.0) - tl.where(live, logq, 0.0)), 0)
        else:
            kl = a / s_p - tl.log(s_p) + tl.log(s_q)
        tl.store(kl_ptr + row, kl)

        if NEED_GRAD:
            # Sweep 2, last block first: on a GPU those blocks are the likeliest still to sit in L2.
            for i in range(0, n_blocks):
                offs = (n_blocks - 1 - i) * BLOCK + cols
                inb = offs < V
                x = tl.load(z_row + offs * stride_zc, mask=inb, other=neg_inf).to(tl.float32) * inv_tau
                t = tl.load(t_row + offs * stride_tc, mask=inb, other=neg_inf).to(tl.float32)
                logp = x - lse_p
                logq = t - lse_q
                if HAS_FLOOR:
                    logq = tl.maximum(logq, floor)
                p = tl.exp(logp)
                live = p > 0
                g = p * (tl.where(live, logp, 0.0) - tl.where(live, logq, 0.0) - kl) * inv_tau
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)
    else:
        tl.store(kl_ptr + row, 0.0)
        if NEED_GRAD:  # the gradient buffer is uninitialised: inactive rows get explicit zeros, no reads
            zeros = tl.zeros((BLOCK,), tl.float32).to(grad_ptr.dtype.element_ty)
            for b in range(0, n_blocks):
                offs = b * BLOCK + cols
                tl.store(g_row + offs, zeros, mask=offs < V)


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(v: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of v columns.

    GPU: 4096-column blocks with 8 warps (16 fp32 values per thread per tensor: enough bytes in flight to
    saturate HBM, few enough registers to keep several programs per SM). Interpreter: big blocks, because
    every loop iteration costs Python overhead there and numpy is fast on long vectors.
    """
    if device.type != "cuda" or interpreting():
        return max(16, min(triton.next_power_of_2(v), 1 << 15)), 1
    block = max(128, min(triton.next_power_of_2(v), 4096))
    return block, 8 if block >= 2048 else 4


def dense_kl_triton_impl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    active: torch.Tensor | None,
    temperature: float,
    need_grad: bool,
    teacher_floor: float | None,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `hybridlab.dense` backend contract, computed by the fused kernel.

    Args:
        student: [N, V] fp32/bf16/fp16 logits; any strides (rows and columns are addressed by stride, no copy,
            except a column stride so large that (V - 1) * stride passes 2**31: that gets a contiguous copy).
        teacher: [N, V] logits or log-probs, any float dtype and strides.
        active: [N] bool or None; inactive rows are not read, get KL 0 and (if need_grad) a zero gradient.
        temperature: tau > 0, applied to the student only.
        need_grad: also write the [N, V] gradient (the only extra [N, V] buffer, in the student's dtype).
        teacher_floor: None, or a log-probability at which log q is clamped (costs one more sweep).
        block, num_warps: override the launch configuration (benchmarks and tests).
        out: optional [N, V] buffer for the gradient, in the student's dtype. It may be `student` itself (the
            fused linear path overwrites its temporary logits): each program reads a block before writing it
            and touches only its own row.

    Returns:
        (kl [N] fp32, grad [N, V] contiguous in the student's dtype, or None).
        fp64 inputs (exact enumeration, not a kernel workload) fall back to the torch closed form in fp64.
    """
    if student.dtype == torch.float64 or teacher.dtype == torch.float64:
        from .._torch_ref import dense_kl_torch as _torch_impl

        return _torch_impl(student, teacher, active, temperature, need_grad, teacher_floor)
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(
            f"student and teacher must both be [N, V], got {list(student.shape)} and {list(teacher.shape)}"
        )
    n, v = student.shape
    # Column offsets are int32 in the kernel: a column stride that could overflow them gets a contiguous copy.
    if (v - 1) * student.stride(1) >= 2**31:
        student = student.contiguous()
    if (v - 1) * teacher.stride(1) >= 2**31:
        teacher = teacher.contiguous()
    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = None
    if need_grad:
        grad = out if out is not None else torch.empty((n, v), dtype=student.dtype, device=student.device)
        if grad.shape != (n, v) or grad.dtype != student.dtype or grad.stride(1) != 1:
            raise ValueError(f"out must be [N, V] = [{n}, {v}] {student.dtype} with unit column stride")
    if n == 0:
        return kl, grad
    if active is not None:
        if active.shape != (n,):
            raise ValueError(f"active must be [N] = [{n}], got {list(active.shape)}")
        active = active.contiguous().view(torch.int8) if active.dtype == torch.bool else active.to(torch.int8)
    b, w = launch_config(v, student.device)
    b = block or b
    w = num_warps or w
    _dense_kl_kernel[(n,)](
        student,
        teacher,
        grad if grad is not None else kl,  # a valid pointer that is never written when NEED_GRAD is False
        kl,
        active if active is not None else kl,
        v,
        student.stride(0),
        student.stride(1),
        teacher.stride(0),
        teacher.stride(1),
        grad.stride(0) if grad is not None else 0,
        1.0 / float(temperature),
        float(teacher_floor) if teacher_floor is not None else 0.0,
        HAS_ACTIVE=active is not None,
        HAS_FLOOR=teacher_floor is not None,
        NEED_GRAD=need_grad,
        BLOCK=b,
        num_warps=w,
    )
    return kl, grad
