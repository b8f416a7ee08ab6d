"""hybrid_loss: the exact identity by enumeration, the myopic control, normalisations, bad input."""

import pytest
import torch

from hybridlab import hybrid_loss
from hybridlab.fused_hybrid import fused_hybrid_loss
from hybridlab.lab import exact as ex


def _setup(eos: bool, vocab=3, horizon=3, kind="shared"):
    space = ex.enumerate_sequences(vocab, horizon, eos=eos)
    student = ex.TinyPolicy(vocab, horizon, kind=kind, seed=1)
    teacher = ex.TinyPolicy(vocab, horizon, seed=2, scale=2.0)
    return space, student, teacher, ex.reward_table(space, "random", seed=3)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("lam", [0.0, 1.5])
@pytest.mark.parametrize("future", ["analytic", "k1", "k3"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_enumerated_estimator_equals_exact_gradient(eos, lam, future, temperature):
    space, student, teacher, reward = _setup(eos)
    kw = dict(lam=lam, beta=0.7, temperature=temperature)
    grad_j = ex.exact_gradient(student, teacher, space, reward, **kw)
    est = ex.expected_estimate(student, teacher, space, reward, future=future, **kw)
    assert grad_j.norm() > 1e-3
    assert _rel(est["total"], grad_j) < 1e-9


def test_identity_holds_on_a_larger_space_and_with_state_baseline():
    space, student, teacher, reward = _setup(True, vocab=4, horizon=4)
    base = torch.randn(
        space.size, space.horizon, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    # An arbitrary state baseline depends on the row (a whole sequence), not only on s_t: to stay a valid
    # b(s_t) it must be a function of the prefix; use one value per prefix code.
    codes = ex.prefix_codes(space.actions, space.vocab)
    per_state = torch.randn(
        int(codes.max()) + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    kw = dict(lam=2.0, beta=0.5)
    grad_j = ex.exact_gradient(student, teacher, space, reward, **kw)
    est = ex.expected_estimate(student, teacher, space, reward, baseline=per_state[codes], **kw)
    assert _rel(est["total"], grad_j) < 1e-9
    # Negative control: a baseline that looks at the sampled token y_t itself is biased.
    cheating = base + 3.0 * (space.actions == 0)
    bad = ex.expected_estimate(student, teacher, space, reward, baseline=cheating, **kw)
    assert _rel(bad["total"], grad_j) > 1e-2


@pytest.mark.parametrize("eos", [True, False])
def test_myopic_control_misses_with_reward(eos):
    space, student, teacher, reward = _setup(eos)
    grad_j = ex.exact_gradient(student, teacher, space, reward, lam=1.5, beta=0.7)
    est = ex.expected_estimate(student, teacher, space, reward, lam=1.5, beta=0.7, future="none")
    assert _rel(est["total"], grad_j) > 5e-2


def test_discount_below_one_changes_the_gradient():
    space, student, teacher, reward = _setup(True)
    grad_j = ex.exact_gradient(student, teacher, space, reward, lam=1.0, beta=1.0)
    est = ex.expected_estimate(student, teacher, space, reward, lam=1.0, beta=1.0, gamma=0.5)
    assert _rel(est["total"], grad_j) > 1e-2


def test_loss_is_dense_plus_sparse_and_diagnostics():
    space, student, teacher, reward = _setup(True)
    out = ex.enumerated_loss(
        student, teacher, space, reward, lam=1.0, beta=0.5, parameters=list(student.parameters())
    )
    assert out.kl.shape == space.actions.shape and out.kl[~space.mask].eq(0).all()
    assert (out.kl[space.mask] >= 0).all()
    assert set(out.grad_norms) == {"dense", "sparse", "total", "cosine"}
    assert (
        out.grad_norms["dense"] > 0 and out.grad_norms["sparse"] > 0 and -1 <= out.grad_norms["cosine"] <= 1
    )
    # returns = lam R - beta * future KL, so the last token of each sequence has return lam R
    last = space.mask.sum(1) - 1
    r = reward(space.actions, space.mask)
    torch.testing.assert_close(out.returns[torch.arange(space.size), last], 1.0 * r)


def _batch(b=4, t=5, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, v, generator=g, requires_grad=True)
    tl = torch.randn(b, t, v, generator=g)
    a = torch.randint(0, v, (b, t), generator=g)
    r = torch.randn(b, generator=g)
    m = torch.ones(b, t, dtype=torch.bool)
    m[0, 3:] = False
    m[2, 1:] = False
    return z, tl, a, r, m


def test_normalisations_scale_sequences_as_documented():
    z, tl, a, r, m = _batch()
    outs = {n: hybrid_loss(z, tl, a, r, mask=m, normalize=n) for n in ("sequences", "tokens", "per_sequence")}
    b, lengths = m.shape[0], m.sum(1).float()
    torch.testing.assert_close(outs["sequences"].token_weights, torch.full((b,), 1 / b))
    torch.testing.assert_close(outs["tokens"].token_weights, torch.full((b,), 1 / lengths.sum()))
    torch.testing.assert_close(outs["per_sequence"].token_weights, 1 / (b * lengths))
    const = hybrid_loss(z, tl, a, r, mask=m, normalize=10.0)
    torch.testing.assert_close(const.loss * 10, outs["sequences"].loss * b)


def test_group_baselines():
    z, tl, a, r, m = _batch()
    out = hybrid_loss(z, tl, a, r, mask=m, baseline="reward_group", group_size=2, lam=2.0)
    want = 2.0 * torch.stack([r[1], r[0], r[3], r[2]])
    torch.testing.assert_close(out.baseline[:, 0], want)
    out2 = hybrid_loss(z, tl, a, r, mask=m, baseline="return_group", group_size=4, lam=2.0)
    padded = torch.where(m, out2.returns, 2.0 * r[:, None])
    torch.testing.assert_close(out2.baseline[1, 0], (padded[0, 0] + padded[2, 0] + padded[3, 0]) / 3)
    with pytest.raises(ValueError, match="group_size"):
        hybrid_loss(z, tl, a, r, mask=m, baseline="reward_group", group_size=3)


def test_all_false_mask_gives_zero_loss_and_finite_gradients():
    z, tl, a, r, _ = _batch()
    m = torch.zeros(4, 5, dtype=torch.bool)
    for norm in ("sequences", "tokens", "per_sequence"):
        zz = z.detach().clone().requires_grad_(True)
        out = hybrid_loss(zz, tl, a, r, mask=m, normalize=norm)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and torch.isfinite(zz.grad).all() and zz.grad.eq(0).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda z, tl, a, r, m: (z, tl[..., :-1], a, r, m), "vocabulary mismatch"),
        (lambda z, tl, a, r, m: (z, tl, a.float(), r, m), "actions must be an integer"),
        (lambda z, tl, a, r, m: (z, tl, a[:, :-1], r, m), r"actions \[4, 4\]"),
        (lambda z, tl, a, r, m: (z, tl, a + 7, r, m), "outside"),
        (lambda z, tl, a, r, m: (z, tl, a, r[:2], m), r"rewards \[2\]"),
        (lambda z, tl, a, r, m: (z, tl, a, r * float("nan"), m), "rewards .* NaN"),
        (lambda z, tl, a, r, m: (z, tl, a, r, m[:, :2]), "mask shape"),
        (lambda z, tl, a, r, m: (z.detach() * float("nan"), tl, a, r, m), "student_logits .* NaN"),
        (lambda z, tl, a, r, m: (z[0], tl[0], a, r, m), r"must be \[B, T, V\]"),
    ],
)
def test_bad_input(mutate, match):
    args = mutate(*_batch())
    with pytest.raises(ValueError, match=match):
        hybrid_loss(*args[:4], mask=args[4])


def test_bad_options():
    z, tl, a, r, m = _batch()
    for kw, match in [
        (dict(future="k2"), "future"),
        (dict(gamma=1.5), "gamma"),
        (dict(normalize="mean"), "normalize"),
        (dict(baseline="ema"), "baseline"),
        (dict(baseline="return_group"), "group_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            hybrid_loss(z, tl, a, r, mask=m, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=float("nan")), "beta must be a finite number >= 0"),
        (dict(beta=-1.0), "beta must be a finite number >= 0"),
        (dict(beta=float("inf")), "beta must be a finite number >= 0"),
        (dict(lam=float("inf")), "lam must be a finite number >= 0"),
        (dict(lam=float("nan")), "lam must be a finite number >= 0"),
        (dict(lam=-0.5), "lam must be a finite number >= 0"),
    ],
)
def test_bad_weights_are_refused_not_a_nan_loss(kw, match):
    z, tl, a, r, m = _batch()
    with pytest.raises(ValueError, match=match):
        hybrid_loss(z, tl, a, r, mask=m, **kw)
    h = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match=match):
        fused_hybrid_loss(h, torch.randn(tl.shape[-1], 3), tl, a, r, mask=m, **kw)
    hybrid_loss(z, tl, a, r, mask=m, beta=0.0, lam=0.0)  # zero weights are legal (pure RL / pure imitation)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_overflowing_at_the_temperature_are_centred_first(backend):
    """z = 3e38 is finite in fp32, infinite once divided by 0.5: the maximum is subtracted first, so the loss
    and the gradient are the float64 ones; a sampled token the student then gives probability 0 (fp32) is
    refused by name, not a NaN."""
    z, tl, a, r, m = _batch()
    z = z.detach().clone()
    z[0, 0, 0] = 3e38
    a = a.clone()
    a[0, 0] = 0  # the token that holds all the mass was the one sampled
    got = z.clone().requires_grad_(True)
    out = hybrid_loss(got, tl, a, r, mask=m, temperature=0.5, backend=backend)
    out.loss.backward()
    z64 = z.double().requires_grad_(True)
    ref = hybrid_loss(z64, tl.double(), a, r.double(), mask=m, temperature=0.5, backend="torch")
    ref.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    a[0, 0] = 1  # p = exp(-6e38) = 0 in fp32 at the sampled token
    with pytest.raises(ValueError, match="probability 0"):
        hybrid_loss(z, tl, a, r, mask=m, temperature=0.5, backend=backend)


