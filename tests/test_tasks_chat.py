"""The chat addition task: questions, the solver, the number-only reward, disjoint splits, teacher prefixes."""

import pytest

from hybridlab.tasks import chat as tc
from hybridlab.tasks.rewards import call_reward, load_reward


def test_question_solver_and_reference():
    q = tc.question(17, 25)
    assert q == "What is 17 + 25? Answer with the number only."
    assert tc.question(17, 25, "equation") == "What is 17 + 25? Answer with the equation only."
    assert tc.solve(q) == 42 and tc.parse_question(q) == (17, 25, "number")
    assert tc.answer_text(17, 25) == "42" and tc.answer_text(17, 25, "equation") == "17 + 25 = 42"
    # a rendered teacher prompt holds demonstrations first: the last question is the one asked
    text = f"{tc.question(1, 2, 'equation')}\n1 + 2 = 3\n{tc.question(40, 5, 'equation')}\n"
    assert tc.parse_question(text) == (40, 5, "equation")
    with pytest.raises(ValueError, match="no 'What is a \\+ b\\?"):
        tc.solve("What is 1 + 2? Tell me a story.")
    with pytest.raises(ValueError, match="operands"):
        tc.question(-1, 2)
    with pytest.raises(ValueError, match="fmt must be one of"):
        tc.question(1, 2, "words")


@pytest.mark.parametrize(
    "response, value",
    [("42", (42,)), (" 42\n", (42,)), ("42.", (42,)), ("-3", (-3,)), ("042", (42,)),
     ("17 + 25 = 42", (17, 25, 42)), ("17+25=42.", (17, 25, 42)),
     ("42 is the answer", None), ("The answer is 42", None), ("4 2", None), ("42..", None), ("", None),
     ("17 + 25 = 42 because", None), ("17 - 25 = 42", None)],
)  # fmt: skip
def test_parse_answer(response, value):
    assert tc.parse_answer(response) == value


