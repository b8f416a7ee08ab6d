"""MixingLab driven through its Python API and through its widgets (slider values, button clicks)."""

import copy
import math

import ipywidgets as W
import numpy as np
import pytest
import torch

from hybridlab.hybrid import hybrid_loss
from hybridlab.lab.exact import exact_gradient, flat_grad, sample
from hybridlab.lab.mixing import DEFAULTS, METRICS, make_reward, make_teacher, optimal_policy
from hybridlab.lab.mixing_lab import MixingLab, plot_histories


@pytest.fixture(scope="module")
def shared_lab():
    """One lab for tests that reset it first (building a lab costs a first figure render)."""
    return MixingLab(seed=0)


@pytest.fixture
def lab(shared_lab):
    """The shared lab back at the default settings and the initial student, with an empty history."""
    return shared_lab.set(**DEFAULTS).reset()


def test_api_shapes_and_widget_container(lab):
    assert isinstance(lab.widget, W.Box)
    assert set(METRICS) <= set(lab.history) and {"reward", "kl"} <= set(lab.history)
    assert all(len(v) == 0 for v in lab.history.values())
    lab.run(7)
    assert all(len(v) == 7 for v in lab.history.values()), {k: len(v) for k, v in lab.history.items()}
    assert lab.history["step"] == list(range(1, 8))
    lab.step()
    assert len(lab.history["reward"]) == 8
    m = lab.metrics()
    assert m["reward"] == pytest.approx(lab.history["reward"][-1]) and m["kl"] == pytest.approx(
        lab.history["kl"][-1]
    )
    assert lab.distribution().sum().item() == pytest.approx(1.0)


def test_pure_imitation_drives_kl_to_zero(lab):
    lab.set(lam=0.0, beta=1.0).run(150)
    kl = lab.history["kl"]
    assert kl[0] > 0.1 and kl[-1] < 1e-3, (kl[0], kl[-1])
    assert lab.history["dist_to_opt"][-1] < 0.01  # pi* = pi_T when lam = 0
    assert lab.history["reward"][-1] == pytest.approx(
        float(lab.teacher_distribution() @ lab.reward_values()), abs=1e-3
    )


def test_pure_rl_increases_reward_and_leaves_the_teacher(lab):
    lab.set(lam=1.0, beta=0.0).run(100)
    reward, kl = lab.history["reward"], lab.history["kl"]
    assert reward[-1] > reward[0] + 0.5 and reward[-1] > 0.95, (reward[0], reward[-1])
    assert kl[-1] > 3 * kl[0]
    assert max(lab.history["dense_norm"]) == 0.0  # beta = 0: no dense term


def test_hybrid_exact_mode_converges_to_pi_star(lab):
    lab.set(lam=1.0, beta=0.5).run(150)
    tv = lab.history["dist_to_opt"]
    assert tv[0] > 0.3 and tv[-1] < 5e-3, (tv[0], tv[-1])
    cos = lab.history["cosine"][-1]
    assert cos < -0.9  # at the optimum the dense and sparse parts cancel


def test_loophole_rl_hacks_and_teacher_holds_back(lab):
    lab.set(reward="loophole", lam=1.0, beta=0.0).run(150)
    assert lab.history["hack"][-1] > 0.95
    lab.reset()
    lab.set(beta=0.5).run(150)
    assert lab.history["hack"][-1] < 0.05
    target = lab.optimum()[lab.loophole_index].item()
    assert lab.history["hack"][-1] == pytest.approx(target, abs=5e-3)


def test_myopic_fixed_point_differs_from_pi_star(lab):
    lab.set(reward="loophole", lam=1.0, beta=0.25, future="none").run(150)
    myopic = lab.history["dist_to_opt"][-1]
    lab.reset()
    lab.set(future="analytic").run(150)
    exact = lab.history["dist_to_opt"][-1]
    assert exact < 0.01 and myopic > 0.3, (exact, myopic)


