"""The mixing lab's recipe settings (schedules, teacher trust, the reward gate, the length-neutral future KL),
checked in float64 on its enumerable toy against an independent expectation of the estimator, with controls."""

import copy

import pytest
import torch

from hybridlab.lab.exact import exact_gradient, flat_grad, token_logprobs
from hybridlab.lab.mixing import GATE_REWARD, MixingModel
from hybridlab.train.config import schedule_value


def _applied(m: MixingModel) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in m.policy.parameters()])


def expected_update(policy, teacher, space, rewards, lam: float, beta_y: torch.Tensor, mean: bool = False
                    ) -> torch.Tensor:  # fmt: skip
    """The expected update of the loss, written from the formula, with per-response teacher weights beta_y [S]
    (analytic future KL, gamma 1, no baseline): sum_y pi(y) [ sum_t beta_y grad KL_t - sum_t grad log pi(y_t)
    (lam R_y - beta_y F_t) ], F_t = sum_{t' > t} KL_t' (`mean`: divided by the number of tokens after t), what
    the optimiser sees (-grad J when every beta_y is beta and F_t is the sum)."""
    logits = policy(space.actions)
    lp = torch.log_softmax(logits, -1)
    with torch.no_grad():
        lq = torch.log_softmax(teacher(space.actions), -1)
    mask = space.mask
    kl = torch.where(mask, (lp.exp() * (lp - lq)).sum(-1), 0.0)  # [S, T]
    logp_y = torch.where(mask, lp.gather(-1, space.actions[..., None])[..., 0], 0.0)
    with torch.no_grad():
        w = token_logprobs(policy, space.actions, mask).sum(1).exp()  # pi(y)
        after = kl.detach().flip(1).cumsum(1).flip(1) - kl.detach()  # sum over t' > t
        if mean:
            count = mask.double().flip(1).cumsum(1).flip(1) - mask.double()  # tokens after t
            after = torch.where(count > 0, after / count.clamp_min(1), 0.0)
        ret = lam * rewards[:, None] - beta_y[:, None] * after
    est = (w * (beta_y * kl.sum(1) - (logp_y * ret).sum(1))).sum()
    return flat_grad(est, policy)


def _step(**settings):
    m = MixingModel(seed=0, **settings)
    before = copy.deepcopy(m.policy)
    m.step()
    return m, before, _applied(m)


def test_teacher_trust_follows_grad_J_at_beta_times_the_teachers_success_rate():
    m, before, g = _step(teacher_trust="global", lam=1.0, beta=0.5, reward="count0")
    r = m.reward_values()
    with torch.no_grad():
        p_t = float((token_logprobs(m.teacher, m.space.actions, m.space.mask).sum(1).exp() * r).sum())
    assert 0.2 < p_t < 0.8 and abs(m.teacher_success() - p_t) < 1e-12
    want = exact_gradient(before, m.teacher, m.space, m.rewards["count0"], lam=1.0, beta=0.5 * p_t)
    torch.testing.assert_close(g, -want, rtol=1e-9, atol=1e-12)
    untrusted = exact_gradient(before, m.teacher, m.space, m.rewards["count0"], lam=1.0, beta=0.5)
    assert (g + untrusted).norm() > 1e-3 * untrusted.norm()  # control: beta unscaled is another gradient


