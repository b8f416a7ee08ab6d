"""Figures of the training notebooks: labelled panels, one colour per method / architecture in every panel, data
drawn as given, legends outside the panels."""

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hybridlab.lab import figures_training as vt  # noqa: E402
from hybridlab.lab.figures import check_figure  # noqa: E402


def _runs(methods=("dense_only", "rl_only", "hybrid"), seeds=(0, 1, 2)):
    runs = []
    for m in methods:
        for s in seeds:
            r = np.linspace(0.1, 0.3 + 0.1 * len(m) / 10 + 0.01 * s, 5)
            runs.append({"method": m, "seed": s, "history": {
                "eval_samples": [0, 64, 128, 192, 256], "eval_reward": r.tolist(),
                "eval_kl": (3 - r).tolist(), "samples": [64, 128, 192, 256], "reward": [0.1] * 4,
                "kl": [1.0] * 4}})  # fmt: skip
    return runs


def _colors(ax):
    return [line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_method_curves_colours_and_bands():
    runs = _runs()
    fig = vt.plot_method_curves(runs, {"teacher": 0.4})
    check_figure(fig)
    rew_ax, kl_ax = fig.axes
    assert (
        _colors(rew_ax)[:3]
        == _colors(kl_ax)
        == [vt.METHOD_COLORS[m] for m in ("dense_only", "rl_only", "hybrid")]
    )
    hyb = [r["history"]["eval_reward"] for r in runs if r["method"] == "hybrid"]
    np.testing.assert_allclose(rew_ax.get_lines()[2].get_ydata(), np.mean(hyb, 0))
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert vt.final_per_seed(runs, "hybrid", "eval_reward", window=1) == [h[-1] for h in hyb]


def test_scatter_run_and_checkpoint_figures():
    runs = _runs()
    check_figure(vt.plot_final_scatter(runs, {"teacher": (0.0, 0.4)}))
    check_figure(vt.plot_run(runs[0]["history"]))
    meta = {"curve": [{"step": 10, "greedy_acc": 0.1, "sampled_reward": 0.0},
                      {"step": 20, "greedy_acc": 0.5, "sampled_reward": 0.2}]}  # fmt: skip
    fig = vt.plot_checkpoint_training({"teacher": meta, "student": meta})
    ax = fig.axes[0]
    assert [line.get_color() for line in ax.get_lines()] == [
        "C0",
        "C0",
        "C1",
        "C1",
    ]  # one colour per checkpoint


def _sweep_result():
    from experiments import teacher_sweep as ts

    recs = []
    for seed in (0, 1):
        r = {"eval_samples": [0, 640, 1280], "eval_reward": [0.1, 0.2, 0.3], "eval_kl": [3.0] * 3,
             "eval_greedy_acc": [0.1, 0.2, 0.3]}  # fmt: skip
        recs.append({"teacher": None, "method": "rl_only", "seed": seed, "curve": r,
                     "kl_by_teacher": {n: [1.0 + i] * 3 for i, n in enumerate(ts.NAMES)}})  # fmt: skip
        for name in ts.NAMES:
            for m, top in (("dense_only", 0.15), ("hybrid", 0.4)):
                c = dict(r, eval_reward=[0.1, top, top], eval_kl=[0.5] * 3)
                recs.append({"teacher": name, "method": m, "seed": seed, "curve": c})
    teachers = {n: {"eval_sampled_reward": x} for n, x in zip(ts.NAMES, (0.2, 0.5, 0.8))}
    return {"runs": recs, "summary": ts.summarize(recs, teachers)}


def test_teacher_sweep_figures():
    res = _sweep_result()
    runs = vt.sweep_runs(res, "strong")
    assert {r["method"] for r in runs} == {"dense_only", "rl_only", "hybrid"}
    assert [r["history"]["eval_kl"] for r in runs if r["method"] == "rl_only"][0] == [3.0] * 3  # strong's KL
    fig = vt.plot_teacher_sweep_curves(res)
    check_figure(fig)
    assert len(fig.axes) == 3
    fig = vt.plot_teacher_sweep_summary(res)
    check_figure(fig)
    # RL-only's final reward is the mean of its last three evaluations, 0.2; hybrid reaches it at its second
    # evaluation: 640 of 1280 samples = 0.5
    dense, hybrid = (np.asarray(col.get_offsets())[:, 1] for col in fig.axes[2].collections[:2])
    np.testing.assert_allclose(hybrid, [0.5, 0.5])
    np.testing.assert_allclose(dense, [1.08, 1.08])  # dense-only (0.15) never reaches it: drawn at the top


def test_memory_and_train_metrics(tmp_path):
    fig = vt.plot_logits_memory(4096, 64, chunk=256, ns=[64, 128, 256, 512, 1024])
    fused = fig.axes[0].get_lines()[1].get_ydata()
    assert fused[2] == fused[3] == fused[4] and fused[0] < fused[2]  # grows until N = C, then flat
    rows = [{"step": i, "kl": 2.0 / i, "reward": 0.0, "grad_norm": 1.0, "lr": 1e-3} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert vt.read_metrics(tmp_path) == rows
    fig = vt.plot_train_metrics({"llama": rows, "qwen2": rows})
    check_figure(fig)
    for ax in fig.axes:  # the same colour means the same run in every panel
        assert _colors(ax) == [vt.ARCH_COLORS["llama"], vt.ARCH_COLORS["qwen2"]]
    assert [ax.get_title() for ax in fig.axes][2].startswith("gradient norm")


def test_tiny_run_overrides():
    tiny = {"llama": {"student": "s", "teacher": "t"}, "tokenizer": {"path": "tok"}, "prompts": {"path": "p"}}
    args = vt.tiny_run_overrides(tiny, "llama", "out", 7, "--x", "1")
    assert args[args.index("--steps") + 1] == "7" and args[-2:] == ["--x", "1"]
    with pytest.raises(KeyError):
        vt.tiny_run_overrides(tiny, "qwen2", "out", 7)


def test_call_captured():
    import sys

    def noisy(x):
        print("log line", file=sys.stderr)
        return x + 1

    assert vt.call_captured(noisy, 1) == (2, "log line\n")
