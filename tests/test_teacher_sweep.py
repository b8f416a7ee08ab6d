"""The teacher-strength sweep (experiments.teacher_sweep): RL-only's run does not depend on the teacher (so
one run per seed serves every teacher), per-teacher summaries, the two targets, argument checks."""

import pytest
import torch

from experiments import teacher_sweep as ts
from experiments.compare import comparison_config, parse_args
from hybridlab.tasks.models import build_model, build_tokenizer
from hybridlab.tasks.toy import make_splits
from hybridlab.train import Trainer


def _train(method: str, teacher_seed: int, kl_teachers=None):
    tok = build_tokenizer()
    student = build_model("llama", "tiny", vocab_size=len(tok), seed=0)
    teacher = build_model("llama", "tiny", vocab_size=len(tok), seed=teacher_seed)
    splits = make_splits("reverse", 40, 8, seed=0, write=False)
    args = parse_args(["--steps", "2", "--batch-prompts", "4", "--samples-per-prompt", "2", "--no-progress"])
    cfg = comparison_config("reverse", method, 0, args).replace(eval_every=1)
    cls = ts._kl_trainer_class() if kl_teachers is not None else Trainer
    tr = cls(cfg, student=student, teacher=teacher, tokenizer=tok, prompts=splits["train"],
             eval_prompts=splits["eval"])  # fmt: skip
    if kl_teachers is not None:
        tr.kl_teachers = {"own": teacher, "other": build_model("llama", "tiny", vocab_size=len(tok), seed=9)}
    tr.train()
    return tr


def test_rl_only_updates_ignore_the_teacher_and_hybrid_does_not():
    a, b = _train("rl_only", 1), _train("rl_only", 2)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.history["eval_reward"] == b.history["eval_reward"]
    assert a.history["eval_kl"] != b.history["eval_kl"]  # only the measured KL changes
    h1, h2 = _train("hybrid", 1), _train("hybrid", 2)  # negative control: hybrid reads the teacher
    assert any(not torch.equal(p, q) for p, q in zip(h1.model.parameters(), h2.model.parameters()))


def test_kl_to_other_teachers_is_measured_on_the_evaluation_samples():
    tr = _train("rl_only", 1, kl_teachers=True)
    assert tr.history["eval_kl_own"] == pytest.approx(tr.history["eval_kl"], rel=1e-6)
    assert tr.history["eval_kl_other"] != pytest.approx(tr.history["eval_kl"], rel=1e-3)


def _record(teacher, method, seed, rewards, kl=1.0):
    n = len(rewards)
    curve = {"eval_samples": [64 * 10 * i for i in range(n)], "eval_reward": list(rewards),
             "eval_kl": [kl] * n, "eval_greedy_acc": list(rewards)}  # fmt: skip
    rec = {"teacher": teacher, "method": method, "seed": seed, "wall_s": 1.0, "curve": curve}
    if teacher is None:
        rec["kl_by_teacher"] = {n_: [kl + i] * n for i, n_ in enumerate(ts.NAMES)}
    return rec


def _records(hybrid_strong, hybrid_weak):
    recs = []
    for seed in (0, 1):
        recs.append(_record(None, "rl_only", seed, [0.1, 0.2, 0.3, 0.5, 0.5, 0.5]))
        for name in ts.NAMES:
            recs.append(_record(name, "dense_only", seed, [0.1, 0.2, 0.2, 0.3, 0.3, 0.3]))
            h = hybrid_strong if name == "strong" else hybrid_weak
            recs.append(_record(name, "hybrid", seed, h))
    return recs


TEACHERS = {n: {"eval_sampled_reward": r} for n, r in zip(ts.NAMES, (0.2, 0.45, 0.8))}


def test_summary_and_targets_met():
    recs = _records([0.1, 0.5, 0.6, 0.6, 0.6, 0.6], [0.1, 0.2, 0.3, 0.6, 0.6, 0.6])
    summary = ts.summarize(recs, TEACHERS)
    assert set(summary) == set(ts.NAMES)
    rl = summary["medium"]["methods"]["rl_only"]
    assert rl["final_kl"]["mean"] == pytest.approx(2.0)  # RL-only's KL to the medium teacher (index 1)
    assert rl["final_reward"]["mean"] == pytest.approx(0.5)
    t = ts.targets(summary)
    assert t["strong_hybrid_samples_to_rl_final_median"] == 640  # second evaluation: 1 x 10 steps x 64
    assert t["strong_rl_only_samples"] == 3200 and t["strong_hybrid_within_quarter"]
    assert t["weak_hybrid_at_least_best_other"]


def test_targets_missed():
    # strong: hybrid reaches 0.5 only at the 4th evaluation (1920 > 3200 / 4); weak: hybrid ends below RL-only
    recs = _records([0.1, 0.2, 0.3, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.35, 0.35, 0.35])
    t = ts.targets(ts.summarize(recs, TEACHERS))
    assert t["strong_hybrid_samples_to_rl_final_median"] == 1920 and not t["strong_hybrid_within_quarter"]
    assert not t["weak_hybrid_at_least_best_other"]
    # a seed that never reaches RL-only's final reward fails the target
    recs = _records([0.1, 0.2, 0.3, 0.45, 0.45, 0.45], [0.6] * 6)
    t = ts.targets(ts.summarize(recs, TEACHERS))
    assert t["strong_hybrid_samples_to_rl_final_median"] is None and not t["strong_hybrid_within_quarter"]


def test_plan_and_arguments(tmp_path):
    args = ts.parse_args(["--out", str(tmp_path / "r.json"), "--seeds", "0", "1"])
    jobs = ts.plan(args)
    assert len(jobs) == 2 * (1 + 2 * len(ts.NAMES)) and jobs[0] == (None, "rl_only", 0)
    assert ts.run_path(args, None, "rl_only", 1).name == "any__rl_only__s1.json"
    with pytest.raises(SystemExit):
        ts.parse_args(["--targets", "0.5", "0.2", "0.8", "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit):
        ts.parse_args(["--out", "data/results/x.json"])
