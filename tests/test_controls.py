"""Negative controls: each wrong estimator's exact expectation misses grad J visibly; hybrid_loss hits it."""

import pytest
import torch

from hybridlab import hybrid_loss
from hybridlab.lab import controls as C
from hybridlab.lab import exact as ex

KW = dict(lam=1.0, beta=0.5)


@pytest.fixture(scope="module", params=[(3, 3, True), (2, 4, False)], ids=["V3H3-eos", "V2H4-noeos"])
def toy(request):
    vocab, horizon, eos = request.param
    space = ex.enumerate_sequences(vocab, horizon, eos=eos)
    student = ex.TinyPolicy(vocab, horizon, seed=0)
    teacher = ex.TinyPolicy(vocab, horizon, seed=1, scale=2.0)
    reward = ex.reward_table(space, "random", seed=0)
    return space, student, teacher, reward


def test_hybrid_loss_expectation_is_exact(toy):
    space, student, teacher, reward = toy
    grad_j = ex.exact_gradient(student, teacher, space, reward, **KW)
    for future in ("analytic", "k1", "k3"):
        est = C.expected_gradient(hybrid_loss, student, teacher, space, reward, future=future, **KW)
        assert C.relative_error(est, grad_j) < 1e-9, future


@pytest.mark.parametrize("name", sorted(C.CONTROLS))
def test_every_control_misses_visibly(toy, name):
    space, student, teacher, reward = toy
    grad_j = ex.exact_gradient(student, teacher, space, reward, **KW)
    est = C.expected_control(name, student, teacher, space, reward, **KW)
    assert C.relative_error(est, grad_j) > 1e-2, name


def test_k1_as_loss_has_zero_expected_kl_gradient(toy):
    space, student, teacher, reward = toy
    est = C.expected_control("k1_loss", student, teacher, space, reward, lam=0.0, beta=0.5)
    scale = ex.exact_gradient(student, teacher, space, reward, lam=0.0, beta=0.5).norm()
    assert est.norm() < 1e-12 * scale
    # with a reward, what is left is exactly the REINFORCE reward term (no KL at all)
    with_reward = C.expected_control("k1_loss", student, teacher, space, reward, **KW)
    reward_only = C.expected_gradient(hybrid_loss, student, teacher, space, reward, lam=1.0, beta=0.0)
    assert C.relative_error(with_reward, reward_only) < 1e-10


def _forward_kl_gradient_by_loops(student, teacher, space, beta):
    """-beta sum_y pi(y) sum_t grad KL(pi_T(.|s_t) || pi(.|s_t)) with s_t fixed, one response at a time."""
    params = list(student.parameters())
    total = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        weights = ex.sequence_probs(student, space)
    for i in range(space.size):
        a, m = space.actions[i : i + 1], space.mask[i]
        logq = torch.log_softmax(teacher(a)[0], -1).detach()
        logp = torch.log_softmax(student(a)[0], -1)
        fwd = sum(
            float(weights[i]) * (logq[t].exp() * (logq[t] - logp[t])).sum() for t in range(len(m)) if m[t]
        )
        for acc, g in zip(total, torch.autograd.grad(fwd, params)):
            acc -= beta * g
    return torch.cat([g.reshape(-1) for g in total])


def test_k3_as_loss_follows_the_forward_kl(toy):
    space, student, teacher, reward = toy
    est = C.expected_control("k3_loss", student, teacher, space, reward, lam=0.0, beta=0.5)
    forward = _forward_kl_gradient_by_loops(student, teacher, space, beta=0.5)
    assert C.relative_error(est, forward) < 1e-10
    reverse = C.expected_gradient(hybrid_loss, student, teacher, space, reward, lam=0.0, beta=0.5)
    assert C.relative_error(est, reverse) > 1e-2  # and that is not the reverse-KL gradient


def test_k2_as_loss_is_the_myopic_rule(toy):
    space, student, teacher, reward = toy
    k2 = C.expected_control("k2_loss", student, teacher, space, reward, **KW)
    myopic = C.expected_control("myopic", student, teacher, space, reward, **KW)
    assert C.relative_error(k2, myopic) < 1e-10


