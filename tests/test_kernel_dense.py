"""The fused Triton dense-KL kernel against the float64 truth, the torch closed form and finite differences.
On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, conftest.py).

Every tolerance is derived from fp32 arithmetic (`_bounds`), never fitted to what one machine printed."""

import math

import pytest
import torch

from hybridlab import dense_kl, dense_kl_reference
from hybridlab.dense import _torch_impl

kernels = pytest.importorskip("hybridlab.kernels.dense_kl_triton")
impl = kernels.dense_kl_triton_impl
pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # numpy noise of the interpreter on error paths

DEV = "cuda" if torch.cuda.is_available() else "cpu"
U32 = torch.finfo(torch.float32).eps  # the kernels compute in fp32 whatever the input dtype
# A sum of V positive terms rounded in fp32, in any order and SIMD width, has a relative error of at most
# about LAMBDA * sqrt(V) * u except with probability ~2 exp(-LAMBDA^2 / 2) (the probabilistic rounding-error
# bound of Higham & Mary, SIAM J. Sci. Comput. 2019; the worst case V * u is never approached in practice).
LAMBDA = 8.0


def _inputs(n, v, seed, dtype=torch.float32, scale=3.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, v, generator=g)
    t = scale * torch.randn(n, v, generator=g)
    w = torch.rand(n, generator=g) * 2 - 0.5  # non-uniform upstream gradient, signs included
    return z.to(device, dtype), t.to(device, dtype), w.to(device)


def _kl_and_grad(fn, z, t, w):
    """KL and d(sum_i w_i KL_i)/dz for fn(z, t) -> [N]."""
    z = z.detach().clone().requires_grad_(True)
    kl = fn(z, t)
    (kl * w.to(kl.dtype)).sum().backward()
    return kl.detach(), z.grad


def _ref64(z, t, w, tau=1.0):
    """The float64 autograd-through-log_softmax truth for (possibly low-precision) inputs."""
    return _kl_and_grad(lambda a, b: dense_kl_reference(a, b, tau), z.double(), t.double(), w.double())


def _triton(z, t, w, tau=1.0, **kw):
    return _kl_and_grad(lambda a, b: dense_kl(a, b, temperature=tau, backend="triton", **kw), z, t, w)


def _bounds(z, t, tau=1.0, scaled_first=False):
    """fp64 truth and error bounds of an fp32 computation of KL and p (d - KL) / tau from logits z, t [N, V].

    Returns (kl64 [N], p [N, V], d = log p - log q [N, V], kl_bound [N], g_bound(kl) -> [N, V]), where
    g_bound(kl) bounds |g_j - p_j (d_j - kl) / tau| for a gradient formed with the implementation's own KL
    (checked separately against kl_bound), so a gradient error is not hidden behind the KL's summation error.

    Per entry, fp32 log p_j = (x_j - m) - log s, x = z / tau, m = max x, s = sum exp(x - m), errs by
        dlp_j = 2 u |x_j - m|  +  LAMBDA sqrt(V) u + (log V + 4) u        (centring, scaling; the sum s)
    and log q_j likewise with t. An implementation that rounds x = z / tau before centring (`scaled_first`,
    e.g. log_softmax(z / tau)) adds u (|x_j| + |m|) when tau != 1. Then
        |dKL|  <= sum_j p_j (|d_j| (dlp_j + 2u) + dlp_j + dlq_j) + sums * (sum_j p_j |d_j| + 2 log V + 1) + u KL
        |dg_j| <= p_j (|d_j - KL| (dlp_j + 3u) + dlp_j + dlq_j) / tau        (+ p_j |d_j - KL| / tau where p_j
                                                                         underflows fp32, which may give 0)
    the `2 log V + 1` covering kernels that form KL as sum p (x - m - (t - m_t)) - log s_p + log s_q.
    """
    x = z.double() / tau
    t64 = t.double()
    v = x.shape[-1]
    logp, logq = torch.log_softmax(x, -1), torch.log_softmax(t64, -1)
    p = logp.exp()
    live = p > 0
    d = torch.where(live, logp - logq, 0.0)
    kl = (p * d).sum(-1)

    def spread(a):
        m = a.amax(-1, keepdim=True)
        return torch.where(torch.isfinite(a) & live, (a - m).abs(), 0.0), torch.where(
            torch.isfinite(m), m.abs(), 0.0
        )

    sx, mx = spread(x)
    st, _ = spread(t64)
    sums = LAMBDA * math.sqrt(v) * U32 + (math.log(v) + 4) * U32
    dlp = 2 * U32 * sx + sums
    if scaled_first and tau != 1.0:
        dlp = dlp + U32 * (torch.where(torch.isfinite(x), x.abs(), 0.0) + mx)
    dlq = 2 * U32 * st + sums
    dlp, dlq = torch.where(live, dlp, 0.0), torch.where(live, dlq, 0.0)
    pd = (p * d.abs()).sum(-1)
    kl_b = (p * (d.abs() * (dlp + 2 * U32) + dlp + dlq)).sum(-1)
    kl_b = kl_b + sums * (pd + 2 * math.log(v) + 1) + U32 * kl.abs()
    tiny = p < 2 * torch.finfo(torch.float32).tiny  # fp32 (flush-to-zero on a GPU) may give p = 0 there

    def g_bound(kl_impl):
        c = (d - kl_impl.double()[:, None]).abs()
        return p * (c * (dlp + 3 * U32) + dlp + dlq) / tau + torch.where(tiny, p * c / tau, 0.0)

    return kl, p, d, kl_b, g_bound