def test_exact_reward_pays_only_the_reference_in_its_format():
    q = tc.question(17, 25)
    responses = ["42", "42.", "43", "17 + 25 = 42", "To solve this, we add 17 and 25.", ""]
    assert tc.exact_reward([q] * 6, responses, ["42"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    e = tc.question(17, 25, "equation")
    responses = ["17 + 25 = 42", "17+25=42", "42", "25 + 17 = 42", "17 + 25 = 43", "17 + 25 = 42 and more"]
    assert tc.exact_reward([e] * 6, responses) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # answers missing: solved from the prompt; a given answer wins over the prompt
    assert tc.exact_reward([q, q], ["42", "42"], [None, "7"]) == [1.0, 0.0]
    assert tc.exact_reward([e], ["17 + 25 = 42"], ["17 + 25 = 42"]) == [1.0]
    # the looser diagnostic: the last integer in the response is the sum
    loose = tc.loose_reward([q] * 4, ["The answer is 42.", "17 + 25 = 42", "42 or 43", "none"], None)
    assert loose == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        tc.exact_reward([q], ["42", "42"], None)
    with pytest.raises(ValueError, match="neither a number nor an equation"):
        tc.exact_reward([q], ["42"], ["forty-two"])


def test_reward_loads_by_dotted_path():
    fn = load_reward("hybridlab.tasks.chat:exact_reward")
    q = tc.question(3, 4)
    assert call_reward(fn, [q, q], ["7", "8"], ["7", "7"]) == [1.0, 0.0]
    assert call_reward(fn, [q, q], ["7", "8"], [None, None]) == [1.0, 0.0]


@pytest.mark.parametrize("fmt", ["number", "equation"])
@pytest.mark.parametrize("digits, lo, hi", [(1, 0, 9), (2, 10, 99), (3, 100, 999)])
def test_splits_are_disjoint_deterministic_and_in_range(digits, lo, hi, fmt):
    s = tc.make_splits(n_train=50, n_eval=20, digits=digits, seed=3, k_demos=2, fmt=fmt)
    assert len(s["train"]) == 50 and len(s["eval"]) == 20
    assert s == tc.make_splits(n_train=50, n_eval=20, digits=digits, seed=3, k_demos=2, fmt=fmt)
    assert s != tc.make_splits(n_train=50, n_eval=20, digits=digits, seed=4, k_demos=2, fmt=fmt)
    train, ev = {r["prompt"] for r in s["train"]}, {r["prompt"] for r in s["eval"]}
    demos = tc.demonstrations(2, digits, seed=3, fmt=fmt)
    assert len(train) == 50 and len(ev) == 20
    assert not (train & ev) and not ({q for q, _ in demos} & (train | ev))
    for r in s["train"] + s["eval"] + [{"prompt": q, "answer": a} for q, a in demos]:
        a, b, f = tc.parse_question(r["prompt"])
        assert lo <= a <= hi and lo <= b <= hi and f == fmt and r["answer"] == tc.answer_text(a, b, fmt)
        assert tc.exact_reward([r["prompt"]], [r["answer"]]) == [1.0]
    # eval rows do not depend on how many training rows are asked for
    assert tc.make_splits(n_train=5, n_eval=20, digits=digits, seed=3, fmt=fmt)["eval"] == s["eval"]


def test_split_errors_name_the_argument():
    with pytest.raises(ValueError, match="digits must be one of"):
        tc.make_splits(digits=4)
    with pytest.raises(ValueError, match="only 98 remain"):
        tc.make_splits(n_train=10, n_eval=99, digits=1, k_demos=2)
    with pytest.raises(ValueError, match="n_train and n_eval"):
        tc.make_splits(n_train=-1)


class _TemplateTokenizer:
    """A stand-in with the ChatML template SmolLM2 uses (no model files needed)."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_teacher_prefix_ends_like_the_students():
    tok = _TemplateTokenizer()
    q = tc.question(31, 12, "equation")
    demos = tc.demonstrations(2, 2, seed=0, fmt="equation")
    student = tc.render(tok, tc.student_messages(q))
    teacher = tc.render(tok, tc.teacher_messages(q, demos))
    # same final user turn and assistant header: the response tokens follow both prefixes alike
    assert teacher.endswith(student)
    assert teacher.count("<|im_start|>assistant\n") == 3
    for dq, da in demos:
        assert f"{dq}<|im_end|>\n<|im_start|>assistant\n{da}<|im_end|>" in teacher
    assert tc.solve(teacher) == 43
    assert tc.teacher_messages(q, []) == tc.student_messages(q)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat_template"):
        tc.render(NoTemplate(), tc.student_messages(q))


def test_lazy_pair_pool_matches_the_filtered_list():
    import random

    full = [(a, b) for a in range(10, 21) for b in range(10, 21)]
    for seed in range(5):
        exclude = set(random.Random(seed).sample(full, 10 * seed)) | {(0, 0), (99, 5)}  # some out of range
        pool = tc._PairPool(10, 20, exclude)
        kept = [p for p in full if p not in exclude]
        assert len(pool) == len(kept) and [pool[j] for j in range(len(pool))] == kept
    with pytest.raises(IndexError):
        pool[len(pool)]


def test_write_splits_round_trips(tmp_path):
    import json

    paths = tc.write_splits(30, 10, digits=2, fmt="equation", seed=1, root=tmp_path)
    assert paths == tc.split_paths(2, "equation", 1, tmp_path)
    assert paths["train"].name == "chat_add2_equation_s1_train.jsonl"
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    splits = tc.make_splits(30, 10, digits=2, seed=1, fmt="equation")
    demos = tc.demonstrations(2, 2, 1, "equation")
    assert rows == {k: tc.with_teacher_messages(v, demos) for k, v in splits.items()}
    # the question comes last
    assert all(r["teacher_messages"][-1]["content"] == r["prompt"] for r in rows["train"])
    plain = tc.write_splits(30, 10, digits=2, fmt="equation", seed=1, k_demos=0, root=tmp_path / "plain")
    rows0 = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in plain.items()}
    assert rows0 == tc.make_splits(30, 10, digits=2, seed=1, fmt="equation", k_demos=0)
