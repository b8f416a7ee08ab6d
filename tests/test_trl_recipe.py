"""The recipe settings in TRL's adapter (lam / teacher_beta schedules incl. switch and plateau, teacher trust, the
reward gate, the length-neutral future term), on the tiny random Llamas of test_trl.py:

(a) with each setting, the adapter's gradient on one generated batch is `hybrid_loss`'s with the per-completion
    lam / beta written here from the setting's formula (negative control: the setting left out gives another one);
(b) the schedules give hybridlab.train's weights at given steps, and a plateau switches where the engine's rule
    says, also after a resume;
(c) bad settings and a prompt without a success rate are refused with errors naming them.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from test_trl import (  # noqa: E402
    adapter_grad,
    config,
    count_reward,
    dataset,
    generation_batch,
    length_reward,
    make_trainer,
    reference_grad,
    rel,
)

from hybridlab.train.config import TrainConfig  # noqa: E402
from hybridlab.train.recipe import plateau_switch  # noqa: E402

LAM, BETA = 1.5, 0.7  # test_trl.config's lam and teacher_beta


def rewards_of(gen) -> torch.Tensor:
    """R of each completion, recomputed from its tokens (reward_weights [1, -0.25], as test_trl.reference_grad)."""
    mask = gen["completion_mask"].bool()
    comp = [row[m].tolist() for row, m in zip(gen["completion_ids"], mask)]
    return torch.tensor(count_reward(comp)) * 1.0 - 0.25 * torch.tensor(length_reward(comp))


def rates_file(tmp_path, mean: float | None = None, drop: str | None = None):
    """A success rate for every training prompt (four distinct levels), optionally without one prompt's."""
    rows = dataset().to_list()
    rates = {r["prompt"]: (i % 4) / 4 for i, r in enumerate(rows)}
    if drop is not None:
        rates.pop(drop)
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"rates": rates, **({} if mean is None else {"mean": mean})}))
    return path, rates


def engine_cfg(**kw) -> TrainConfig:
    return TrainConfig(student="s", teacher="t", prompts="p", steps=10, lam=LAM, beta=BETA, **kw).validate()


# ----------------------------------------------------------------------------- (b) schedules: engine's values
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "switch", "plateau"])
def test_schedules_give_the_engines_weights(tmp_path, kind):
    tr = make_trainer(tmp_path, max_steps=10, lam_schedule=kind, lam_final=0.3, teacher_beta_schedule=kind,
                      teacher_beta_final=0.1, switch_step=6)  # fmt: skip
    eng = engine_cfg(lam_schedule=kind, lam_final=0.3, beta_schedule=kind, beta_final=0.1, switch_step=6)
    got, want = [], []
    for k in (0, 3, 5, 6, 9):
        tr.state.global_step = k
        got.append(tr.hybrid_weights())
        want.append((eng.weight_at("lam", k), eng.weight_at("beta", k)))
    assert got == want
    # written from the formulas, independently of the engine (steps 0..9; linear passes 1/3 at step 3)
    hand = {
        "constant": (LAM, BETA),
        "linear": (LAM + (0.3 - LAM) / 3, BETA + (0.1 - BETA) / 3),
        "cosine": (0.3 + (LAM - 0.3) * 0.75, 0.1 + (BETA - 0.1) * 0.75),
        "switch": (LAM, BETA),
        "plateau": (LAM, BETA),
    }[kind]
    assert got[1] == pytest.approx(hand, rel=1e-12)
    late = (LAM, BETA) if kind == "constant" else (0.3, 0.1)
    assert got[-1] == pytest.approx(late, rel=1e-12)  # linear / cosine end there; switch / plateau at step 6
    if kind in ("switch", "plateau"):
        assert got[2] == (LAM, BETA) and got[3] == (0.3, 0.1)


def test_switch_schedule_gradient_is_hybrid_loss_at_the_steps_weights(tmp_path):
    tr = make_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=10,
                      lam_schedule="switch", lam_final=0.4, teacher_beta_schedule="switch", teacher_beta_final=0.2,
                      switch_step=3)  # fmt: skip
    tr.state.global_step = 3
    batch, gen = generation_batch(tr)
    g = adapter_grad(tr, gen, n_micro=2)
    assert rel(g, reference_grad(tr, batch, gen, lam=0.4, beta=0.2)) < 1e-6
    assert rel(g, reference_grad(tr, batch, gen)) > 1e-3  # the starting weights give another update
    assert rel(g, reference_grad(tr, batch, gen, lam=0.4)) > 1e-3  # so does the old beta