def assert_matches(kl, grad, z, t, w, tau=1.0, dtype=torch.float32, scaled_first=False):
    """kl [N] and grad = d(sum_i w_i KL_i)/dz [N, V] of logits z, t within the fp32 bounds of `_bounds`.

    The gradient is compared with w_i p_j (d_j - KL_i) / tau at the implementation's own KL_i (whose own error is
    bounded above); bf16/fp16 gradients add their roundings to that dtype. The negative controls below show
    that this comparison fails for a wrong formula, temperature, upstream gradient, or log p formed at the
    scale of the logits."""
    assert kl.dtype == torch.float32 and grad.dtype == dtype
    kl64, p, d, kl_b, g_bound = _bounds(z, t, tau, scaled_first)
    err = (kl.double() - kl64).abs()
    assert (err <= kl_b).all(), f"KL error {err.tolist()} > bound {kl_b.tolist()}"
    w64 = w.double().to(p.device)[:, None]
    want = w64 * p * (d - kl.double()[:, None]) / tau
    fin = torch.finfo(dtype)
    # bf16/fp16: the fp32 value is rounded on store (to nearest on a GPU, eps / 2; Triton's CPU interpreter
    # truncates fp32 -> bf16, up to eps) and to nearest again when backward scales it by w (eps / 2)
    out_eps = 0.0 if dtype == torch.float32 else 1.5 * fin.eps
    # ... and below the smallest normal those roundings are absolute: one subnormal spacing each, at most
    spacing = fin.tiny * fin.eps
    bound = w64.abs() * g_bound(kl) + (U32 + out_eps) * want.abs() + (1 + w64.abs()) * spacing
    gerr = (grad.double() - want).abs()
    worst = (gerr / bound).max()
    assert (gerr <= bound).all(), f"gradient error up to {float(worst):.3g} x its bound"


# V ragged (never a multiple of the block), rows from 64 down to 1 as V grows.
@pytest.mark.parametrize(
    "n,v,tau",
    [(64, 1, 1.0), (33, 7, 0.7), (9, 1000, 1.0), (3, 32003, 1.3), (1, 131075, 1.0), (2, 131075, 0.5)],
)
def test_matches_references_ragged_vocab(n, v, tau):
    z, t, w = _inputs(n, v, seed=v + n)
    kl, grad = _triton(z, t, w, tau)
    assert_matches(kl, grad, z, t, w, tau)
    # the torch closed form against the same fp64 truth (it rounds z / tau before centring: scaled_first)
    kl_t, grad_t = _kl_and_grad(lambda a, b: dense_kl(a, b, temperature=tau, backend="torch"), z, t, w)
    assert_matches(kl_t, grad_t, z, t, w, tau, scaled_first=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1000, 32003])