def test_exact_mode_step_follows_grad_J(lab):
    """The gradient the optimiser sees is -grad J (enumerated_loss's 1/S undone), checked against autograd."""
    lab.set(reward="random", lam=1.0, beta=0.5)
    before = copy.deepcopy(lab.policy)
    lab.step()
    g = exact_gradient(before, lab.teacher, lab.space, lab.rewards["random"], lam=1.0, beta=0.5)
    applied = torch.cat([p.grad.reshape(-1) for p in lab.policy.parameters()])
    torch.testing.assert_close(applied, -g, rtol=1e-9, atol=1e-12)
    assert lab.history["dense_norm"][-1] > 0 and lab.history["sparse_norm"][-1] > 0
    assert math.isnan(lab.history["grad_var"][-1])


def test_sampled_mode_gradient_is_the_batch_gradient(lab):
    """The per-sample pull-back sums to the ordinary batch gradient of hybrid_loss."""
    lab.set(mode="sampled", samples=12, baseline="return_group", future="k3", reward="count0")
    gen = torch.Generator()
    gen.set_state(lab.generator.get_state())
    before = copy.deepcopy(lab.policy)
    lab.step()
    actions, mask = sample(before, 12, gen, eos=lab.space.eos)
    with torch.no_grad():
        teacher_logits = lab.teacher(actions)
    out = hybrid_loss(
        before(actions), teacher_logits, actions, lab.rewards["count0"](actions, mask), mask=mask,
        lam=1.0, beta=0.5, future="k3", baseline="return_group", group_size=12, backend="torch",
    )  # fmt: skip
    expected = flat_grad(out.loss, before)
    applied = torch.cat([p.grad.reshape(-1) for p in lab.policy.parameters()])
    torch.testing.assert_close(applied, expected, rtol=1e-9, atol=1e-12)
    var = lab.history["grad_var"][-1]
    assert np.isfinite(var) and var > 0


def test_gradient_variance_orders_the_estimators(lab):
    # Pure imitation: the analytic (Rao-Blackwellised) future KL beats k3, which beats k1.
    var = {
        f: lab.gradient_variance(batches=10, lam=0.0, beta=1.0, future=f) for f in ("analytic", "k3", "k1")
    }
    assert var["analytic"] < 0.8 * var["k3"] < 0.8 * var["k1"], var
    assert lab.settings["lam"] == 1.0 and lab.settings["future"] == "analytic"  # overrides were temporary
    # A student that RL pulled away from the teacher: a baseline on R alone raises the variance, one on the
    # whole return lowers it.
    lab.set(lam=1.0, beta=0.0).run(25)
    var = {
        b: lab.gradient_variance(batches=40, samples=16, beta=1.0, baseline=b)
        for b in ("none", "reward_group", "return_group")
    }
    assert var["reward_group"] > 2 * var["none"] and var["return_group"] < 0.7 * var["none"], var


def test_sampled_variance_falls_with_more_samples(lab):
    lab.set(mode="sampled")
    small = lab.gradient_variance(batches=20, samples=8)
    large = lab.gradient_variance(batches=20, samples=64)
    assert 4 < small / large < 14, (small, large)  # 8 in expectation (independent samples: 1/N)


def test_slider_values_equal_api_settings():
    a, b = MixingLab(seed=3), MixingLab(seed=3)
    a.controls["lam"].value = 0.4
    a.controls["beta"].value = 0.9
    a.controls["gamma"].value = 0.5
    a.controls["samples"].value = 16
    a.controls["mode"].value = "sampled"
    a.controls["future"].value = "k1"
    a.controls["baseline"].value = "reward_group"
    a.controls["reward"].value = "loophole"
    a.controls["steps"].value = 25
    b.set(
        lam=0.4, beta=0.9, gamma=0.5, samples=16, mode="sampled", future="k1", baseline="reward_group",
        reward="loophole", steps=25,
    )  # fmt: skip
    assert a.settings == b.settings
    a.buttons["run"].click()
    b.run()
    assert len(a.history["reward"]) == 25
    for key in METRICS:
        np.testing.assert_array_equal(a.history[key], b.history[key], err_msg=key)


