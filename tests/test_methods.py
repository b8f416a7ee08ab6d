"""The related methods' rules, written from their formulas, against the hybridlab settings that reproduce them."""

import pytest
import torch

from hybridlab import dense_kl, hybrid_loss
from hybridlab.lab import controls as C
from hybridlab.lab import exact as E
from hybridlab.lab import method_map as MM
from hybridlab.lab import method_rules as R
from hybridlab.lab import toys


@pytest.fixture(scope="module")
def toy():
    space = E.enumerate_sequences(3, 3, eos=True)
    student = E.TinyPolicy(3, 3, seed=0)
    teacher = E.TinyPolicy(3, 3, seed=1, scale=2.0)
    reward = E.reward_table(space, "random", seed=0)
    group_space = E.enumerate_sequences(3, 2, eos=True)
    return student, teacher, space, reward, group_space, E.reward_table(group_space, "random", seed=0)


@pytest.fixture(scope="module")
def rows(toy):
    student, teacher, space, reward, gs, gr = toy
    return MM.method_map(student, teacher, space, reward, lam=1.0, beta=0.5, group_space=gs, group_reward=gr)


def test_every_expressible_rule_equals_its_setting_and_misses_the_wrong_one(rows):
    assert len(rows) >= 13
    assert sum(r.tol == 1e-10 for r in rows) == len(rows) - 1  # only TRL's float32 code is looser
    for row in rows:
        if row.expressible:
            assert row.match < row.tol <= 1e-5, (row.name, row.match)
        assert row.wrong_gap > 1e-2, (row.name, row.wrong_gap)


def test_each_rule_is_unbiased_exactly_when_the_map_says_so(rows):
    for row in rows:
        if row.unbiased:
            assert row.vs_grad_j < 1e-10, (row.name, row.vs_grad_j)
        else:
            assert row.vs_grad_j > 1e-2, (row.name, row.vs_grad_j)
    names = {r.name.split(" ")[0].rstrip(",") for r in rows if r.unbiased}
    assert names == {"MiniLLM", "PPO-RLHF", "This"}


def test_not_expressible_rows_say_why(rows):
    lonely = [r for r in rows if not r.expressible]
    assert {r.name for r in lonely} == {
        "MiniLLM with length normalisation",
        "GRPO with std scaling (group of 2)",
    }
    for r in lonely:
        assert r.setting.startswith("not expressible: ") and len(r.setting) > 30


def test_a_rule_differs_from_a_setting_that_is_not_its_own(toy):
    """Negative control at the level of a single comparison: the GKD rule is not the 'sequences' setting."""
    student, teacher, space, reward, *_ = toy
    rule = C.expected_gradient(R.gkd_loss, student, teacher, space, reward)
    own = C.expected_gradient(
        hybrid_loss,
        student,
        teacher,
        space,
        reward,
        lam=0.0,
        beta=1.0,
        future="none",
        normalize="per_sequence",
    )
    other = C.expected_gradient(
        hybrid_loss, student, teacher, space, reward, lam=0.0, beta=1.0, future="none"
    )
    assert C.relative_error(own, rule) < 1e-12
    assert C.relative_error(other, rule) > 1e-2


def test_sampled_token_distillation_has_the_dense_terms_mean_but_more_variance(toy):
    """OPD's sampled-token advantage and hybridlab's dense term agree in expectation, not per sample."""
    student, teacher, space, reward, *_ = toy
    opd = C.exact_moments(R.opd_loss, student, teacher, space, reward)
    dense = C.exact_moments(hybrid_loss, student, teacher, space, reward, lam=0.0, beta=1.0, future="none")
    assert C.relative_error(opd["mean"], dense["mean"]) < 1e-10
    assert opd["variance"] > 1.05 * dense["variance"]


def test_grpo_group_mean_is_a_scaled_leave_one_out_baseline():
    g = 4
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    centred = rewards - rewards.mean()
    loo = rewards - (rewards.sum() - rewards) / (g - 1)
    assert torch.allclose(centred, (g - 1) / g * loo, atol=1e-15)


def test_rules_reject_bad_options(toy):
    student, teacher, space, reward, *_ = toy
    logits, tlogits = student(space.actions), teacher(space.actions)
    r = reward(space.actions, space.mask)
    with pytest.raises(ValueError, match="reduction"):
        R.gkd_loss(logits, tlogits, space.actions, r, mask=space.mask, reduction="mean")
    with pytest.raises(ValueError, match="group_size"):
        R.grpo_loss(
            logits, tlogits, space.actions, r, mask=space.mask, group_size=4
        )  # 15 is not a multiple of 4