def test_low_precision_inputs_accumulate_in_fp32(dtype, v):
    z, t, w = _inputs(4, v, seed=11, dtype=dtype)
    kl, grad = _triton(z, t, w, 0.8)
    assert_matches(kl, grad, z, t, w, 0.8, dtype=dtype)
    # the torch closed form on the same inputs: same fp32 math, one rounding of the gradient
    kl_t, grad_t = _torch_impl(z, t, None, 0.8, True, None)
    assert_matches(kl_t, grad_t, z, t, torch.ones_like(w), 0.8, dtype=dtype, scaled_first=True)


@pytest.mark.parametrize("block,v", [(16, 7), (16, 1000), (64, 4099), (256, 32003)])
def test_many_blocks_online_rescaling(block, v):
    """Small blocks force the online max/sum updates across many blocks (the default covers a row at once
    in the interpreter). The row maximum sits in the last block, where every earlier sum must be rescaled."""
    z, t, w = _inputs(3, v, seed=v)
    z[:, -1] += 40.0
    t[1, -2] += 60.0
    kl, grad = impl(z, t, None, 0.9, True, None, block=block)
    assert_matches(kl, grad, z, t, torch.ones(3), 0.9)


def test_leading_all_neg_inf_blocks():
    """Blocks that are entirely -inf before any finite logit (padded vocab at the front) must not make NaNs."""
    z, t, w = _inputs(2, 200, seed=3)
    z[:, :100] = float("-inf")
    t[:, :64] = float("-inf")
    kl, grad = impl(z, t, None, 1.0, True, None, block=16)
    assert_matches(kl, grad, z, t, torch.ones(2))
    assert (grad[:, :100] == 0).all()


def test_finite_differences():
    """The kernel's gradient is the derivative of the KL: central differences of the float64 truth."""
    z, t, w = _inputs(3, 11, seed=5)
    _, grad = _triton(z, t, w, 0.6)
    f = lambda x: (dense_kl_reference(x, t.double(), 0.6) * w.double()).sum()
    fd = torch.zeros(z.shape, dtype=torch.float64)
    zd, eps = z.double(), 1e-6
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            e = torch.zeros_like(zd)
            e[i, j] = eps
            fd[i, j] = (f(zd + e) - f(zd - e)) / (2 * eps)
    torch.testing.assert_close(grad.double(), fd, rtol=1e-4, atol=1e-6)


def test_masks_skip_rows():
    z, t, w = _inputs(6, 1000, seed=8)
    mask = torch.tensor([True, False, True, True, False, True], device=DEV)
    z[1] = float("nan")  # a masked row is never read: no error, and no NaN leaks into its gradient
    t[4, 3] = float("inf")
    kl, grad = _triton(z, t, w, mask=mask)
    keep = mask.nonzero().squeeze(1)
    assert_matches(kl[keep], grad[keep], z[keep], t[keep], w[keep])
    assert (kl[~mask] == 0).all() and (grad[~mask] == 0).all()


def test_all_masked():
    z, t, w = _inputs(4, 300, seed=9)
    mask = torch.zeros(4, dtype=torch.bool, device=DEV)
    kl, grad = _triton(z, t, w, mask=mask)
    assert (kl == 0).all() and (grad == 0).all()


def test_non_contiguous_inputs():
    """Row and column strides are honoured without a copy: a transposed view and a strided slice."""
    z, t, w = _inputs(5, 777, seed=10)
    zt = z.t().contiguous().t()  # column stride 5, row stride 1
    tt = torch.stack([t, -t], dim=-1)[..., 0]  # column stride 2, row stride 2V
    assert not zt.is_contiguous() and not tt.is_contiguous()
    kl, grad = impl(zt, tt, None, 1.0, True, None)
    assert_matches(kl, grad, z, t, torch.ones(5))
    # and through the public API on a [B, T, V] slice (the time shift of a causal LM)
    z3 = z.reshape(1, 5, 777)[:, 1:]
    t3 = t.reshape(1, 5, 777)[:, 1:]
    kl3, _ = _triton(z3, t3, w[1:].reshape(1, 4))
    torch.testing.assert_close(kl3.reshape(-1), kl[1:])


def test_extreme_logits():
    z, t, w = _inputs(3, 1000, seed=12, scale=1e4)
    kl, grad = _triton(z, t, w, 0.7)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert_matches(kl, grad, z, t, w, 0.7)  # KL ~ 1e4 here: centred sums keep ~u sqrt(V) relative


