"""A teacher prompt per data row ("teacher_messages", a whole chat: worked examples as earlier turns, then the
student's question): the teacher scores the student's response tokens after it, in the trainer's dense and sparse
terms and on the fused-linear path; the chat task's JSONL writer emits it. Tiny models, no real model needed."""

import json

import pytest
import torch
from test_rollout import check_teacher_scoring

from hybridlab.tasks import chat as tc
from hybridlab.tasks.models import build_model, build_tokenizer
from hybridlab.train import TrainConfig, Trainer
from hybridlab.train.data import as_row, load_prompts
from hybridlab.train.rollout import teacher_encode

# a chat template over a character vocabulary: "content;" per turn, "=" opens an assistant turn
CHAT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}={% endif %}{{ m['content'] }};{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)


def _length(prompts, responses, answers):
    return [float(len(r) % 3 == 0) for r in responses]


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer("0123456789+=;")
    t.chat_template = CHAT
    return t


def _rows():
    demos = [{"role": "user", "content": "12"}, {"role": "assistant", "content": "21"}]
    return [
        {"prompt": p, "answer": None, "teacher_messages": demos + [{"role": "user", "content": p}]}
        for p in ("345", "6", "78+9", "10")
    ]


def _by_hand(teacher, tok, text: str, actions: list[int], vocab: int) -> torch.Tensor:
    prefix = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for t in range(len(actions)):
        with torch.no_grad():
            out.append(teacher(input_ids=torch.tensor([prefix + actions[:t]])).logits[0, -1, :vocab])
    return torch.stack(out)


def test_row_teacher_messages_score_the_students_tokens_after_the_teachers_chat(tok):
    student = build_model("llama", "tiny", vocab_size=len(tok), seed=0)
    teacher = build_model("llama", "tiny", vocab_size=len(tok), seed=1)
    rows = _rows()
    kw = dict(steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=5, bf16=False, chat_template=True,
              dense_backend="torch", output_dir=None, progress=False, cpu=True, seed=0, beta=0.5)  # fmt: skip
    tr = Trainer(
        TrainConfig(**kw), student=student, teacher=teacher, tokenizer=tok, prompts=rows, reward=_length
    )
    (ro,) = tr.generate()
    ids, am, p = ro.teacher_view()
    assert p > ro.prompt_len  # the teacher's chat is longer than the student's
    manual = torch.zeros(*ro.actions.shape, tr.vocab)
    for b, prompt in enumerate(ro.prompts):
        text = "12;=21;" + prompt + ";="
        chat = next(r["teacher_messages"] for r in rows if r["prompt"] == prompt)
        assert tok.apply_chat_template(chat, tokenize=False,
                                       add_generation_prompt=True) == text  # fmt: skip
        real = ids[b][am[b].bool()].tolist()
        assert real == tok(text, add_special_tokens=False)["input_ids"] + ro.actions[b].tolist()
        n = int(ro.mask[b].sum())
        manual[b, :n] = _by_hand(teacher, tok, text, ro.actions[b, :n].tolist(), tr.vocab)
    check_teacher_scoring(tr, ro, teacher, manual)
    # the fused-linear path makes the same update from the same rollouts
    a = tr.train_step(rollouts=[ro], keep_grads=True)
    fused = Trainer(TrainConfig(**kw, fused_linear=True, fused_chunk=3), tokenizer=tok, prompts=rows, reward=_length,
                    student=build_model("llama", "tiny", vocab_size=len(tok), seed=0), teacher=teacher)  # fmt: skip
    b = fused.train_step(rollouts=[ro], keep_grads=True)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    for (n, q1), q2 in zip(tr.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_rows_without_teacher_messages_read_the_students_prompt(tok):
    rows = [as_row(r) for r in _rows()]
    rows[1] = as_row({"prompt": "6"})
    enc = teacher_encode(tok, rows, chat_template=True)
    plain = tok(["6;="], add_special_tokens=False)["input_ids"][0]
    assert enc["input_ids"][1][enc["attention_mask"][1].bool()].tolist() == plain
    assert teacher_encode(tok, [as_row("6")], chat_template=True) is None  # the student's own prompt


@pytest.mark.parametrize(
    "kw, match",
    [(dict(template="1{prompt}", chat_template=True), "teacher_prompt is set and the prompt rows carry"),
     (dict(chat_template=False), "need chat_template=true")],
)  # fmt: skip
def test_teacher_messages_conflicts_are_errors(tok, kw, match):
    with pytest.raises(ValueError, match=match):
        teacher_encode(tok, [as_row(r) for r in _rows()], **kw)


@pytest.mark.parametrize("bad", [[], "12;", [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_malformed_teacher_messages_are_refused(bad):
    with pytest.raises(ValueError, match="teacher_messages must be a non-empty list"):
        as_row({"prompt": "1", "teacher_messages": bad})


def test_write_splits_gives_each_row_the_teachers_chat(tmp_path):
    paths = tc.write_splits(20, 5, 1, "equation", k_demos=2, root=tmp_path)
    demos = tc.demonstrations(2, 1, 0, "equation")
    for split in ("train", "eval"):
        rows = load_prompts(paths[split])
        raw = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert len(rows) == (20 if split == "train" else 5)
        for r, x in zip(rows, raw):
            assert r["teacher_messages"] == tc.teacher_messages(x["prompt"], demos)
            assert r["teacher_messages"][-1] == {"role": "user", "content": r["prompt"]}
            assert r["answer"] == x["answer"] and tc.exact_reward([r["prompt"]], [r["answer"]]) == [1.0]
    none = tc.write_splits(3, 2, 1, "equation", k_demos=0, root=tmp_path / "plain")
    assert all("teacher_messages" not in r for r in load_prompts(none["train"]))
