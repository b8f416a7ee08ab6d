"""The one rollout path (`hybridlab.train.rollout`) and what the loss reads from it: the reward text, sampler =
scorer against a model folder's own generation defaults, deterministic scoring (dropout / layerdrop), truncated
responses, and a teacher with its own prompt (dense and sparse terms read the teacher at the right tokens)."""

import shutil

import pytest
import torch

from hybridlab.scripts.make_tiny_models import make_tiny_models
from hybridlab.tasks.models import build_model, build_tokenizer, save_model_dir
from hybridlab.tasks.rewards import load_reward
from hybridlab.train import TrainConfig, Trainer, make_deterministic, response_logits, sample
from hybridlab.train.data import as_row
from hybridlab.train.loading import load_model
from hybridlab.train.rollout import assemble, encode, generation_config, teacher_inputs

REV = "hybridlab.tasks.rewards:reverse"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"), ("llama",), hidden=32, layers=1, n_prompts=32)


def _cfg(tiny, tmp_path, **kw) -> TrainConfig:
    base = dict(
        student=str(tiny["llama"]["student"]), teacher=str(tiny["llama"]["teacher"]),
        tokenizer=str(tiny["tokenizer"]["path"]), prompts=str(tiny["prompts"]["path"]), reward=REV, lr=3e-3,
        steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, bf16=False, dense_backend="torch",
        output_dir=str(tmp_path / "run"), progress=False, cpu=True, cpu_threads=1, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base).validate()


# ------------------------------------------------------------------------------- (1) the reward text
def test_reward_sees_special_tokens_sampled_inside_a_response(tok):
    """Prompt "123=", sampled `3 <pad> 2 1 <eos>`: the reward reads "3<pad>21" (wrong), never "321"."""
    enc = encode(tok, ["123=", "123="])
    rows = [as_row("123=")] * 2
    ids = [
        tok.convert_tokens_to_ids(t)
        for t in (["3", "<pad>", "2", "1", "<eos>"], ["3", "2", "1", "<eos>", "<pad>"])
    ]
    ro = assemble(tok, rows, enc, torch.tensor(ids), load_reward(REV), [tok.eos_token_id], 1.0)
    assert ro.texts == ["3<pad>21", "321"] and ro.rewards.tolist() == [0.0, 1.0]
    assert ro.mask.tolist() == [
        [True] * 5,
        [True] * 4 + [False],
    ]  # the <pad> inside the response is trained on
    assert ro.truncated.tolist() == [False, False]


# --------------------------------------------------------------------------- (2) sampler = scorer
@pytest.fixture(scope="module")
def student_with_defaults(tmp_path_factory, tok):
    """A model folder whose generation_config.json reshapes sampling in every way transformers allows."""
    from transformers import GenerationConfig

    path = save_model_dir(build_model("llama", "tiny", vocab_size=len(tok), seed=3), tok,
                          tmp_path_factory.mktemp("m") / "student")  # fmt: skip
    digits = tok.convert_tokens_to_ids(["1", "2"])
    GenerationConfig(do_sample=True, temperature=0.3, top_k=3, top_p=0.5, repetition_penalty=1.5,
                     no_repeat_ngram_size=2, min_new_tokens=4, suppress_tokens=digits, eos_token_id=2,
                     pad_token_id=0, bos_token_id=1).save_pretrained(path)  # fmt: skip
    return path


def _scored(model, ro, tau):
    with torch.no_grad():
        z = response_logits(model, ro).double()
    return torch.log_softmax(z / tau, -1).gather(-1, ro.actions[..., None])[..., 0]


def test_sampled_logprobs_are_the_scored_logprobs_whatever_the_model_folder_says(student_with_defaults, tok):
    model = load_model(str(student_with_defaults), "student", torch.float32)
    assert model.generation_config.repetition_penalty == 1.5  # the folder's defaults were loaded
    prompts = ["12=", "4567=", "908+1=", "3="] * 4
    torch.manual_seed(0)
    ro = sample(model, tok, prompts, reward=REV, temperature=0.7, max_new_tokens=6, sampler_logprobs=True)
    gap = (ro.sampler_logprobs.double() - _scored(model, ro, 0.7))[ro.mask].abs().max()
    assert gap < 1e-4, gap
    # Negative control: handing generate an explicit config is not enough, the folder's defaults fill its unset
    # fields (repetition penalty, banned n-grams, minimum length, suppressed tokens) and the sampler drifts.
    enc = encode(tok, prompts)
    torch.manual_seed(0)
    g = model.generate(**enc, generation_config=generation_config(tok, [2], 0.7, 6), output_scores=True,
                       return_dict_in_generate=True)  # fmt: skip
    tokens = g.sequences[:, enc["input_ids"].shape[1] :]
    lp = torch.log_softmax(torch.stack(g.scores, 1).float(), -1).gather(-1, tokens[..., None])[..., 0]
    bad = assemble(
        tok, [as_row(p) for p in prompts], enc, tokens, load_reward(REV), [2], 0.7, sampler_logprobs=lp
    )
    assert (bad.sampler_logprobs.double() - _scored(model, bad, 0.7))[bad.mask].abs().max() > 0.1
    assert model.generation_config.repetition_penalty == 1.5  # generate() swapped it out for its call only