def test_neg_inf_entries_on_both_sides():
    """-inf is a legal logit (0 log 0 = 0): where both sides are -inf, or only the student is."""
    z, t, w = _inputs(3, 500, seed=13)
    z[:, :40] = float("-inf")
    t[:, 20:60] = float(
        "-inf"
    )  # 20..39 on both sides, 40..59 teacher only -> student must also be -inf there
    z[:, 40:60] = float("-inf")
    z[1, 100:300] = float("-inf")  # student-only -inf: fine
    kl, grad = _triton(z, t, w, 1.0)
    assert_matches(kl, grad, z, t, w)
    assert (grad[:, :60] == 0).all()


def test_teacher_zero_where_student_has_mass():
    z, t, w = _inputs(2, 100, seed=14)
    t[1, 7] = float("-inf")
    with pytest.raises(ValueError, match="infinite KL.*teacher_floor"):
        _triton(z, t, w)
    # the explicit clamp: matches the torch backend's clamp
    kl, grad = _triton(z, t, w, 0.9, teacher_floor=-30.0)
    kl_t, grad_t = _kl_and_grad(
        lambda a, b: dense_kl(a, b, temperature=0.9, backend="torch", teacher_floor=-30.0), z, t, w
    )
    torch.testing.assert_close(kl, kl_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "where,value,match",
    [
        ("student", float("nan"), "student_logits .* NaN"),
        ("student", float("inf"), r"student_logits .* \+inf"),
        ("teacher", float("nan"), "teacher_logits .* NaN"),
        ("teacher", float("inf"), r"teacher_logits .* \+inf"),
    ],
)
def test_nan_and_pos_inf_raise(where, value, match):
    z, t, w = _inputs(3, 50, seed=15)
    (z if where == "student" else t)[2, 9] = value
    with pytest.raises(ValueError, match=match):
        _triton(z, t, w)


def test_fp64_falls_back_to_torch_and_backward_twice():
    z, t, w = _inputs(2, 30, seed=16)
    kl, grad = impl(z.double(), t.double(), None, 1.0, True, None)
    assert kl.dtype == torch.float64 and grad.dtype == torch.float64
    zz = z.clone().requires_grad_(True)
    kl = dense_kl(zz, t, backend="triton", inplace_backward=False)
    (kl * w).sum().backward(retain_graph=True)
    first = zz.grad.clone()
    (kl * w).sum().backward()
    torch.testing.assert_close(zz.grad, 2 * first)


def test_no_grad_forward_writes_no_gradient():
    z, t, _ = _inputs(2, 300, seed=17)
    kl, grad = impl(z, t, None, 1.0, False, None)
    assert grad is None
    torch.testing.assert_close(kl.double(), dense_kl_reference(z.double(), t.double()), rtol=1e-5, atol=1e-6)


