"""Notebook 06's readers of the recipe study: verdicts and the practitioner's table from stored numbers."""

import copy

import pytest

from hybridlab.lab import figures_recipe as FR


def rule(mean, std, n, length=(5.6, 5.0)):
    d = {"mean": mean, "std": std, "n": n}
    curves = {"eval_samples": [0, 640], "eval_reward": [0.1, mean], "eval_resp_len": list(length),
              "eval_kl": [3.0, 2.0], "eval_eos_frac": [1.0, 1.0]}  # fmt: skip
    return {"seeds": list(range(n)), "final_reward": d, "final_reward_multi": d, "curves": curves,
            "initial_resp_len": {"mean": length[0]}, "min_resp_len": {"mean": min(length)}}  # fmt: skip


def study(**rules):
    return {
        "partial": True, "runs_done": 4, "runs_planned": 75,
        "rules": {"trust_per_prompt": {"preset": "hybrid_trust", "settings": {}},
                  "exact_hybrid": {"preset": "hybrid", "settings": {}},
                  "myopic_hybrid": {"preset": "hybrid", "settings": {"future": "none"}}},
        "summary": {"strong": {"teacher_sampled_reward": 0.85, "rules": rules}},
    }  # fmt: skip


def test_verdicts_need_two_seeds_and_a_margin_above_one_std():
    s = study(dense_only=rule(0.40, 0.02, 3), rl_only=rule(0.30, 0.01, 3), trust_per_prompt=rule(0.45, 0.02, 3),
              exact_hybrid=rule(0.41, 0.02, 3), myopic_hybrid=rule(0.5, 0.0, 1))  # fmt: skip
    assert FR.verdict(s, "strong", "trust_per_prompt") == "above"
    assert FR.verdict(s, "strong", "exact_hybrid") == "not above"  # 0.01 < one std
    assert FR.verdict(s, "strong", "myopic_hybrid").startswith("undecided (1 seed")
    assert FR.verdict(s, "medium", "exact_hybrid").startswith("undecided (not run")
    assert FR.best_part(s, "strong")[0] == "dense_only"
    assert FR.study_status(s) == "partial: 4 of 75 runs"
    done = dict(s, partial=False, runs_done=75)
    assert FR.study_status(done) == "complete: 75 runs"


def test_practitioner_table_reads_the_numbers_and_names_the_setting():
    s = study(dense_only=rule(0.40, 0.02, 3), rl_only=rule(0.30, 0.01, 3), trust_per_prompt=rule(0.45, 0.02, 3),
              exact_hybrid=rule(0.26, 0.02, 3, length=(5.7, 2.8)))  # fmt: skip
    table = FR.practitioner_table(s)
    assert "0.450 ± 0.020 (n=3)" in table and "| above |" in table
    assert "5.7 -> 2.8" in table and "preset `hybrid_trust`" in table
    s2 = copy.deepcopy(s)
    s2["summary"]["strong"]["rules"]["trust_per_prompt"] = rule(0.41, 0.02, 3)
    assert "| not above |" in FR.practitioner_table(s2)  # the same table, a miss reported as a miss
    for line in table.splitlines():
        assert line.count("|") == 7, line


def test_figures_draw_partial_and_empty_studies():
    s = study(dense_only=rule(0.40, 0.02, 3), exact_hybrid=rule(0.26, 0.02, 1))
    for fig in (FR.plot_recipe_lengths(s), FR.plot_recipe_finals(s)):
        assert fig.axes
    empty = dict(s, summary={})
    assert FR.teachers_of(empty) == [] and FR.plot_recipe_finals(empty).axes
    assert FR.final(s, "strong", "rl_only") is None


def test_shortcut_figure():
    h = {k: [1.0, 0.5] for k in ("length", "eos_rate", "reward", "cosine")}
    assert len(FR.plot_shortcut({"a": h, "b": h}).axes) == 4
    with pytest.raises(KeyError):
        FR.plot_shortcut({"a": {"length": [1.0]}})