def test_api_moves_the_widgets(lab):
    lab.set(lam=2.5, beta=0.0, future="k3", normalize="per_sequence", lr=0.02, samples=40)
    c = lab.controls
    assert (c["lam"].value, c["beta"].value, c["future"].value) == (2.5, 0.0, "k3")
    assert (c["normalize"].value, c["samples"].value) == ("per_sequence", 40)
    assert c["lr"].value == pytest.approx(0.02)
    lab.set(lam=12.0, samples=500)  # beyond the sliders' ranges: the ranges grow instead of clamping
    assert c["lam"].value == 12.0 and c["lam"].max >= 12.0
    assert c["samples"].value == 500 and lab.settings["samples"] == 500


def test_buttons_run_step_reset_and_determinism(lab):
    lab.set(steps=30)
    lab.buttons["run"].click()
    first = {k: list(v) for k, v in lab.history.items()}
    assert len(first["reward"]) == 30
    lab.buttons["step"].click()
    assert len(lab.history["reward"]) == 31
    lab.buttons["reset"].click()
    assert all(len(v) == 0 for v in lab.history.values())
    assert len(lab.previous["reward"]) == 31 and lab.previous["reward"][:30] == first["reward"]
    lab.buttons["run"].click()
    assert lab.history == first  # reset restores the initial policy and the sampler


def test_figure_redraws_with_new_curves(lab):
    lab.set(steps=40)
    png0, draws0 = lab.image.value, lab.timings["draws"]
    lab.buttons["run"].click()
    png1 = lab.image.value
    assert png1 != png0 and lab.timings["draws"] > draws0
    np.testing.assert_array_equal(lab.lines["reward"].get_ydata(), lab.history["reward"])
    np.testing.assert_array_equal(lab.lines["kl"].get_xdata(), np.arange(1, 41))
    old_reward = np.array(lab.lines["reward"].get_ydata())
    lab.buttons["reset"].click()
    assert len(lab.lines["reward"].get_ydata()) == 0
    np.testing.assert_array_equal(lab._dashboard.ghosts["reward"].get_ydata(), old_reward)
    lab.controls["beta"].value = 0.0  # a slider change, then Run: a new, different curve
    lab.buttons["run"].click()
    new_reward = np.array(lab.lines["reward"].get_ydata())
    assert len(new_reward) == 40 and new_reward[-1] > old_reward[-1] + 0.2
    assert lab.image.value not in (png0, png1)
    assert lab.image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_marks_record_changes_during_training(lab):
    lab.run(5)
    lab.set(lam=0.3)
    lab.set(future="k1")
    lab.set(steps=7)  # not a training setting: no mark
    lab.run(5)
    assert lab.marks == [(5, "lam=0.3, future=k1")]
    lab.reset()
    assert lab.marks == []


