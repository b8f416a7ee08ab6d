"""Baselines on the same sampled groups (notebook 04 § 3): shift invariance, and the variance change measured."""

import torch

from hybridlab import hybrid_loss
from hybridlab.lab import controls as C
from hybridlab.lab import exact as E
from hybridlab.lab import figures as viz
from hybridlab.lab.baselines import shifted, variance_changes


def _toy():
    space = E.enumerate_sequences(3, 3, eos=True)
    xi = E.reward_table(space, "random", seed=0)
    return (
        space,
        E.TinyPolicy(3, 3, seed=0),
        E.TinyPolicy(3, 3, seed=100, scale=3.0),
        lambda a, m: torch.sigmoid(xi(a, m)),
    )


def test_a_reward_shift_leaves_grad_j_and_every_tracking_baseline_unchanged_but_not_no_baseline():
    space, student, teacher, reward = _toy()
    kw = dict(lam=1.0, beta=1.0)
    far = shifted(reward, 3.0)
    g0 = E.exact_gradient(student, teacher, space, reward, **kw)
    assert C.relative_error(E.exact_gradient(student, teacher, space, far, **kw), g0) < 1e-12  # same grad J
    res = {}
    for name, rw in (("A", reward), ("B", far)):
        bl = {"none": "none", "reward_group": "reward_group", "return_group": "return_group"}
        res[name] = variance_changes(
            hybrid_loss, student, teacher, space, rw, bl, group_size=4, n_groups=30, seed=3, **kw
        )
    for k in (
        "reward_group",
        "return_group",
    ):  # the leave-one-out means shift with the reward: identical estimates
        assert abs(res["A"]["variance"][k] - res["B"]["variance"][k]) < 1e-9 * res["A"]["variance"][k]
    assert (
        res["B"]["variance"]["none"] > 3 * res["A"]["variance"]["none"]
    )  # without a baseline the mean costs
    assert all(v < -0.5 for v in res["B"]["change"].values())
    assert res["A"]["change"]["reward_group"] > 0  # toy A: the reward-only baseline raises the variance
    fig = viz.variance_changes({"toy A": res["A"], "toy B": res["B"]}, title="t")
    viz.check_figure(fig)
    assert len(fig.axes) == 2