def test_closed_form_reference_is_the_autograd_truth():
    """The fp64 closed form `assert_matches` compares against equals fp64 autograd through log_softmax."""
    z, t, w = _inputs(3, 257, seed=30)
    kl64, p, d, _, _ = _bounds(z, t, 0.6)
    kl_r, grad_r = _ref64(z, t, w, 0.6)
    torch.testing.assert_close(kl64, kl_r, rtol=1e-12, atol=1e-12)
    want = w.double()[:, None] * p * (d - kl64[:, None]) / 0.6
    torch.testing.assert_close(want, grad_r, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_common_logit_offset_keeps_fp32_accuracy(offset, tau):
    """Issue 13, item 3: a logit offset common to a row (softmax ignores it) must not cost accuracy. log p is
    formed as (x - m) - log s, never as x - lse with lse rounded at the scale of the logits (ulp(1e4) = 1e-3).
    16 rows, so that some row's log-sum-exp rounds badly in fp32 (each rounding is uniform in +-ulp/2)."""
    z, t, w = _inputs(16, 64, seed=31)
    z = z + offset
    t = t - offset
    kl, grad = _triton(z, t, w, tau)
    assert_matches(kl, grad, z, t, w, tau)
    kl, grad = impl(z, t, None, tau, True, None, block=16)  # across blocks: online maxima
    assert_matches(kl, grad, z, t, torch.ones(16), tau)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_negative_control_log_p_formed_at_the_logits_scale_is_caught(offset):
    """The same comparison rejects the fp32 formula the kernel used before: log p = x - lse(x)."""
    z, t, w = _inputs(16, 64, seed=31)
    z = z + offset
    t = t - offset
    logp = z - torch.logsumexp(z, -1, keepdim=True)  # lse rounded at ~offset: error up to ulp(offset) / 2
    logq = t - torch.logsumexp(t, -1, keepdim=True)
    p = logp.exp()
    kl = _bounds(z, t)[
        0
    ].float()  # the old kernel's KL was accurate (centred sums); only its gradient was not
    grad = w[:, None] * p * (logp - logq - kl[:, None])
    with pytest.raises(AssertionError, match="gradient error"):
        assert_matches(kl, grad, z, t, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [50257, 32001])
def test_odd_vocabularies_take_the_aligned_path(v, dtype):
    """Issue 17: V (and so the row stride) not a multiple of 16. Rows start at every residue mod 16 bytes;
    full blocks start at each row's first aligned column, the rest (tail + wrapped head) is an edge block."""
    z, t, w = _inputs(3, v, seed=v, dtype=dtype)
    z[1, 2] += 30.0  # the row maximum inside the wrapped head (processed last in sweep 1): a late rescale
    assert kernels.row_alignment(z, t, torch.empty_like(z)) == 16 // z.element_size()
    kl, grad = _triton(z, t, w, 0.9)
    assert_matches(kl, grad, z, t, w, 0.9, dtype=dtype)
    kl_b, grad_b = impl(z, t, None, 0.9, True, None, block=4096)  # many full blocks per row
    assert_matches(kl_b, grad_b, z, t, torch.ones(3), 0.9, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wrapped_head_every_row_residue(dtype):
    """V = 37 with 16-column blocks: row r starts at element 37 r, so its head (columns before the first
    aligned one) takes every value 0..VEC-1; rows 0-7 put the maximum in column 0 (always in the head or the
    first full block), in the last column, or nowhere special; one row of V < VEC columns is all edge."""
    z, t, w = _inputs(8, 37, seed=32, dtype=dtype)
    z[::3, 0] += 20.0
    z[1::3, -1] += 20.0
    t[2, 0] += 25.0
    kl, grad = impl(z, t, None, 1.0, True, None, block=16)
    assert_matches(kl, grad, z, t, torch.ones(8), dtype=dtype)
    # inactive rows: zeros written over the same full/edge split, nothing read (NaN there stays out)
    active = torch.arange(8, device=DEV) % 3 != 1
    z[~active] = float("nan")
    grad = torch.full_like(z, 5.0)
    kl, _ = impl(z, t, active, 1.0, True, None, block=16, out=grad)
    assert (grad[~active] == 0).all() and (kl[~active] == 0).all()
    assert_matches(kl[active], grad[active], z[active], t[active], torch.ones(int(active.sum())), dtype=dtype)
    zs, ts, ws = _inputs(9, 5, seed=33, dtype=dtype)
    kl, grad = impl(zs, ts, None, 1.0, True, None, block=16)
    assert_matches(kl, grad, zs, ts, torch.ones(9), dtype=dtype)


def test_row_alignment_rules_and_the_unaligned_fallback():
    z, t, _ = _inputs(4, 101, seed=34, dtype=torch.bfloat16)
    assert kernels.row_alignment(z, t) == 8
    assert kernels.row_alignment(z, t.float()) == 8  # larger elements are aligned a fortiori
    assert kernels.row_alignment(z.float(), t.float()) == 4
    wide = torch.cat([t, t], dim=1)[:, :101]  # another row stride
    assert kernels.row_alignment(z, wide) == 0
    shifted = torch.cat([z, z], dim=1)[:, 1:102]  # same stride as `wide`, base 2 bytes off alignment
    assert kernels.row_alignment(shifted, wide) == 0
    assert kernels.row_alignment(z.t().contiguous().t(), t) == 0  # column stride
    w = torch.ones(4)
    for zz, tt in ((z, wide), (shifted, wide), (shifted, t)):
        kl, grad = impl(zz, tt, None, 1.0, True, None, block=16)
        assert_matches(kl, grad, zz, tt, w, dtype=torch.bfloat16)


def test_row_scale_writes_the_scaled_gradient():
    """row_scale: the loss weight known in forward is applied in the kernel (no [N, V] pass afterwards)."""
    z, t, w = _inputs(4, 300, seed=35)
    kl, grad = impl(z, t, None, 0.7, True, None, row_scale=w)
    assert_matches(kl, grad, z, t, w, 0.7)
    kl1, grad1 = impl(z, t, None, 0.7, True, None)
    torch.testing.assert_close(grad, grad1 * w[:, None], rtol=4 * U32, atol=0)  # one more fp32 rounding
    with pytest.raises(ValueError, match="row_scale must be"):
        impl(z, t, None, 0.7, True, None, row_scale=w[:2])


@pytest.mark.slow
def test_sm90_code_uses_vector_loads_for_odd_vocabularies():
    """Offline sm_90 compile (no GPU needed: Triton's bundled ptxas): with V = 50257 (row stride not a multiple
    of 16) the full blocks load 16 bytes per instruction (ld.global.v4) on the path `row_alignment` selects;
    the negative control, the same kernel told nothing about alignment, only scalar loads."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        r"""
        import re, torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from hybridlab.kernels import dense_kl_triton as K
        z = torch.empty(4, 50257, dtype=torch.bfloat16)
        vec = K.row_alignment(z, z, z)
        sig = {"z_ptr": "*bf16", "t_ptr": "*bf16", "grad_ptr": "*bf16", "kl_ptr": "*fp32", "active_ptr": "*i8",
               "scale_ptr": "*fp32", "V": "i32", "stride_zr": "i32", "stride_zc": "constexpr",
               "stride_tr": "i32", "stride_tc": "constexpr", "stride_gr": "i32", "inv_tau": "fp32",
               "floor": "fp32", "HAS_ACTIVE": "constexpr", "HAS_FLOOR": "constexpr", "HAS_SCALE": "constexpr",
               "NEED_GRAD": "constexpr", "ALIGNED": "constexpr", "VEC": "constexpr", "BLOCK": "constexpr"}
        for aligned in (True, False):
            const = {"stride_zc": 1, "stride_tc": 1, "HAS_ACTIVE": False, "HAS_FLOOR": False,
                     "HAS_SCALE": False, "NEED_GRAD": True, "ALIGNED": aligned and vec > 1,
                     "VEC": max(vec, 1), "BLOCK": 4096}
            attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}  # 16-byte-aligned base pointers
            src = ASTSource(fn=K._dense_kl_kernel, signature=sig, constexprs=const, attrs=attrs)
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
            print(aligned, len(re.findall(r"ld\.global\.v4", ptx)), len(re.findall(r"st\.global\.v4", ptx)))
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"offline sm_90 compile unavailable here: {r.stderr.strip().splitlines()[-1:]}")
    counts = {ln.split()[0]: tuple(map(int, ln.split()[1:])) for ln in r.stdout.strip().splitlines()}
    # BLOCK 4096 / 256 threads = 16 bf16 per thread per tensor = two 16-byte loads; z and t in two sweeps
    assert counts["True"][0] >= 8 and counts["True"][1] >= 2, counts
    assert counts["False"] == (0, 0), counts