def test_plateau_switches_where_the_engines_rule_says_and_after_a_resume(tmp_path):
    """A 3-step run with plateau_window 1 and a tolerance no reward can beat: the engine's rule switches at step 2,
    from the rewards of steps 0 and 1; the adapter logs the start weights at steps 0, 1 and lam_final at 2, and a
    run resumed from step 2's checkpoint reads the saved rewards and takes the same weights."""
    kw = dict(max_steps=3, logging_steps=1, lam_schedule="plateau", lam_final=0.2, plateau_window=1,
              plateau_tol=10.0)  # fmt: skip
    full = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=2, **kw)
    full.train()
    hist = full._history()
    assert (
        len(hist) == 3
        and plateau_switch(hist[:2], 1, 10.0) == 2
        and plateau_switch(hist[:1], 1, 10.0) is None
    )
    lams = [e["hybrid/lam"] for e in full.state.log_history if "hybrid/lam" in e]
    assert lams == [LAM, LAM, 0.2]
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["RewardHistory"]["attributes"]["rewards"] == pytest.approx(hist[:2])
    resumed = make_trainer(tmp_path / "full", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed._history() == pytest.approx(hist)
    assert [e["hybrid/lam"] for e in resumed.state.log_history if "hybrid/lam" in e][-1] == 0.2
    # negative control: without the saved rewards the resumed run has no plateau yet at step 2
    fresh = make_trainer(tmp_path / "fresh", **kw)
    fresh.state.global_step = 2
    assert fresh.hybrid_weights() == (LAM, BETA)


# ------------------------------------------------------------------ (a) trust, gate, future_norm: exact gradients
@pytest.mark.parametrize("baseline", ["return_group", "reward_group"])
def test_per_prompt_trust_is_hybrid_loss_with_beta_x(tmp_path, baseline):
    path, rates = rates_file(tmp_path)
    tr = make_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, baseline=baseline,
                      teacher_trust="per_prompt", teacher_trust_rates=str(path))  # fmt: skip
    batch, gen = generation_batch(tr)
    beta = BETA * torch.tensor([rates[r["prompt"]] for r in batch], dtype=torch.float64)
    assert len(set(beta.tolist())) > 1  # the prompts of this batch have different rates
    g = adapter_grad(tr, gen, n_micro=2)  # micro-batches: the per-completion betas travel with their rows
    assert rel(g, reference_grad(tr, batch, gen, beta=beta)) < 1e-6
    assert rel(g, reference_grad(tr, batch, gen)) > 1e-3  # the untrusting update
    assert (
        rel(g, reference_grad(tr, batch, gen, beta=beta.flip(0))) > 1e-3
    )  # rates given to the wrong prompts


def test_global_trust_is_hybrid_loss_with_a_smaller_beta(tmp_path):
    path, rates = rates_file(tmp_path, mean=0.3)
    tr = make_trainer(tmp_path, teacher_trust="global", teacher_trust_rates=str(path))
    batch, gen = generation_batch(tr)
    assert gen["hybrid_beta"].dim() == 0 and float(gen["hybrid_beta"]) == BETA * 0.3  # the file's mean
    g = adapter_grad(tr, gen, n_micro=1)
    assert rel(g, reference_grad(tr, batch, gen, beta=BETA * 0.3)) < 1e-6
    assert rel(g, reference_grad(tr, batch, gen)) > 1e-3
    # without a 'mean' in the file: the mean over the training rows
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(rates))
    tr2 = make_trainer(tmp_path, teacher_trust="global", teacher_trust_rates=str(plain))
    want = sum(rates[r["prompt"]] for r in dataset().to_list()) / len(dataset())
    assert tr2._trust[1] == pytest.approx(want, rel=1e-12) and want != 0.3


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_gate_with_trust_and_future_mean_is_hybrid_loss(tmp_path, fused):
    """All three per-completion settings at once, on both loss paths (the fused one takes future_norm too)."""
    path, rates = rates_file(tmp_path)
    kw = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, teacher_trust="per_prompt",
              teacher_trust_rates=str(path), dense_gate="incorrect", gate_reward=-0.75, future="k1",
              future_norm="mean", fused_linear=fused)  # fmt: skip
    tr = make_trainer(tmp_path, **kw)
    batch, gen = generation_batch(tr)
    r = rewards_of(gen)
    open_ = (r < -0.75).double()
    assert 0 < int(open_.sum()) < r.numel(), r  # the gate closes on some completions, not all
    beta = BETA * torch.tensor([rates[p["prompt"]] for p in batch], dtype=torch.float64) * open_
    g = adapter_grad(tr, gen, n_micro=2)
    assert rel(g, reference_grad(tr, batch, gen, beta=beta, future_norm="mean")) < 1e-6
    ungated = BETA * torch.tensor([rates[p["prompt"]] for p in batch], dtype=torch.float64)
    assert rel(g, reference_grad(tr, batch, gen, beta=ungated, future_norm="mean")) > 1e-3
    assert rel(g, reference_grad(tr, batch, gen, beta=beta)) > 1e-3  # the exact future sum


def test_gate_alone_is_hybrid_loss_with_the_gated_beta(tmp_path):
    tr = make_trainer(tmp_path, dense_gate="incorrect", gate_reward=-0.75)
    batch, gen = generation_batch(tr)
    beta = BETA * (rewards_of(gen) < -0.75).double()
    assert 0 < int((beta > 0).sum()) < beta.numel()
    g = adapter_grad(tr, gen, n_micro=1)
    assert rel(g, reference_grad(tr, batch, gen, beta=beta)) < 1e-6
    assert rel(g, reference_grad(tr, batch, gen)) > 1e-3


