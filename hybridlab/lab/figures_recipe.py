"""Notebook 06's reading of the recipe study (`experiments.recipe_study`, stored in data/results/recipe_study.json)
and of the shortcut toy (`hybridlab.lab.shortcut`): figures, and the practitioner's table, all computed from the
stored numbers (nothing typed). matplotlib only; every figure passes `hybridlab.lab.figures.check_figure`.

The study's summary is {teacher: {"teacher_sampled_reward", "rules": {rule: {"final_reward": {"mean", "std", "n"},
..., "curves": {"eval_samples", "eval_reward", "eval_resp_len", ...}}}}}; a partial file (runs still going) has
fewer rules or seeds, and every reader here says what it lacks instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .figures_training import TEACHER_COLORS, _legend_below

TEACHERS = ("weak", "medium", "strong")
PARTS = ("dense_only", "rl_only")
RULE_COLORS = {
    "dense_only": "C0", "rl_only": "C1", "exact_hybrid": "C2", "myopic_hybrid": "C3", "trust_per_prompt": "C4",
    "trust_global": "C5", "sequential": "C6", "beta_anneal": "C8", "dense_gate": "C9",
}  # fmt: skip
LENGTH_RULES = ("dense_only", "rl_only", "exact_hybrid", "myopic_hybrid", "trust_per_prompt")


def study_status(study: Mapping) -> str:
    """'partial: N of M runs' while the study runs, 'complete: M runs' when it is done."""
    done, planned = study["runs_done"], study["runs_planned"]
    return f"partial: {done} of {planned} runs" if study["partial"] else f"complete: {planned} runs"


def teachers_of(study: Mapping) -> list[str]:
    """The teachers the stored summary has results for, weakest first."""
    return [n for n in TEACHERS if n in study["summary"]]


def final(study: Mapping, teacher: str, rule: str, key: str = "final_reward") -> dict | None:
    """{"mean", "std", "n"} of one rule's final value with one teacher (None: no run stored yet)."""
    d = study["summary"].get(teacher, {}).get("rules", {}).get(rule)
    return None if d is None else d[key]


def best_part(study: Mapping, teacher: str, key: str = "final_reward") -> tuple[str, dict] | None:
    """The better of dense-only and RL-only by mean final value (None while either is missing)."""
    parts = {p: final(study, teacher, p, key) for p in PARTS}
    if any(v is None for v in parts.values()):
        return None
    name = max(parts, key=lambda p: parts[p]["mean"])
    return name, parts[name]


def verdict(study: Mapping, teacher: str, rule: str, key: str = "final_reward") -> str:
    """'above' (by more than one std, the larger of the two), 'not above', or 'undecided (...)' when a value is
    missing or has fewer than 2 seeds (no spread to compare with)."""
    best, mine = best_part(study, teacher, key), final(study, teacher, rule, key)
    if best is None or mine is None:
        return "undecided (not run yet)"
    if min(mine["n"], best[1]["n"]) < 2:
        return f"undecided ({min(mine['n'], best[1]['n'])} seed)"
    margin, sd = mine["mean"] - best[1]["mean"], max(mine["std"], best[1]["std"])
    return "above" if margin > sd else "not above"


def _ms(d: Mapping | None) -> str:
    if d is None:
        return "—"
    return f"{d['mean']:.3f} ± {d['std']:.3f} (n={d['n']})" if d["n"] > 1 else f"{d['mean']:.3f} (n=1)"