def test_double_count_adds_a_second_dense_term(toy):
    space, student, teacher, reward = toy
    grad_j = ex.exact_gradient(student, teacher, space, reward, **KW)
    dense = ex.expected_estimate(student, teacher, space, reward, **KW)["dense"]
    est = C.expected_control("double_count", student, teacher, space, reward, **KW)
    assert C.relative_error(est, grad_j + dense) < 1e-10


def test_myopic_is_exact_for_nothing_but_matches_hybrid_future_none(toy):
    space, student, teacher, reward = toy
    myopic = C.expected_control("myopic", student, teacher, space, reward, **KW)
    direct = C.expected_gradient(hybrid_loss, student, teacher, space, reward, future="none", **KW)
    assert C.relative_error(myopic, direct) < 1e-12


def test_sampled_gradients_converge_to_expectation():
    space = ex.enumerate_sequences(3, 2, eos=True)
    student, teacher = ex.TinyPolicy(3, 2, seed=0), ex.TinyPolicy(3, 2, seed=1, scale=2.0)
    reward = ex.reward_table(space, "random", seed=0)
    for loss_fn in (hybrid_loss, C.CONTROLS["k3_loss"]):
        exact = C.exact_moments(loss_fn, student, teacher, space, reward, **KW)
        mc = C.sampled_gradients(loss_fn, student, teacher, space, reward, n_groups=400, seed=0, **KW)
        err = (mc.mean(0) - exact["mean"]).norm()
        assert err < 4 * (exact["variance"] / 400) ** 0.5  # within 4 standard errors of the exact mean


def test_group_estimates_are_means_not_sums():
    """A group of G samples gives the group *mean* estimate: same expectation for every G."""
    space = ex.enumerate_sequences(3, 2, eos=True)
    student, teacher = ex.TinyPolicy(3, 2, seed=0), ex.TinyPolicy(3, 2, seed=1, scale=2.0)
    reward = ex.reward_table(space, "random", seed=0)
    grad_j = ex.exact_gradient(student, teacher, space, reward, **KW)
    for base in ("none", "reward_group", "return_group"):
        m = C.exact_moments(hybrid_loss, student, teacher, space, reward, group_size=2, baseline=base, **KW)
        assert C.relative_error(m["mean"], grad_j) < 1e-10, base


def test_baselines_are_unbiased_and_ordered():
    space = ex.enumerate_sequences(3, 3, eos=True)
    student, teacher = ex.TinyPolicy(3, 3, seed=0), ex.TinyPolicy(3, 3, seed=100, scale=3.0)
    xi = ex.reward_table(space, "random", seed=0)
    reward = lambda a, m: torch.sigmoid(xi(a, m))
    kw = dict(lam=1.0, beta=1.0)
    grad_j = ex.exact_gradient(student, teacher, space, reward, **kw)
    bases = C.mean_baselines(student, teacher, space, reward, **kw)
    bases["state"] = C.state_value_baseline(student, teacher, space, reward, **kw)
    var = {}
    for name, b in bases.items():
        m = C.exact_moments(hybrid_loss, student, teacher, space, reward, baseline=b, **kw)
        assert C.relative_error(m["mean"], grad_j) < 1e-10, name
        var[name] = m["variance"]
    none, reward_only, combined, state = var.values()
    assert reward_only > 1.2 * none and combined < none and state <= min(var.values())


def test_cosine_and_helpers():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert C.cosine(a, a) == pytest.approx(1.0)
    assert C.cosine(a, torch.tensor([0.0, 2.0], dtype=torch.float64)) == pytest.approx(0.0)
    assert C.cosine(1e-20 * a, a) == 0.0  # numerically zero vectors have no direction
    assert C.loglog_slope([1, 4, 16], [1.0, 0.5, 0.25]) == pytest.approx(-0.5)
    est = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
    assert C.block_rmse(est, torch.zeros(1, dtype=torch.float64), [1, 2]) == pytest.approx([1.0, 0.0])


def test_errors_name_the_problem(toy):
    space, student, teacher, reward = toy
    with pytest.raises(ValueError, match="unknown control"):
        C.expected_control("nope", student, teacher, space, reward, **KW)
    with pytest.raises(ValueError, match="kind"):
        C.kl_as_loss(
            torch.zeros(1, 1, 2),
            torch.zeros(1, 1, 2),
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1),
            kind="k4",
        )
    with pytest.raises(ValueError, match="max_groups"):
        C.exact_moments(hybrid_loss, student, teacher, space, reward, group_size=5, **KW)
