"""Fused top-k-teacher KL kernel: the tail-bucket KL and its closed-form logit gradient.

The teacher gives only K log-probabilities lq_k at token ids i_k. Both distributions are coarsened to K + 1
categories: the K teacher tokens and one "tail" bucket holding everything else. With x = z / tau,
p = softmax(x), P_T = sum_{j not in ids} p_j and log Q_T given per row (computed by the caller),

    KL        = sum_k p_{i_k} (log p_{i_k} - lq_k) + P_T (log P_T - log Q_T)
    dKL/dz_j  = (1 / tau) p_j (r_j - KL),   r_j = log p_j - lq_k  if j = i_k,   r_j = log P_T - log Q_T  otherwise.

One program per row:
1. one sweep over the vocabulary for the student's raw max m, s = sum exp((z - m) / tau) and the tail sum
   s_T = sum_{j not in ids} exp((z_j - m) / tau) (online rescaling). The max is subtracted before the scaling,
   so large logits (offsets of 1e4) keep fp32's relative precision in every log-prob. The tail is summed directly, never as 1 - P_top,
   so a tail of 1e-9 keeps its relative precision in fp32. Membership in the top-k is read from a per-row
   bitmap (bit j of byte j // 8), built by the caller: one byte per 8 columns, 1/16 of the bf16 logits.
2. gather the K student logits at the teacher's ids, form KL.
3. a gradient sweep writes the tail coefficient on non-top columns; the K top columns are written by a
   scatter afterwards. The two store sets are disjoint, so no ordering between threads is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense_kl_triton import launch_config


@triton.jit
def _topk_kl_kernel(
    z_ptr,
    lq_ptr,
    ids_ptr,
    bits_ptr,
    log_qt_ptr,
    grad_ptr,
    kl_ptr,
    active_ptr,
    V,
    K,
    stride_zr,
    stride_zc,
    stride_gr,
    n_bytes,
    inv_tau,
    HAS_ACTIVE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zr
    g_row = grad_ptr + row * stride_gr
    bits_row = bits_ptr + row * n_bytes
    cols = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(V, BLOCK)
    neg_inf = -float("inf")

    is_active = True
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0

    if is_active:
        # m is the running maximum of the *raw* logits: each logit is centred before it is scaled by 1 / tau,
        # so logits of size 1e4 are never rounded at that scale (log p = (z - m) / tau - log s).
        m = tl.full((), neg_inf, tl.float32)
        s_vec = tl.zeros((BLOCK,), tl.float32)  # per-lane sums, reduced once after the sweep
        st_vec = tl.zeros((BLOCK,), tl.float32)
        for b in range(0, n_blocks):
            offs = b * BLOCK + cols
            inb = offs < V
            z = tl.load(z_row + offs * stride_zc, mask=inb, other=neg_inf).to(tl.float32)
            byte = tl.load(bits_row + (offs >> 3), mask=inb, other=0).to(tl.int32)
            top = ((byte >> (offs & 7)) & 1) != 0
            new_m = tl.maximum(m, tl.max(z, 0))
            sh = tl.where(new_m == neg_inf, 0.0, new_m)
            alpha = tl.exp((m - sh) * inv_tau)
            e = tl.exp((z - sh) * inv_tau)
            s_vec = alpha * s_vec + e
            st_vec = alpha * st_vec + tl.where(top, 0.0, e)
            m = new_m
        s = tl.sum(s_vec, 0)
        s_t = tl.sum(st_vec, 0)
        sh = tl.where(m == neg_inf, 0.0, m)
        lse = tl.log(s)  # of the centred, scaled logits

        ks = tl.arange(0, K_PAD)
        kin = ks < K
        ids = tl.load(ids_ptr + row * K + ks, mask=kin, other=0)
        lq = tl.load(lq_ptr + row * K + ks, mask=kin, other=0.0).to(tl.float32)
        zk = tl.load(z_row + ids * stride_zc, mask=kin, other=neg_inf).to(tl.float32)
        logp_k = (zk - sh) * inv_tau - lse
        p_k = tl.exp(logp_k)
        live_k = p_k > 0
        r_k = tl.where(live_k, logp_k, 0.0) - tl.where(live_k, lq, 0.0)  # 0 log 0 = 0

        log_qt = tl.load(log_qt_ptr + row)
        p_t = s_t / s
        live_t = p_t > 0
        # log P_T = log s_T - log s; an empty tail (K = V, or all tail logits -inf) contributes 0.
        r_t = tl.where(live_t, tl.log(tl.where(live_t, s_t, 1.0)) - tl.log(s) - log_qt, 0.0)
        kl = tl.sum(p_k * r_k, 0) + p_t * r_t
        tl.store(kl_ptr + row, kl)

        if NEED_GRAD:
            for i in range(0, n_blocks):
                offs = (n_blocks - 1 - i) * BLOCK + cols  # last block first: likeliest still in L2
                inb = offs < V
                z = tl.load(z_row + offs * stride_zc, mask=inb, other=neg_inf).to(tl.float32)
                byte = tl.load(bits_row + (offs >> 3), mask=inb, other=0).to(tl.int32)
                top = ((byte >> (offs & 7)) & 1) != 0
                p = tl.exp((z - sh) * inv_tau - lse)
                g = p * (r_t - kl) * inv_tau
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=inb & ~top)
            g_k = p_k * (r_k - kl) * inv_tau
            tl.store(g_row + ids, g_k.to(grad_ptr.dtype.element_ty), mask=kin)
    else:
        tl.store(kl_ptr + row, 0.0)
        if NEED_GRAD:
            zeros = tl.zeros((BLOCK,), tl.float32).to(grad_ptr.dtype.element_ty)
            for b in range(0, n_blocks):
                offs = b * BLOCK + cols
                tl.store(g_row + offs, zeros, mask=offs < V)


def topk_bitmap(ids: torch.Tensor, v: int) -> torch.Tensor:
    """[N, K] distinct ids in [0, V) -> [N, ceil(V / 8)] uint8 with bit j % 8 of byte j // 8 set for each id.

    scatter_add equals a bitwise OR because the ids of a row are distinct (the caller validates that).
    """
    n = ids.shape[0]
    bits = torch.zeros((n, (v + 7) // 8), dtype=torch.uint8, device=ids.device)
    bits.scatter_add_(1, ids // 8, torch.bitwise_left_shift(torch.ones_like(ids), ids % 8).to(torch.uint8))
    return bits


def topk_kl_triton_impl(
    student: torch.Tensor,
    lq: torch.Tensor,
    ids: torch.Tensor,
    log_qt: torch.Tensor,
    active: torch.Tensor | None,
    temperature: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k KL and its gradient by the fused kernel (same contract as `hybridlab.topk._topk_torch_impl`).

    Args:
        student: [N, V] fp32/bf16/fp16 logits, any strides.
        lq: [N, K] teacher log-probabilities at `ids`; ids: [N, K] int64, distinct per row, in [0, V).
        log_qt: [N] fp32 log of the teacher's tail mass (already floored by the caller).
        active: [N] bool or None; temperature: tau; need_grad: also return the gradient.

    Returns:
        (kl [N] fp32, grad [N, V] contiguous in the student's dtype or None).
    """
    if student.dtype == torch.float64:
        from .._torch_ref import topk_kl_torch as _topk_torch_impl

        return _topk_torch_impl(student, lq, ids, log_qt, active, temperature, need_grad)
    n, v = student.shape
    k = ids.shape[1]
    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device) if need_grad else None
    if n == 0:
        return kl, grad
    ids = ids.contiguous()
    lq = lq.contiguous()
    if active is not None:  # padded rows may hold placeholder ids: give them distinct in-range ones
        ids = torch.where(active[:, None], ids, torch.arange(ids.shape[1], device=ids.device))
    bits = topk_bitmap(ids, v)
    if active is not None:
        active = active.contiguous().view(torch.int8)
    block, warps = launch_config(v, student.device)
    _topk_kl_kernel[(n,)](
        student,
        lq,
        ids,
        bits,
        log_qt.to(torch.float32).contiguous(),
        grad if grad is not None else kl,
        kl,
        active if active is not None else kl,
        v,
        k,
        student.stride(0),
        student.stride(1),
        grad.stride(0) if grad is not None else 0,
        bits.shape[1],
        1.0 / float(temperature),
        HAS_ACTIVE=active is not None,
        NEED_GRAD=need_grad,
        BLOCK=block,
        K_PAD=max(16, triton.next_power_of_2(k)),
        num_warps=warps,
    )
    return kl, grad
