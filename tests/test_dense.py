"""dense_kl (torch backend) against a float64 log-softmax reference and finite differences."""

import pytest
import torch

from hybridlab import dense_kl, dense_kl_reference


def _ref64(z, t, tau=1.0):
    return dense_kl_reference(z.double(), t.double(), tau)


def _grad(fn, z, t, w):
    z = z.detach().clone().requires_grad_(True)
    (fn(z, t) * w).sum().backward()
    return z.grad


@pytest.mark.parametrize("v", [1, 7, 1000, 32003])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_matches_float64_reference(v, tau):
    g = torch.Generator().manual_seed(v)
    n = 5 if v < 32000 else 2
    z = 3 * torch.randn(n, v, generator=g)
    t = 3 * torch.randn(n, v, generator=g)
    w = torch.rand(n, generator=g) + 0.5  # non-uniform upstream gradient
    kl = dense_kl(z, t, temperature=tau, backend="torch")
    torch.testing.assert_close(kl.double(), _ref64(z, t, tau), rtol=1e-5, atol=1e-6)
    got = _grad(lambda a, b: dense_kl(a, b, temperature=tau, backend="torch"), z, t, w)
    want = _grad(lambda a, b: _ref64(a, b, tau), z.double(), t.double(), w.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_closed_form_equals_finite_differences_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    (dense_kl(zz, t, temperature=0.8, backend="torch") * w).sum().backward()
    fd = torch.zeros_like(z)
    eps = 1e-6
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            zp, zm = z.clone(), z.clone()
            zp[i, j] += eps
            zm[i, j] -= eps
            f = lambda x: (dense_kl(x, t, temperature=0.8, backend="torch") * w).sum()
            fd[i, j] = (f(zp) - f(zm)) / (2 * eps)
    torch.testing.assert_close(zz.grad, fd, rtol=1e-6, atol=1e-9)


def test_negative_control_wrong_formula_is_caught():
    """The comparison above must be able to fail: drop the -KL centring term and it does."""
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    p = torch.softmax(z, -1)
    wrong = p * (torch.log_softmax(z, -1) - torch.log_softmax(t, -1))  # missing "- KL"
    right = _grad(lambda a, b: dense_kl(a, b, backend="torch"), z, t, torch.ones(4))
    assert (wrong - right).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    z = (2 * torch.randn(6, 32000, generator=g)).to(dtype)
    t = (2 * torch.randn(6, 32000, generator=g)).to(dtype)
    kl = dense_kl(z, t, backend="torch")
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), _ref64(z, t), rtol=1e-5, atol=1e-5)
    zz = z.clone().requires_grad_(True)
    dense_kl(zz, t, backend="torch").sum().backward()
    assert zz.grad.dtype == dtype
    want = _grad(lambda a, b: _ref64(a, b), z.double(), t.double(), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(zz.grad.double(), want, rtol=2e-2, atol=1e-7)


def test_extreme_logits_and_neg_inf_entries():
    z = torch.tensor([[1e4, -1e4, 0.0, -float("inf")], [0.0, 1.0, 2.0, -float("inf")]])
    t = torch.tensor([[1e4 - 1.0, 0.0, -1e4, 3.0], [-1.0, 0.5, 2.0, -float("inf")]])
    kl = dense_kl(z, t, backend="torch")
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), _ref64(z, t), rtol=1e-6, atol=1e-6)
    zz = z.clone().requires_grad_(True)
    dense_kl(zz, t, backend="torch").sum().backward()
    assert torch.isfinite(zz.grad).all()
    assert zz.grad[:, 3].eq(0).all()  # a -inf student logit has p = 0: no gradient


def test_mask_skips_rows_and_zeroes_their_gradient():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 11, generator=g)
    t[0, 1] = float("nan")  # garbage on a masked row must not matter
    mask = torch.tensor([[True, False, True], [False, True, True]])
    kl = dense_kl(z, t, mask=mask, backend="torch")
    assert kl.shape == (2, 3) and kl[~mask].eq(0).all()
    kl.sum().backward()
    assert z.grad[~mask].eq(0).all() and z.grad[mask].abs().sum() > 0
    none = torch.zeros(2, 3, dtype=torch.bool)
    z2 = z.detach().clone().requires_grad_(True)
    out = dense_kl(z2, t, mask=none, backend="torch")
    out.sum().backward()
    assert out.eq(0).all() and z2.grad.eq(0).all()


