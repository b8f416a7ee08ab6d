"""The fused Triton dense-KL kernel against the torch closed form, the float64 autograd reference and
finite differences. On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, conftest.py)."""

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
# (rtol, atol) on the gradient against the float64 reference: bf16/fp16 gradients are rounded once on store.
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-4), torch.float16: (2e-3, 1e-5)}


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


def assert_close_to_max(a, b, rel):
    """|a - b| <= rel * max|b| everywhere: for two fp32 computations that round differently."""
    err = (a.double() - b.double()).abs().max()
    assert err <= rel * b.double().abs().max(), (float(err), float(b.abs().max()))


def assert_matches(kl, grad, kl_ref, grad_ref, dtype=torch.float32, kl_rtol=1e-5):
    """The comparison every test uses (and the negative controls show can fail)."""
    assert kl.dtype == torch.float32 and grad.dtype == dtype
    scale = kl_ref.abs().clamp_min(1.0)
    assert ((kl.double() - kl_ref).abs() <= kl_rtol * scale).all(), (kl, kl_ref)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=rtol, atol=atol)


# V ragged (never a multiple of the block), rows from 64 down to 1 as V grows.
@pytest.mark.parametrize(
    "n,v,tau",
    [(64, 1, 1.0), (33, 7, 0.7), (9, 1000, 1.0), (3, 32003, 1.3), (1, 131075, 1.0), (2, 131075, 0.5)],
)
def test_matches_references_ragged_vocab(n, v, tau):
    z, t, w = _inputs(n, v, seed=v + n)
    kl, grad = _triton(z, t, w, tau)
    assert_matches(kl, grad, *_ref64(z, t, w, tau))
    kl_t, grad_t = _kl_and_grad(lambda a, b: dense_kl(a, b, temperature=tau, backend="torch"), z, t, w)
    torch.testing.assert_close(kl, kl_t, rtol=1e-5, atol=1e-5)
    assert_close_to_max(grad, grad_t, 1e-4)  # the torch fp32 form is the less accurate of the two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1000, 32003])
def test_low_precision_inputs_accumulate_in_fp32(dtype, v):
    z, t, w = _inputs(4, v, seed=11, dtype=dtype)
    kl, grad = _triton(z, t, w, 0.8)
    assert_matches(kl, grad, *_ref64(z, t, w, 0.8), dtype=dtype)
    # the torch closed form on the same inputs: same fp32 math, one rounding of the gradient
    kl_t, grad_t = _torch_impl(z, t, None, 0.8, True, None)
    torch.testing.assert_close(kl, kl_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,v", [(16, 7), (16, 1000), (64, 4099), (256, 32003)])
def test_many_blocks_online_rescaling(block, v):
    """Small blocks force the online max/sum updates across many blocks (the default covers a row at once
    in the interpreter). The row maximum sits in the last block, where every earlier sum must be rescaled."""
    z, t, w = _inputs(3, v, seed=v)
    z[:, -1] += 40.0
    t[1, -2] += 60.0
    kl, grad = impl(z, t, None, 0.9, True, None, block=block)
    kl_r, grad_r = _ref64(z, t, torch.ones(3), 0.9)
    assert_matches(kl, grad, kl_r, grad_r)


def test_leading_all_neg_inf_blocks():
    """Blocks that are entirely -inf before any finite logit (padded vocab at the front) must not make NaNs."""
    z, t, w = _inputs(2, 200, seed=3)
    z[:, :100] = float("-inf")
    t[:, :64] = float("-inf")
    kl, grad = impl(z, t, None, 1.0, True, None, block=16)
    assert_matches(kl, grad, *_ref64(z, t, torch.ones(2)))
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
    kl_r, grad_r = _ref64(z[keep], t[keep], w[keep])
    assert_matches(kl[keep], grad[keep], kl_r, grad_r)
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
    kl_r, grad_r = _ref64(z, t, torch.ones(5))
    assert_matches(kl, grad, kl_r, grad_r)
    # and through the public API on a [B, T, V] slice (the time shift of a causal LM)
    z3 = z.reshape(1, 5, 777)[:, 1:]
    t3 = t.reshape(1, 5, 777)[:, 1:]
    kl3, _ = _triton(z3, t3, w[1:].reshape(1, 4))
    torch.testing.assert_close(kl3.reshape(-1), kl[1:])


def test_extreme_logits():
    z, t, w = _inputs(3, 1000, seed=12, scale=1e4)
    kl, grad = _triton(z, t, w, 0.7)
    kl_r, grad_r = _ref64(z, t, w, 0.7)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert_matches(kl, grad, kl_r, grad_r, kl_rtol=1e-6)  # KL ~ 1e4 here: centred sums keep ~1e-6 relative


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
    assert_matches(kl, grad, *_ref64(z, t, w))
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


# ---- negative controls: the comparisons above must be able to fail ----------------------------------------


def test_negative_control_wrong_gradient_formula_is_caught():
    """A gradient without the -KL centring (a classic bug) fails `assert_matches`."""
    z, t, w = _inputs(4, 1000, seed=18)
    kl, grad = _triton(z, t, w)
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    wrong = (logp.exp() * (logp - logq)) * w[:, None]
    with pytest.raises(AssertionError):
        assert_matches(kl, wrong, *_ref64(z, t, w))


def test_negative_control_wrong_temperature_is_caught():
    """The kernel run at the wrong temperature (or an upstream gradient ignored) fails the comparison."""
    z, t, w = _inputs(3, 1000, seed=19)
    kl, grad = _triton(z, t, w, 1.0)
    with pytest.raises(AssertionError):
        assert_matches(kl, grad, *_ref64(z, t, w, 0.7))
    with pytest.raises(AssertionError):
        assert_matches(kl, grad, *_ref64(z, t, torch.ones_like(w)))


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
    torch.testing.assert_close(kl, kl_t.float(), rtol=1e-4, atol=1e-4)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.float(), grad_t.float(), rtol=rtol, atol=atol)
    few = slice(0, 4)
    kl_r, grad_r = _ref64(z[few], t[few], w[few], 0.7)
    m = mask[few]
    assert_matches(kl[few][m], grad[few][m], kl_r[m], grad_r[m], dtype=dtype, kl_rtol=1e-4)


@pytest.mark.gpu
def test_gpu_extreme_and_strided():
    z, t, w = _inputs(16, 131075, seed=21, scale=1e4, device="cuda")
    z[:, :1000] = float("-inf")
    t[:, :500] = float("-inf")
    kl, grad = impl(z.t().contiguous().t(), t, None, 0.7, True, None)
    kl_r, grad_r = _ref64(z, t, torch.ones(16, device="cuda"), 0.7)
    assert_matches(kl, grad, kl_r, grad_r, kl_rtol=1e-5)


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
