"""The real-model comparison's bookkeeping, without the real model: method configs, results JSON from metrics
files (partial runs included), the final table, the targets and the figures."""

import json
import math

import pytest

from experiments import real_compare as rc
from hybridlab.lab import real_model as rm
from hybridlab.lab.figures import check_figure
from hybridlab.lab.figures_real import plot_compare, plot_teacher_advantage, running_mean
from hybridlab.train.config import PRESETS

CFG = str(rc.ROOT / "configs" / "real_cpu.yaml")


def test_each_method_is_the_yaml_with_its_preset_on_top(tmp_path):
    cfgs = {m: rc.method_config(CFG, m, tmp_path) for m in rc.METHODS}
    assert (cfgs["dense_only"].lam, cfgs["dense_only"].future, cfgs["dense_only"].baseline) == (
        0.0,
        "none",
        "none",
    )
    assert (cfgs["rl_only"].beta, cfgs["rl_only"].baseline) == (0.0, "reward_group")
    assert (cfgs["hybrid"].future, cfgs["hybrid"].baseline, cfgs["hybrid"].beta) == (
        "analytic",
        "return_group",
        0.1,
    )
    for m, c in cfgs.items():
        assert c.output_dir == str(tmp_path / m)
        for k, v in PRESETS[m].items():
            assert getattr(c, k) == v
    # equal samples: everything but the objective is the same
    keys = ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "lr", "seed", "prompts")
    assert len({tuple(getattr(c, k) for k in keys) for c in cfgs.values()}) == 1
    with pytest.raises(ValueError, match="method must be one of"):
        rc.method_config(CFG, "ppo", tmp_path)


def _fake_runs(root, steps, rewards, kls, per_step=16):
    for m in rc.METHODS:
        d = root / m
        d.mkdir(parents=True)
        lines = []
        for s in range(1, steps[m] + 1):
            row = {"step": s, "samples": per_step * s, "reward": rewards[m], "kl": kls[m], "eos_frac": 1.0,
                   "resp_len": 9.0, "grad_norm": 1.0, "step_s": 2.0}  # fmt: skip
            if s % 5 == 0:
                row.update(eval_step=s, eval_samples=per_step * s, eval_greedy_acc=rewards[m], eval_reward=rewards[m],
                           eval_kl=kls[m], eval_resp_len=9.0)  # fmt: skip
            lines.append(json.dumps(row))
        (d / "metrics.jsonl").write_text(
            "\n".join(lines) + "\n" + '{"step": 99, "sampl'
        )  # a line being written
        (d / "initial_eval.json").write_text(json.dumps(dict(eval_step=0, eval_samples=0, eval_greedy_acc=0.1,
                                                             eval_reward=0.05, eval_kl=7.0, eval_resp_len=11.0)))  # fmt: skip


def test_results_json_table_and_targets_from_metrics(tmp_path):
    rewards = {"dense_only": 0.5, "rl_only": 0.6, "hybrid": 0.9}
    kls = {"dense_only": 1.0, "rl_only": 6.0, "hybrid": 2.0}
    _fake_runs(tmp_path / "runs", {m: 20 for m in rc.METHODS}, rewards, kls)
    res = rc.collect(CFG, tmp_path / "runs", tmp_path / "out.json", wall={"total": 1.0})
    assert json.loads((tmp_path / "out.json").read_text()) == res
    assert res["complete"] and res["n_eval"] == 20 and res["responses_per_step"] == 16
    h = res["results"]["hybrid"]
    assert h["steps_done"] == 20 and h["eval"]["eval_step"] == [0, 5, 10, 15, 20]
    lo, hi = h["final"]["reward_last5_ci95"]
    assert lo < 0.9 < hi and h["final"]["reward_last5"] == pytest.approx(0.9)
    table = rm.final_table(res)
    assert [r["method"] for r in table] == list(rm.METHODS) and table[2]["samples"] == 320
    md = rm.format_table(table)
    assert md.count("\n") == 4 and "| hybrid | 20 (320) | 0.900" in md
    tg = rm.targets(res)
    assert tg["hybrid reward above dense-only and RL-only"]["met"]
    assert tg["hybrid reward above the teacher's sampled accuracy"]["met"]  # 0.9 > 0.7875
    assert tg["hybrid KL below RL-only's"]["met"]
    # negative control: a hybrid run that ends below RL-only misses the first target, and KL above it the third
    rewards["hybrid"], kls["hybrid"] = 0.55, 7.0
    _fake_runs(tmp_path / "worse", {m: 20 for m in rc.METHODS}, rewards, kls)
    bad = rm.targets(rc.collect(CFG, tmp_path / "worse", tmp_path / "worse.json"))
    assert (
        not bad["hybrid reward above dense-only and RL-only"]["met"]
        and not bad["hybrid KL below RL-only's"]["met"]
    )
    check_figure(plot_compare(res, teacher_sampled=0.79, student_sampled=0.03))


