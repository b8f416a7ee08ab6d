"""hybridlab inside TRL (`hybridlab.integrations.trl`), on tiny random Llamas built here (CPU, no download).

(a) on one generated batch, the adapter's gradient is `hybrid_loss`'s on the same prompts, completions and rewards;
(b) `train()` takes the same update in one process and in two (gloo), for the same global batch;
(c) TRL's own chunked divergence at beta=1 (DistillationTrainer's loss) is the adapter at lam=0, future="none";
(d) settings the update cannot honour are refused with errors naming them;
(e) the README's example runs as typed; the core package imports without TRL.

This file is also the two-process worker of (b): `torchrun --nproc_per_node 2 tests/test_trl.py OUT.json`.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._net import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parents[1]
G = 4  # num_generations


# ------------------------------------------------------------------------------------------------ helpers
def tiny_models(teacher_vocab: int | None = None):
    from hybridlab.scripts.make_tiny_models import make_model
    from hybridlab.tasks.models import build_tokenizer

    tok = build_tokenizer()
    v = len(tok)
    student = make_model("llama", v, seed=0, hidden=32, layers=1, heads=4, kv_heads=2)
    teacher = make_model(
        "llama", teacher_vocab or v, seed=1, hidden=32, layers=2, heads=4, kv_heads=2, init_std=0.3
    )
    return student, teacher, tok


def dataset(n: int = 24):
    from datasets import Dataset

    from hybridlab.tasks.toy import generate_examples

    return Dataset.from_list(generate_examples("reverse", n=n, seed=0))


def count_reward(completion_ids, **kwargs):
    """A reward with spread on random models: the share of token ids divisible by 3."""
    return [sum(t % 3 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def length_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def config(tmp, **kw):
    from hybridlab.integrations.trl import HybridGRPOConfig

    base = dict(
        output_dir=str(tmp), num_generations=G, per_device_train_batch_size=8, max_completion_length=5,
        learning_rate=1e-2, max_steps=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, gradient_checkpointing=False, reward_weights=[1.0, -0.25], teacher_beta=0.7,
        lam=1.5, temperature=0.8, dataloader_num_workers=0, bf16=False,
    )  # fmt: skip
    base.update(kw)
    return HybridGRPOConfig(**base)


def make_trainer(tmp, cls=None, teacher_vocab=None, reward_funcs=None, teacher=None, **kw):
    from hybridlab.integrations.trl import HybridGRPOTrainer

    student, teacher_model, tok = tiny_models(teacher_vocab)
    return (cls or HybridGRPOTrainer)(
        model=student, teacher_model=teacher or teacher_model, reward_funcs=reward_funcs or [count_reward, length_reward],
        args=config(tmp, **kw), train_dataset=dataset(), processing_class=tok,
    )  # fmt: skip


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(model):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params(model)])


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def generation_batch(trainer):
    """One generation batch, generated and scored by the trainer (GRPO's path plus the hybrid fields)."""
    torch.manual_seed(0)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, trainer._generate_and_score_completions(batch)


def adapter_grad(trainer, gen, n_micro):
    """The adapter's gradient over the generation batch, split into micro-batches as `_prepare_inputs` does."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    trainer.model.zero_grad(set_to_none=True)
    for mb in split_tensor_dict(shuffle_sequence_dict(gen), n_micro):
        trainer.compute_loss(trainer.model, mb).backward()
    return flat_grad(trainer.model)


def reference_grad(trainer, batch, gen, teacher_texts=None, **overrides):
    """`hybrid_loss` on the whole batch, from plain forwards and rewards recomputed here from the completions."""
    from hybridlab import hybrid_loss
    from hybridlab.integrations.trl import model_inputs

    a = trainer.args
    ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], 1)
    att = torch.cat([gen["prompt_mask"], gen["completion_mask"]], 1)
    n = gen["completion_ids"].shape[1]
    mask = gen["completion_mask"].bool()
    comp = [row[m].tolist() for row, m in zip(gen["completion_ids"], mask)]
    r = torch.tensor(count_reward(comp)) * 1.0 - 0.25 * torch.tensor(length_reward(comp))
    t_ids, t_att = ids, att
    if teacher_texts is not None:  # the teacher reads its own prompt, then the same completion tokens
        enc = trainer.processing_class(teacher_texts, padding=True, padding_side="left", return_tensors="pt")
        t_ids = torch.cat([enc["input_ids"], gen["completion_ids"]], 1)
        t_att = torch.cat([enc["attention_mask"], gen["completion_mask"]], 1)
    with torch.no_grad():
        q = trainer.teacher_model(**model_inputs(t_ids, t_att, True)).logits[:, -(n + 1) : -1]
    trainer.model.zero_grad(set_to_none=True)
    z = trainer.model(**model_inputs(ids, att, True)).logits[:, -(n + 1) : -1]
    kw = dict(mask=mask, beta=a.teacher_beta, lam=a.lam, future=a.future, gamma=a.gamma, baseline=a.baseline,
              group_size=G, temperature=a.temperature, normalize=a.normalize)  # fmt: skip
    kw.update(overrides)
    hybrid_loss(z, q, gen["completion_ids"], r, **kw).loss.backward()
    return flat_grad(trainer.model)


# ------------------------------------------------------------------------------------ (a) gradient identity
@pytest.mark.parametrize(
    "setting",
    [
        dict(future="analytic", baseline="return_group", normalize="sequences"),
        dict(future="k3", baseline="reward_group", normalize="tokens", gamma=0.9),
        dict(future="k1", baseline="return_group", normalize="per_sequence", fused_linear=True),
    ],
    ids=["analytic-return_group", "k3-reward_group-tokens", "k1-fused"],
)
def test_adapter_gradient_equals_hybrid_loss(tmp_path, setting):
    tr = make_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, **setting)
    batch, gen = generation_batch(tr)
    assert gen["completion_ids"].shape[0] == 8 and gen["hybrid_mask"].any()
    assert torch.tensor(count_reward([[0, 3, 1]])).item() > 0  # the reward has spread
    g = adapter_grad(tr, gen, n_micro=2)
    ref = reference_grad(tr, batch, gen)
    assert ref.norm() > 0
    assert rel(g, ref) < 1e-6, rel(g, ref)
    # Negative controls on the same batch: the myopic return, another temperature, no baseline.
    assert rel(g, reference_grad(tr, batch, gen, future="none")) > 1e-3
    assert rel(g, reference_grad(tr, batch, gen, temperature=1.0)) > 1e-3
    assert rel(g, reference_grad(tr, batch, gen, baseline="none")) > 1e-3


def test_training_forward_scores_the_sampled_distribution():
    """On left-padded prompts the adapter's forward numbers positions as `generate` does: the log-probs it trains
    are those the tokens were sampled with. Control: default positions (0..L-1, padding counted) on an
    absolute-position model (GPT-2) score another distribution."""
    from hybridlab.integrations.trl import model_inputs
    from hybridlab.tasks.models import build_model, build_tokenizer

    tok, model = build_tokenizer(), build_model("gpt2", "tiny", seed=0).eval()
    model.generation_config.eos_token_id = None  # exactly n tokens, no EOS masking in the scores
    enc = tok(["12=", "12345="], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    n = 4
    out = model.generate(**enc, do_sample=True, max_new_tokens=n, temperature=0.8, top_k=0, top_p=1.0,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ids, acts = out.sequences, out.sequences[:, -n:, None]
    att = torch.cat([enc["attention_mask"], torch.ones(2, n, dtype=torch.long)], 1)
    sampled = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(2, acts)
    with torch.no_grad():
        ours = torch.log_softmax(model(**model_inputs(ids, att, True)).logits[:, -(n + 1) : -1] / 0.8, -1)
        plain = torch.log_softmax(model(**model_inputs(ids, att, False)).logits[:, -(n + 1) : -1] / 0.8, -1)
    assert (ours.gather(2, acts) - sampled).abs().max() < 1e-5
    assert (plain.gather(2, acts) - sampled).abs().max() > 1e-2


def _sampler_vs_scorer_gap(tmp_path, cls):
    """Max |log-prob the sampler drew a completion token with - log-prob the training forward gives it|, for a
    student whose folder's generation_config.json bans, suppresses and penalises tokens and sets a minimum length."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from hybridlab.integrations.trl import HybridGRPOTrainer, model_inputs

    student, teacher, tok = tiny_models()
    digits = tok.convert_tokens_to_ids(["1", "2", "3"])
    student.save_pretrained(tmp_path / "student")
    GenerationConfig(no_repeat_ngram_size=1, min_new_tokens=4, suppress_tokens=digits[:1], bad_words_ids=[[digits[1]]],
                     begin_suppress_tokens=[digits[2]], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(tmp_path / "student")  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", use_safetensors=True)
    assert student.generation_config.min_new_tokens == 4  # the folder's defaults were loaded
    tr = (cls or HybridGRPOTrainer)(model=student, teacher_model=teacher, reward_funcs=[count_reward],
                                    args=config(tmp_path / "run", reward_weights=None), train_dataset=dataset(),
                                    processing_class=tok)  # fmt: skip
    seen, orig = {}, type(tr.model).generate

    def generate(*a, **kw):  # GRPO's call, plus the scores the sampler drew from
        out = orig(tr.model, *a, output_scores=True, return_dict_in_generate=True, **kw)
        seen["scores"] = torch.stack(out.scores, 1).float()
        return out.sequences

    tr.model.generate = generate
    _, gen = generation_batch(tr)
    acts, mask = gen["completion_ids"], gen["completion_mask"].bool()
    drawn = torch.log_softmax(seen["scores"][:, : acts.shape[1]], -1).gather(-1, acts[..., None])[..., 0]
    ids = torch.cat([gen["prompt_ids"], acts], 1)
    att = torch.cat([gen["prompt_mask"], gen["completion_mask"]], 1)
    with torch.no_grad():
        z = tr.model(**model_inputs(ids, att, True)).logits[:, -(acts.shape[1] + 1) : -1].double()
    scored = torch.log_softmax(z / tr.args.temperature, -1).gather(-1, acts[..., None])[..., 0]
    assert tr.model.generation_config.min_new_tokens == 4  # swapped out for the call only
    return float((drawn.double() - scored)[mask].abs().max())


def test_sampling_ignores_the_student_folders_generation_defaults(tmp_path):
    """The completions are drawn from softmax(z / temperature), the policy the loss differentiates, whatever the
    student folder's generation_config.json says. Control: GRPO's generation as is samples another distribution."""
    from trl import GRPOTrainer

    from hybridlab.integrations.trl import HybridGRPOTrainer

    class AsGRPO(HybridGRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            return GRPOTrainer._generate_single_turn(self, *a, **k)

    gap = _sampler_vs_scorer_gap(tmp_path / "a", None)
    assert gap < 1e-4, gap  # fp32 forwards of one model, batched differently
    assert _sampler_vs_scorer_gap(tmp_path / "b", AsGRPO) > 0.1


def test_unscorable_completions_leave_the_loss(tmp_path):
    """A completion every reward function returns None for has no R: it is masked out (GRPO gives it 0 advantage)."""

    def some_none(completion_ids, **kw):
        return [None if i % 4 == 0 else 1.0 for i in range(len(completion_ids))]

    tr = make_trainer(tmp_path, reward_funcs=[some_none], reward_weights=None)
    _, gen = generation_batch(tr)
    assert not gen["hybrid_mask"][::4].any() and gen["hybrid_mask"][1].any()
    assert torch.all(gen["hybrid_rewards"][::4] == 0) and torch.all(gen["hybrid_rewards"][1::4] == 1)
    assert float(gen["hybrid_n_tok"]) == float(gen["hybrid_mask"].sum())


def _some_none(completion_ids, **kw):
    return [None if i % 4 == 0 else 1.0 for i in range(len(completion_ids))]


def test_left_out_rows_leave_the_counts_and_the_teacher_kl_metric(tmp_path):
    """Unscorable completions leave the loss *and* its divisor, as in hybridlab.train: the adapter's gradient is
    hybrid_loss's on the kept rows alone (normalize="sequences"), and hybrid/teacher_kl is the kept rows' mean of
    sum_t KL_t, checked against a float64 KL written here. Control: dividing by all rows is another gradient."""
    from hybridlab import hybrid_loss
    from hybridlab.integrations.trl import model_inputs

    tr = make_trainer(tmp_path, reward_funcs=[_some_none], reward_weights=None, baseline="none")
    _, gen = generation_batch(tr)
    g = adapter_grad(tr, gen, n_micro=1)
    kl_logged = tr._metrics["train"]["hybrid/teacher_kl"][-1]
    keep = torch.arange(8) % 4 != 0
    ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], 1)[keep]
    att = torch.cat([gen["prompt_mask"], gen["completion_mask"]], 1)[keep]
    acts, mask = gen["completion_ids"][keep], gen["completion_mask"].bool()[keep]
    n, a = acts.shape[1], tr.args
    with torch.no_grad():
        q = tr.teacher_model(**model_inputs(ids, att, True)).logits[:, -(n + 1) : -1]
    tr.model.zero_grad(set_to_none=True)
    z = tr.model(**model_inputs(ids, att, True)).logits[:, -(n + 1) : -1]
    kw = dict(
        mask=mask, beta=a.teacher_beta, lam=a.lam, future=a.future, baseline="none", temperature=a.temperature
    )
    hybrid_loss(z, q, acts, torch.ones(int(keep.sum())), normalize="sequences", **kw).loss.backward()
    ref = flat_grad(tr.model)
    assert rel(g, ref) < 1e-6, rel(g, ref)
    # control: dividing by all 8 rows instead of the 6 kept
    assert abs(rel(g, ref * keep.float().mean()) - 1 / 3) < 1e-3
    lp = torch.log_softmax(z.detach().double() / a.temperature, -1)
    lq = torch.log_softmax(q.double(), -1)
    kl_rows = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum(1)  # [6]
    assert kl_logged == pytest.approx(float(kl_rows.mean()), rel=1e-5)
    assert kl_logged > float(kl_rows.sum()) / 8 * 1.2  # the old all-rows mean counts the dropped rows as 0


def test_a_batch_without_any_reward_warns(tmp_path):
    def all_none(completion_ids, **kw):
        return [None] * len(completion_ids)

    tr = make_trainer(tmp_path, reward_funcs=[all_none], reward_weights=None)
    with pytest.warns(RuntimeWarning, match="every reward of this train batch"):
        _, gen = generation_batch(tr)
    assert not gen["hybrid_mask"].any()
    tr2 = make_trainer(tmp_path, reward_funcs=[_some_none], reward_weights=None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # control: some rewards, no warning
        generation_batch(tr2)


def test_teacher_from_a_local_folder_and_checkpoint_resume(tmp_path):
    """teacher_model as a path; GRPO's checkpoints: resuming from step 1 ends where the uninterrupted run does."""
    _, teacher, _ = tiny_models()
    teacher.save_pretrained(tmp_path / "teacher")
    full = make_trainer(tmp_path / "full", teacher=str(tmp_path / "teacher"), max_steps=2, save_strategy="steps",
                        save_steps=1)  # fmt: skip
    full.train()
    assert (tmp_path / "full" / "checkpoint-1" / "model.safetensors").exists()
    resumed = make_trainer(tmp_path / "full", teacher=str(tmp_path / "teacher"), max_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    a, b = (
        torch.cat([p.reshape(-1) for p in params(full.model)]),
        torch.cat([p.reshape(-1) for p in params(resumed.model)]),
    )
    assert resumed.state.global_step == 2
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_evaluate_reports_a_finite_hybrid_loss(tmp_path):
    tr = make_trainer(tmp_path, per_device_eval_batch_size=8)
    m = tr.evaluate(eval_dataset=dataset(4))
    assert math.isfinite(m["eval_loss"]) and math.isfinite(m["eval_hybrid/teacher_kl"]), m


@pytest.mark.parametrize("fused", [False, True])
def test_teacher_prompt_scores_the_completion_after_the_teachers_own_prefix(tmp_path, fused):
    tr = make_trainer(tmp_path, teacher_prompt="{answer}+{prompt}", fused_linear=fused,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2)  # fmt: skip
    batch, gen = generation_batch(tr)
    texts = [f"{x['answer']}+{x['prompt']}" for x in batch]
    assert gen["hybrid_teacher_prompt_ids"].shape[1] > gen["prompt_ids"].shape[1]
    g = adapter_grad(tr, gen, n_micro=2)
    ref = reference_grad(tr, batch, gen, teacher_texts=texts)
    assert rel(g, ref) < 1e-6, rel(g, ref)
    assert rel(g, reference_grad(tr, batch, gen)) > 1e-3  # control: the teacher on the student's prompt


def test_rewards_are_the_weighted_sum_and_counts_are_global(tmp_path):
    tr = make_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    _, gen = generation_batch(tr)
    mask = gen["completion_mask"].bool()
    comp = [row[m].tolist() for row, m in zip(gen["completion_ids"], mask)]
    want = torch.tensor(count_reward(comp)) - 0.25 * torch.tensor(length_reward(comp))
    assert torch.allclose(gen["hybrid_rewards"], want)
    assert float(gen["hybrid_n_seq"]) == 8 and float(gen["hybrid_n_tok"]) == float(mask.sum())
    assert gen["hybrid_baseline"].shape == mask.shape


# ------------------------------------------------------------------ (c) TRL's distillation rule as a setting
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_chunked_divergence_is_lam0_myopic_setting(tmp_path, temperature):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from hybridlab.integrations.trl import model_inputs

    tr = make_trainer(tmp_path, lam=0.0, teacher_beta=1.0, future="none", baseline="none", normalize="tokens",
                      temperature=temperature)  # fmt: skip
    _, gen = generation_batch(tr)
    g = adapter_grad(tr, gen, n_micro=1)

    ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], 1)
    att = torch.cat([gen["prompt_mask"], gen["completion_mask"]], 1)
    n = gen["completion_ids"].shape[1]
    student, teacher = tr.model, tr.teacher_model
    tr.model.zero_grad(set_to_none=True)
    h_s = student.base_model(**model_inputs(ids, att, True)).last_hidden_state[:, -(n + 1) : -1]
    with torch.no_grad():
        h_t = teacher.base_model(**model_inputs(ids, att, True)).last_hidden_state[:, -(n + 1) : -1]
    mask = gen["completion_mask"]
    loss, _, _ = _chunked_divergence_loss(
        h_s, h_t, student.get_output_embeddings().weight, teacher.get_output_embeddings().weight, mask,
        beta=1.0, num_items_in_batch=mask.sum(), temperature=temperature,
    )  # fmt: skip
    loss.backward()
    ref = flat_grad(tr.model)
    if temperature == 1.0:
        assert ref.norm() > 0 and rel(g, ref) < 1e-5, rel(g, ref)
    else:
        # TRL divides the *teacher's* logits by the temperature too; hybridlab's teacher is taken as given, so
        # at temperature != 1 the two rules differ (same rule with a tempered teacher, checked in test (c2)).
        assert rel(g, ref) > 1e-3
    # Negative control: the exact imitation estimator (future KL in the return) is not TRL's myopic rule.
    tr.args.future = "analytic"
    assert rel(adapter_grad(tr, gen, n_micro=1), ref) > 1e-3


def test_trl_divergence_with_tempered_teacher_equals_hybrid_loss():
    """TRL at temperature tau == hybrid_loss(student at tau, teacher logits / tau): where the two rules meet."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from hybridlab import hybrid_loss

    torch.manual_seed(0)
    b, t, h, v, tau = 3, 5, 8, 11, 0.7
    hs, ht = torch.randn(b, t, h, requires_grad=True), torch.randn(b, t, h)
    ws, wt = torch.randn(v, h), torch.randn(v, h)
    mask = torch.rand(b, t) > 0.3
    loss, _, _ = _chunked_divergence_loss(hs, ht, ws, wt, mask.long(), beta=1.0, num_items_in_batch=mask.sum(),
                                          temperature=tau)  # fmt: skip
    (g_trl,) = torch.autograd.grad(loss, hs)
    acts = torch.randint(0, v, (b, t))
    out = hybrid_loss(hs @ ws.T, (ht @ wt.T) / tau, acts, torch.randn(b), mask=mask, beta=1.0, lam=0.0,
                      future="none", temperature=tau, normalize="tokens")  # fmt: skip
    (g_h,) = torch.autograd.grad(out.loss, hs)
    assert rel(g_h, g_trl) < 1e-5
    out = hybrid_loss(hs @ ws.T, ht @ wt.T, acts, torch.randn(b), mask=mask, beta=1.0, lam=0.0, future="none",
                      temperature=tau, normalize="tokens")  # fmt: skip
    assert rel(torch.autograd.grad(out.loss, hs)[0], g_trl) > 1e-3  # the untempered teacher is another rule


# ------------------------------------------------------------------------------------------ (d) bad settings
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=0.04), "teacher_beta"),
        (dict(beta=0.04, teacher_beta=0.0), "pass the reference model as teacher_model"),
        (dict(num_iterations=2), "num_iterations=2"),
        (dict(steps_per_generation=2), "steps_per_generation=2"),
        (dict(vllm_importance_sampling_correction=True), "vllm_importance_sampling_correction"),
        (dict(top_p=0.9), "top_p=0.9"),
        (dict(top_k=5), "top_k=5"),
        (dict(repetition_penalty=1.1), "repetition_penalty"),
        (dict(generation_kwargs={"min_new_tokens": 3}), "min_new_tokens=3"),
        (dict(generation_kwargs={"no_repeat_ngram_size": 2}), "no_repeat_ngram_size=2"),
        (dict(generation_kwargs={"suppress_tokens": [3]}), "suppress_tokens"),
        (dict(generation_kwargs={"forced_eos_token_id": 2}), "forced_eos_token_id"),
        (dict(generation_kwargs={"temperature": 0.5}), "temperature"),
        (dict(entropy_coef=0.01), "entropy_coef"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),
        (dict(future="k2"), "future must be one of"),
        (dict(gamma=1.5), "gamma must lie in"),
        (dict(baseline="group"), "baseline must be one of"),
        (dict(normalize="mean"), "normalize must be one of"),
        (dict(normalize=-1), "normalize as a number"),
        (dict(lam=float("nan")), "lam must be"),
        (dict(teacher_beta=-1.0), "teacher_beta must be"),
        (dict(teacher_floor=1.0), "teacher_floor"),
        (dict(teacher_prompt="Answer: {answer}"), "teacher_prompt must be a template containing"),
    ],
)
def test_bad_settings_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_good_settings_pass(tmp_path):
    c = config(tmp_path, normalize="16", future="k3", gamma=0.5, baseline="none", top_k=0, min_p=0.0)
    assert c.normalize == 16.0 and c.num_iterations == 1 and not c.vllm_importance_sampling_correction


def test_trainer_refusals(tmp_path):
    from hybridlab.integrations.trl import HybridGRPOTrainer

    with pytest.raises(
        ValueError, match=r"vocabulary mismatch: student .* vocab_size=15, teacher .* vocab_size=12"
    ):
        make_trainer(tmp_path, teacher_vocab=12)
    with pytest.raises(ValueError, match="teacher_model must be given"):
        student, _, tok = tiny_models()
        HybridGRPOTrainer(model=student, reward_funcs=count_reward, args=config(tmp_path), processing_class=tok,
                          train_dataset=dataset())  # fmt: skip
    with pytest.raises(TypeError, match="args must be a HybridGRPOConfig"):
        from trl import GRPOConfig

        student, teacher, tok = tiny_models()
        HybridGRPOTrainer(model=student, teacher_model=teacher, reward_funcs=count_reward,
                          args=GRPOConfig(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=8,
                                          use_cpu=True, report_to="none"),
                          processing_class=tok, train_dataset=dataset())  # fmt: skip
    tr = make_trainer(tmp_path, teacher_vocab=20)  # a padded, larger teacher head is sliced (with a warning)
    assert tr.vocab_size == 15
    tr = make_trainer(tmp_path, teacher_prompt="{hint}+{prompt}")
    with pytest.raises(ValueError, match="names 'hint', which is not a text column"):
        generation_batch(tr)


# --------------------------------------------------------------------------- (b) one process vs two processes
class _SeededGeneration:
    """Completions as a pure function of (global row, step, prompt): the same global batch for any process split.

    Each row is sampled from the *current* student at the configured temperature (on-policy), one token at a
    time, with its own generator."""

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        model = self.accelerator.unwrap_model(self.model)
        out = []
        start = self.accelerator.process_index * len(prompt_ids)
        with torch.no_grad():
            for i, ids in enumerate(prompt_ids):
                gen = torch.Generator().manual_seed(1000 * self.state.global_step + start + i + 7 * sum(ids))
                seq, comp = list(ids), []
                for _ in range(self.max_completion_length):
                    z = model(input_ids=torch.tensor([seq])).logits[0, -1].float() / self.temperature
                    tok = int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen))
                    comp.append(tok)
                    seq.append(tok)
                    if tok in self.eos_token_ids:
                        break
                out.append(comp)
        return out, None


def run_steps(out_dir, steps=2, naive=False, **kw):
    """`steps` updates of train() with SGD; returns {"prompts", "delta" (param change), "loss"}."""
    from hybridlab.integrations.trl import HybridGRPOTrainer

    class Seeded(_SeededGeneration, HybridGRPOTrainer):
        def hybrid_coefficients(self, inputs):
            c = super().hybrid_coefficients(inputs)
            if naive:  # the negative control: normalise by this process's own micro-batch tokens
                return c * float(inputs["hybrid_n_tok"]) / inputs["hybrid_mask"].sum().clamp_min(1).float()
            return c

    seen = []

    def record(prompts, completions, completion_ids, **k):
        seen.extend(prompts)
        return count_reward(completion_ids)

    student, teacher, tok = tiny_models()
    before = [p.detach().clone() for p in params(student)]
    args = config(out_dir, max_steps=steps, optim="sgd", learning_rate=0.5, normalize="tokens", lam=2.0,
                  reward_weights=None, shuffle_dataset=False, **kw)  # fmt: skip
    tr = Seeded(model=student, teacher_model=teacher, reward_funcs=[record], args=args, train_dataset=dataset(),
                processing_class=tok)  # fmt: skip
    tr.train()
    delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params(tr.model), before)])
    from accelerate.utils import gather_object

    prompts = gather_object(seen)
    return {"delta": delta, "prompts": prompts}


@pytest.mark.slow
def test_two_processes_take_the_single_process_update(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(Path(__file__).resolve()), str(out)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # meanwhile, in this process: one process, the whole global batch of 12 rows as 1 and as 2 micro-batches
    one = run_steps(tmp_path / "a", per_device_train_batch_size=12, gradient_accumulation_steps=1)
    two = run_steps(tmp_path / "b", per_device_train_batch_size=6, gradient_accumulation_steps=2)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    ddp = torch.load(out)
    # same global batches (3 prompts x 4 completions, a group split over the two processes)
    assert sorted(ddp["good"]["prompts"]) == sorted(one["prompts"]) == sorted(two["prompts"])
    print(
        {
            k: rel(v, one["delta"])
            for k, v in (
                ("two", two["delta"]),
                ("ddp", ddp["good"]["delta"]),
                ("naive", ddp["naive"]["delta"]),
            )
        }
    )
    assert one["delta"].norm() > 0
    assert rel(two["delta"], one["delta"]) < 1e-5, rel(two["delta"], one["delta"])
    assert rel(ddp["good"]["delta"], one["delta"]) < 1e-5, rel(ddp["good"]["delta"], one["delta"])
    # Negative control: each process normalising by its own token count is visibly another update.
    assert rel(ddp["naive"]["delta"], one["delta"]) > 1e-3, rel(ddp["naive"]["delta"], one["delta"])


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    kw = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, ddp_backend="gloo")
    good = run_steps(Path(out).parent / "ddp_good", **kw)
    naive = run_steps(Path(out).parent / "ddp_naive", naive=True, **kw)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"good": good, "naive": naive}, out)


# ------------------------------------------------------------------------------ (e) README and packaging
def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    sec = text.split("## Use it inside TRL", 1)
    assert len(sec) == 2, "README has no 'Use it inside TRL' section"
    blocks = re.findall(r"```python\n(.*?)```", sec[1].split("\n## ", 1)[0], flags=re.S)
    assert blocks, "the TRL section has no python example"
    return blocks[0]


def test_readme_example_is_the_runnable_example_and_runs(tmp_path, monkeypatch):
    from hybridlab.integrations.trl import _demo

    example = (ROOT / "examples" / "trl_tiny.py").read_text()
    assert _readme_example().strip() in example, "README's TRL example and examples/trl_tiny.py differ"
    monkeypatch.chdir(tmp_path)  # the example writes to runs/trl_tiny
    g = _demo(["--demo"])  # `python -m hybridlab.integrations.trl --demo`, in this process
    logs = g["trainer"].state.log_history
    assert g["trainer"].state.global_step == 3
    assert all(math.isfinite(x["hybrid/teacher_kl"]) for x in logs if "hybrid/teacher_kl" in x)
    assert sum("hybrid/teacher_kl" in x for x in logs) == 3


def test_core_imports_without_trl():
    code = (
        "import sys, hybridlab, hybridlab.integrations, hybridlab.hybrid, hybridlab.fused_hybrid\n"
        "assert 'trl' not in sys.modules, 'trl imported by the core package'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "hybridlab").rglob("*.py")
        if "integrations" not in p.parts and re.search(r"^(import trl|from trl)\b", p.read_text(), re.M)
    ]
    assert not offenders, offenders


if __name__ == "__main__":
    _worker(sys.argv[1])