# ---- negative controls: the comparisons above must be able to fail ----------------------------------------


def test_negative_control_wrong_gradient_formula_is_caught():
    """A gradient without the -KL centring (a classic bug) fails `assert_matches`."""
    z, t, w = _inputs(4, 1000, seed=18)
    kl, grad = _triton(z, t, w)
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    wrong = (logp.exp() * (logp - logq)) * w[:, None]
    with pytest.raises(AssertionError):
        assert_matches(kl, wrong, z, t, w)


def test_negative_control_wrong_temperature_is_caught():
    """The kernel run at the wrong temperature (or an upstream gradient ignored) fails the comparison."""
    z, t, w = _inputs(3, 1000, seed=19)
    kl, grad = _triton(z, t, w, 1.0)
    with pytest.raises(AssertionError):
        assert_matches(kl, grad, z, t, w, 0.7)
    with pytest.raises(AssertionError):
        assert_matches(kl, grad, z, t, torch.ones_like(w))


# ---- the same checks on a GPU, at sizes the interpreter cannot afford -------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", [(256, 32000), (64, 152064), (8, 262144), (1000, 1)])
def test_gpu_matches_torch(dtype, n, v):
    z, t, w = _inputs(n, v, seed=20, dtype=dtype, device="cuda")
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(0)) > 0.2).cuda()
    kl, grad = _triton(z, t, w, 0.7, mask=mask)
    kl_t, grad_t = _kl_and_grad(
        lambda a, b: dense_kl(a, b, temperature=0.7, mask=mask, backend="torch"), z, t, w
    )
    m = mask
    assert_matches(kl[m], grad[m], z[m], t[m], w[m], 0.7, dtype=dtype)
    assert_matches(kl_t[m], grad_t[m], z[m], t[m], w[m], 0.7, dtype=dtype, scaled_first=True)
    assert (kl[~m] == 0).all() and (grad[~m] == 0).all()