def test_a_shorter_repeat_with_another_seed_is_summarised_beside(tmp_path):
    same = dict.fromkeys(rc.METHODS, 0.5)
    _fake_runs(tmp_path / "s0", dict.fromkeys(rc.METHODS, 20), same, same)
    _fake_runs(tmp_path / "s1", dict.fromkeys(rc.METHODS, 10), same, same)
    res = rc.collect(
        CFG,
        tmp_path / "s0",
        tmp_path / "o.json",
        other_seeds={1: (tmp_path / "s1", {"seed": 1, "steps": 10})},
    )
    o = res["other_seeds"]["1"]
    assert (o["seed"], o["steps"], o["compared_at_step"], o["complete"]) == (1, 10, 10, True)
    assert [r["samples"] for r in rm.final_table(o)] == [160] * 3 and res["seed"] == 0
    rows = rm.seeds_at(res)
    assert [(r["seed"], r["step"]) for r in rows] == [(0, 10)] * 3 + [(1, 10)] * 3
    assert all(r["reward"] == pytest.approx(0.5) and r["eval_greedy_acc"] == pytest.approx(0.5) for r in rows)
    assert rm.seeds_at({**res, "other_seeds": {}}) == []
    assert rm.seeds_at(res, min_step=11) == []  # a repeat that has not reached min_step is left out
    with pytest.raises(ValueError, match="fewer than 30"):
        rm.at_step(res, 30)
    assert rc.run_command(CFG, "hybrid", tmp_path, {"seed": 1, "steps": 10})[-4:] == [
        "--seed",
        "1",
        "--steps",
        "10",
    ]


def test_partial_runs_are_marked_and_missing_ones_refused(tmp_path):
    _fake_runs(tmp_path, {"dense_only": 7, "rl_only": 7, "hybrid": 6}, dict.fromkeys(rc.METHODS, 0.5),
               dict.fromkeys(rc.METHODS, 1.0))  # fmt: skip
    res = rc.collect(CFG, tmp_path, tmp_path / "out.json")
    assert not res["complete"] and not res["results"]["rl_only"]["complete"]
    # compared at the step every run reached: equal samples
    assert res["compared_at_step"] == 6 and res["results"]["rl_only"]["steps_run"] == 7
    assert {r["steps_done"] for r in res["results"].values()} == {6}
    assert {r["samples"] for r in rm.final_table(res)} == {96}
    (tmp_path / "hybrid" / "metrics.jsonl").write_text("")
    res = rc.collect(CFG, tmp_path, tmp_path / "out.json")
    assert "final" not in res["results"]["hybrid"] or not res["results"]["hybrid"]["curves"]["step"]
    with pytest.raises(ValueError, match="no steps for"):
        rm.targets(res)


def test_wilson_and_running_mean():
    lo, hi = rc.wilson(8, 10)
    assert 0.4 < lo < 0.8 < hi < 1.0
    assert rc.wilson(0, 10)[0] == 0.0 and rc.wilson(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in rc.wilson(0, 0))
    assert list(running_mean([1, 2, 3, 4], 2)) == [1.0, 1.5, 2.5, 3.5]


def test_stored_probe_summary_and_teacher_figure():
    p = rm.probe_summary()
    assert p["teacher"]["sampled"] > p["student"]["sampled"] and p["student"]["n_eval"] == 40
    check_figure(plot_teacher_advantage(p, {"student": 0.1, "teacher": 0.8}))
