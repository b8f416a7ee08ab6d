"""The Trainer in-process (notebooks, the method comparison): logits alignment (row t produced token t), every
method's step, presets, resume with evaluation history, shipped checkpoints."""

import json

import pytest
import torch

from experiments.compare import format_table, samples_to_threshold, summarize
from hybridlab import dense_kl, hybrid_loss
from hybridlab.tasks.models import build_model, build_tokenizer, load_meta, load_model_dir
from hybridlab.tasks.rewards import load_reward
from hybridlab.tasks.toy import DATA_DIR, TASKS, make_splits
from hybridlab.train import (
    METHODS,
    TrainConfig,
    Trainer,
    response_logits,
    sample,
    sampled_opd_loss,
    teacher_forcing_rollout,
)
from hybridlab.train.data import as_row
from hybridlab.train.rollout import assemble

REV = "hybridlab.tasks.rewards:reverse"

PROMPTS = ["12=", "4567=", "908+1=", "3="]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def manual_logprobs(model, tok, prompt: str, response_ids: list[int], temperature: float) -> list[float]:
    """log pi(y_t | x, y_<t) by one unpadded forward per token (no batching, no padding, no slicing tricks)."""
    prefix = tok(prompt)["input_ids"]
    out = []
    for y in response_ids:
        with torch.no_grad():
            z = model(input_ids=torch.tensor([prefix])).logits[0, -1]
        out.append(float(torch.log_softmax(z.double() / temperature, -1)[y]))
        prefix = prefix + [y]
    return out


@pytest.mark.parametrize("arch, temperature", [("llama", 1.0), ("gpt2", 0.7), ("qwen2", 1.3)])
def test_row_t_produced_token_t(arch, temperature, tok):
    """hybrid_loss's sampled log-probs on the trainer's logits == an independent token-by-token forward."""
    model = build_model(arch, "tiny", vocab_size=len(tok), seed=2)
    torch.manual_seed(0)
    ro = sample(model, tok, PROMPTS, reward=REV, temperature=temperature, max_new_tokens=6)
    logits = response_logits(model, ro)
    assert logits.shape == (*ro.actions.shape, len(tok))
    # uniform teacher: hybrid_loss's logratio = log pi(y_t) - log(1/V)
    uniform = torch.zeros_like(logits)
    out = hybrid_loss(logits, uniform, ro.actions, ro.rewards, mask=ro.mask, temperature=temperature)
    logp = out.logratio + torch.log(torch.tensor(1.0 / len(tok)))
    for b, prompt in enumerate(ro.prompts):
        n = int(ro.mask[b].sum())
        ref = manual_logprobs(model, tok, prompt, ro.actions[b, :n].tolist(), temperature)
        torch.testing.assert_close(
            logp[b, :n].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=0
        )
    # negative control: a slice shifted by one position does not line up
    full = model(
        input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids
    ).logits
    p = ro.prompt_len
    wrong = full[:, p : p + ro.actions.shape[1]]
    lw = torch.log_softmax(wrong / temperature, -1).gather(-1, ro.actions[..., None])[..., 0]
    assert (lw - logp)[ro.mask].abs().max() > 1e-2


def test_rollout_matches_generate_logits(tok):
    """The scoring forward reproduces the logits `generate` sampled from (same positions, left padding)."""
    model = build_model("gpt2", "tiny", vocab_size=len(tok), seed=4)
    from hybridlab.tasks.models import encode_prompts

    enc = encode_prompts(tok, PROMPTS)
    torch.manual_seed(1)
    g = model.generate(
        **enc, do_sample=True, top_k=0, max_new_tokens=5, return_dict_in_generate=True, output_logits=True
    )
    tokens = g.sequences[:, enc["input_ids"].shape[1] :]
    ro = assemble(tok, [as_row(p) for p in PROMPTS], enc, tokens, load_reward(REV), [tok.eos_token_id], 1.0)
    with torch.no_grad():
        ours = response_logits(model, ro)
    gen = torch.stack(g.logits, 1)
    torch.testing.assert_close(ours[ro.mask], gen[ro.mask], atol=1e-5, rtol=0)


