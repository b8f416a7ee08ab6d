"""Fused dense-KL kernel: per row, KL(softmax(z / tau) || softmax(t)) and d KL / d z in one launch.

For one row with x = z / tau (student, scaled) and t (teacher logits or log-probs), the closed form is

    KL        = sum_j p_j (log p_j - log q_j),     p = softmax(x), q = softmax(t)
    dKL/dz_j  = (1 / tau) p_j (log p_j - log q_j - KL)

One program handles one row in two sweeps over vocabulary blocks of BLOCK columns. Everything is computed in
base 2 (exp2/log2 are the GPU's native instructions): with the raw maxima m_z = max z, m_t = max t,

    xs_j = (z_j - m_z) * (log2(e) / tau)      the student's log2-weights, centred first, then scaled once
    ts_j = (t_j - m_t) * log2(e)              the teacher's

1. statistics, online (flash-softmax style), all in fp32 whatever the input dtype:
       s_p = sum_j 2^xs_j,   s_q = sum_j 2^ts_j,   a = sum_j 2^xs_j (xs_j - ts_j)
   The accumulators are rescaled only when a block raises a running maximum (a scalar test per block).
   Then, in bits, KL / ln 2 = a / s_p - log2 s_p + log2 s_q: the log-ratio is centred on the maxima, so
   logits of size 1e4 do not cancel in fp32.
2. gradient: re-read the row (last block first, so the blocks the first sweep touched most recently are
   still in L2 on a GPU) and write (ln 2 / tau) p_j (log2 p_j - log2 q_j - KL / ln 2) in the student dtype,
   with log2 p_j = xs_j - log2 s_p and log2 q_j = ts_j - log2 s_q. The maximum is subtracted from each logit
   *before* anything of the logits' own size is rounded: log p is never formed as x - lse with lse rounded
   at the scale of the logits (which costs ulp(|x|) absolute: 1e-3 at an offset of 1e4).

Alignment (odd vocabularies such as 50257 or 32001): a row that starts at an address that is not a multiple
of 16 bytes cannot use 16-byte vector loads. When z, t and the gradient share one row stride, unit column
stride and 16-byte-aligned bases (`ALIGNED`), each row is walked as a rotation: full blocks start at the row's
first 16-byte-aligned column `head` (< 8) and are loaded without masks, with a `tl.multiple_of` hint on
their start; the remaining `V mod BLOCK` columns - the tail and, wrapped behind it, the `head` columns before
the first aligned one - form masked edge blocks. Without that layout (different strides, column strides,
unaligned bases) head = 0 and alignment is whatever Triton infers from the strides.

Bytes moved per row: two reads of z and t and one write of the gradient; the algorithmic minimum is one read
of each and one write (3 * V * elem), which `hybridlab.bench` uses as its byte model.

Conventions (the same as `hybridlab.dense._torch_impl`):
- 0 log 0 = 0: a -inf logit on either side is legal; entries with p_j = 0 add nothing to KL or gradient.
- p_j > 0 with q_j = 0 gives KL = +inf (dense.py turns that into a ValueError naming the inputs), unless
  `teacher_floor` clamps log q_j from below; then the kernel needs log-sum-exp(t) before it can clamp, and
  takes a third sweep (statistics, KL, gradient). The clamp keeps NaN: a NaN, +inf or all -inf teacher row
  stays an error with a floor too (as in the torch backend).
- NaN or +inf logits make the row's KL NaN, which dense.py reports as an error.
- Inactive rows (active[r] == False) do no reads: KL 0 and, when a gradient is wanted, a zero row.
- `row_scale` (optional, [N] fp32): the gradient row r is written multiplied by row_scale[r] (the loss
  weight the caller will put on KL_r), so no separate [N, V] pass has to scale it later.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _block(b, cols, head, V, row_ptr, start_ptr, stride_c, BLOCK: tl.constexpr, EDGE: tl.constexpr):
    """(pointers, mask, column index) of block b of one tensor's row. Full blocks: BLOCK contiguous columns from
    the aligned `start_ptr` (no mask). Edge blocks: the columns left over, wrapped past V onto the row's first
    `head`. Column offsets are int32 (the host copies a tensor whose (V - 1) * column stride could overflow them)."""
    k = b * BLOCK + cols
    if EDGE:
        c = head + k
        c = tl.where(c >= V, c - V, c)
        return row_ptr + c * stride_c, k < V, c
    return start_ptr + k * stride_c, k < V, head + k


@triton.jit
def _prologue(z_ptr, t_ptr, g_ptr, row, stride_zr, stride_tr, stride_gr, V, ALIGNED: tl.constexpr,
              VEC: tl.constexpr):  # fmt: skip
    """(head, z_row, t_row, g_row, z_start, t_start, g_start): the row pointers and the aligned start of the full
    blocks. With ALIGNED, z, t and g share the row stride and unit column stride: one head aligns all three."""
    z_off = row * stride_zr
    t_off = row * stride_tr
    g_off = row * stride_gr
    if ALIGNED:
        head = tl.minimum((VEC - z_off % VEC) % VEC, V).to(tl.int32)
        z_start = z_ptr + tl.multiple_of(z_off + head, VEC)
        t_start = t_ptr + tl.multiple_of(t_off + head, VEC)
        g_start = g_ptr + tl.multiple_of(g_off + head, VEC)
    else:
        head = 0
        z_start = z_ptr + z_off
        t_start = t_ptr + t_off
        g_start = g_ptr + g_off
    return head, z_ptr + z_off, t_ptr + t_off, g_ptr + g_off, z_start, t_start, g_start


@triton.jit
def _row_blocks(active_ptr, row, head, V, HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr):
    """(cols, n_blocks, n_full, is_active): the lanes, the number of blocks and of full ones (loaded without a
    mask; the others are edge blocks), and whether the row is active (always, without an `active` input)."""
    cols = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(V, BLOCK)
    n_full = (V - head) // BLOCK
    is_active = True
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + row) != 0
    return cols, n_blocks, n_full, is_active


@triton.jit
def _load(ptrs, mask, EDGE: tl.constexpr):
    if EDGE:
        return tl.load(ptrs, mask=mask, other=-float("inf")).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _stats_step(z, t, m_z, m_t, sp, sq, a, c_p, ACC_A: tl.constexpr):
    """Fold one block (raw fp32 z, t) into the running maxima and the per-lane sums (see the docstring)."""
    neg_inf = -float("inf")
    new_z = tl.maximum(m_z, tl.max(z, 0))
    new_t = tl.maximum(m_t, tl.max(t, 0))
    # A maximum that is still -inf would make -inf - -inf = NaN: shift by 0 instead.
    sh_z = tl.where(new_z == neg_inf, 0.0, new_z)
    sh_t = tl.where(new_t == neg_inf, 0.0, new_t)
    if (new_z > m_z) | (new_t > m_t):  # rescale only when a maximum moved
        alpha_p = tl.exp2((m_z - sh_z) * c_p)  # 0 while nothing was accumulated (m_z = -inf)
        alpha_q = tl.exp2((m_t - sh_t) * LOG2E)
        if ACC_A:
            # Re-centre sum e (xs - ts) on the new maxima: it shifts by `shift` per unit of s_p.
            old_z = tl.where(m_z == neg_inf, 0.0, m_z)
            old_t = tl.where(m_t == neg_inf, 0.0, m_t)
            shift = (old_z - sh_z) * c_p - (old_t - sh_t) * LOG2E
            # alpha_p == 0: the max jumped so far that every earlier entry has p = 0 in fp32 (dead, as in the
            # torch backend); drop them rather than compute 0 * inf = NaN from a -inf teacher entry.
            a = tl.where(alpha_p > 0, alpha_p * (a + shift * sp), 0.0)
        sp = alpha_p * sp
        sq = alpha_q * sq
    xs = (z - sh_z) * c_p
    ts = (t - sh_t) * LOG2E
    e = tl.exp2(xs)
    sp += e
    sq += tl.exp2(ts)
    if ACC_A:  # with a floor the log-ratio needs log-sum-exp(t) first: a sweep of its own
        live = e > 0  # 0 log 0 = 0: select before subtracting, so -inf - -inf never makes a NaN
        a += e * (tl.where(live, xs, 0.0) - tl.where(live, ts, 0.0))
    return new_z, new_t, sp, sq, a


@triton.jit
def _log2_ratio(z, t, sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, HAS_FLOOR: tl.constexpr):
    """(p_j, log2 p_j - log2 q_j) of one block, the maxima subtracted before any scaling."""
    lp = (z - sh_z) * c_p - log2_sp
    lq = (t - sh_t) * LOG2E - log2_sq
    if HAS_FLOOR:
        # maximum(NaN, floor) is the floor: keep a NaN (a NaN, +inf or all -inf teacher row) so it is reported
        lq = tl.where(lq != lq, lq, tl.maximum(lq, floor2))
    p = tl.exp2(lp)
    live = p > 0
    return p, tl.where(live, lp, 0.0) - tl.where(live, lq, 0.0)


@triton.jit
def _stats_sweep(lo, hi, m_z, m_t, sp, sq, a, cols, head, V, z_row, z_start, stride_zc, t_row, t_start,
                 stride_tc, c_p, ACC_A: tl.constexpr, BLOCK: tl.constexpr, EDGE: tl.constexpr):  # fmt: skip
    """Blocks lo..hi-1 of a row (all full or all edge) folded into the online statistics."""
    for b in range(lo, hi):
        zo, msk, _c = _block(b, cols, head, V, z_row, z_start, stride_zc, BLOCK, EDGE)
        to, msk, _c = _block(b, cols, head, V, t_row, t_start, stride_tc, BLOCK, EDGE)
        z = _load(zo, msk, EDGE)
        t = _load(to, msk, EDGE)
        m_z, m_t, sp, sq, a = _stats_step(z, t, m_z, m_t, sp, sq, a, c_p, ACC_A)
    return m_z, m_t, sp, sq, a


@triton.jit
def _kl_sweep(lo, hi, kl_vec, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc, sh_z, sh_t,
              c_p, log2_sp, log2_sq, floor2, BLOCK: tl.constexpr, EDGE: tl.constexpr):  # fmt: skip
    """Blocks lo..hi-1 of a row added into the per-lane KL (in bits) with the floored log q."""
    for b in range(lo, hi):
        zo, msk, _c = _block(b, cols, head, V, z_row, z_start, stride_zc, BLOCK, EDGE)
        to, msk, _c = _block(b, cols, head, V, t_row, t_start, stride_tc, BLOCK, EDGE)
        p, d = _log2_ratio(_load(zo, msk, EDGE), _load(to, msk, EDGE),
                           sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, True)  # fmt: skip
        kl_vec += p * d
    return kl_vec


@triton.jit
def _row_stats(cols, head, V, n_full, n_blocks, z_row, z_start, stride_zc, t_row, t_start, stride_tc, c_p,
               floor, HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """(sh_z, sh_t, log2 s_p, log2 s_q, floor / ln 2, KL / ln 2) of an active row: sweep 1 (online statistics of
    both sides) and, with a floor, the KL sweep (it needs the clamped log q, hence log-sum-exp(t) first)."""
    neg_inf = -float("inf")
    m_z = tl.full((), neg_inf, tl.float32)  # running raw maxima (may stay -inf while blocks are all -inf)
    m_t = tl.full((), neg_inf, tl.float32)
    # Sums are kept per lane ([BLOCK] vectors) and reduced once after the sweep: per block only the two
    # maxima need a cross-warp reduction.
    sp = tl.zeros((BLOCK,), tl.float32)
    sq = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    m_z, m_t, sp, sq, a = _stats_sweep(0, n_full, m_z, m_t, sp, sq, a, cols, head, V, z_row, z_start, stride_zc,
                                       t_row, t_start, stride_tc, c_p, not HAS_FLOOR, BLOCK, False)  # fmt: skip
    m_z, m_t, sp, sq, a = _stats_sweep(n_full, n_blocks, m_z, m_t, sp, sq, a, cols, head, V, z_row, z_start,
                                       stride_zc, t_row, t_start, stride_tc, c_p, not HAS_FLOOR, BLOCK,
                                       True)  # fmt: skip
    sh_z = tl.where(m_z == neg_inf, 0.0, m_z)
    sh_t = tl.where(m_t == neg_inf, 0.0, m_t)
    log2_sp = tl.log2(tl.sum(sp, 0))  # -inf for an all -inf row, which makes KL NaN: reported upstream
    log2_sq = tl.log2(tl.sum(sq, 0))
    floor2 = floor * LOG2E
    if HAS_FLOOR:
        kl_vec = tl.zeros((BLOCK,), tl.float32)
        kl_vec = _kl_sweep(0, n_full, kl_vec, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc,
                           sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, BLOCK, False)  # fmt: skip
        kl_vec = _kl_sweep(n_full, n_blocks, kl_vec, cols, head, V, z_row, z_start, stride_zc, t_row, t_start,
                           stride_tc, sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, BLOCK, True)  # fmt: skip
        kl2 = tl.sum(kl_vec, 0)
    else:
        kl2 = tl.sum(a, 0) / tl.sum(sp, 0) - log2_sp + log2_sq
    return sh_z, sh_t, log2_sp, log2_sq, floor2, kl2


@triton.jit
def _grad_sweep(lo, hi, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc, g_row, g_start,
                sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, kl2, k_a, k_b, y, HAS_FLOOR: tl.constexpr,
                SCORE: tl.constexpr, BLOCK: tl.constexpr, EDGE: tl.constexpr):  # fmt: skip
    """Write the gradient of blocks hi-1 down to lo (last block first: on a GPU those are the likeliest still to
    sit in L2), rounded once into g's dtype. SCORE False: the dense term k_a p (d - KL) (k_a: ln 2 / tau times
    the row's weight); True: the hybrid's p (k_a (d - KL) - k_b) + k_b 1[j = y]."""
    for i in range(0, hi - lo):
        b = hi - 1 - i
        zo, msk, c = _block(b, cols, head, V, z_row, z_start, stride_zc, BLOCK, EDGE)
        to, msk, c = _block(b, cols, head, V, t_row, t_start, stride_tc, BLOCK, EDGE)
        go, msk, c = _block(b, cols, head, V, g_row, g_start, 1, BLOCK, EDGE)
        p, d = _log2_ratio(_load(zo, msk, EDGE), _load(to, msk, EDGE),
                           sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, HAS_FLOOR)  # fmt: skip
        if SCORE:
            g = p * (k_a * (d - kl2) - k_b) + tl.where(c == y, k_b, 0.0)
        else:
            g = k_a * p * (d - kl2)  # p = 0 where d was zeroed: dead entries write 0
        if EDGE:
            tl.store(go, g.to(g_row.dtype.element_ty), mask=msk)
        else:
            tl.store(go, g.to(g_row.dtype.element_ty))


@triton.jit
def _zero_row(g_row, g_start, cols, head, V, n_full, n_blocks, BLOCK: tl.constexpr):
    """An inactive row's gradient: explicit zeros (the buffer is uninitialised), no reads."""
    zeros = tl.zeros((BLOCK,), tl.float32).to(g_row.dtype.element_ty)
    for b in range(0, n_full):
        go, msk, _c = _block(b, cols, head, V, g_row, g_start, 1, BLOCK, False)
        tl.store(go, zeros)
    for b in range(n_full, n_blocks):
        go, msk, _c = _block(b, cols, head, V, g_row, g_start, 1, BLOCK, True)
        tl.store(go, zeros, mask=msk)