@pytest.mark.parametrize("future", ["analytic", "k3"])
def test_future_mean_is_hybrid_loss_future_mean(tmp_path, future):
    tr = make_trainer(tmp_path, future=future, future_norm="mean", baseline="return_group", gamma=0.9)
    batch, gen = generation_batch(tr)
    g = adapter_grad(tr, gen, n_micro=1)
    assert rel(g, reference_grad(tr, batch, gen, future_norm="mean")) < 1e-6
    assert rel(g, reference_grad(tr, batch, gen)) > 1e-3  # the exact future sum


# ----------------------------------------------------------------------------------------------- (c) refusals
def test_per_prompt_trust_refuses_a_prompt_without_a_rate(tmp_path):
    first = dataset()[0]["prompt"]
    path, _ = rates_file(tmp_path, drop=first)
    with pytest.raises(ValueError, match=r"teacher_trust_rates .* has no success rate for the prompt"):
        make_trainer(tmp_path, teacher_trust="per_prompt", teacher_trust_rates=str(path))
    # a prompt that reaches a batch without a rate (here: removed after the start) is a KeyError naming it
    full, _ = rates_file(tmp_path)
    tr = make_trainer(tmp_path, teacher_trust="per_prompt", teacher_trust_rates=str(full))
    batch, gen = generation_batch(tr)  # control: with every rate the batch is weighted
    assert gen["hybrid_beta"].shape == (8,)
    tr._trust[0].pop(batch[0]["prompt"])
    with pytest.raises(KeyError, match="no success rate for prompt"):
        generation_batch(tr)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lam_schedule="step"), "lam_schedule must be one of"),
        (dict(teacher_beta_schedule="exp", teacher_beta_final=0.0), "teacher_beta_schedule must be one of"),
        (dict(lam_schedule="linear"), "lam_schedule='linear' needs lam_final"),
        (dict(teacher_beta_schedule="switch", teacher_beta_final=0.0), "needs switch_step > 0"),
        (dict(teacher_beta_final=-1.0), "teacher_beta_final must be >= 0"),
        (dict(lam_final=float("inf")), "lam_final must be a finite number"),
        (dict(plateau_window=0), "plateau_window must be a positive integer"),
        (dict(switch_step=-2), "switch_step must be an integer >= 0"),
        (dict(teacher_trust="always"), "teacher_trust must be one of"),
        (dict(teacher_trust="per_prompt"), "needs teacher_trust_rates"),
        (dict(teacher_trust_rates="r.json"), "teacher_trust='none'"),
        (dict(dense_gate="wrong"), "dense_gate must be one of"),
        (dict(gate_reward=float("nan")), "gate_reward must be a finite number"),
        (dict(future_norm="avg"), "future_norm must be one of"),
    ],
)
def test_bad_recipe_settings_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_bad_rates_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rates": {dataset()[0]["prompt"]: 1.5}}))
    with pytest.raises(ValueError, match=r"success rate must be a number in \[0, 1\], got 1.5"):
        make_trainer(tmp_path, teacher_trust="global", teacher_trust_rates=str(bad))
    with pytest.raises(ValueError, match="cannot read a JSON file"):
        make_trainer(tmp_path, teacher_trust="global", teacher_trust_rates=str(tmp_path / "missing.json"))
    few = tmp_path / "few.json"
    few.write_text(json.dumps({dataset()[0]["prompt"]: 0.5}))
    with pytest.raises(ValueError, match="no 'mean'"):
        make_trainer(tmp_path, teacher_trust="global", teacher_trust_rates=str(few))


def test_fused_loss_checks_future_norm():
    from hybridlab.fused_hybrid import fused_hybrid_loss

    h, w = torch.randn(1, 2, 3), torch.randn(4, 3)
    a, r = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1)
    assert torch.isfinite(fused_hybrid_loss(h, w, torch.randn(1, 2, 4), a, r, future_norm="mean").loss)
    with pytest.raises(ValueError, match="future_norm must be one of"):
        fused_hybrid_loss(h, w, torch.randn(1, 2, 4), a, r, future_norm="avg")


def test_help_states_what_each_setting_optimises():
    """The adapter's help is the engine's field help plus its SCHEDULES paragraph (one copy of the wording)."""
    import dataclasses

    from hybridlab.integrations.trl import HybridGRPOConfig
    from hybridlab.train.config import TrainConfig

    ours = {f.name: f.metadata["help"] for f in dataclasses.fields(HybridGRPOConfig)}
    engine = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    assert (
        "the gradient of E_x[lam E_y R - beta_x KL_x], exactly with the future KL kept"
        in ours["teacher_trust"]
    )
    assert "is not the gradient of E[lam R - beta 1[R < g] log(pi / pi_T)]" in ours["dense_gate"]
    assert "not the gradient of J nor of any fixed objective" in ours["future_norm"]
    for name in ("lam_schedule", "teacher_beta_schedule"):
        assert "update k follows the gradient of J_k = lam_k E[R] - beta_k KL" in ours[name]
    assert (
        engine["beta_schedule"] in ours["teacher_beta_schedule"]
        and engine["plateau_window"] == ours["plateau_window"]
    )
    assert "teacher_trust.json" in ours["teacher_trust_rates"]