def practitioner_table(study: Mapping, key: str = "final_reward") -> str:
    """Markdown: per teacher strength, the better part, the best of the other rules and whether it is above the
    better part by more than one standard deviation, the exact hybrid's evaluation length (start -> shortest) and
    the setting to start from (the best rule's preset and settings from the study)."""
    lines = [
        "| teacher (its sampled reward) | better part | best other rule | above the better part by > 1 std? | "
        "exact hybrid: eval length start -> shortest | start from |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in teachers_of(study):
        s = study["summary"][n]
        best = best_part(study, n, key)
        others = {r: d[key] for r, d in s["rules"].items() if r not in PARTS}
        top = max(others, key=lambda r: others[r]["mean"]) if others else None
        ex = s["rules"].get("exact_hybrid")
        length = (
            "—" if ex is None else f"{ex['initial_resp_len']['mean']:.1f} -> {ex['min_resp_len']['mean']:.1f}"
        )
        start = "—"
        if top is not None:
            spec = study["rules"][top]
            extra = ", ".join(f"{k}={v}" for k, v in spec["settings"].items())
            start = f"`{top}`: preset `{spec['preset']}`" + (f" + {extra}" if extra else "")
        lines.append(
            f"| {n} ({s['teacher_sampled_reward']:.2f}) | "
            f"{'—' if best is None else best[0] + ' ' + _ms(best[1])} | "
            f"{'—' if top is None else top + ' ' + _ms(others[top])} | "
            f"{'—' if top is None else verdict(study, n, top, key)} | {length} | {start} |"
        )
    return "\n".join(lines)


def plot_recipe_lengths(study: Mapping, rules: Sequence[str] = LENGTH_RULES) -> Figure:
    """Evaluation response length against samples, one panel per teacher, one colour per rule (mean over the
    stored seeds): the exact hybrid's fall is the short-answer shortcut."""
    names = teachers_of(study)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), squeeze=False)
    for ax, n in zip(axes[0], names):
        for r in rules:
            d = study["summary"][n]["rules"].get(r)
            if d is None:
                continue
            c = d["curves"]
            ax.plot(c["eval_samples"], c["eval_resp_len"], color=RULE_COLORS.get(r, "k"), lw=1.6,
                    label=f"{r} ({len(d['seeds'])} seed{'s' if len(d['seeds']) > 1 else ''})")  # fmt: skip
        ax.set(title=f"{n} teacher ({study['summary'][n]['teacher_sampled_reward']:.2f})",
               xlabel="student samples", ylabel="eval response length (tokens)")  # fmt: skip
        ax.grid(alpha=0.3)
    if not names:
        axes[0][0].set(title="no runs stored yet", xlabel="student samples", ylabel="eval response length")
    _legend_below(fig, axes[0][0], ncols=3)
    return fig


def plot_recipe_finals(study: Mapping, key: str = "final_reward") -> Figure:
    """Final reward (mean ± std over seeds) of every stored rule, one panel per teacher; the dashed line is the
    better part's mean, the dotted one the teacher's own sampled reward."""
    names = teachers_of(study)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.6), squeeze=False)
    for ax, n in zip(axes[0], names):
        s = study["summary"][n]
        rules = [r for r in RULE_COLORS if r in s["rules"]]
        for i, r in enumerate(rules):
            d = s["rules"][r][key]
            ax.errorbar([i], [d["mean"]], yerr=[d["std"]], fmt="o", color=RULE_COLORS[r], capsize=3, label=r)
        best = best_part(study, n, key)
        if best is not None:
            ax.axhline(best[1]["mean"], ls="--", color="0.4", lw=1, label="_better part")
        ax.axhline(s["teacher_sampled_reward"], ls=":", color=TEACHER_COLORS[n], lw=1.2, label="_teacher")
        ax.set_xticks(range(len(rules)), rules, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"{n} teacher (dotted: its reward {s['teacher_sampled_reward']:.2f})",
               xlabel="rule", ylabel="final eval reward")  # fmt: skip
        ax.grid(alpha=0.3, axis="y")
    if not names:
        axes[0][0].set(title="no runs stored yet", xlabel="rule", ylabel="final eval reward")
    fig.tight_layout()
    plt.close(fig)
    from .figures import check_figure

    check_figure(fig)
    return fig


def plot_shortcut(runs: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """The shortcut toy (`shortcut.shortcut_runs`): expected length, EOS probability, task reward and the cosine
    of the expected dense and future-KL terms per step, one colour per setting."""
    panels = (("length", "expected response length"), ("eos_rate", "EOS probability"),
              ("reward", "expected task reward"), ("cosine", "cos(dense, future-KL term)"))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for i, (label, h) in enumerate(runs.items()):
        for ax, (key, name) in zip(axes, panels):
            ax.plot(range(1, len(h[key]) + 1), h[key], color=f"C{i}", lw=1.6, label=label)
            ax.set(title=name, xlabel="update", ylabel=name)
            ax.grid(alpha=0.3)
    axes[3].set_ylim(-1.05, 1.05)
    _legend_below(fig, axes[0], ncols=3)
    return fig


def step_size_table(res: Mapping) -> str:
    """Markdown for `data/results/recipe_lr.json`: per teacher strength and rule, the final reward (mean ± std over
    seeds) at the recipe study's learning rate and at twice it, and the samples each seed needed to reach RL-only's
    final reward at the study's rate ("never" where it did not)."""
    lo, hi = res["reference_lr"], res["lr"]
    lines = [f"| teacher | rule | final reward, lr {lo:g} | final reward, lr {hi:g} | samples to RL-only's "
             f"{lo:g} final, lr {hi:g} (per seed) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for n, t in res["teachers"].items():
        for rule, d in t["rules"].items():
            reach = ", ".join("never" if x is None else f"{x:,}" for x in d["samples_to_rl_final_3e-4"])
            lines.append(f"| {n} | {rule} | {_ms(d['final_reward_3e-4'])} | {_ms(d['final_reward_6e-4'])} | "
                         f"{reach} |")  # fmt: skip
    return "\n".join(lines)