def test_teacher_gets_no_gradient_and_kl_is_zero_for_equal_inputs():
    z = torch.randn(4, 10, requires_grad=True)
    t = z.detach().clone().requires_grad_(True)
    kl = dense_kl(z, t, backend="torch")
    kl.sum().backward()
    assert t.grad is None
    assert kl.abs().max() < 1e-6


def test_second_backward_is_refused_unless_asked():
    z = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    kl = dense_kl(z, t, backend="torch").sum()
    kl.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        kl.backward()
    kl2 = dense_kl(z, t, backend="torch", inplace_backward=False).sum()
    kl2.backward(retain_graph=True)
    kl2.backward()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(2, 5), torch.randn(2, 6)), "vocabulary mismatch"),
        (lambda: (torch.randn(2, 5), torch.randn(3, 5)), "shape mismatch"),
        (lambda: (torch.randint(0, 5, (2, 5)), torch.randn(2, 5)), "floating"),
        (lambda: (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2)), "student_logits .* NaN"),
        (lambda: (torch.zeros(1, 2), torch.tensor([[0.0, float("inf")]])), r"teacher_logits .* \+inf"),
        (lambda: (torch.zeros(1, 2), torch.tensor([[0.0, -float("inf")]])), "infinite KL"),
        (lambda: (torch.full((1, 2), -float("inf")), torch.zeros(1, 2)), "all -inf"),
    ],
)
def test_bad_input_raises_naming_argument_and_shape(make, match):
    z, t = make()
    with pytest.raises((ValueError, TypeError), match=match):
        dense_kl(z, t, backend="torch")


def test_teacher_floor_is_an_explicit_clamp():
    z = torch.zeros(1, 2)
    t = torch.tensor([[0.0, -float("inf")]])
    kl = dense_kl(z, t, backend="torch", teacher_floor=-30.0)
    want = 0.5 * (torch.log(torch.tensor(0.5)) - 0.0) + 0.5 * (torch.log(torch.tensor(0.5)) + 30.0)
    torch.testing.assert_close(kl[0], want)


def test_bad_mask_and_temperature():
    z, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"mask shape \[3, 2\]"):
        dense_kl(z, t, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        dense_kl(z, t, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        dense_kl(z, t, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        dense_kl(z, t, backend="cuda")


def test_no_gradient_work_under_no_grad(monkeypatch):
    import hybridlab.dense as dense

    seen = []
    real = dense._IMPLS["torch"]
    monkeypatch.setitem(dense._IMPLS, "torch", lambda *a: seen.append(a[4]) or real(*a))
    z = torch.randn(3, 5, requires_grad=True)
    with torch.no_grad():
        dense_kl(z, torch.randn(3, 5), backend="torch")
    dense_kl(z, torch.randn(3, 5), backend="torch")
    assert seen == [False, True]


def test_dense_kl_and_logprobs_validates_actions():
    from hybridlab import dense_kl_and_logprobs

    z, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="integer"):
        dense_kl_and_logprobs(z, t, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside"):
        dense_kl_and_logprobs(z, t, torch.full((2, 3), 5))
    kl, logp = dense_kl_and_logprobs(z, t, torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(logp, torch.log_softmax(z, -1)[..., 0])


def test_finite_logits_that_overflow_at_the_temperature_never_give_a_silent_nan():
    """z = 3e38 is finite in fp32 but z / 0.5 is not. Both backends subtract the row maximum before dividing by
    the temperature, so the KL is still the correct one (the float64 reference), never a silent NaN."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, generator=g)
    z[1, 2] = 3e38
    t = torch.randn(3, 6, generator=g)
    ref = dense_kl_reference(z.double(), t.double(), temperature=0.5)
    for backend in ("torch", "triton"):
        got = dense_kl(z, t, temperature=0.5, backend=backend).double()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.isfinite(torch.log_softmax(z / 0.5, -1)).all()  # control: dividing first overflows
    assert torch.isfinite(dense_kl(z, t, temperature=2.0, backend="torch")).all()