def test_trainer_rollouts_sample_what_the_loss_scores(tiny, tmp_path, student_with_defaults):
    folder = tmp_path / "student"
    shutil.copytree(tiny["llama"]["student"], folder)
    shutil.copy(student_with_defaults / "generation_config.json", folder)
    tr = Trainer(_cfg(tiny, tmp_path, student=str(folder), temperature=0.7))
    ro = tr.generate(sampler_logprobs=True)[0]
    assert (ro.sampler_logprobs.double() - _scored(tr.model, ro, 0.7))[ro.mask].abs().max() < 1e-4


# -------------------------------------------------------------------------------- (3) dropout
def _random_models():
    from transformers import AutoModelForCausalLM, BloomConfig, OPTConfig

    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=15, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1, layerdrop=0.3,
    ))  # fmt: skip
    bloom = AutoModelForCausalLM.from_config(BloomConfig(
        vocab_size=15, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.1, attention_dropout=0.1,
    ))  # fmt: skip
    return {"opt": opt, "bloom": bloom}


def _train_mode_gap(model) -> float:
    ids = torch.arange(2, 12)[None].repeat(4, 1) % 15
    model.train()
    with torch.no_grad():
        a, b = (model(input_ids=ids).logits for _ in range(2))
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_scoring_is_deterministic_whatever_the_dropout_is_called(arch):
    model = _random_models()[arch]
    # Negative control, what a dropout switch keyed on nn.Dropout and `dropout` / `attention_dropout` misses:
    # BLOOM's `hidden_dropout`, OPT's `layerdrop`.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    assert _train_mode_gap(model) > 1e-3
    assert make_deterministic(model, arch) > 0
    assert _train_mode_gap(model) == 0.0


def test_a_model_still_random_in_train_mode_is_refused():
    model = build_model("llama", "tiny", vocab_size=15)
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: o + 0.1 * torch.randn_like(o) if m.training else o)
    with pytest.raises(ValueError, match=r"student 'noisy' .*random in train mode.*differ by"):
        make_deterministic(model, "student 'noisy'")