@triton.jit
def _dense_kl_kernel(
    z_ptr,
    t_ptr,
    grad_ptr,
    kl_ptr,
    active_ptr,
    scale_ptr,
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
    HAS_SCALE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: N * V passes 2**31 at 16k rows of a 150k vocabulary
    head, z_row, t_row, g_row, z_start, t_start, g_start = _prologue(
        z_ptr, t_ptr, grad_ptr, row, stride_zr, stride_tr, stride_gr, V, ALIGNED, VEC
    )
    cols, n_blocks, n_full, is_active = _row_blocks(active_ptr, row, head, V, HAS_ACTIVE, BLOCK)
    if is_active:
        c_p = inv_tau * LOG2E  # 1 / tau and log2(e) in one multiply
        sh_z, sh_t, log2_sp, log2_sq, floor2, kl2 = _row_stats(cols, head, V, n_full, n_blocks, z_row, z_start,
                                                               stride_zc, t_row, t_start, stride_tc, c_p, floor,
                                                               HAS_FLOOR, BLOCK)  # fmt: skip
        tl.store(kl_ptr + row, kl2 * LN2)

        if NEED_GRAD:
            k_g = inv_tau * LN2  # d/dz of the base-2 quantities, and the row's loss weight, in one factor
            if HAS_SCALE:
                k_g = k_g * tl.load(scale_ptr + row)
            # Sweep 2: the edge blocks, then the full ones, each last block first.
            _grad_sweep(n_full, n_blocks, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc,
                        g_row, g_start, sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, kl2, k_g, 0.0, 0, HAS_FLOOR,
                        False, BLOCK, True)  # fmt: skip
            _grad_sweep(0, n_full, cols, head, V, z_row, z_start, stride_zc, t_row, t_start, stride_tc,
                        g_row, g_start, sh_z, sh_t, c_p, log2_sp, log2_sq, floor2, kl2, k_g, 0.0, 0, HAS_FLOOR,
                        False, BLOCK, False)  # fmt: skip
    else:
        tl.store(kl_ptr + row, 0.0)
        if NEED_GRAD:
            _zero_row(g_row, g_start, cols, head, V, n_full, n_blocks, BLOCK)


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


def row_alignment(*tensors: torch.Tensor) -> int:
    """VEC (elements) such that the kernel can start every row's full blocks on a 16-byte boundary of all
    `tensors` at once, or 0 when it cannot.

    That needs one row stride (in elements) for all of them, unit column stride and 16-byte-aligned bases:
    then column c of row r sits at element r * S + c of each, and r * S + c = 0 mod VEC, with VEC = 16 bytes
    over the smallest element size, is 16-byte aligned in every one of them (larger elements only more so).
    """
    if any(x.dim() != 2 or x.stride(1) != 1 or x.data_ptr() % 16 for x in tensors):
        return 0
    if tensors[0].shape[0] > 1 and len({x.stride(0) for x in tensors}) > 1:
        return 0
    return 16 // min(x.element_size() for x in tensors)


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
    row_scale: torch.Tensor | None = None,
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
        row_scale: optional [N] weights; gradient row r is written times row_scale[r] (in fp32, rounded once),
            for a caller that knows the loss weights of the KL in forward: no [N, V] rescaling pass later.

    Returns:
        (kl [N] fp32, grad [N, V] contiguous in the student's dtype, or None).
        fp64 inputs (exact enumeration, not a kernel workload) fall back to the torch closed form in fp64.
    """
    if student.dtype == torch.float64 or teacher.dtype == torch.float64:
        from .._torch_ref import dense_kl_torch as _torch_impl

        kl, grad = _torch_impl(student, teacher, active, temperature, need_grad, teacher_floor)
        if grad is not None and row_scale is not None:
            grad.mul_(row_scale.to(grad.dtype)[:, None])
        return kl, grad
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
    if row_scale is not None:
        if row_scale.shape != (n,):
            raise ValueError(f"row_scale must be [N] = [{n}], got {list(row_scale.shape)}")
        row_scale = row_scale.to(device=student.device, dtype=torch.float32).contiguous()
    if active is not None:
        if active.shape != (n,):
            raise ValueError(f"active must be [N] = [{n}], got {list(active.shape)}")
        active = active.contiguous().view(torch.int8) if active.dtype == torch.bool else active.to(torch.int8)
    b, w = launch_config(v, student.device)
    b = block or b
    w = num_warps or w
    vec = row_alignment(student, teacher, *([grad] if grad is not None else []))
    _dense_kl_kernel[(n,)](
        student,
        teacher,
        grad if grad is not None else kl,  # a valid pointer that is never written when NEED_GRAD is False
        kl,
        active if active is not None else kl,
        row_scale if row_scale is not None else kl,
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
        HAS_SCALE=row_scale is not None,
        NEED_GRAD=need_grad,
        ALIGNED=vec > 1,
        VEC=max(vec, 1),
        BLOCK=b,
        num_warps=w,
    )
    return kl, grad
