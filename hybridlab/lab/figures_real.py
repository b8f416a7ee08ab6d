"""Figures for notebook 08 (a real pretrained model): the teacher's advantage before training and the comparison of
dense-only, RL-only and hybrid training, re-drawn from data/results/*.json. matplotlib only; every function returns
a closed `Figure` that passes `hybridlab.lab.figures.check_figure`. A method keeps its colour everywhere
(`hybridlab.lab.figures_training.METHOD_COLORS`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .figures_recipe import RULE_COLORS
from .figures_training import METHOD_COLORS, _legend_below

LABELS = {"dense_only": "dense only (on-policy distillation)", "rl_only": "RL only", "hybrid": "hybrid",
          "hybrid_trust": "hybrid_trust (myopic, beta x teacher's success rate)"}  # fmt: skip
# the trust rule keeps the colour it has in notebook 06's recipe figures
STUDY_COLORS = {**METHOD_COLORS, "hybrid_trust": RULE_COLORS["trust_per_prompt"]}


def running_mean(x: Sequence[float], k: int = 5) -> np.ndarray:
    """Mean of the last `k` values at each point (fewer at the start)."""
    x = np.asarray(x, dtype=float)
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - k, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_teacher_advantage(
    summary: Mapping[str, Mapping[str, float]], live: Mapping[str, float] | None = None
) -> Figure:
    """Exact match before training, student vs teacher (same weights + worked examples): greedy and sampled (T=1)
    from the stored probe, and optionally a live re-check ({"student": acc, "teacher": acc}, sampled)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    kinds = [("greedy", "stored: greedy"), ("sampled", "stored: sampled, T=1")]
    if live:
        kinds.append(("live", "live re-check: sampled, T=1"))
    width = 0.8 / len(kinds)
    for j, (key, label) in enumerate(kinds):
        vals = [live[w] if key == "live" else summary[w][key] for w in ("student", "teacher")]
        xs = np.arange(2) + (j - (len(kinds) - 1) / 2) * width
        ax.bar(xs, vals, width, color=f"C{7 + j}", label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(2), ["student: the question alone", "teacher: 2 worked examples first"])
    ax.set(title="Before training: the same weights, with and without examples", xlabel="prompt",
           ylabel="exact-match accuracy", ylim=(0, 1.1))  # fmt: skip
    ax.grid(alpha=0.3, axis="y")
    _legend_below(fig, ax, ncols=3)
    return fig


def plot_compare(
    res: Mapping, teacher_sampled: float | None = None, student_sampled: float | None = None
) -> Figure:
    """Training reward, KL to the teacher and eval greedy accuracy against samples seen, one colour per method
    (train batches faint, their 5-step running mean solid; evaluations as dots)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    for m, r in res["results"].items():
        c, e, col = r["curves"], r["eval"], METHOD_COLORS.get(m, "C5")
        if not c["step"]:
            continue
        for ax, key in ((axes[0], "reward"), (axes[1], "kl")):
            ax.plot(c["samples"], c[key], color=col, alpha=0.25, lw=1)
            ax.plot(c["samples"], running_mean(c[key]), color=col, lw=2, label=LABELS.get(m, m))
        axes[1].plot(e["eval_samples"], e["eval_kl"], "o", color=col, ms=4)
        axes[2].plot(e["eval_samples"], e["eval_greedy_acc"], "-o", color=col, ms=4)
    for v, label, style in ((teacher_sampled, "teacher before training (sampled)", "--"),
                            (student_sampled, "student before training (sampled)", ":")):  # fmt: skip
        if v is not None:
            axes[0].axhline(v, color="k", ls=style, lw=1, label=label)
    # line widths and markers carry the second meaning, the same for every method: say so in the legend
    axes[0].plot([], [], color="0.45", alpha=0.35, lw=1, label="thin, faint: one training step's batch")
    axes[0].plot([], [], color="0.45", lw=2, label="thick: its 5-step running mean")
    axes[1].plot([], [], "o", color="0.45", ms=4, label="dots: an evaluation on held-out questions")
    axes[0].set(title="Task reward of the training samples", xlabel="responses sampled",
                ylabel="exact match (T=1)", ylim=(-0.02, 1.02))  # fmt: skip
    axes[1].set(title="KL to the teacher (dots: eval)", xlabel="responses sampled",
                ylabel="sequence KL (nats)")  # fmt: skip
    axes[2].set(title="Greedy accuracy on the eval questions", xlabel="responses sampled",
                ylabel="exact match (greedy)", ylim=(-0.02, 1.02))  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], ncols=5)
    return fig


def plot_short_run(history: Mapping[str, Sequence[float]], title: str = "A short real run") -> Figure:
    """Reward and KL per step of a short in-notebook run."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, ylabel in ((axes[0], "reward", "exact match (T=1)"), (axes[1], "kl", "sequence KL (nats)")):
        ax.plot(history["step"], history[key], "-o", color=METHOD_COLORS["hybrid"])
        ax.set(title=f"{title}: {key}", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    from .figures import check_figure

    check_figure(fig)
    return fig


def plot_study(res: Mapping, teacher_sampled: float | None = None) -> Figure:
    """The study (`data/results/real_model_study.json`): per method, the mean over seeds of the 5-step running
    mean of the training reward, of the sequence KL to the teacher and of the response length, against responses
    sampled; the band spans the seeds' lowest and highest value at each point."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    for m, runs in res["runs"].items():
        done = [r for r in runs.values() if r["complete"]]
        if not done:
            continue
        col, x = STUDY_COLORS.get(m, "C5"), done[0]["curves"]["samples"]
        for ax, key in zip(axes, ("reward", "kl", "resp_len")):
            ys = np.array([running_mean(r["curves"][key]) for r in done])
            ax.fill_between(x, ys.min(0), ys.max(0), color=col, alpha=0.15, lw=0)
            ax.plot(x, ys.mean(0), color=col, lw=2, label=f"{LABELS.get(m, m)}, {len(done)} seeds")
    if teacher_sampled is not None:
        axes[0].axhline(teacher_sampled, color="k", ls="--", lw=1, label="teacher before training (sampled)")
    axes[0].fill_between([], [], [], color="0.45", alpha=0.15, label="band: lowest to highest seed")
    axes[0].set(title="Task reward of the training samples", xlabel="responses sampled",
                ylabel="exact match (T=1), 5-step mean", ylim=(-0.02, 1.02))  # fmt: skip
    axes[1].set(
        title="KL to the teacher", xlabel="responses sampled", ylabel="sequence KL (nats), 5-step mean"
    )
    axes[2].set(title="Response length", xlabel="responses sampled", ylabel="tokens, 5-step mean")
    for ax in axes:
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], ncols=3)
    return fig


__all__ = ["LABELS", "plot_compare", "plot_study", "plot_short_run", "plot_teacher_advantage", "running_mean"]
