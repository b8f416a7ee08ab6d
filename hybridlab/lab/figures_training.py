"""Figures and small helpers for the training notebooks (06: the method comparison and the teacher sweep; 07:
real runs of `hybridlab.train`). matplotlib only; every function returns a closed `Figure` that passes
`hybridlab.lab.figures.check_figure` (a title and both axis labels on every panel).

Colours keep one meaning across every panel of a figure, and across figures: a method (`METHOD_COLORS`), an
architecture (`ARCH_COLORS`) or a teacher strength (`TEACHER_COLORS`) always has the same colour; line style
carries the second meaning (greedy vs sampled, train batch vs evaluation).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .figures import check_figure

METHOD_COLORS = {"sft": "C4", "opd_sampled": "C3", "dense_only": "C0", "rl_only": "C1", "hybrid": "C2"}
ARCH_COLORS = {"llama": "C0", "qwen2": "C1", "gpt2": "C2"}
TEACHER_COLORS = {"weak": "C7", "medium": "C9", "strong": "C5"}
SWEEP_METHODS = ("dense_only", "rl_only", "hybrid")


def finish(fig: Figure) -> Figure:
    """Lay out, close in pyplot (the notebook shows it once, as the cell's value), check titles and labels."""
    fig.tight_layout()
    plt.close(fig)
    check_figure(fig)
    return fig


def _legend_below(fig: Figure, ax, ncols: int = 4) -> None:
    """One legend for the figure, under the panels: it never covers a curve."""
    handles, labels = [], []
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    fig.tight_layout(rect=(0, 0.1 + 0.04 * (len(labels) // (ncols + 1)), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncols=min(ncols, len(labels)), fontsize=8, frameon=False)
    plt.close(fig)
    check_figure(fig)


# --------------------------------------------------------------------------------------------- notebook 06


def plot_checkpoint_training(metas: Mapping[str, Mapping]) -> Figure:
    """Supervised training curves of shipped checkpoints (label -> meta.json with a "curve"): greedy accuracy
    (solid, circles) and sampled reward at tau = 1 (dashed, crosses), one colour per checkpoint."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, meta) in enumerate(metas.items()):
        c = meta["curve"]
        steps = [r["step"] for r in c]
        ax.plot(steps, [r["greedy_acc"] for r in c], "-o", ms=3, color=f"C{i}", label=f"{name}: greedy")
        ax.plot(
            steps, [r["sampled_reward"] for r in c], "--x", ms=3, color=f"C{i}", label=f"{name}: sampled, τ=1"
        )
    ax.set(title="Supervised training of the shipped checkpoints (stopped early)", xlabel="optimiser step (batch 64)",
           ylabel="exact-match accuracy on eval")  # fmt: skip
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, ncols=2)
    return fig


def plot_run(history: Mapping[str, Sequence[float]], name: str = "Hybrid run") -> Figure:
    """Task reward and KL to the teacher of one `Trainer` run: train batches (faint) and evaluations (dots)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title, ylabel in ((axes[0], "reward", "task reward", "exact-match reward"),
                                   (axes[1], "kl", "KL to the teacher", "sequence KL (nats)")):  # fmt: skip
        ax.plot(history["samples"], history[key], color="C0", alpha=0.35, label="train batch (sampled)")
        ax.plot(
            history["eval_samples"],
            history[f"eval_{key}"],
            "o-",
            color="C0",
            label="eval (student samples, τ=1)",
        )
        ax.set(title=f"{name}: {title}", xlabel="samples drawn", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0])
    return fig


def learning_curves(runs: Sequence[Mapping], key: str) -> dict[str, dict[str, np.ndarray]]:
    """{method: {"samples", "mean", "std"}} of history[key] over a method's runs, at the shared evaluations."""
    by: dict[str, list] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r["history"])
    out = {}
    for m, hs in by.items():
        n = min(len(h[key]) for h in hs)
        ys = np.array([h[key][:n] for h in hs], dtype=float)
        out[m] = {"samples": np.asarray(hs[0]["eval_samples"][:n], dtype=float), "mean": ys.mean(0),
                  "std": ys.std(0, ddof=1) if len(hs) > 1 else np.zeros(n)}  # fmt: skip
    return out


def _band(ax, c: Mapping, color: str, label: str, **kw) -> None:
    ax.plot(c["samples"], c["mean"], color=color, label=label, **kw)
    ax.fill_between(c["samples"], c["mean"] - c["std"], c["mean"] + c["std"], color=color, alpha=0.18, lw=0)


def plot_method_curves(runs: Sequence[Mapping], references: Mapping[str, float] = (),
                       methods: Sequence[str] | None = None, title: str = "") -> Figure:  # fmt: skip
    """Reward and KL learning curves per method (mean ± std over seeds); `references` are horizontal lines on the
    reward panel (label -> value), e.g. the teacher's sampled reward and the estimated optimum of J."""
    rew, kl = learning_curves(runs, "eval_reward"), learning_curves(runs, "eval_kl")
    methods = [m for m in (methods or METHOD_COLORS) if m in rew]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    n = len({r["seed"] for r in runs})
    for ax, curves, ylabel, name in ((axes[0], rew, "exact-match reward of own samples", "Task reward"),
                                     (axes[1], kl, "sequence KL to the teacher (nats)", "KL to the teacher")):  # fmt: skip
        for m in methods:
            _band(ax, curves[m], METHOD_COLORS[m], m)
        ax.set(title=f"{title}{name} (mean ± std, {n} seeds)", xlabel="samples drawn", ylabel=ylabel)
        ax.grid(alpha=0.3)
    for (label, value), ls in zip(dict(references).items(), (":", "--", "-.")):
        axes[0].axhline(value, color="k", ls=ls, lw=1, label=label)
    _legend_below(fig, axes[0], ncols=4)
    return fig


def final_per_seed(runs: Sequence[Mapping], method: str, key: str, window: int = 3) -> list[float]:
    """Mean of the last `window` values of history[key] for each run of `method`, ordered by seed."""
    rs = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
    return [statistics.fmean(r["history"][key][-window:]) for r in rs]


def plot_final_scatter(runs: Sequence[Mapping], points: Mapping[str, tuple[float, float]] = ()) -> Figure:
    """Where each run ends: final KL (x) against final reward (y), one dot per seed; `points` are extra labelled
    (KL, reward) markers (the teacher, the optimum of J)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, color in METHOD_COLORS.items():
        if any(r["method"] == m for r in runs):
            ax.scatter(final_per_seed(runs, m, "eval_kl"), final_per_seed(runs, m, "eval_reward"), color=color,
                       label=m)  # fmt: skip
    for (label, (x, y)), marker in zip(dict(points).items(), ("*", "P", "X")):
        ax.scatter([x], [y], marker=marker, s=140, color="k" if marker == "*" else "0.5", label=label)
    ax.set(title="Where each run ends: reward vs KL (one dot per seed)", xlabel="final sequence KL to teacher (nats)",
           ylabel="final exact-match reward")  # fmt: skip
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, ncols=4)
    return fig


def sweep_runs(result: Mapping, teacher: str) -> list[dict]:
    """The runs of one teacher of a teacher-sweep results file, as {"method", "seed", "history"} (RL-only's
    shared runs carry their KL to this teacher)."""
    out = []
    for r in result["runs"]:
        if r["teacher"] not in (None, teacher):
            continue
        h = dict(r["curve"])
        if r["teacher"] is None:
            h["eval_kl"] = r["kl_by_teacher"][teacher]
        out.append({"method": r["method"], "seed": r["seed"], "history": h})
    return out


def plot_teacher_sweep_curves(result: Mapping) -> Figure:
    """Reward learning curves per teacher strength (one panel each): dense-only, RL-only and hybrid, mean ± std
    over seeds; the dotted line is RL-only's final reward, the dashed grey one the teacher's sampled reward."""
    names = [n for n in TEACHER_COLORS if n in result["summary"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        curves = learning_curves(sweep_runs(result, name), "eval_reward")
        for m in SWEEP_METHODS:
            if m in curves:
                _band(ax, curves[m], METHOD_COLORS[m], m)
        s = result["summary"][name]
        if "rl_final_reward" in s:
            ax.axhline(s["rl_final_reward"], color=METHOD_COLORS["rl_only"], ls=":", lw=1.2,
                       label="RL-only's final reward")  # fmt: skip
        ax.axhline(s["teacher_sampled_reward"], color="0.45", ls="--", lw=1, label="teacher (sampled, τ=1)")
        ax.set(title=f"{name} teacher (sampled reward {s['teacher_sampled_reward']:.2f})", xlabel="samples drawn",
               ylabel="exact-match reward of own samples")  # fmt: skip
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0][0], ncols=5)
    return fig


def plot_teacher_sweep_summary(result: Mapping) -> Figure:
    """Against the teacher's sampled reward: each method's final reward and final KL (mean ± std over seeds),
    and the samples dense-only and hybrid need to reach RL-only's final reward, as a fraction of RL-only's (one dot
    per seed, side by side; the line at 1/4 is hybrid's target)."""
    names = [n for n in TEACHER_COLORS if n in result["summary"]]
    xs = [result["summary"][n]["teacher_sampled_reward"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, ylabel, title in ((axes[0], "final_reward", "final exact-match reward", "Final reward"),
                                   (axes[1], "final_kl", "final sequence KL to teacher (nats)", "Final KL to the teacher")):  # fmt: skip
        for m in SWEEP_METHODS:
            pts = [(x, result["summary"][n]["methods"][m][key]) for x, n in zip(xs, names)
                   if m in result["summary"][n]["methods"]]  # fmt: skip
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                            fmt="o-", capsize=3, color=METHOD_COLORS[m], label=m)  # fmt: skip
        ax.set(title=f"{title} by teacher strength", xlabel="teacher's sampled reward (τ = 1)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for x, n in zip(xs, names):
        meth = result["summary"][n]["methods"]
        if "hybrid" not in meth or "rl_only" not in meth:
            continue
        total = meth["rl_only"]["samples"]
        for m, dx in (("dense_only", -0.012), ("hybrid", 0.012)):  # side by side at each teacher
            if m not in meth:
                continue
            ys = [1.08 if s is None else s / total for s in meth[m]["samples_to_rl_final"]]
            ax.scatter([x + dx] * len(ys), ys, color=METHOD_COLORS[m], marker="o", alpha=0.7,
                       label=f"{m}, one seed (at the top: never)")  # fmt: skip
    ax.axhline(0.25, color="k", ls=":", lw=1, label="¼ of RL-only's samples")
    ax.axhline(1.0, color=METHOD_COLORS["rl_only"], ls="-", lw=1, label="RL-only's budget")
    ax.set(title="Samples to RL-only's final reward", xlabel="teacher's sampled reward (τ = 1)",
           ylabel="fraction of RL-only's samples", ylim=(0, 1.15))  # fmt: skip
    ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], ncols=6)
    return fig


# --------------------------------------------------------------------------------------------- notebook 07


def plot_logits_memory(v: int, h: int, chunk: int = 1024, ns: Sequence[int] | None = None) -> Figure:
    """Vocabulary-wide memory of the loss against the response tokens N of a micro-batch (bf16): materialised
    `hybrid_loss` (three [N, V] tensors) and the fused path (chunks of min(N, C) rows plus [V, H] buffers); the
    dotted line marks N = C, beyond which the fused path no longer grows."""
    from .memory import fused_bytes, materialised_bytes

    ns = list(ns or [2**k for k in range(8, 16)])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(ns, [sum(materialised_bytes(n, v).values()) / 2**30 for n in ns], "o-", color="C3",
            label="materialised (hybrid_loss on logits)")  # fmt: skip
    ax.plot(ns, [sum(fused_bytes(n, v, h, chunk).values()) / 2**30 for n in ns], "s-", color="C0",
            label=f"fused (hidden states + LM head, C = {chunk})")  # fmt: skip
    ax.axvline(chunk, color="0.5", ls=":", lw=1, label="N = C")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=f"Loss memory at V = {v:,}, H = {h}, bf16", xlabel="response tokens per micro-batch N",
           ylabel="vocabulary-wide memory (GiB)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    _legend_below(fig, ax, ncols=3)
    return fig


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` (one per optimiser step)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def plot_train_metrics(metrics: Mapping[str, Sequence[Mapping]]) -> Figure:
    """Runs of `hybridlab.train` (label -> metrics rows), one colour per run in every panel: KL to the teacher,
    task reward, gradient norm before clipping, learning rate."""
    panels = (("kl", "KL(student ‖ teacher) per sequence", "nats"),
              ("reward", "task reward of the sampled batch", "reward (partial credit)"),
              ("grad_norm", "gradient norm (before clipping)", "‖∇‖"),
              ("lr", "learning rate (warmup + cosine)", "learning rate"))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    for i, (name, rows) in enumerate(metrics.items()):
        color = ARCH_COLORS.get(name, f"C{i}")
        steps = [m["step"] for m in rows]
        for ax, (key, _, _) in zip(axes, panels):
            ax.plot(steps, [m[key] for m in rows], color=color, label=name)
    for ax, (_, title, ylabel) in zip(axes, panels):
        ax.set(title=title, xlabel="optimiser step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0])
    return fig


def tiny_run_overrides(
    tiny: Mapping, arch: str, output_dir: str | Path, steps: int, *extra: str
) -> list[str]:
    """Command-line flags that point a config (e.g. configs/tiny_cpu.yaml) at the models and prompts written by
    `hybridlab.scripts.make_tiny_models` (`tiny` is its return value)."""
    return [
        "--student", str(tiny[arch]["student"]), "--teacher", str(tiny[arch]["teacher"]),
        "--tokenizer", str(tiny["tokenizer"]["path"]), "--prompts", str(tiny["prompts"]["path"]),
        "--output_dir", str(output_dir), "--steps", str(steps), "--progress", "false", *extra,
    ]  # fmt: skip


def call_captured(fn, *args, **kwargs):
    """(fn(*args, **kwargs), what it wrote to stderr): the trainer's log lines and end-of-run summary, which a
    notebook would otherwise show in red, are returned as text to print or check."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        out = fn(*args, **kwargs)
    return out, buf.getvalue()
