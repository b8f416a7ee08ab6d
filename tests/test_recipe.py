"""Training recipes beyond the constant-weight hybrid: per-prompt beta (teacher trust), the reward gate, the
length-neutral future term, lam/beta schedules, and the diagnostics the trainer logs (future-KL share of the
return, gradient parts, the short-answer shortcut warning). Exact checks on enumerable toys where a setting has
an objective; a visible bias where it has none."""

import math

import pytest
import torch
from torch import nn

from hybridlab import hybrid_loss
from hybridlab.hybrid import flat_grad
from hybridlab.lab import exact as ex
from hybridlab.tasks.models import build_model, build_tokenizer
from hybridlab.tasks.toy import TASKS, make_splits
from hybridlab.train import PRESETS, TrainConfig, Trainer
from hybridlab.train.recipe import plateau_switch, shortcut_signal

GIVEN = ("student", "teacher", "prompts")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- exact checks on an enumerable toy with two prompts ----------------------------------------------------
class PromptPolicy(nn.Module):
    """pi(. | x, y_<t): a shared-parameter TinyPolicy plus a per-prompt logit offset (the prompt x in {0, 1})."""

    def __init__(self, vocab, horizon, seed, scale=1.0):
        super().__init__()
        self.base = ex.TinyPolicy(vocab, horizon, seed=seed, scale=scale)
        g = torch.Generator().manual_seed(100 + seed)
        self.u = nn.Parameter(scale * torch.randn(2, vocab, generator=g, dtype=torch.float64))

    def forward(self, x: int, actions):
        return self.base(actions) + self.u[x]


def two_prompt_toy(vocab=3, horizon=3):
    space = ex.enumerate_sequences(vocab, horizon, eos=True)
    student, teacher = PromptPolicy(vocab, horizon, seed=1), PromptPolicy(vocab, horizon, seed=2, scale=1.5)
    rewards = [ex.reward_table(space, "random", seed=s)(space.actions, space.mask) for s in (3, 4)]
    return space, student, teacher, rewards


def seq_logp(policy, x, space):
    return ex.token_logprobs(lambda a: policy(x, a), space.actions, space.mask).sum(1)


def exact_two_prompt_grad(student, teacher, space, rewards, rho, lam, betas):
    """grad of sum_x rho_x sum_y pi(y|x) [lam R(x, y) - beta_x log(pi(y|x) / pi_T(y|x))] by autograd."""
    j = 0.0
    for x in (0, 1):
        lp = seq_logp(student, x, space)
        with torch.no_grad():
            lq = seq_logp(teacher, x, space)
        j = j + rho[x] * (lp.exp() * (lam * rewards[x] - betas[x] * (lp - lq))).sum()
    return flat_grad(j, student.parameters())


def expected_two_prompt_estimate(student, teacher, space, rewards, rho, beta, **kw):
    """-N grad of hybrid_loss over every (prompt, response) with seq_weights rho_x pi(y|x): the expectation."""
    logits = torch.cat([student(x, space.actions) for x in (0, 1)])
    with torch.no_grad():
        t_logits = torch.cat([teacher(x, space.actions) for x in (0, 1)])
        w = torch.cat([rho[x] * seq_logp(student, x, space).exp() for x in (0, 1)])
    n = 2 * space.size
    out = hybrid_loss(logits, t_logits, space.actions.repeat(2, 1), torch.cat(rewards), mask=space.mask.repeat(2, 1),
                      seq_weights=w, beta=beta, backend="torch", **kw)  # fmt: skip
    return -n * flat_grad(out.loss, student.parameters())