def test_teacher_forcing_rollout_layout(tok):
    ro = teacher_forcing_rollout(tok, ["12=", "345="], ["21", "543"], reward=REV)
    assert ro.texts == ["21", "543"] and ro.rewards.tolist() == [1.0, 1.0]
    assert ro.mask.sum(1).tolist() == [3, 4]  # answer + EOS
    assert ro.actions[0, 2] == tok.eos_token_id


def test_sampled_opd_expected_gradient_is_dense_gradient():
    """At one state, E_a~pi[grad of the sampled-token OPD loss] == grad KL(pi || pi_T) exactly."""
    torch.manual_seed(0)
    v = 5
    z = torch.randn(1, 1, v, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 1, v, dtype=torch.float64)
    p = torch.softmax(z.detach() / 0.8, -1)[0, 0]
    expected = torch.zeros_like(z)
    for a in range(v):
        loss, _ = sampled_opd_loss(z, t, torch.tensor([[a]]), torch.ones(1, 1, dtype=torch.bool), 0.8)
        (g,) = torch.autograd.grad(loss, z)
        expected += p[a] * g
    (dense,) = torch.autograd.grad(dense_kl(z, t, temperature=0.8).sum(), z)
    torch.testing.assert_close(expected, dense, atol=1e-12, rtol=1e-10)


def test_config_presets_and_errors():
    c = TrainConfig.preset("dense_only", lam=3.0, beta=2.0)
    assert (c.lam, c.beta, c.future, c.baseline, c.loss) == (0.0, 2.0, "none", "none", "hybrid")
    r = TrainConfig.preset("rl_only", lam=3.0)
    assert (r.lam, r.beta, r.baseline) == (3.0, 0.0, "reward_group")
    h = TrainConfig.preset("hybrid")
    assert (h.future, h.baseline, h.gamma, h.loss) == ("analytic", "return_group", 1.0, "hybrid")
    assert TrainConfig.preset("sft").loss == "sft" and TrainConfig.preset("opd_sampled").gamma == 0.0
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig.preset("ppo")
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        TrainConfig.preset("hybrid", samples_per_prompt=1).validate(("student", "teacher", "prompts"))
    with pytest.raises(ValueError, match="must equal samples_per_prompt"):
        TrainConfig.preset("hybrid", group_size=3, samples_per_prompt=4).validate(
            ("student", "teacher", "prompts")
        )


def _trainer(method: str, tok, teacher=None, reward=REV, **kw) -> Trainer:
    student = build_model("llama", "tiny", vocab_size=len(tok), seed=0)
    teacher = teacher or build_model("llama", "tiny", vocab_size=len(tok), seed=1)
    splits = make_splits("reverse", 3000, 200, seed=0)
    kw = {"prompts_per_step": 3, "samples_per_prompt": 2, "eval_count": 6, "lr": 1e-3, "steps": 2, "eval_every": 10,
          "scheduler": "constant", "max_new_tokens": TASKS["reverse"].max_answer_len + 2, "output_dir": None,
          "bf16": False, "cpu": True, "progress": False, "seed": 0, "reward": reward, **kw}  # fmt: skip
    cfg = TrainConfig.preset(method, **kw)
    return Trainer(cfg, student=student, teacher=teacher, tokenizer=tok, prompts=splits["train"],
                   eval_prompts=splits["eval"])  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_a_step(method, tok):
    # partial credit: a random student's rewards differ within a group, so RL-only gets a gradient too
    tr = _trainer(
        method,
        tok,
        reward="hybridlab.tasks.rewards:reverse_partial",
        prompts_per_step=3,
        samples_per_prompt=4,
    )
    before = [p.detach().clone() for p in tr.model.parameters()]
    t_before = [p.detach().clone() for p in tr.teacher.parameters()]
    tr.train()
    hist = tr.history
    assert hist["step"] == [1, 2] and hist["samples"] == [12, 24]
    assert hist["eval_step"] == [0, 2] and len(hist["eval_kl"]) == 2
    for k in ("loss", "kl", "reward", "grad_norm", "eval_greedy_acc", "eval_reward"):
        assert all(torch.isfinite(torch.tensor(x)) for x in hist[k]), k
    assert all(x >= 0 for x in hist["kl"] + hist["eval_kl"])
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters())), "student did not move"
    assert all(torch.equal(a, b) for a, b in zip(t_before, tr.teacher.parameters())), "teacher moved"