def test_dpo_is_stationary_exactly_at_the_optimum_of_j(toy):
    _, teacher, space, reward, *_ = toy
    check = MM.dpo_check(teacher, space, reward, lam=1.0, beta=0.5)
    assert check.grad_at_optimum < 1e-12
    assert check.grad_j_at_optimum < 1e-12
    assert check.grad_at_wrong > 1e-2
    assert check.implicit_reward_spread < 1e-12


def test_markdown_table_has_one_line_per_row(rows):
    table = MM.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
    for line in table.splitlines():  # no stray '|' inside a cell: exactly 7 columns
        assert line.count("|") == 8, line
    assert "not expressible" in table


@pytest.mark.parametrize("divergence", ["reverse", "forward"])
def test_fit_bump_mode_seeking_vs_covering(divergence):
    tokens = torch.arange(60, dtype=torch.float64)
    q = 0.5 * toys.bump_logits(tokens, 15, 4).exp() + 0.5 * toys.bump_logits(tokens, 45, 4).exp()
    q = q / q.sum()
    q = (1 - 1e-8) * q + 1e-8 / 60
    fit = toys.fit_bump(divergence, q.log(), steps=200)
    left = float(fit["p"][:30].sum())
    if divergence == "reverse":
        assert left > 0.99  # locks onto the left mode
    else:
        assert 0.3 < left < 0.7 and fit["width"] > 8  # spreads over both modes


def test_fit_bump_rejects_an_unknown_divergence():
    with pytest.raises(ValueError, match="divergence"):
        toys.fit_bump("jsd", torch.zeros(5), steps=1)


def test_one_token_view_splits_one_response(toy):
    student, teacher, space, *_ = toy
    i = int(space.mask.sum(1).argmax())
    view = toys.one_token_view(student, teacher, space.actions[i], space.mask[i], t=2)
    with torch.no_grad():
        kl = dense_kl(student(space.actions[i : i + 1]), teacher(space.actions[i : i + 1]), backend="torch")[
            0
        ]
        logp = E.token_logprobs(student, space.actions[i : i + 1], space.mask[i : i + 1])[0]
        logq = E.token_logprobs(teacher, space.actions[i : i + 1], space.mask[i : i + 1])[0]
    assert abs(view["kl_t"] - float(kl[1])) < 1e-12
    assert torch.allclose(view["logratios"], (logp - logq)[: int(space.mask[i].sum())], atol=1e-12)
    with pytest.raises(ValueError, match="1..3"):
        toys.one_token_view(student, teacher, space.actions[i], space.mask[i], t=4)


def test_trl_kl_div_argument_order_at_beta_one_is_the_reverse_kl(toy):
    """TRL's generalized JSD at beta = 1 is F.kl_div(teacher_log_probs, student_log_probs, log_target=True) summed
    over the vocabulary: KL(student || teacher), the per-state KL that gkd_loss and hybridlab's dense term use."""
    student, teacher, space, *_ = toy
    logp = torch.log_softmax(student(space.actions), -1)
    logq = torch.log_softmax(teacher(space.actions), -1)
    trl_beta1 = torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    trl_beta0 = torch.nn.functional.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
    _, _, kl = R.token_terms(student(space.actions), teacher(space.actions), space.actions, space.mask)
    assert torch.allclose(trl_beta1[space.mask], kl[space.mask], atol=1e-13)
    assert not torch.allclose(trl_beta0[space.mask], kl[space.mask], atol=1e-3)  # beta = 0 is the forward KL


def test_trl_rule_is_a_batch_rule_at_temperature_one(toy):
    student, teacher, space, reward, *_ = toy
    logits, tlogits = student(space.actions), teacher(space.actions)
    r = reward(space.actions, space.mask)
    with pytest.raises(ValueError, match="seq_weights"):
        R.trl_distillation_loss(
            logits, tlogits, space.actions, r, mask=space.mask, seq_weights=torch.ones(15)
        )
    with pytest.raises(ValueError, match="temperature"):
        R.trl_distillation_loss(logits, tlogits, space.actions, r, mask=space.mask, temperature=0.7)
