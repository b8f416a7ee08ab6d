"""The chat addition task: questions, the solver, the number-only reward, disjoint splits, teacher prefixes."""

import pytest

from hybridlab import tasks_chat as tc
from hybridlab.rewards import call_reward, load_reward


def test_question_and_solver():
    q = tc.question(17, 25)
    assert q == "What is 17 + 25? Answer with the number only."
    assert tc.solve(q) == 42
    # a rendered teacher prompt holds demonstrations first: the last question is the one asked
    text = "What is 1 + 2? Answer with the number only.\n3\nWhat is 40 + 5? Answer with the number only.\n"
    assert tc.solve(text) == 45
    with pytest.raises(ValueError, match="no 'What is a \\+ b\\?' question"):
        tc.solve("Add these numbers")
    with pytest.raises(ValueError, match="operands"):
        tc.question(-1, 2)


@pytest.mark.parametrize(
    "response, value",
    [("42", 42), (" 42\n", 42), ("42.", 42), ("-3", -3), ("042", 42),
     ("42 is the answer", None), ("The answer is 42", None), ("4 2", None), ("42..", None), ("", None)],
)  # fmt: skip
def test_parse_answer(response, value):
    assert tc.parse_answer(response) == value


def test_exact_reward_pays_only_the_bare_sum():
    q = tc.question(17, 25)
    responses = ["42", "42.", "43", "17 + 25 = 42", "To solve this, we add 17 and 25.", ""]
    assert tc.exact_reward([q] * 6, responses, ["42"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # answers missing: solved from the prompt; a given answer wins over the prompt
    assert tc.exact_reward([q, q], ["42", "42"], [None, "7"]) == [1.0, 0.0]
    assert tc.exact_reward([q], ["42"]) == [1.0]
    # the looser diagnostic: the first integer in the response
    assert tc.contains_reward([q] * 3, ["42 apples", "17 + 25 = 42", "it is 42"], None) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="same length"):
        tc.exact_reward([q], ["42", "42"], None)


def test_reward_loads_by_dotted_path():
    fn = load_reward("hybridlab.tasks_chat:exact_reward")
    q = tc.question(3, 4)
    assert call_reward(fn, [q, q], ["7", "8"], ["7", "7"]) == [1.0, 0.0]


@pytest.mark.parametrize("digits, lo, hi", [(1, 0, 9), (2, 10, 99), (3, 100, 999)])
def test_splits_are_disjoint_deterministic_and_in_range(digits, lo, hi):
    s = tc.make_splits(n_train=50, n_eval=20, digits=digits, seed=3, k_demos=2)
    assert len(s["train"]) == 50 and len(s["eval"]) == 20
    assert s == tc.make_splits(n_train=50, n_eval=20, digits=digits, seed=3, k_demos=2)
    assert s != tc.make_splits(n_train=50, n_eval=20, digits=digits, seed=4, k_demos=2)
    train, ev = {r["prompt"] for r in s["train"]}, {r["prompt"] for r in s["eval"]}
    demos = {q for q, _ in tc.demonstrations(2, digits, seed=3)}
    assert len(train) == 50 and len(ev) == 20
    assert not (train & ev) and not (demos & (train | ev))
    for r in s["train"] + s["eval"]:
        a, b = (int(x) for x in r["prompt"].split("What is ")[1].split("?")[0].split(" + "))
        assert lo <= a <= hi and lo <= b <= hi and r["answer"] == str(a + b)
    # eval rows do not depend on how many training rows are asked for
    assert tc.make_splits(n_train=5, n_eval=20, digits=digits, seed=3)["eval"] == s["eval"]


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
    q = tc.question(31, 12)
    demos = tc.demonstrations(2, 2, seed=0)
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
