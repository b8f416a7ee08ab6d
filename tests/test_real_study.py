"""experiments.real_study: the study's summary and targets from metrics files (synthetic runs, no model)."""

import json

import pytest

from experiments import real_study as rs

CONFIG = "configs/real_cpu.yaml"


def _write_run(root, seed, method, rewards):
    d = root / f"seed{seed}" / method
    d.mkdir(parents=True)
    rows = []
    for i, r in enumerate(rewards, 1):
        row = {"step": i, "samples": 16 * i, "reward": r, "kl": 1.0 / i, "eos_frac": 1.0, "resp_len": 9.0,
               "grad_norm": 1.0, "step_s": 1.0}  # fmt: skip
        if i % 5 == 0:
            row.update(eval_step=i, eval_samples=16 * i, eval_greedy_acc=r, eval_reward=r, eval_kl=0.5,
                       eval_resp_len=9.0)  # fmt: skip
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _study(tmp_path, finals):
    for m, per_seed in finals.items():
        for s, f in enumerate(per_seed):
            _write_run(tmp_path, s, m, [0.1] * 15 + [f] * 5)
    return rs.collect(CONFIG, tmp_path, tmp_path / "out.json", seeds=(0, 1, 2))


def test_summary_is_the_mean_and_std_over_seeds(tmp_path):
    res = _study(tmp_path, {"dense_only": [0.8, 0.9, 1.0], "rl_only": [0.5, 0.6, 0.7], "hybrid": [0.7] * 3,
                            "hybrid_trust": [0.9, 0.95, 1.0]})  # fmt: skip
    d = res["summary"]["dense_only"]["reward_last5"]
    assert d["per_seed"] == pytest.approx([0.8, 0.9, 1.0]) and d["mean"] == pytest.approx(0.9)
    assert d["std"] == pytest.approx(0.1)  # sample std (n - 1)
    t = res["targets"]["rule_above_both_parts"]
    assert t["met"] and t["best_part"] == "dense_only" and t["margin"] == pytest.approx(0.05)
    assert t["seeds_won"] == 2 and t["seeds_compared"] == 3  # seed 2: a tie is not a win
    assert res["complete"] and json.loads((tmp_path / "out.json").read_text())["targets"] == res["targets"]


def test_a_rule_below_a_part_is_a_miss(tmp_path):
    """Negative control: the same collector reports a rule that ends below RL-only as missed."""
    res = _study(tmp_path, {"dense_only": [0.5] * 3, "rl_only": [0.9] * 3, "hybrid": [0.7] * 3,
                            "hybrid_trust": [0.8] * 3})  # fmt: skip
    assert not res["targets"]["rule_above_both_parts"]["met"]
    assert res["targets"]["rule_above_both_parts"]["best_part"] == "rl_only"
    assert res["targets"]["rule_above_teacher"]["met"] == (0.8 > res["teacher_sampled_exact"])


def test_incomplete_runs_stay_out_of_the_summary(tmp_path):
    _write_run(tmp_path, 0, "dense_only", [0.5] * 7)  # 7 of 20 steps
    res = rs.collect(CONFIG, tmp_path, None)
    assert "dense_only" not in res["summary"] and res["runs"]["dense_only"]["0"]["complete"] is False
    assert res["targets"] == {} and not res["complete"]