def test_per_prompt_beta_is_the_gradient_of_the_per_prompt_objective():
    """teacher_trust='per_prompt' (beta_x per prompt, future KL kept) is exact for E_x[lam E R - beta_x KL_x]."""
    space, student, teacher, rewards = two_prompt_toy()
    rho, lam, betas = (0.3, 0.7), 1.0, (0.2, 0.9)
    want = exact_two_prompt_grad(student, teacher, space, rewards, rho, lam, betas)
    beta = torch.tensor([betas[0]] * space.size + [betas[1]] * space.size, dtype=torch.float64)
    got = expected_two_prompt_estimate(student, teacher, space, rewards, rho, beta, lam=lam)
    assert rel(got, want) < 1e-10
    # negative controls: one beta for both prompts (the global mean), and the myopic rule, both miss visibly
    mean = rho[0] * betas[0] + rho[1] * betas[1]
    glob = expected_two_prompt_estimate(student, teacher, space, rewards, rho, mean, lam=lam)
    assert rel(glob, want) > 1e-2
    myopic = expected_two_prompt_estimate(student, teacher, space, rewards, rho, beta, lam=lam, future="none")
    assert rel(myopic, want) > 1e-2
    # a constant tensor is the scalar beta
    same = expected_two_prompt_estimate(student, teacher, space, rewards, rho,
                                        torch.full((2 * space.size,), 0.5, dtype=torch.float64), lam=lam)  # fmt: skip
    assert (
        rel(same, expected_two_prompt_estimate(student, teacher, space, rewards, rho, 0.5, lam=lam)) < 1e-12
    )