def test_infinite_kl_is_an_error_or_explicit_clamp():
    z, tl, a, r, m = _batch()
    tl = tl.clone()
    tl[1, 0, 2] = -float("inf")
    with pytest.raises(ValueError, match="infinite KL"):
        hybrid_loss(z, tl, a, r, mask=m)
    out = hybrid_loss(z, tl, a, r, mask=m, teacher_floor=-20.0)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logit_gradient_matches_the_composition_of_parts(dtype):
    """hybrid_loss shares one [N, V] buffer for dense + sparse; it must equal dense_kl + selected_logprobs."""
    from hybridlab import dense_kl, selected_logprobs

    z, tl, a, r, m = _batch(b=6, t=4, v=50, seed=5)
    z = z.detach().to(dtype)
    z1 = z.clone().requires_grad_(True)
    out = hybrid_loss(z1, tl, a, r, mask=m, lam=1.3, beta=0.6, baseline="return_group", group_size=3)
    out.loss.backward()
    z2 = z.clone().requires_grad_(True)
    kl = dense_kl(z2, tl, mask=m)
    logp = selected_logprobs(z2, a)
    c = out.token_weights
    loss = 0.6 * (c[:, None] * kl).sum() - (c[:, None] * torch.where(m, logp, 0.0) * out.advantages).sum()
    loss.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(z1.grad.float(), z2.grad.float(), **tol)
    torch.testing.assert_close(out.loss.detach().float(), loss.detach().float(), **tol)
    # the grad-norm mode (out-of-place backward) gives the same gradient
    z3 = z.clone().requires_grad_(True)
    out3 = hybrid_loss(
        z3, tl, a, r, mask=m, lam=1.3, beta=0.6, baseline="return_group", group_size=3, parameters=[z3]
    )
    out3.loss.backward()
    torch.testing.assert_close(z3.grad, z1.grad)


