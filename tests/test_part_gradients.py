"""`part_gradients` (the trainer's grad_diagnostics): its dense / reward / future split of the loss, in float64
on a small batch, against parts written from the formula with explicit loops, for both future norms and every
baseline kind, with controls."""

import pytest
import torch

from hybridlab.hybrid import flat_grad, hybrid_loss
from hybridlab.train.policy import part_gradients

B, T, V, GROUP = 6, 4, 5, 3
LAM, BETA, TAU = 1.5, 0.7, 1.0
EPS = torch.finfo(torch.float64).eps


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([4, 2, 3, 1, 4, 3])  # padding in most rows: the remaining-token counts differ
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    tensor_baseline = torch.where(mask, torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    return logits, teacher, actions, mask, rewards, tensor_baseline


def _reference(logits, teacher, actions, mask, rewards, baseline, future, future_norm):
    """(reward part, future part) from the formula: the score term -sum_b (1/B) sum_t grad log pi(y_t) A_t with
    A_t split into lam R - b_R (b_R: the leave-one-out group mean of lam R, or the caller's tensor) and the rest
    of the advantage, -beta F_t - b_F (F_t the analytic future KL sum_{t' > t} KL_t', divided by the number of
    tokens after t for "mean"; b_F: the leave-one-out mean of -beta F_t over the group for "return_group")."""
    lp = torch.log_softmax(logits, -1)
    with torch.no_grad():
        lq = torch.log_softmax(teacher, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        f = torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            n = int(mask[b].sum())
            for t in range(n):
                later = kl[b, t + 1 : n]
                if future != "none" and len(later):
                    f[b, t] = later.sum() / (len(later) if future_norm == "mean" else 1)
        g_ret = LAM * rewards[:, None] - BETA * f  # the return; a finished row counts lam R in a group mean
        g_ret = torch.where(mask, g_ret, LAM * rewards[:, None])
        b_r, b_f = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            others = [o for o in range(b // GROUP * GROUP, b // GROUP * GROUP + GROUP) if o != b]
            if baseline in ("reward_group", "return_group"):
                b_r[b] = LAM * rewards[others].mean()
            if baseline == "return_group":
                b_f[b] = g_ret[others].mean(0) - b_r[b]
        if isinstance(baseline, torch.Tensor):
            b_r = baseline.clone()
        rew_adv = torch.where(mask, LAM * rewards[:, None] - b_r, 0.0)
        fut_adv = torch.where(mask, -BETA * f - b_f, 0.0)
    logp = torch.where(mask, lp.gather(-1, actions[..., None])[..., 0], 0.0)
    parts = []
    for adv in (rew_adv, fut_adv):
        (g,) = torch.autograd.grad(-(logp * adv).sum() / B, logits, retain_graph=True)
        parts.append(g.reshape(-1))
    return parts


def _parts(baseline_kind, future, future_norm, seed=0):
    logits, teacher, actions, mask, rewards, tb = _batch(seed)
    baseline = tb if baseline_kind == "tensor" else baseline_kind
    group = GROUP if baseline_kind in ("reward_group", "return_group") else None
    out = hybrid_loss(logits, teacher, actions, rewards, mask=mask, beta=BETA, lam=LAM, future=future,
                      baseline=baseline, group_size=group, backend="torch", parameters=[logits],
                      future_norm=future_norm)  # fmt: skip
    parts = part_gradients(out, logits, actions, mask, rewards, LAM, TAU, [logits], baseline, group)
    ref = _reference(logits, teacher, actions, mask, rewards, baseline, future, future_norm)
    return out, parts, ref, logits


BASELINE_KINDS = ["none", "reward_group", "return_group", "tensor"]


@pytest.mark.parametrize("future_norm", ["sum", "mean"])
@pytest.mark.parametrize("baseline", BASELINE_KINDS)
def test_the_parts_add_up_and_each_is_its_formula(baseline, future_norm):
    out, parts, (ref_reward, ref_future), logits = _parts(baseline, "analytic", future_norm)
    tol = dict(rtol=1e3 * EPS, atol=1e3 * EPS)
    sparse = flat_grad(out.sparse, [logits], True)
    torch.testing.assert_close(parts["reward"] + parts["future"], sparse, **tol)
    torch.testing.assert_close(parts["dense"], flat_grad(out.dense, [logits], True), **tol)
    torch.testing.assert_close(parts["reward"], ref_reward, **tol)
    torch.testing.assert_close(parts["future"], ref_future, **tol)
    assert parts["future"].norm() > 1e-3 * parts["reward"].norm()  # a future part that is there to check


@pytest.mark.parametrize("baseline", BASELINE_KINDS)
def test_the_future_part_vanishes_without_a_future_term(baseline):
    out, parts, _, logits = _parts(baseline, "none", "mean")
    assert torch.count_nonzero(parts["future"]) == 0
    torch.testing.assert_close(parts["reward"], flat_grad(out.sparse, [logits], True), rtol=1e3 * EPS, atol=0)


def test_controls_the_norm_and_the_baseline_change_the_parts():
    _, mean, _, _ = _parts("return_group", "analytic", "mean")
    _, total, _, _ = _parts("return_group", "analytic", "sum")
    assert (mean["future"] - total["future"]).norm() > 1e-2 * total["future"].norm()  # "mean" is seen
    _, plain, _, _ = _parts("none", "analytic", "sum")
    assert (plain["reward"] - total["reward"]).norm() > 1e-2 * plain["reward"].norm()  # b_R is seen
