"""The whole hybrid logit gradient in two launches: row scalars forward, the combined gradient backward.

Forward (`_hybrid_fwd_kernel`), one program per row, one sweep over z and t (the online statistics of
`dense_kl_triton`, in base 2, maxima subtracted before scaling), emits

    KL_r,  log p(y_r),  log q(y_r)        and the row state (max z, max t, log2 sum 2^xs, log2 sum 2^ts, KL / ln 2)

With `teacher_floor` the KL needs log-sum-exp(t) before it can clamp log q: one more sweep (as in the dense kernel).

Backward (`_hybrid_bwd_kernel`), one program per row, one sweep that reads z and t and writes

    dL/dz_j = (1 / tau) [ a p_j (log p_j - log q_j - KL) + b (1[j = y] - p_j) ]

from the row state and the upstream gradients a = dL/dKL_r, b = dL/dlog p(y_r) (in `hybrid_loss`: a = beta c_b,
b = -c_b A_t), rounded once into the student's dtype. The score term needs no extra pass: p_j is formed for the
dense term anyway and the one-hot is a comparison of column indices.

Bytes per row: forward reads z and t (2U), backward reads them again and writes the gradient (3U): 5U for the
complete hybrid loss, U = one [N, V] tensor. Nothing [N, V] lives between the launches but the inputs.

Conventions (those of `hybridlab._onepass` and `dense_kl_triton`): 0 log 0 = 0 (a -inf logit on either side is
legal where p = 0); p > 0 with q = 0 gives KL = +inf (the caller reports it) unless a floor clamps log q;
NaN / +inf logits make the KL NaN (reported); inactive rows are never read, get scalars 0 and a zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense_kl_triton import (
    LN2,
    LOG2E,
    _grad_sweep,
    _prologue,
    _row_blocks,
    _row_stats,
    _zero_row,
    launch_config,
    row_alignment,
)

STATE = 5  # row state columns: sh_z, sh_t, log2 s_p, log2 s_q, KL / ln 2


@triton.jit
def _hybrid_fwd_kernel(
    z_ptr, t_ptr, y_ptr, active_ptr, kl_ptr, logp_ptr, tlogp_ptr, state_ptr,
    V, stride_zr, stride_zc, stride_tr, stride_tc, inv_tau, floor,
    HAS_ACTIVE: tl.constexpr, HAS_FLOOR: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N * V passes 2**31 at 16k rows of a 150k vocabulary
    head, z_row, t_row, _g, z_start, t_start, _gs = _prologue(
        z_ptr, t_ptr, z_ptr, row, stride_zr, stride_tr, 0, V, ALIGNED, VEC
    )
    cols, n_blocks, n_full, is_active = _row_blocks(active_ptr, row, head, V, HAS_ACTIVE, BLOCK)
    if is_active:
        c_p = inv_tau * LOG2E
        sh_z, sh_t, log2_sp, log2_sq, floor2, kl2 = _row_stats(cols, head, V, n_full, n_blocks, z_row, z_start,
                                                               stride_zc, t_row, t_start, stride_tc, c_p, floor,
                                                               HAS_FLOOR, BLOCK)  # fmt: skip
        # The sampled token: two scalar loads, log-probs from the same centred base-2 quantities.
        y = tl.load(y_ptr + row)
        z_y = tl.load(z_row + y * stride_zc).to(tl.float32)
        t_y = tl.load(t_row + y * stride_tc).to(tl.float32)
        lq_y = (t_y - sh_t) * LOG2E - log2_sq
        if HAS_FLOOR:
            lq_y = tl.where(lq_y != lq_y, lq_y, tl.maximum(lq_y, floor2))
        tl.store(kl_ptr + row, kl2 * LN2)
        tl.store(logp_ptr + row, ((z_y - sh_z) * c_p - log2_sp) * LN2)
        tl.store(tlogp_ptr + row, lq_y * LN2)
        s = state_ptr + row * 5
        tl.store(s, sh_z)
        tl.store(s + 1, sh_t)
        tl.store(s + 2, log2_sp)
        tl.store(s + 3, log2_sq)
        tl.store(s + 4, kl2)
    else:
        tl.store(kl_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(tlogp_ptr + row, 0.0)


@triton.jit
def _hybrid_bwd_kernel(
    z_ptr, t_ptr, y_ptr, active_ptr, state_ptr, a_ptr, b_ptr, g_ptr,
    V, stride_zr, stride_zc, stride_tr, stride_tc, stride_gr, inv_tau, floor,
    HAS_ACTIVE: tl.constexpr, HAS_FLOOR: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    head, z_row, t_row, g_row, z_start, t_start, g_start = _prologue(
        z_ptr, t_ptr, g_ptr, row, stride_zr, stride_tr, stride_gr, V, ALIGNED, VEC
    )
    cols, n_blocks, n_full, is_active = _row_blocks(active_ptr, row, head, V, HAS_ACTIVE, BLOCK)
    if is_active:
        c_p = inv_tau * LOG2E
        s = state_ptr + row * 5
        sh_z = tl.load(s)
        sh_t = tl.load(s + 1)
        log2_sp = tl.load(s + 2)
        log2_sq = tl.load(s + 3)
        kl2 = tl.load(s + 4)
        floor2 = floor * LOG2E
        k_a = tl.load(a_ptr + row) * inv_tau * LN2  # dense coefficient, base-2 log-ratios
        k_b = tl.load(b_ptr + row) * inv_tau  # score coefficient
        y = tl.load(y_ptr + row).to(tl.int32)
        # Last block first (edge blocks, then full ones): on a GPU the blocks of the row other programs just wrote
        # are likelier in L2.
        _grad_sweep(n_full, n_blocks, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc, g_row,
                    g_start, sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, kl2, k_a, k_b, y, HAS_FLOOR, True, BLOCK,
                    True)  # fmt: skip
        _grad_sweep(0, n_full, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc, g_row,
                    g_start, sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, kl2, k_a, k_b, y, HAS_FLOOR, True, BLOCK,
                    False)  # fmt: skip
    else:  # the gradient buffer is uninitialised: inactive rows get explicit zeros, no reads
        _zero_row(g_row, g_start, cols, head, V, n_full, n_blocks, BLOCK)


def _prepare(z: torch.Tensor, t: torch.Tensor, active: torch.Tensor | None):
    n, v = z.shape
    if t.shape != z.shape:
        raise ValueError(f"student and teacher must both be [N, V], got {list(z.shape)} and {list(t.shape)}")
    # Column offsets are int32 in the kernels: a column stride that could overflow them gets a contiguous copy.
    if (v - 1) * z.stride(1) >= 2**31:
        z = z.contiguous()
    if (v - 1) * t.stride(1) >= 2**31:
        t = t.contiguous()
    if active is not None:
        if active.shape != (n,):
            raise ValueError(f"active must be [N] = [{n}], got {list(active.shape)}")
        active = active.contiguous().view(torch.int8) if active.dtype == torch.bool else active.to(torch.int8)
    return z, t, active


def hybrid_rows_forward(
    z: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    active: torch.Tensor | None,
    temperature: float,
    teacher_floor: float | None,
    *,
    block: int | None = None,
    num_warps: int | None = None,
):
    """Row scalars of student logits z [N, V] (fp32/bf16/fp16, any strides) and teacher logits t [N, V].

    Args:
        y: [N] int64 sampled tokens in [0, V); active: [N] bool or None (inactive rows are not read).
        temperature: tau > 0 (the student's); teacher_floor: None or a log-prob at which log q is clamped.
    Returns:
        (kl, logp_y, tlogp_y) [N] fp32 (0 on inactive rows) and the row state [N, 5] fp32 for the backward.
    """
    z, t, act = _prepare(z, t, active)
    n, v = z.shape
    dev = z.device
    kl, logp, tlogp = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
    state = torch.zeros((n, STATE), dtype=torch.float32, device=dev)
    if n == 0:
        return kl, logp, tlogp, state
    bl, w = launch_config(v, dev)
    vec = row_alignment(z, t)
    _hybrid_fwd_kernel[(n,)](
        z, t, y.contiguous(), act if act is not None else kl, kl, logp, tlogp, state,
        v, z.stride(0), z.stride(1), t.stride(0), t.stride(1), 1.0 / float(temperature),
        float(teacher_floor) if teacher_floor is not None else 0.0,
        HAS_ACTIVE=act is not None, HAS_FLOOR=teacher_floor is not None, ALIGNED=vec > 1, VEC=max(vec, 1),
        BLOCK=block or bl, num_warps=num_warps or w,
    )  # fmt: skip
    return kl, logp, tlogp, state


def hybrid_rows_backward(
    z: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    active: torch.Tensor | None,
    temperature: float,
    teacher_floor: float | None,
    state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The combined logit gradient [N, V] in z's dtype: (1/tau)[a p (log p - log q - KL) + b (onehot(y) - p)].

    Args:
        z, t, y, active, temperature, teacher_floor: those of the forward; state: its [N, 5] row state.
        a, b: [N] upstream gradients of KL and of log p(y) (any float dtype; used in fp32). They are also the
            place for per-row loss weights (`row_scale`): the gradient is written scaled, no pass of its own.
        out: optional [N, V] buffer with unit column stride, in z's dtype; it may be z itself (the fused linear
            path overwrites its temporary logits): each program reads a block before it writes it.
    """
    z, t, act = _prepare(z, t, active)
    n, v = z.shape
    grad = out if out is not None else torch.empty((n, v), dtype=z.dtype, device=z.device)
    if grad.shape != (n, v) or grad.dtype != z.dtype or grad.stride(1) != 1:
        raise ValueError(f"out must be [N, V] = [{n}, {v}] {z.dtype} with unit column stride")
    if n == 0:
        return grad
    a = a.to(device=z.device, dtype=torch.float32).contiguous()
    b = b.to(device=z.device, dtype=torch.float32).contiguous()
    bl, w = launch_config(v, z.device)
    vec = row_alignment(z, t, grad)
    _hybrid_bwd_kernel[(n,)](
        z, t, y.contiguous(), act if act is not None else a, state, a, b, grad,
        v, z.stride(0), z.stride(1), t.stride(0), t.stride(1), grad.stride(0), 1.0 / float(temperature),
        float(teacher_floor) if teacher_floor is not None else 0.0,
        HAS_ACTIVE=act is not None, HAS_FLOOR=teacher_floor is not None, ALIGNED=vec > 1, VEC=max(vec, 1),
        BLOCK=block or bl, num_warps=num_warps or w,
    )  # fmt: skip
    return grad
