"""Toy tasks: solvers, verifiable rewards, deterministic and disjoint splits, shipped split files."""

import random

import pytest

from hybridlab.tasks.toy import TASKS, generate_examples, get_task, make_splits, reward, rewards, split_paths


@pytest.mark.parametrize(
    "task, prompt, answer",
    [
        ("reverse", "40213=", "31204"),
        ("reverse", "007=", "700"),
        ("sort", "40213=", "01234"),
        ("sort", "9919=", "1999"),
        ("add", "57+168=", "225"),
        ("add", "999+1=", "1000"),
        ("add", "0+0=", "0"),
    ],
)
def test_solvers_and_exact_reward(task, prompt, answer):
    assert get_task(task).solve(prompt) == answer
    assert reward(task, prompt, answer) == 1.0
    assert reward(task, prompt, answer + "0") == 0.0  # one extra character
    assert reward(task, prompt, answer[:-1]) == 0.0  # one missing
    assert reward(task, prompt, "") == 0.0


def test_negative_examples():
    assert reward("reverse", "123=", "123") == 0.0  # the copy is not the reverse
    assert reward("sort", "321=", "321") == 0.0
    assert reward("add", "12+34=", "1234") == 0.0
    assert reward("reverse", "12=", "2<pad>1") == 0.0  # special tokens never match


def test_partial_reward():
    assert reward("reverse", "1234=", "4321", "partial") == 1.0
    assert reward("reverse", "1234=", "4301", "partial") == 0.75
    assert reward("reverse", "1234=", "43", "partial") == 0.5  # missing characters cost
    assert reward("reverse", "1234=", "432100", "partial") == pytest.approx(4 / 6)  # so do extra ones
    assert reward("reverse", "1234=", "", "partial") == 0.0
    r = [reward("sort", "5173=", s, "partial") for s in ("1357", "1375", "7531")]
    assert r == sorted(r, reverse=True) and r[0] == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("multiply")
    with pytest.raises(ValueError, match="kind must be"):
        reward("reverse", "12=", "21", kind="fuzzy")
    with pytest.raises(ValueError, match="must end with"):
        reward("reverse", "12", "21")
    with pytest.raises(ValueError, match="same length"):
        rewards("reverse", ["12="], [])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_examples_fit_bounds(task):
    t = get_task(task)
    rows = generate_examples(task, 300, seed=5)
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        assert r["prompt"].endswith("=") and len(r["prompt"]) <= t.max_prompt_len
        assert len(r["answer"]) <= t.max_answer_len
        assert reward(task, r["prompt"], r["answer"]) == 1.0
    assert generate_examples(task, 50, seed=5) == rows[:50]  # deterministic prefix
    assert generate_examples(task, 50, seed=6) != rows[:50]
    assert t.example(random.Random(0)) == t.example(random.Random(0))


def test_make_splits_deterministic_and_disjoint(tmp_path):
    a = make_splits("add", 120, 30, seed=3, root=tmp_path)
    assert split_paths("add", 3, tmp_path)["train"].exists()
    b = make_splits("add", 120, 30, seed=3, root=tmp_path / "other")
    assert a == b
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}
    c = make_splits("add", 50, 10, seed=3, root=tmp_path)  # read back a prefix of the written files
    assert c["train"] == a["train"][:50] and c["eval"] == a["eval"][:10]


def test_shipped_reverse_split_is_reproducible():
    paths = split_paths("reverse", 0)
    assert paths["train"].exists(), "data/tasks/reverse_s0_train.jsonl should be shipped"
    shipped = make_splits("reverse", 3000, 200, seed=0)
    assert shipped == make_splits("reverse", 3000, 200, seed=0, root="/nonexistent-dir", write=False)
    assert sum(p.stat().st_size for p in paths.values()) < 300_000
