"""Exact enumeration: fixed points of exact ascent, and Monte Carlo behaviour of the sampled estimator."""

import pytest
import torch

from hybridlab.lab import exact as ex


def test_enumeration_counts_and_probabilities_sum_to_one():
    with_eos = ex.enumerate_sequences(3, 3, eos=True)
    assert with_eos.size == 1 + 2 + 4 * 3  # EOS at 1, at 2, or anything at 3
    no_eos = ex.enumerate_sequences(2, 4, eos=False)
    assert no_eos.size == 16
    for space in (with_eos, no_eos):
        for kind in ("shared", "tabular"):
            pol = ex.TinyPolicy(space.vocab, space.horizon, kind=kind, seed=0)
            torch.testing.assert_close(
                ex.sequence_probs(pol, space).sum().detach(), torch.tensor(1.0).double()
            )
    with pytest.raises(ValueError, match="tiny"):
        ex.enumerate_sequences(50, 3)


def test_objective_equals_chain_rule_sum_of_per_state_kls():
    """Sequence-level KL = E_y sum_t KL_t(s_t) (chain rule)."""
    space = ex.enumerate_sequences(3, 3, eos=True)
    student, teacher = ex.TinyPolicy(3, 3, seed=1), ex.TinyPolicy(3, 3, seed=2, scale=2.0)
    zero = lambda a, m: torch.zeros(a.shape[0], dtype=torch.float64)
    seq_kl = -ex.objective(student, teacher, space, zero, lam=0.0, beta=1.0)
    out = ex.enumerated_loss(student, teacher, space, zero, lam=0.0, beta=1.0)
    w = ex.sequence_probs(student, space)
    torch.testing.assert_close(seq_kl, (w * out.kl.sum(1)).sum(), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def fixed_points():
    space = ex.enumerate_sequences(3, 3, eos=True)
    teacher = ex.TinyPolicy(3, 3, seed=2, scale=2.0)
    reward = ex.reward_table(space, "random", seed=3)
    res = {}
    for future in ("analytic", "none"):
        pol = ex.TinyPolicy(3, 3, kind="tabular", seed=1, scale=0.1)
        res[future] = ex.ascend(pol, teacher, space, reward, lam=1.0, beta=0.5, steps=3000, future=future)
    return res


def test_exact_ascent_reaches_the_optimum(fixed_points):
    assert fixed_points["analytic"]["tv"][-1] < 1e-3


def test_myopic_rule_converges_elsewhere(fixed_points):
    tv = fixed_points["none"]["tv"]
    assert tv[-1] > 1e-2
    assert abs(tv[-1] - tv[-50]) < 1e-4  # it did converge (to the wrong place)
    assert fixed_points["none"]["J"][-1] < fixed_points["analytic"]["J"][-1] - 1e-3


# Monte Carlo toy: V = 3 (EOS included), H = 4, shared-parameter student (seed 1), teacher (seed 2, scale 1),
# reward = fraction of tokens equal to 0, lam = beta = 1. Common random numbers (same seed) across variants.
MC = dict(lam=1.0, beta=1.0)


@pytest.fixture(scope="module")
def mc_toy():
    space = ex.enumerate_sequences(3, 4, eos=True)
    student, teacher = ex.TinyPolicy(3, 4, seed=1), ex.TinyPolicy(3, 4, seed=2)
    reward = ex.reward_table(space, "count0")
    grad_j = ex.exact_gradient(student, teacher, space, reward, **MC)
    samples = {
        f: ex.sampled_estimates(student, teacher, space, reward, n_groups=800, future=f, seed=0, **MC)
        for f in ("analytic", "k3", "k1", "none")
    }
    myopic = ex.expected_estimate(student, teacher, space, reward, future="none", **MC)["total"]
    return grad_j, samples, myopic


def _z(samples, direction, target):
    proj = samples @ direction
    return float((proj.mean() - target @ direction) / (proj.std() / len(proj) ** 0.5))


@pytest.mark.parametrize("future", ["analytic", "k3", "k1"])
def test_sampled_estimates_are_unbiased(mc_toy, future):
    grad_j, samples, myopic = mc_toy
    bias_dir = (myopic - grad_j) / (myopic - grad_j).norm()
    for d in (grad_j / grad_j.norm(), bias_dir):
        assert abs(_z(samples[future], d, grad_j)) < 4.0


def test_myopic_sampled_estimate_is_detectably_biased(mc_toy):
    """Negative control. Paired with the analytic estimator on the same samples, the myopic estimate's mean
    differs from it by many standard errors (it drops beta * sum_t grad log pi * future KL), and is
    unbiased only for its own, wrong, target."""
    grad_j, samples, myopic = mc_toy
    bias_dir = (myopic - grad_j) / (myopic - grad_j).norm()
    diff = (samples["none"] - samples["analytic"]) @ bias_dir
    assert float(diff.mean() / (diff.std() / len(diff) ** 0.5)) > 6.0
    assert abs(_z(samples["none"], bias_dir, myopic)) < 4.0
    # the same paired test between two unbiased estimators does not fire
    same = (samples["k3"] - samples["analytic"]) @ bias_dir
    assert abs(float(same.mean() / (same.std() / len(same) ** 0.5))) < 4.0


def test_variance_ordering_analytic_k3_k1(mc_toy):
    _, samples, _ = mc_toy
    var = {f: float(s.var(0).sum()) for f, s in samples.items()}
    assert var["analytic"] <= var["k3"] <= var["k1"], var


def test_monte_carlo_error_shrinks_like_one_over_sqrt_n(mc_toy):
    grad_j, samples, _ = mc_toy
    s = samples["analytic"]
    per_sample_sd = float(s.var(0).sum().sqrt())
    errs = [float((s[:n].mean(0) - grad_j).norm()) for n in (50, 200, 800)]
    for n, e in zip((50, 200, 800), errs):
        assert e < 3.0 * per_sample_sd / n**0.5  # within 3 standard errors of the 1/sqrt(N) law
    assert errs[-1] < errs[0]


def test_reward_only_baseline_can_raise_variance():
    """Stated toy: teacher scale 3, reward = count0 + 0.5, groups of 4, lam = beta = 1. The combined return's mean
    is far below lam * E[R], so a baseline on R alone over-subtracts and *raises* variance above no baseline,
    while the combined-return baseline does not."""
    space = ex.enumerate_sequences(3, 4, eos=True)
    student, teacher = ex.TinyPolicy(3, 4, seed=1), ex.TinyPolicy(3, 4, seed=2, scale=3.0)
    count0 = ex.reward_table(space, "count0")
    reward = lambda a, m: count0(a, m) + 0.5
    var = {}
    for base in ("none", "reward_group", "return_group"):
        s = ex.sampled_estimates(
            student, teacher, space, reward, n_groups=300, group_size=4, baseline=base, seed=0, **MC
        )
        var[base] = float(s.var(0).sum())
    assert var["reward_group"] > 1.2 * var["none"], var
    assert var["return_group"] < 0.85 * var["reward_group"], var


def test_group_estimates_are_unbiased_for_grad_j_not_a_multiple():
    """With groups of G samples, each row is one estimate of grad J (not G times it)."""
    space = ex.enumerate_sequences(3, 3, eos=True)
    student, teacher = ex.TinyPolicy(3, 3, seed=1), ex.TinyPolicy(3, 3, seed=2)
    reward = ex.reward_table(space, "count0")
    grad_j = ex.exact_gradient(student, teacher, space, reward, **MC)
    s = ex.sampled_estimates(student, teacher, space, reward, n_groups=300, group_size=4, seed=3, **MC)
    u = grad_j / grad_j.norm()
    assert abs(_z(s, u, grad_j)) < 4.0
    assert abs(_z(s, u, 4 * grad_j)) > 6.0  # the earlier bug (rows = G * estimate) would pass this instead