def test_triton_backend_gives_the_same_hybrid_loss_and_gradient():
    """The Triton kernel (interpreter on CPU) behind hybrid_loss: same loss and logit gradient as torch."""
    pytest.importorskip("triton")
    z, tl, a, r, m = _batch(b=4, t=3, v=1000, seed=7)
    grads = {}
    for backend in ("torch", "triton"):
        zz = z.detach().clone().requires_grad_(True)
        out = hybrid_loss(zz, tl, a, r, mask=m, lam=0.8, beta=1.2, temperature=0.9, backend=backend)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), zz.grad)
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1], rtol=1e-4, atol=1e-6)


def test_bf16_score_gradient_is_rounded_once_even_when_the_sampled_token_dominates():
    """Against fp64 autograd on the same bf16 inputs: the sampled entry g (1 - p_a) / tau must not be the
    difference of two rounded numbers (p_a close to 1 is the usual case for a confident student)."""
    g = torch.Generator().manual_seed(11)
    b, t, v = 8, 6, 1000
    z = torch.randn(b, t, v, generator=g)
    a = torch.randint(0, v, (b, t), generator=g)
    z.scatter_(-1, a[..., None], 12.0)  # p_a ~ 0.99
    z = z.to(torch.bfloat16)
    tl = torch.randn(b, t, v, generator=g)
    r = torch.randn(b, generator=g)
    zz = z.clone().requires_grad_(True)
    hybrid_loss(zz, tl, a, r, lam=1.0, beta=0.0).loss.backward()  # pure score-function term
    ref = z.double().requires_grad_(True)
    out = hybrid_loss(ref, tl.double(), a, r.double(), lam=1.0, beta=0.0)
    out.loss.backward()
    got = zz.grad.double().gather(-1, a[..., None])
    want = ref.grad.gather(-1, a[..., None])
    rel = ((got - want).abs() / want.abs()).max()
    assert rel < 1e-2, float(rel)  # one bf16 rounding is ~0.4%; rounding twice gave errors of several 100%


