"""Notebook 08's readers: the answers table prints plain text, and the comparison's legend explains its lines."""

from hybridlab.lab import real_model as rm
from hybridlab.lab.figures_real import plot_compare


def test_as_cell_is_plain_text_for_one_markdown_cell():
    assert rm.as_cell("8 + 7 = 15") == "8 + 7 = 15"  # no quotes, no repr
    assert rm.as_cell("The answer is:\n8 + 7 = 15") == "The answer is: ⏎ 8 + 7 = 15"
    assert rm.as_cell("a | b `c`") == "a \\| b \\`c\\`"
    assert rm.as_cell("  \n") == "(empty)"
    long = rm.as_cell("x" * 100, limit=20)
    assert len(long) == 20 and long.endswith("…")


def test_answers_table_has_one_row_per_question_and_no_reprs():
    g = [{"question": "What is 8 + 7?", "response": "8 + 7 = 15", "reward": 1.0},
         {"question": "What is 2 + 2?", "response": "Sure!\nIt is 4.", "reward": 0.0}]  # fmt: skip
    s = [dict(x, response=x["response"] + " ") for x in g for _ in range(2)]
    table = rm.answers_table(g, s, per_question=2)
    lines = table.splitlines()
    assert len(lines) == 2 + len(g)
    assert "'" not in table and "\\n" not in table  # no Python repr quotes or escaped newlines
    assert "Sure! ⏎ It is 4." in lines[3]
    for line in lines:
        assert line.count("|") - line.count("\\|") == 6, line


def test_compare_legend_explains_thick_and_thin_lines():
    curves = {"step": [1, 2], "samples": [16, 32], "reward": [0.0, 0.5], "kl": [1.0, 0.8]}
    ev = {"eval_samples": [0, 32], "eval_kl": [1.0, 0.7], "eval_greedy_acc": [0.1, 0.6]}
    res = {"results": {m: {"curves": curves, "eval": ev} for m in ("dense_only", "rl_only", "hybrid")}}
    fig = plot_compare(res, teacher_sampled=0.79)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any(lab.startswith("thin") for lab in labels) and any(lab.startswith("thick") for lab in labels)
    assert any(lab.startswith("dots") for lab in labels)