@pytest.mark.parametrize("kind", ["linear", "cosine", "switch"])
def test_schedules_give_the_engines_weights_and_each_step_follows_its_J(kind):
    m = MixingModel(seed=0, lam=0.2, beta=0.8, lam_schedule=kind, lam_final=2.0, beta_schedule=kind,
                    beta_final=0.1, steps=11, switch_step=4, reward="random")  # fmt: skip
    m.run(6)
    k = 6
    lam_k, beta_k = m.weights_now()
    if kind == "linear":  # written from the definition: start + (end - start) k / (steps - 1)
        assert abs(lam_k - (0.2 + 1.8 * k / 10)) < 1e-12 and abs(beta_k - (0.8 - 0.7 * k / 10)) < 1e-12
    assert lam_k == schedule_value(kind, 0.2, 2.0, k, 11, 4) and beta_k == schedule_value(
        kind, 0.8, 0.1, k, 11, 4
    )
    before = copy.deepcopy(m.policy)
    m.step()
    want = exact_gradient(before, m.teacher, m.space, m.rewards["random"], lam=lam_k, beta=beta_k)
    torch.testing.assert_close(_applied(m), -want, rtol=1e-9, atol=1e-12)
    start = exact_gradient(before, m.teacher, m.space, m.rewards["random"], lam=0.2, beta=0.8)
    assert (_applied(m) + start).norm() > 1e-3 * start.norm()  # control: the unscheduled weights differ


def test_the_reward_gate_is_its_estimators_expectation_and_biased_for_J():
    m, before, g = _step(dense_gate="incorrect", lam=1.0, beta=0.5, reward="count0")
    r = m.reward_values()
    gate = 0.5 * (r < GATE_REWARD).double()
    assert 0 < int((r >= GATE_REWARD).sum()) < r.numel()  # some responses are "correct"
    torch.testing.assert_close(
        g, expected_update(before, m.teacher, m.space, r, 1.0, gate), rtol=1e-9, atol=1e-12
    )
    # controls: the reference at a gate that keeps every response is J's gradient, and it is not this step
    full = expected_update(before, m.teacher, m.space, r, 1.0, torch.full_like(r, 0.5))
    torch.testing.assert_close(-full, exact_gradient(before, m.teacher, m.space, m.rewards["count0"], lam=1.0,
                                                    beta=0.5), rtol=1e-9, atol=1e-12)  # fmt: skip
    assert (g - full).norm() > 1e-3 * full.norm()


def test_future_norm_mean_moves_the_step_off_grad_J_and_is_inert_without_a_future_term():
    m, before, g = _step(future_norm="mean", lam=1.0, beta=0.5, reward="count0")
    r = m.reward_values()
    want = expected_update(before, m.teacher, m.space, r, 1.0, torch.full_like(r, 0.5), mean=True)
    torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)  # the length-neutral estimator's expectation
    exact = exact_gradient(before, m.teacher, m.space, m.rewards["count0"], lam=1.0, beta=0.5)
    bias = float((g + exact).norm() / exact.norm())
    assert bias > 1e-3, bias  # biased for J (the length-neutral return is not its gradient): 0.070 here
    summed = expected_update(before, m.teacher, m.space, r, 1.0, torch.full_like(r, 0.5))
    torch.testing.assert_close(-summed, exact, rtol=1e-9, atol=1e-12)  # control: the sum is grad J exactly
    _, _, g_none = _step(future_norm="mean", future="none", lam=1.0, beta=0.5, reward="count0")
    _, _, g_ref = _step(future="none", lam=1.0, beta=0.5, reward="count0")
    torch.testing.assert_close(g_none, g_ref, rtol=0, atol=0)


def _plateau_from_the_definition(rewards: list[float], window: int, tol: float) -> int | None:
    """The first j + 1 where the windowed mean reward ending at j has not beaten its best by more than tol
    for `window` updates (TrainConfig's plateau rule), written out with plain loops."""
    means = [sum(rewards[j - window + 1 : j + 1]) / window for j in range(window - 1, len(rewards))]
    best, best_at = -float("inf"), None
    for i, x in enumerate(means):
        j = i + window - 1
        if x > best + tol:
            best, best_at = x, j
        elif j - best_at >= window:
            return j + 1
    return None