def test_beta_tensor_is_checked():
    z = torch.zeros(2, 3, 4)
    a = torch.zeros(2, 3, dtype=torch.long)
    r = torch.zeros(2)
    with pytest.raises(ValueError, match=r"beta as a tensor must have shape \[B\] = \[2\]"):
        hybrid_loss(z, z, a, r, beta=torch.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        hybrid_loss(z, z, a, r, beta=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="future_norm must be one of"):
        hybrid_loss(z, z, a, r, future_norm="avg")


def test_per_sequence_beta_in_the_fused_path():
    """fused_hybrid_loss (hidden states + LM heads) takes the same [B] beta: same loss and gradients."""
    from hybridlab.fused_hybrid import fused_hybrid_loss

    torch.manual_seed(0)
    b, t, h, v = 4, 5, 8, 11
    hid = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    t_hid, t_w = torch.randn(b, t, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    a, r = torch.randint(0, v, (b, t)), torch.randn(b, dtype=torch.float64)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    ref = hybrid_loss(hid @ w.T, t_hid @ t_w.T, a, r, beta=beta, backend="torch")
    fused = fused_hybrid_loss(hid, w, (t_hid, t_w), a, r, beta=beta)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(fused.loss, [hid, w]), torch.autograd.grad(ref.loss, [hid, w])):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    scalar = hybrid_loss(hid @ w.T, t_hid @ t_w.T, a, r, beta=1.0, backend="torch")
    assert abs(float(scalar.loss - ref.loss)) > 1e-3  # the per-sequence weights mattered


def one_prompt_toy(horizon=3):
    space = ex.enumerate_sequences(3, horizon, eos=True)
    student, teacher = ex.TinyPolicy(3, horizon, seed=1), ex.TinyPolicy(3, horizon, seed=2, scale=1.5)
    return space, student, teacher, ex.reward_table(space, "random", seed=3)


def test_dense_gate_open_everywhere_is_exact_and_a_real_gate_is_biased():
    space, student, teacher, reward = one_prompt_toy()
    lam, beta = 1.0, 0.7
    r = reward(space.actions, space.mask)
    grad_j = ex.exact_gradient(student, teacher, space, reward, lam=lam, beta=beta)

    def gated(threshold):
        b = beta * (r < threshold).to(torch.float64)
        return ex.expected_estimate(student, teacher, space, reward, lam=lam, beta=b)["total"]

    assert rel(gated(math.inf), grad_j) < 1e-10  # every response "incorrect": the gate is open, J exactly
    g = float(r.median())
    # the objective a gate suggests, E[lam R - beta 1[R < g] log(pi / pi_T)]: the gated estimator is not its gradient
    lp = ex.token_logprobs(student, space.actions, space.mask).sum(1)
    with torch.no_grad():
        lq = ex.token_logprobs(teacher, space.actions, space.mask).sum(1)
    j_gate = (lp.exp() * (lam * r - beta * (r < g).to(lp.dtype) * (lp - lq))).sum()
    grad_gate = ex.flat_grad(j_gate, student)
    assert rel(gated(g), grad_gate) > 1e-2
    assert rel(gated(g), grad_j) > 1e-2


def test_future_mean_is_exact_without_long_futures_and_biased_with_them():
    lam, beta = 1.0, 0.7
    space, student, teacher, reward = one_prompt_toy(horizon=2)  # at most one future token: mean == sum
    want = ex.exact_gradient(student, teacher, space, reward, lam=lam, beta=beta)
    got = ex.expected_estimate(student, teacher, space, reward, lam=lam, beta=beta, future_norm="mean")[
        "total"
    ]
    assert rel(got, want) < 1e-10
    space, student, teacher, reward = one_prompt_toy(horizon=4)
    want = ex.exact_gradient(student, teacher, space, reward, lam=lam, beta=beta)
    exact = ex.expected_estimate(student, teacher, space, reward, lam=lam, beta=beta)["total"]
    mean = ex.expected_estimate(student, teacher, space, reward, lam=lam, beta=beta, future_norm="mean")[
        "total"
    ]
    assert rel(exact, want) < 1e-10 and rel(mean, want) > 1e-2


def test_future_mean_returns_by_hand():
    """A_t = lam R - beta * (sum of later KLs) / (number of later tokens), 0 future tokens -> lam R."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    a = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    r = torch.tensor([1.0, -2.0], dtype=torch.float64)
    out = hybrid_loss(s, t, a, r, mask=mask, lam=2.0, beta=0.5, future_norm="mean", backend="torch")
    kl = out.kl
    want = torch.tensor([[2 * r[0] - 0.5 * kl[0, 1:].mean(), 2 * r[0] - 0.5 * kl[0, 2:].mean(),
                          2 * r[0] - 0.5 * kl[0, 3], 2 * r[0]], [2 * r[1] - 0.5 * kl[1, 1], 2 * r[1], 0, 0]],
                        dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(out.returns, want, rtol=1e-12, atol=1e-12)


# -- schedules -------------------------------------------------------------------------------------------------
def cfg_of(**kw) -> TrainConfig:
    return TrainConfig(student="s", teacher="t", prompts="p", steps=11, **kw).validate()


def test_weight_schedules():
    lin = cfg_of(beta=1.0, beta_final=0.0, beta_schedule="linear")
    assert [lin.weight_at("beta", k) for k in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    cos = cfg_of(beta=1.0, beta_final=0.0, beta_schedule="cosine")
    assert cos.weight_at("beta", 0) == 1.0 and abs(cos.weight_at("beta", 5) - 0.5) < 1e-12
    assert abs(cos.weight_at("beta", 10)) < 1e-12
    sw = cfg_of(lam=0.0, lam_final=3.0, lam_schedule="switch", switch_step=4)
    assert [sw.weight_at("lam", k) for k in (0, 3, 4, 10)] == [0.0, 0.0, 3.0, 3.0]
    pl = cfg_of(lam=0.0, lam_final=3.0, lam_schedule="plateau", switch_step=9)
    assert pl.weight_at("lam", 5) == 0.0 and pl.weight_at("lam", 5, switched_at=5) == 3.0
    assert pl.weight_at("lam", 9) == 3.0  # switch_step is the latest switch
    assert cfg_of().weight_at("lam", 7) == 1.0
    with pytest.raises(ValueError, match="needs switch_step > 0"):
        cfg_of(lam_schedule="switch", lam_final=0.0)
    with pytest.raises(ValueError, match="needs beta_final"):
        cfg_of(beta_schedule="linear")
    with pytest.raises(ValueError, match="lam_schedule must be one of"):
        cfg_of(lam_schedule="step", lam_final=1.0)
    with pytest.raises(ValueError, match="grad_diagnostics=true needs"):
        cfg_of(grad_diagnostics=True, fused_linear=True)


def test_plateau_switch():
    assert plateau_switch([0.5] * 20, window=3, tol=0.01) == 6  # best window ends at 2; 3 more without a rise
    assert plateau_switch([0.1 * k for k in range(20)], window=3, tol=0.01) is None  # still rising
    assert plateau_switch([0.5] * 5, window=3, tol=0.01) is None  # not long enough to tell
    assert plateau_switch([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 3, 0.01) == 9


def test_shortcut_signal():
    n = 10
    falling, kl_falling = [6.0] * n + [4.0] * n, [10.0] * n + [5.0] * n
    assert shortcut_signal(falling, kl_falling, n)
    assert not shortcut_signal(falling, [5.0] * n + [10.0] * n, n)  # KL rising: not the shortcut
    assert not shortcut_signal([6.0] * 2 * n, kl_falling, n)  # length kept: learning, not the shortcut
    assert not shortcut_signal(falling[:-1], kl_falling[:-1], n)  # too short a history
    assert not shortcut_signal(falling, kl_falling, 0)  # off


# -- the trainer -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return make_splits("reverse", 3000, 200, seed=0)["train"][:12]


def make_trainer(
    tok, rows, preset="hybrid", reward="hybridlab.tasks.rewards:reverse_partial", **kw
) -> Trainer:
    student = build_model("llama", "tiny", vocab_size=len(tok), seed=0)
    teacher = build_model("llama", "tiny", vocab_size=len(tok), seed=1)
    base = {"prompts_per_step": 3, "samples_per_prompt": 2, "lr": 1e-3, "steps": 4, "eval_every": 0,
            "scheduler": "constant", "max_new_tokens": TASKS["reverse"].max_answer_len + 2, "output_dir": None,
            "bf16": False, "cpu": True, "progress": False, "seed": 0, "grad_clip": 0.0, "shortcut_window": 0}  # fmt: skip
    cfg = TrainConfig.preset(preset, **base).replace(**kw)  # kw on top of the preset
    if not isinstance(reward, str):
        return Trainer(cfg, student=student, teacher=teacher, tokenizer=tok, prompts=rows, reward=reward)
    return Trainer(cfg.replace(reward=reward), student=student, teacher=teacher, tokenizer=tok, prompts=rows)


def step_grad(tr: Trainer, ros) -> tuple[torch.Tensor, dict]:
    m = tr.train_step(rollouts=ros, keep_grads=True)
    return torch.cat([p.grad.reshape(-1) for p in tr.model.parameters()]), m


def test_switch_schedule_follows_each_steps_objective(tok, rows):
    """After the switch, an update is the one of a run with the final weights, on the same rollouts."""
    sw = make_trainer(tok, rows, lam=0.0, lam_final=2.0, lam_schedule="switch", beta=1.0, beta_final=0.3,
                      beta_schedule="switch", switch_step=1)  # fmt: skip
    ros = sw.generate()
    g0, m0 = step_grad(sw, ros)
    assert (m0["lam"], m0["beta"]) == (0.0, 1.0)
    ref0 = make_trainer(tok, rows, lam=0.0, beta=1.0)
    torch.testing.assert_close(step_grad(ref0, ros)[0], g0, rtol=1e-6, atol=1e-8)
    # the second update (after the switch) from the student's new state
    ref1 = make_trainer(tok, rows, lam=2.0, beta=0.3)
    ref1.model.load_state_dict(sw.model.state_dict())
    g1, m1 = step_grad(sw, ros)
    assert (m1["lam"], m1["beta"]) == (2.0, 0.3)
    torch.testing.assert_close(step_grad(ref1, ros)[0], g1, rtol=1e-6, atol=1e-7)
    assert rel(g1, g0) > 1e-2  # the weights did change the update


def test_plateau_schedule_switches_in_a_run(tok, rows):
    tr = make_trainer(tok, rows, steps=8, lam=0.0, lam_final=1.0, lam_schedule="plateau", plateau_window=2,
                      plateau_tol=10.0)  # any rise below 10 is a plateau  # fmt: skip
    tr.train()
    assert (
        tr.history["lam"] == [0.0] * 4 + [1.0] * 4
    )  # windows end at 1, 2, 3: switch from update 4 (0-based)


def constant_reward(value):
    def fn(prompts, responses, answers):
        return [value] * len(responses)

    return fn


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_trust_per_prompt_scales_beta_by_the_teachers_success(tok, rows, value, tmp_path):
    """A teacher always right (rate 1) leaves beta as it is; one never right (rate 0) removes the teacher terms."""
    cache = tmp_path / "trust.json"
    tr = make_trainer(tok, rows, preset="hybrid_trust", reward=constant_reward(value), trust_cache=str(cache))
    assert set(tr.trust.values()) == {value} and tr.trust_mean == value and len(tr.trust) == len(rows)
    ros = tr.generate()
    g, m = step_grad(tr, ros)
    assert m["beta_applied"] == value
    ref = make_trainer(
        tok, rows, future="none", baseline="reward_group", beta=value, reward=constant_reward(value)
    )
    torch.testing.assert_close(step_grad(ref, ros)[0], g, rtol=1e-6, atol=1e-8)
    # cached: a second trainer reads the file (its rates would be redrawn otherwise: a different reward)
    again = make_trainer(
        tok, rows, preset="hybrid_trust", reward=constant_reward(0.5), trust_cache=str(cache)
    )
    assert again.trust_mean == value


def test_trust_rates_are_estimates_and_the_cache_knows_its_teacher(tok, rows, tmp_path, capsys):
    import json

    cache = tmp_path / "trust.json"
    n = 4
    tr = make_trainer(tok, rows, preset="hybrid_trust", trust_cache=str(cache), trust_samples=n,
                      reward="hybridlab.tasks.rewards:reverse")  # exact match: rates are multiples of 1/n  # fmt: skip
    assert all(0.0 <= p <= 1.0 and abs(p * n - round(p * n)) < 1e-9 for p in tr.trust.values())
    assert abs(tr.trust_mean - sum(tr.trust[r["prompt"]] for r in rows) / len(rows)) < 1e-12
    ro = tr.generate()[0]
    want = torch.tensor([2.0 * tr.trust[p] for p in ro.prompts], dtype=torch.float64)
    torch.testing.assert_close(tr.beta_of(ro, 2.0).cpu(), want)
    # the same teacher reuses the table; another teacher redraws it (the key holds a digest of its weights)
    key = json.loads(cache.read_text())["key"]
    same = make_trainer(tok, rows, preset="hybrid_trust", trust_cache=str(cache), trust_samples=n,
                        reward="hybridlab.tasks.rewards:reverse")  # fmt: skip
    assert same.trust == tr.trust and "redrawn" not in capsys.readouterr().err
    same.teacher = build_model("llama", "tiny", vocab_size=len(tok), seed=7)
    same.teacher_success_rates()
    assert "redrawn" in capsys.readouterr().err
    assert json.loads(cache.read_text())["key"]["teacher"] != key["teacher"]


def test_global_trust_and_gate_in_the_trainer(tok, rows):
    tr = make_trainer(tok, rows, preset="hybrid", teacher_trust="global", trust_samples=2,
                      reward=constant_reward(1.0))  # fmt: skip
    assert tr.beta_of(tr.generate()[0], 0.5) == 0.5
    gate = make_trainer(tok, rows, dense_gate="incorrect", gate_reward=0.5)
    ro = gate.generate()[0]
    b = gate.beta_of(ro, 2.0).cpu()
    torch.testing.assert_close(b, 2.0 * (ro.rewards.cpu() < 0.5).double())


def length_reward(prompts, responses, answers):
    return [len(r) % 3 / 2 for r in responses]  # varies within a group: every part has a gradient


@pytest.mark.parametrize("future_norm", ["sum", "mean"])
def test_grad_parts_add_up_to_the_update_and_future_share(tok, rows, future_norm):
    """dense + reward + future gradients == the gradient the optimizer applies (pre-clip), with grad_accum too,
    and with the length-neutral return (the parts split the loss's own returns, normalised or not)."""
    for accum in (1, 3):
        tr = make_trainer(tok, rows, grad_diagnostics=True, grad_accum=accum, lam=2.0, beta=0.5,
                          reward=length_reward, future_norm=future_norm)  # fmt: skip
        parts = {}
        orig = tr.policy.forward

        def spy(mode, orig=orig, parts=parts, **kw):
            out = orig(mode, **kw)
            for k, g in (out.get("grad_parts", {}) if mode == "loss" else {}).items():
                parts[k] = parts.get(k, 0) + g
            return out

        tr.policy.forward = spy
        g, m = step_grad(tr, tr.generate())
        torch.testing.assert_close(
            parts["dense"] + parts["reward"] + parts["future"], g, rtol=1e-5, atol=1e-6
        )
        for k in ("dense", "reward", "future"):
            assert abs(m[f"grad_{k}"] - float(parts[k].norm())) < 1e-4 * (1 + m[f"grad_{k}"])
        cos = float(parts["dense"] @ parts["future"] / (parts["dense"].norm() * parts["future"].norm()))
        assert abs(m["cos_dense_future"] - cos) < 1e-5
        assert 0.0 < m["future_share"] < 1.0 and m["grad_reward"] > 0 and m["grad_future"] > 0
    # the future share: no reward -> all future KL; no KL weight -> none
    one = constant_reward(1.0)
    assert make_trainer(tok, rows, lam=0.0, reward=one).train_step()["future_share"] == 1.0
    assert make_trainer(tok, rows, beta=0.0, reward=one).train_step()["future_share"] == 0.0
    assert make_trainer(tok, rows, preset="dense_only").train_step()["future_share"] == 0.0  # no return


def test_shortcut_warning_is_logged(tok, rows, capsys):
    tr = make_trainer(tok, rows, shortcut_window=2)
    # earlier updates: long responses with a large KL, then short ones with a small KL (this update adds one)
    tr.history = {"resp_len": [50.0, 50.0, 1.0], "kl": [1e4, 1e4, 0.0]}
    assert tr.train_step()["shortcut"] == 1.0
    assert "getting shorter while the KL falls" in capsys.readouterr().err
    tr.history = {"resp_len": [1.0, 1.0, 50.0], "kl": [1e4, 1e4, 0.0]}  # longer: no warning
    assert tr.train_step()["shortcut"] == 0.0


@pytest.mark.parametrize("settings", [{"preset": "rl_only"}, {"future": "none"}, {"future_norm": "mean"}])
def test_no_shortcut_warning_where_the_return_has_no_summed_future_kl(tok, rows, capsys, settings):
    """RL-only (beta = 0), the myopic hybrid and the length-neutral return gain nothing by ending early: shorter
    answers there are ordinary learning, and advice to drop the future KL would mislead."""
    tr = make_trainer(tok, rows, shortcut_window=2, **settings)
    tr.history = {"resp_len": [50.0, 50.0, 1.0], "kl": [1e4, 1e4, 0.0]}
    assert tr.train_step()["shortcut"] == 0.0
    assert "getting shorter" not in capsys.readouterr().err


def test_preset_for_the_trust_rule():
    assert PRESETS["hybrid_trust"]["teacher_trust"] == "per_prompt"
    assert PRESETS["hybrid_trust"]["future"] == "none"
    cfg = TrainConfig.preset("hybrid_trust").validate(GIVEN)
    assert cfg.loss == "hybrid" and cfg.baseline == "reward_group"


def test_recipe_keys_from_the_command_line():
    from hybridlab.train.config import parse_args

    base = ["--student", "s", "--teacher", "t", "--prompts", "p"]
    cfg, _ = parse_args([*base, "--preset", "hybrid_trust", "--beta_schedule", "cosine", "--beta_final", "0.1",
                         "--dense_gate", "incorrect", "--future_norm", "mean"])  # fmt: skip
    assert (cfg.teacher_trust, cfg.beta_schedule, cfg.beta_final, cfg.dense_gate, cfg.future_norm) == (
        "per_prompt", "cosine", 0.1, "incorrect", "mean"
    )  # fmt: skip
    with pytest.raises(ValueError, match="teacher_trust"):
        parse_args([*base, "--teacher_trust", "always"])
    with pytest.raises(ValueError, match="needs lam_final"):
        parse_args([*base, "--lam_schedule", "linear"])


def test_future_norm_reaches_the_engines_loss(tok, rows):
    """future_norm='mean' (a length-neutral future KL) must change the engine's update on the same rollouts; before
    the fix the setting was validated and then dropped, so both runs made the same update."""
    mean = make_trainer(tok, rows, preset="hybrid", future_norm="mean")
    ros = mean.generate()
    g_mean, _ = step_grad(mean, ros)
    g_sum, _ = step_grad(make_trainer(tok, rows, preset="hybrid"), ros)
    assert mean.loss_kw["future_norm"] == "mean"
    assert rel(g_mean, g_sum) > 1e-3