def test_training_is_reproducible(tok):
    a, b = _trainer("hybrid", tok), _trainer("hybrid", tok)
    a.train(), b.train()
    untimed = lambda h: {k: v for k, v in h.items() if not k.endswith("_s")}  # noqa: E731  (timings differ)
    assert untimed(a.history) == untimed(b.history)


TEACHER = DATA_DIR / "teacher_reverse"


def test_resume_reproduces_an_uninterrupted_run(tok, tmp_path):
    want = _trainer("hybrid", tok, steps=4, eval_every=2)
    want.train()
    first = _trainer("hybrid", tok, steps=4, eval_every=2, output_dir=str(tmp_path), stop_after=2)
    first.train()  # checkpoint at step 2
    first.train_step()  # work after the checkpoint that a crash would lose
    again = _trainer("hybrid", tok, steps=4, eval_every=2, output_dir=str(tmp_path))
    assert again.resume() and again.step == 2
    again.train()
    untimed = lambda h: {k: v for k, v in h.items() if not k.endswith("_s")}  # noqa: E731  (timings differ)
    assert untimed(again.history) == untimed(want.history)
    assert not _trainer("hybrid", tok, output_dir=str(tmp_path / "empty")).resume()


def test_dense_only_reduces_kl_on_a_fixed_batch(tok):
    """The trainer's dense-only loss is a descent direction: repeated updates on one rollout shrink its KL."""
    teacher, _ = load_model_dir(TEACHER)
    tr = _trainer("dense_only", tok, teacher=teacher, prompts_per_step=4, lr=1e-2)
    ros = tr.generate()
    kls = [tr.train_step(rollouts=ros)["kl"] for _ in range(20)]
    assert kls[-1] < 0.5 * kls[0], kls


def test_mismatched_vocabularies_raise(tok):
    s = build_model("llama", "tiny", vocab_size=len(tok))
    t = build_model("llama", "tiny", vocab_size=len(tok) - 1)  # a teacher that misses a student id
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(
            TrainConfig(reward=REV, bf16=False, cpu=True), student=s, teacher=t, tokenizer=tok, prompts=["1="]
        )


def test_summary_targets_are_computed_from_numbers():
    def run(method, seed, rewards, kl):
        n = len(rewards)
        h = {"samples": [64 * (i + 1) for i in range(n)], "eval_samples": [64 * i for i in range(n)],
             "eval_reward": rewards, "eval_greedy_acc": rewards, "eval_kl": kl}  # fmt: skip
        return {"method": method, "seed": seed, "history": h}

    runs = [run("rl_only", 0, [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]), run("dense_only", 0, [0.1, 0.2, 0.2, 0.2], [1] * 4),
            run("hybrid", 0, [0.1, 0.45, 0.5, 0.5], [1, 1, 1, 1.5])]  # fmt: skip
    s = summarize(runs, threshold=0.45, final_window=1)
    assert s["methods"]["hybrid"]["samples_to_threshold"] == [64]
    assert s["methods"]["dense_only"]["samples_to_threshold"] == [None]
    assert s["methods"]["hybrid"]["samples_to_rl_final"] == [64]
    t = s["targets"]
    assert t["hybrid_reward_above_dense_only"] and t["hybrid_kl_below_rl_only"]
    assert t["hybrid_reaches_rl_final_with_half_samples"]  # 64 <= 256 / 2
    assert "| hybrid |" in format_table(s)
    assert samples_to_threshold(runs[0]["history"], 0.99) is None