# ------------------------------------------------------------------------------- (4) truncation
def test_truncated_responses_are_marked_and_can_be_left_out(tiny, tmp_path):
    kw = {"baseline": "none", "samples_per_prompt": 1, "max_new_tokens": 4}
    tr = Trainer(_cfg(tiny, tmp_path, mask_truncated_completions=True, **kw))
    for ro in tr.generate():
        assert torch.equal(ro.keep, ~ro.truncated)
        assert torch.equal(ro.truncated, ~(ro.actions == tr.tokenizer.eos_token_id).any(1))
    tok = tr.tokenizer
    e, d = tok.eos_token_id, tok.convert_tokens_to_ids(list("0123"))
    rows = [as_row(p) for p in ("12=", "34=", "56=", "78=")]  # one length: no padding differences
    tokens = torch.tensor([[d[1], e, 0, 0], d, [d[2], d[3], e, 0], [d[0]] * 4])  # rows 1 and 3 never stop
    reward = load_reward(REV)
    enc = encode(tok, [r["prompt"] for r in rows])
    ro = assemble(tok, rows, enc, tokens, reward, [e], 1.0, mask_truncated=True)
    assert ro.truncated.tolist() == [False, True, False, True] and ro.keep.tolist() == [
        True,
        False,
        True,
        False,
    ]
    m = tr.train_step(rollouts=[ro], keep_grads=True)
    assert m["kept_frac"] == 0.5 and m["samples"] == 4
    got = [p.grad.clone() for p in tr.model.parameters()]
    # the same update as training on the two finished responses alone
    kept = [0, 2]
    enc2 = {k: v[kept] for k, v in enc.items()}
    ref = Trainer(_cfg(tiny, tmp_path, **kw))
    ref.train_step(rollouts=[assemble(tok, [rows[i] for i in kept], enc2, tokens[kept], reward, [e], 1.0)],
                   keep_grads=True)  # fmt: skip
    for a, b in zip(got, (p.grad for p in ref.model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # negative control: keeping them changes the update
    full = Trainer(_cfg(tiny, tmp_path, **kw))
    full.train_step(rollouts=[assemble(tok, rows, enc, tokens, reward, [e], 1.0)], keep_grads=True)
    assert any(not torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, full.model.parameters()))


# ------------------------------------------------------------------------ a teacher with its own prompt
TEMPLATE = "10=01;{prompt}"  # a worked example in the teacher's prompt only (context distillation)


def _by_hand(teacher, tok, prompt_text: str, actions: list[int], vocab: int) -> torch.Tensor:
    """[N, V] teacher logits of each response token, one unpadded forward per prefix of teacher prompt + response."""
    prefix = tok(prompt_text)["input_ids"]
    rows = []
    for t in range(len(actions)):
        with torch.no_grad():
            rows.append(teacher(input_ids=torch.tensor([prefix + actions[:t]])).logits[0, -1, :vocab])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tok_with_semicolon():
    return build_tokenizer("0123456789+=;")


def test_teacher_prompt_scores_the_students_tokens_after_its_own_prefix(tmp_path, tok_with_semicolon):
    tok = tok_with_semicolon
    student = build_model("llama", "tiny", vocab_size=len(tok), seed=0)
    teacher = build_model("llama", "tiny", vocab_size=len(tok), seed=1)
    rows = [{"prompt": p, "answer": None} for p in ("12=", "4567=", "908+1=", "3=")]
    kw = dict(reward=REV, steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, bf16=False,
              dense_backend="torch", output_dir=None, progress=False, cpu=True, seed=0, teacher_prompt=TEMPLATE)  # fmt: skip
    tr = Trainer(TrainConfig(**kw), student=student, teacher=teacher, tokenizer=tok, prompts=rows)
    (ro,) = tr.generate()
    ids, am, p = ro.teacher_view()
    manual = torch.zeros(*ro.actions.shape, tr.vocab)
    for b, prompt in enumerate(ro.prompts):
        text = TEMPLATE.format(prompt=prompt)
        real = ids[b][am[b].bool()].tolist()
        assert (
            real == tok(text)["input_ids"] + ro.actions[b].tolist()
        )  # teacher prompt, then the same response
        n = int(ro.mask[b].sum())
        manual[b, :n] = _by_hand(teacher, tok, text, ro.actions[b, :n].tolist(), tr.vocab)
    check_teacher_scoring(tr, ro, teacher, manual)
    # fused-linear path: the same update on the same rollouts
    a = tr.train_step(rollouts=[ro], keep_grads=True)
    fused = Trainer(TrainConfig(**kw, fused_linear=True, fused_chunk=5), tokenizer=tok, prompts=rows,
                    student=build_model("llama", "tiny", vocab_size=len(tok), seed=0), teacher=teacher)  # fmt: skip
    b = fused.train_step(rollouts=[ro], keep_grads=True)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6) and b["kl"] == pytest.approx(
        a["kl"], rel=1e-5
    )
    for (n, p), q in zip(tr.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def check_teacher_scoring(tr, ro, teacher, manual) -> None:
    """The trainer's teacher log-probs equal `manual` (scored by hand after the teacher's own prefix), the loss's
    dense and sparse terms read exactly those, and the teacher on the student's prompt (negative control) differs."""
    got = tr.teacher_inputs(ro)
    torch.testing.assert_close(got[ro.mask], manual[ro.mask], atol=1e-5, rtol=0)
    plain = teacher_inputs(teacher, ro.__class__(**{**ro.__dict__, "teacher_input_ids": None}), tr.vocab)
    assert (plain[ro.mask] - manual[ro.mask]).abs().max() > 1e-2
    c = torch.full((ro.actions.shape[0],), 1.0 / ro.actions.shape[0])
    common = dict(mode="loss", input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids,
                  prompt_len=ro.prompt_len, actions=ro.actions, mask=ro.mask, rewards=ro.rewards, seq_weights=c,
                  loss_kw=tr.loss_kw, fused=False, chunk=16)  # fmt: skip
    ours, ref, wrong = (tr.policy(teacher=t, **common) for t in (got, manual, plain))
    for k in ("loss", "dense", "sparse"):
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-5)
    assert abs(float(ours["sparse"] - wrong["sparse"])) + abs(float(ours["dense"] - wrong["dense"])) > 1e-3


def test_max_prompt_tokens_does_not_cut_the_teachers_prefix(tok_with_semicolon):
    """The student's prompt is cut to max_prompt_tokens; the teacher's own, longer prefix (worked examples) is not,
    unless max_teacher_prompt_tokens asks for it."""
    from hybridlab.train.rollout import rollout

    tok = tok_with_semicolon
    eos = tok.eos_token_id

    def gen(input_ids, attention_mask, generation_config, **kw):  # two response tokens, the second EOS
        resp = torch.tensor([[tok.convert_tokens_to_ids("3"), eos]] * input_ids.shape[0])
        return torch.cat([input_ids, resp], 1)

    rows = ["12=", "4567="]
    full = max(len(tok(TEMPLATE.format(prompt=p))["input_ids"]) for p in rows)
    kw = dict(reward_fn=lambda p, r, a: [0.0] * len(p), eos_ids=[eos], temperature=1.0, max_new_tokens=2,
              teacher_prompt=TEMPLATE, max_prompt_tokens=3)  # fmt: skip
    ro = rollout(gen, tok, rows, **kw)
    assert ro.prompt_len == 3 and full > 6
    assert ro.teacher_prompt_len == full  # the whole teacher prefix
    ids, am, p = ro.teacher_view()
    assert ids[1][am[1].bool()].tolist()[:-2] == tok(TEMPLATE.format(prompt="4567="))["input_ids"]
    cut = rollout(gen, tok, rows, max_teacher_prompt_tokens=6, **kw)
    assert cut.teacher_prompt_len == 6  # an explicit limit of its own