def test_validation_errors_are_clear_and_atomic(lab):
    with pytest.raises(TypeError, match="unknown setting 'lamda'.*lam, beta"):
        lab.set(lamda=1.0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        lab.set(gamma=1.5)
    with pytest.raises(ValueError, match="future must be one of"):
        lab.set(future="k2")
    with pytest.raises(ValueError, match="samples must be >= 2"):
        lab.set(samples=1)
    with pytest.raises(TypeError, match="steps must be an int"):
        lab.set(steps=2.5)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        lab.set(lam=-1)
    with pytest.raises(TypeError, match="lr must be a finite real"):
        lab.set(lr=float("nan"))
    with pytest.raises(ValueError, match="lr must be > 0"):
        lab.set(lr=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        lab.set(mode="exactly")
    with pytest.raises(ValueError, match="gamma"):
        lab.set(lam=0.3, gamma=2.0)
    assert lab.settings["lam"] == 1.0 and lab.controls["lam"].value == 1.0  # nothing applied
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        lab.run(-1)
    with pytest.raises(ValueError, match="kind must be"):
        MixingLab(kind="mlp")


def test_shared_policy_learns_in_both_modes():
    lab = MixingLab(seed=1, kind="shared", beta=0.0, steps=60)
    lab.run()
    exact = lab.history["reward"]
    assert exact[-1] > exact[0] + 0.3
    lab.reset()
    lab.set(mode="sampled", samples=16).run()
    sampled = lab.history["reward"]
    assert sampled[-1] > sampled[0] + 0.2
    assert np.all(np.isfinite(lab.history["grad_var"]))


def test_world_definitions():
    from hybridlab.lab.exact import enumerate_sequences, sequence_probs

    space = enumerate_sequences(3, 3, eos=True)
    teacher = make_teacher(space)
    probs = sequence_probs(teacher, space)
    assert probs.sum().item() == pytest.approx(1.0)
    loophole = make_reward(space, "loophole")(space.actions, space.mask)
    honest = make_reward(space, "count0")(space.actions, space.mask)
    hacked = int(torch.argmax(loophole))
    assert loophole[hacked] == 2.0 and loophole.max() > honest.max() + 0.5  # over-valued ...
    assert probs[hacked] < 0.01 and probs[hacked] == probs.min()  # ... and the teacher's least likely answer
    assert (loophole != honest).sum() == 1
    logq = probs.log()
    assert optimal_policy(logq, honest, 0.0, 0.0) is None
    greedy = optimal_policy(logq, loophole, 1.0, 0.0)
    assert greedy[hacked] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reward must be one of"):
        make_reward(space, "nope")


def test_plot_histories_helper(lab):
    lab.run(10)
    fig = plot_histories({"a": lab.history, "b": lab.history}, keys=("reward", "kl", "grad_var"))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 and len(axes[0].get_lines()) == 2
    np.testing.assert_array_equal(axes[1].get_lines()[0].get_ydata(), lab.history["kl"])


def test_widgets_are_built_only_when_used():
    lab = MixingLab(seed=0)
    lab.run(5)
    assert not lab.widgets_built and lab.timings["draws"] == 0  # nothing on screen: nothing drawn
    png = lab.show().data
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and not lab.widgets_built  # a static image builds no widget
    assert isinstance(lab.widget, W.Box) and lab.widgets_built
    assert lab.timings["draws"] == 1 and lab.image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_cosine_hidden_where_the_gradients_vanish(lab):
    from hybridlab.lab.mixing_lab import COSINE_MIN_NORM, visible_cosine

    lab.set(lam=0.0, beta=1.0).run(200)  # pure imitation converges: both parts vanish
    h = lab.history
    cos = visible_cosine(h)
    assert np.isfinite(cos[:5]).all() and np.isnan(cos[-50:]).all()
    small = np.minimum(h["dense_norm"], h["sparse_norm"]) < COSINE_MIN_NORM * max(
        max(h["dense_norm"]), max(h["sparse_norm"])
    )
    assert np.array_equal(np.isnan(cos), small)
    assert np.isnan(
        np.asarray(lab.lines["cosine"].get_ydata(), dtype=float)[-1]
    )  # the dashboard hides it too
    lab.reset()
    lab.set(lam=1.0, beta=0.0).run(20)  # RL only: the dense part is exactly zero, no angle at all
    assert np.isnan(visible_cosine(lab.history)).all()
    lab.reset()
    lab.set(lam=1.0, beta=0.5).run(150)  # hybrid: both parts stay large and cancel
    assert visible_cosine(lab.history)[-1] < -0.9


def test_plots_have_axis_labels_and_legends_outside(lab):
    lab.run(10)
    fig = plot_histories({"a": lab.history, "b": lab.history}, keys=("reward", "kl", "cosine"))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert all(ax.get_ylabel() and ax.get_xlabel() for ax in axes)
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
    dash = lab.figure.axes
    assert all(ax.get_ylabel() for ax in dash)
    assert min(t.get_fontsize() for ax in dash for t in ax.get_yticklabels()) >= 9