def test_plateau_switches_when_the_exact_reward_stops_rising_and_then_follows_the_final_J():
    m = MixingModel(seed=0, lam=1.0, beta=0.5, reward="count0", beta_schedule="plateau", beta_final=0.0,
                    plateau_window=5, plateau_tol=0.01, switch_step=0)  # fmt: skip
    for _ in range(100):
        if m.switched_at() is not None:
            break
        assert m.weights_now() == (1.0, 0.5)  # before the plateau: the start weights
        m.step()
    k = len(m.history["step"])
    assert 5 < k < 100 and m.switched_at() == k  # it switched, at the first update of the rule
    assert _plateau_from_the_definition(m.history["reward"], 5, 0.01) == k
    assert _plateau_from_the_definition(m.history["reward"][:-1], 5, 0.01) is None  # not an update earlier
    before = copy.deepcopy(m.policy)
    m.step()
    want = exact_gradient(before, m.teacher, m.space, m.rewards["count0"], lam=1.0, beta=0.0)
    torch.testing.assert_close(_applied(m), -want, rtol=1e-9, atol=1e-12)
    start = exact_gradient(before, m.teacher, m.space, m.rewards["count0"], lam=1.0, beta=0.5)
    assert (_applied(m) + start).norm() > 1e-3 * start.norm()  # control: the unswitched weights differ
    late = MixingModel(seed=0, beta_schedule="plateau", beta=0.5, beta_final=0.0, plateau_window=200,
                       switch_step=3)  # fmt: skip
    late.run(3)  # no plateau within 3 updates: switch_step is the latest switch
    assert late.switched_at() is None and late.weights_now() == (1.0, 0.0)


def test_recipe_settings_are_validated_with_their_names():
    m = MixingModel(seed=0)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        m.set(beta_schedule="step")
    with pytest.raises(ValueError, match="teacher_trust='per_prompt' is the same as 'global' here"):
        m.set(teacher_trust="per_prompt")
    with pytest.raises(ValueError, match="teacher_trust must be one of"):
        m.set(teacher_trust="local")
    with pytest.raises(ValueError, match="plateau_window must be >= 1"):
        m.set(plateau_window=0)
    with pytest.raises(ValueError, match="plateau_tol must be >= 0"):
        m.set(plateau_tol=-0.1)
    with pytest.raises(ValueError, match="switch_step must be >= 0"):
        m.set(switch_step=-1)
    with pytest.raises(ValueError, match="lam_final must be >= 0"):
        m.set(lam_final=-0.5)
    assert m.settings["lam_schedule"] == "constant" and m.settings["future_norm"] == "sum"


def test_recipe_widgets_and_the_api_move_each_other():
    from hybridlab.lab.mixing_lab import MixingLab

    lab = MixingLab(seed=0)
    box = next(c for c in lab.widget.children if "hybridlab-recipe" in c._dom_classes)
    assert box.selected_index is None  # collapsed: the lab looks as before until opened
    lab.controls["beta_schedule"].value = "switch"
    lab.controls["switch_step"].value = 3
    lab.controls["teacher_trust"].value = "global"
    assert (lab.settings["beta_schedule"], lab.settings["switch_step"], lab.settings["teacher_trust"]) == (
        "switch", 3, "global")  # fmt: skip
    lab.set(dense_gate="incorrect", future_norm="mean")
    assert lab.controls["dense_gate"].value == "incorrect" and lab.controls["future_norm"].value == "mean"
    lab.controls["lam_final"].value = -1.0  # the slider clamps at its minimum: never an invalid setting
    assert lab.settings["lam_final"] == 0.0
    lab.controls["plateau_window"].value = 7
    lab.set(plateau_tol=0.002)
    assert lab.settings["plateau_window"] == 7 and lab.controls["plateau_tol"].value == 0.002
    lab.set(teacher_trust="global")  # the status line: the next update's beta, x p_T = 0.41 under trust
    assert "β 0.20 ·" in lab.status.value and f"{lab.weights_now(trusted=True)[1]:.2f}" == "0.20"
    lab.set(teacher_trust="none")
    assert "β 0.50 ·" in lab.status.value  # the slider's beta again