def test_shipped_teacher_loads_and_reaches_documented_accuracy():
    meta = load_meta(TEACHER)
    assert meta["task"] == "reverse" and meta["role"] == "teacher"
    assert f"**{meta['eval_greedy_acc']:.3f}**" in (TEACHER / "TRAINING.md").read_text()
    assert sum(f.stat().st_size for f in TEACHER.iterdir()) < 3_000_000
    model, tok = load_model_dir(TEACHER)
    splits = make_splits("reverse", meta["n_train"], meta["eval_prompts"], seed=meta["data_seed"])
    prompts = [r["prompt"] for r in splits["eval"]]
    greedy = sample(model, tok, prompts, reward=REV, greedy=True, max_new_tokens=8)
    acc = float(greedy.rewards.mean())
    assert abs(acc - meta["eval_greedy_acc"]) <= 0.02, (acc, meta["eval_greedy_acc"])
    assert 0.3 < acc < 0.95  # imperfect on purpose, but a useful teacher


def test_shipped_student_init_is_weaker_than_teacher():
    s, t = load_meta(DATA_DIR / "student_reverse"), load_meta(TEACHER)
    assert s["eval_sampled_reward"] < t["eval_sampled_reward"]
    model, _ = load_model_dir(DATA_DIR / "student_reverse")
    assert model.config.vocab_size == json.loads((TEACHER / "config.json").read_text())["vocab_size"]


def test_train_teacher_script_writes_a_documented_checkpoint(tmp_path):
    from experiments.train_teacher import corrupt_answers, main

    out = tmp_path / "t"
    meta = main(["--task", "reverse", "--out", str(out), "--size", "tiny", "--steps", "4", "--eval-every", "2",
                 "--n-eval", "20", "--corrupt", "0.5"])  # fmt: skip
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    text = (out / "TRAINING.md").read_text()
    assert (
        "--corrupt 0.5" in text
        and "50% of training answers corrupted" in text
        and f"{meta['wall_s']} s" in text
    )
    assert load_meta(out)["steps"] == 4 and len(meta["curve"]) == 2
    rows = [{"prompt": "123=", "answer": "321"}] * 200
    bad = corrupt_answers(rows, 0.5, seed=0)
    n_bad = sum(r["answer"] != "321" for r in bad)
    assert 60 < n_bad < 140 and all(len(r["answer"]) == 3 for r in bad)
    assert corrupt_answers(rows, 0.0, seed=0) == rows


def test_scripts_help_and_default_outputs(capsys, tmp_path):
    """The comparison and the teacher script: `-m` usage, help text and a default on every option, results
    under runs/ unless the shipped data are regenerated explicitly (--shipped)."""
    from experiments import compare, train_teacher

    for mod, prog in ((compare, "compare"), (train_teacher, "train_teacher")):
        with pytest.raises(SystemExit):
            mod.parse_args(["--help"])
        text = capsys.readouterr().out
        assert f"usage: python -m experiments.{prog}" in text and "issue" not in text.lower()
        opts = [ln for ln in text.split("options:")[1].splitlines() if ln.strip().startswith("--")]
        assert opts and all(len(ln.split("  ", 1)) == 2 or "--shipped" in ln for ln in opts), opts
        assert text.count("(default:") >= len(opts) - 3, text
    assert compare.parse_args([]).out == "runs/compare_reverse.json"
    assert train_teacher.parse_args([]).out == "runs/teacher_reverse"
    assert compare.parse_args(["--shipped"]).out == str(DATA_DIR / "results" / "compare_reverse.json")
    for mod, args in (
        (compare, ["--out", str(DATA_DIR / "results" / "x.json")]),
        (train_teacher, ["--out", str(DATA_DIR / "t")]),
    ):
        with pytest.raises(SystemExit):
            mod.parse_args(args)
        assert "--shipped" in capsys.readouterr().err


def test_shipped_results_record_repository_paths():
    res = json.loads((DATA_DIR / "results" / "compare_reverse.json").read_text())
    assert (
        res["args"]["teacher"] == "data/teacher_reverse" and res["args"]["student"] == "data/student_reverse"
    )
    assert "/work/" not in json.dumps({k: v for k, v in res.items() if k != "runs"})