@pytest.mark.gpu
def test_gpu_extreme_and_strided():
    z, t, w = _inputs(16, 131075, seed=21, scale=1e4, device="cuda")
    z[:, :1000] = float("-inf")
    t[:, :500] = float("-inf")
    kl, grad = impl(z.t().contiguous().t(), t, None, 0.7, True, None)
    assert_matches(kl, grad, z, t, torch.ones(16, device="cuda"), 0.7)


def test_bench_cpu_smoke(capsys):
    """The benchmark's CPU mode runs and prints its table (a smoke test: no timing is asserted)."""
    from hybridlab.bench import main

    threads = torch.get_num_threads()
    try:
        main(["dense", "--cpu", "--sizes", "4:64", "--reps", "1", "--no-fused"])
    finally:
        torch.set_num_threads(threads)  # the CPU mode pins one thread for steady timings
    out = capsys.readouterr().out
    assert "triton kernel" in out and "autograd log_softmax" in out and "copy bandwidth" in out


@pytest.mark.parametrize("floor", [None, -30.0])
def test_small_blocks_dead_teacher_entries_and_late_student_maximum(floor):
    """A teacher -inf in block 0 under a student entry that becomes dead (p = 0 in fp32) only once a later
    block raises the student's maximum by > 104: the result must not depend on the block size."""
    from hybridlab.dense import _torch_impl
    from hybridlab.kernels.dense_kl_triton import dense_kl_triton_impl

    v = 64
    z = torch.zeros(2, v)
    t = torch.zeros(2, v)
    t[:, 3] = -float("inf")  # block 0: teacher gives 0 where the student (for now) has mass
    z[:, 50] = 200.0  # block 3 (of 16 columns): the student's mass moves there, p_3 underflows to 0
    z[1, 7] = -5.0
    want_kl, want_grad = _torch_impl(z, t, None, 1.0, True, floor)
    for block in (16, 64):
        kl, grad = dense_kl_triton_impl(z, t, None, 1.0, True, floor, block=block)
        assert torch.isfinite(kl).all(), (block, kl)
        torch.testing.assert_close(kl, want_kl.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_teacher_floor_over_several_blocks_matches_torch():
    from hybridlab.dense import _torch_impl
    from hybridlab.kernels.dense_kl_triton import dense_kl_triton_impl

    g = torch.Generator().manual_seed(5)
    z = 3 * torch.randn(3, 100, generator=g)
    t = 3 * torch.randn(3, 100, generator=g)
    t[:, ::7] = -float("inf")
    want_kl, want_grad = _torch_impl(z, t, None, 0.8, True, -20.0)
    kl, grad = dense_kl_triton_impl(z, t, None, 0.8, True, -20.0, block=16)
    torch.testing.assert_close(kl, want_kl.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


# ---- backward: no [N, V] pass spent on the upstream gradient in the common cases (issue 17) ---------------


class _BufferOps:
    """Records the aten ops (views excluded) that take a given tensor's storage as an argument."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not func.is_view:
                    ptrs = {
                        a.untyped_storage().data_ptr()
                        for a in torch.utils._pytree.tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor) and a.numel()
                    }
                    rec.calls.append((func.__name__, ptrs))
                return func(*args, **kwargs)

        self.mode = Mode()
        self.calls = []

    def touching(self, ptr):
        return [name for name, ptrs in self.calls if ptr in ptrs]


def _backward_ops(fn, z, *upstream):
    """Run fn(z) -> outputs, backpropagate `upstream` under the recorder; return (z.grad, ops on the buffer)."""
    z = z.detach().clone().requires_grad_(True)
    outs = fn(z)
    seen = []
    z.register_hook(lambda g: seen.append(g.untyped_storage().data_ptr()))
    rec = _BufferOps()
    with rec.mode:
        torch.autograd.backward([o for o, u in zip(outs, upstream) if u is not None],
                                [u for u in upstream if u is not None])  # fmt: skip
    return z.grad, rec.touching(seen[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_spends_no_pass_on_a_unit_upstream_gradient(backend):
    """dense_kl(...).sum().backward(): the saved [N, V] gradient is returned as it is (no op touches it), and
    is the right one; with a mask the rows outside it may carry any upstream value."""
    z, t, w = _inputs(4, 300, seed=40)
    mask = torch.tensor([True, True, False, True], device=DEV)
    for m, up in ((None, torch.ones(4)), (mask, torch.tensor([1.0, 1.0, 7.0, 1.0]))):
        grad, ops = _backward_ops(lambda a, m=m: [dense_kl(a, t, mask=m, backend=backend)], z, up.to(DEV))
        assert ops == [], ops
        keep = torch.arange(4) if m is None else m.nonzero().squeeze(1)
        assert_matches(
            dense_kl(z, t, mask=m, backend=backend).detach()[keep], grad[keep], z[keep], t[keep],
            torch.ones(len(keep)), scaled_first=backend == "torch",
        )  # fmt: skip
    # negative control: a weighted KL does scale the buffer (one in-place multiply), and the probe sees it
    grad, ops = _backward_ops(lambda a: [dense_kl(a, t, backend=backend)], z, w)
    assert ops == ["mul_.Tensor"], ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hybrid_backward_folds_the_kl_scale_into_the_score_pass(backend):
    """hybrid_loss's upstream gradients: beta * c_b on the KL (never 1) and -c_b A_t on the log-probs. The
    buffer is read once and written once (the score pass), no multiply of its own; the result equals the
    fp64 truth d(sum g_kl KL + g_lp log p)/dz."""
    from hybridlab import dense_kl_and_logprobs

    z, t, w = _inputs(5, 200, seed=41)
    a = torch.randint(0, 200, (5,), generator=torch.Generator().manual_seed(0)).to(DEV)
    g_kl = 0.3 * w
    g_lp = torch.linspace(-1.0, 2.0, 5, device=DEV)
    fn = lambda x: dense_kl_and_logprobs(x, t, a, temperature=0.8, backend=backend)
    grad, ops = _backward_ops(fn, z, g_kl, g_lp)
    assert not any(op.startswith("mul") for op in ops) and len(ops) <= 2, ops
    z64 = z.double().requires_grad_(True)
    logp64 = torch.log_softmax(z64 / 0.8, -1).gather(1, a[:, None])[:, 0]
    loss = (dense_kl_reference(z64, t.double(), 0.8) * g_kl.double()).sum() + (logp64 * g_lp.double()).sum()
    (want,) = torch.autograd.grad(loss, z64)
    kl64, p, d, _, g_bound = _bounds(z, t, 0.8, scaled_first=backend == "torch")
    kl = fn(z)[0].detach()
    # bound: the KL part as in assert_matches (plus its KL's own error); the score part g (onehot - p) / tau
    # with p = exp(z / tau - lse) formed in fp32: relative error u (|x| + |lse|) + a few u
    x = z.double() / 0.8
    lse = torch.logsumexp(x, -1, keepdim=True)
    score_b = g_lp.double().abs()[:, None] * (p * (U32 * (x.abs() + lse.abs()) + 4 * U32) + U32) / 0.8
    bound = g_kl.double().abs()[:, None] * g_bound(kl) + 4 * U32 * want.abs() + score_b
    bound = bound + g_kl.double().abs()[:, None] * p * (kl.double() - kl64).abs()[:, None] / 0.8
    assert ((grad.double() - want).abs() <= bound).all()
    # fp64 end to end: the fold itself is exact arithmetic, checked to 1e-12
    grad64, _ = _backward_ops(lambda x: dense_kl_and_logprobs(x, t.double(), a, temperature=0.8, backend=backend),
                              z.double(), g_kl.double(), g_lp.double())  # fmt: skip
    torch.testing.assert_close(grad64, want, rtol=1e-10, atol=1e-13)