def test_garbage_on_masked_rows_never_reaches_loss_or_gradient():
    z, tl, a, r, m = _batch()
    z = z.detach().clone()
    z[0, 4] = float("nan")  # masked position
    z[2, 3] = -float("inf")  # masked position, all -inf
    tl = tl.clone()
    tl[0, 4] = float("nan")
    a = a.clone()
    a[2, 2] = 10_000  # out-of-range id on a masked position is ignored
    for norm in ("sequences", "tokens"):
        zz = z.clone().requires_grad_(True)
        out = hybrid_loss(zz, tl, a, r, mask=m, lam=1.0, beta=0.5, normalize=norm)
        out.loss.backward()
        assert torch.isfinite(out.loss.detach())
        assert torch.isfinite(zz.grad).all()
        assert zz.grad[~m].eq(0).all()


def test_second_order_gradients_are_refused_not_silently_wrong():
    z, tl, a, r, m = _batch()
    out = hybrid_loss(z, tl, a, r, mask=m)
    with pytest.raises(RuntimeError, match="does not support second derivatives"):
        torch.autograd.grad(out.loss, z, create_graph=True)
    (gz,) = torch.autograd.grad(hybrid_loss(z, tl, a, r, mask=m).loss, z)  # first order is fine
    assert torch.isfinite(gz).all()


def test_a_sampled_token_with_zero_student_probability_is_an_error():
    z, tl, a, r, m = _batch()
    z = z.detach().clone()
    z[1, 0, a[1, 0]] = -float("inf")
    with pytest.raises(ValueError, match="probability 0"):
        hybrid_loss(z, tl, a, r, mask=m)
