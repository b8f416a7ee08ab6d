"""Plotting helpers for the notebooks (matplotlib only).

Every function draws one figure with a title, labelled axes and units, closes it in pyplot (so a notebook shows it
once, as the cell's value) and returns the `Figure`. `check_figure` asserts those rules; the tests use it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.rcParams.setdefault("figure.dpi", 80)

import matplotlib.pyplot as plt  # noqa: E402  (after the rcParams default)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
UNITLESS = "(unitless)"


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def _wrap_labels(fig: Figure) -> None:
    """Wrap titles and y labels that would not fit their axes (no clipped titles, no label running into one)."""
    width_in, height_in = fig.get_size_inches()
    for ax in fig.axes:
        pos = ax.get_position()
        title = ax.get_title()
        chars = max(20, int(pos.width * width_in * 13))  # ~13 characters per inch at the title's font size
        if title and len(title) > chars and "\n" not in title:
            ax.set_title(textwrap.fill(title, chars))
        ylabel = ax.get_ylabel()
        chars = max(14, int(pos.height * height_in * 10))
        if ylabel and len(ylabel) > chars and "\n" not in ylabel:
            ax.set_ylabel(textwrap.fill(ylabel, chars))


def _done(fig: Figure) -> Figure:
    _wrap_labels(fig)
    fig.tight_layout()
    plt.close(fig)
    check_figure(fig)
    return fig


def check_figure(fig: Figure) -> None:
    """Raise AssertionError unless every visible axes has a title and both axis labels.

    A figure suptitle counts as every axes' title; a twin axes (twinx) shares its partner's title and x label but
    needs its own y label.
    """
    sup = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes, "figure has no axes"
    for ax in axes:
        twins = ax.get_shared_x_axes().get_siblings(ax)
        assert sup or any(t.get_title() for t in twins), f"axes {ax} has no title"
        assert any(t.get_xlabel() for t in twins), f"axes {ax.get_title()!r} has no x label"
        assert ax.get_ylabel(), f"axes {ax.get_title()!r} has no y label"


def bars(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "estimator variant",
    log: bool = False,
    hline: float | None = None,
    hline_label: str | None = None,
    colors: Sequence[str] | None = None,
    errors: Sequence[float] | None = None,
    annotate: bool = True,
) -> Figure:
    """One bar per label, optional log scale, error bars and a horizontal reference line."""
    vals = _np(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.6))
    x = np.arange(len(labels))
    shown = np.maximum(vals, 1e-17) if log else vals
    ax.bar(x, shown, color=colors or COLORS[0], yerr=None if errors is None else _np(errors), capsize=4)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    if log:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label=hline_label)
        if hline_label:
            ax.legend(loc="best", fontsize=8)
    if (
        annotate
    ):  # the value just beyond the bar's end (and its error bar): above if positive, below if negative
        errs = np.zeros_like(vals) if errors is None else np.abs(_np(errors))
        for xi, v, s, e in zip(x, vals, shown, errs):
            end = s * (1 + e / abs(v)) if log and v else (s + e if v >= 0 else s - e)
            ax.annotate(f"{v:.2g}", (xi, end), ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _done(fig)


def variance_changes(
    panels: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    title: str,
    xlabel: str = "baseline",
) -> Figure:
    """Side by side, one panel per toy: each baseline's change in variance against none (percent), with its
    standard error; green bars lower the variance, red ones raise it. `panels`: title -> {"change": name -> x,
    "se": name -> x} (what `hybridlab.lab.baselines.variance_changes` returns)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (name, res) in zip(axes[0], panels.items()):
        labels = list(res["change"])
        vals = 100 * np.array([res["change"][k] for k in labels])
        errs = 100 * np.array([res["se"][k] for k in labels])
        x = np.arange(len(labels))
        ax.bar(x, vals, yerr=errs, capsize=4, color=[COLORS[3] if v > 0 else COLORS[2] for v in vals])
        ax.axhline(0.0, color="k", ls="--", lw=1, label="no baseline")
        for xi, v, e in zip(x, vals, errs):
            ax.annotate(f"{v:+.0f}%", (xi, v + e if v >= 0 else v - e), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=8)  # fmt: skip
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set(title=name, xlabel=xlabel, ylabel="change in variance vs no baseline (%)")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    return _done(fig)


def relative_errors(
    labels: Sequence[str],
    errors: Sequence[float],
    *,
    title: str,
    threshold: float | None = 1e-2,
    target: str = "grad J",
) -> Figure:
    """Bar chart (log scale) of ||E[g_hat] - target|| / ||target|| per estimator variant (target: grad J)."""
    errs = _np(errors)
    colors = [COLORS[2] if e < (threshold or 0) else COLORS[3] for e in errs]
    return bars(
        labels,
        errs,
        title=title,
        ylabel=f"relative error vs {target} " + UNITLESS,
        log=True,
        hline=threshold,
        hline_label=None if threshold is None else f"visible-miss margin {threshold:g}",
        colors=colors,
    )


def cosines(labels: Sequence[str], values: Sequence[float], *, title: str) -> Figure:
    """Cosine between each variant's expected gradient and grad J, drawn as the angle (degrees) for visibility.

    Wrong estimators often keep a cosine near 1 (they point roughly uphill); the angle separates them. Each bar is
    annotated with its cosine.
    """
    cos = np.clip(_np(values), -1.0, 1.0)
    angle = np.degrees(np.arccos(cos))
    colors = [COLORS[2] if c > 1 - 1e-9 else COLORS[3] for c in cos]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.6))
    x = np.arange(len(labels))
    ax.bar(x, angle, color=colors)
    for xi, a, c in zip(x, angle, cos):
        ax.annotate(f"cos {c:.4f}", (xi, a), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylim(0, max(1.0, float(angle.max()) * 1.15))
    ax.set(title=title, xlabel="estimator variant", ylabel="angle to grad J (degrees)")
    return _done(fig)


def variances(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str = "tr Cov of the estimate (gradient units^2)",
    errors: Sequence[float] | None = None,
    xlabel: str = "estimator variant",
) -> Figure:
    """Bar chart of estimator variances (trace of the covariance), with optional error bars."""
    return bars(labels, values, title=title, ylabel=ylabel, errors=errors, xlabel=xlabel)


def lines(
    x,
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    markers: bool = True,
    styles: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Several labelled curves over the same x (or, with x=None, each over its own 1..len); `styles` and `colors`
    map a curve's name to its line style and colour (default: solid, the colour cycle)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (name, ys) in enumerate(curves.items()):
        y = _np(ys)
        xs = np.arange(1, len(y) + 1) if x is None else _np(x)
        ls = (styles or {}).get(name, "-")
        color = (colors or {}).get(name, COLORS[i % len(COLORS)])
        ax.plot(xs, y, ls, marker="o" if markers else None, ms=4, color=color, label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _done(fig)


def convergence(
    ns: Sequence[int],
    errors: Sequence[float],
    *,
    predicted: Sequence[float] | None = None,
    title: str = "Monte Carlo error falls as 1/sqrt(N)",
    label: str = "measured RMS error",
) -> Figure:
    """Log-log plot of the error of a Monte Carlo mean against N, with the 1/sqrt(N) prediction."""
    n = _np(ns)
    err = _np(errors)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.loglog(n, err, "o-", color=COLORS[0], label=label)
    if predicted is not None:
        ax.loglog(n, _np(predicted), "k--", label="prediction sqrt(tr Cov / N)")
    else:
        ax.loglog(n, err[0] * np.sqrt(n[0] / n), "k--", label="slope -1/2")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.set(title=title, xlabel="samples N (sequences)", ylabel="||mean - grad J|| (gradient units)")
    return _done(fig)


def vocab_gradients(
    panels: Sequence[Mapping],
    *,
    title: str = "Reverse-KL gradient across the vocabulary",
) -> Figure:
    """One row per (student, teacher) pair: p and q per token (left axis) and -dKL/dz (right axis).

    Each panel is a mapping with keys "p", "q", "grad" ([V] each) and "label".
    """
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        p, q, g = _np(panel["p"]), _np(panel["q"]), _np(panel["grad"])
        tok = np.arange(len(p))
        ax.plot(tok, q, color=COLORS[1], lw=2, label="teacher q")
        ax.plot(tok, p, color=COLORS[0], lw=2, label="student p")
        ax.set(title=panel["label"], xlabel="token id j", ylabel="probability " + UNITLESS)
        ax2 = ax.twinx()
        step = -g
        up = step > 0
        ax2.bar(
            tok[up], step[up], color=COLORS[3], alpha=0.5, width=1.0, label="raise logit j (-dKL/dz_j > 0)"
        )
        ax2.bar(
            tok[~up], step[~up], color=COLORS[0], alpha=0.35, width=1.0, label="lower logit j (-dKL/dz_j < 0)"
        )
        ax2.set_ylabel("-dKL/dz_j (nats per logit)")
        lim = float(np.abs(g).max()) * 1.1 or 1.0
        ax2.set_ylim(-lim, lim)
        top = max(float(p.max()), float(q.max())) * 1.15
        ax.set_ylim(-top, top)  # both axes symmetric: their zeros sit on the same line
        ax.axhline(0.0, color="0.3", lw=0.8)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    fig.suptitle(title)
    return _done(fig)


def optimum(
    labels: Sequence[str],
    teacher: Sequence[float],
    reward: Sequence[float],
    optima: Mapping[str, Sequence[float]],
    *,
    title: str = "The optimum pi* ~ pi_T exp(lam R / beta) as lam/beta grows",
) -> Figure:
    """pi*(y) for several weight ratios (bars) beside the teacher, responses sorted by reward (dots, right axis)."""
    r = _np(reward)
    order = np.argsort(r, kind="stable")
    fig, ax = plt.subplots(figsize=(min(10.0, 0.3 * len(labels) + 3), 4))
    k = len(optima) + 1
    width = 0.8 / k
    x = np.arange(len(labels))
    ax.bar(x - 0.4 + width / 2, _np(teacher)[order], width, color="0.6", label="teacher pi_T")
    for i, (name, probs) in enumerate(optima.items()):
        ax.bar(
            x - 0.4 + width * (i + 1.5), _np(probs)[order], width, color=COLORS[i % len(COLORS)], label=name
        )
    ax.set_xticks(x, [labels[i] for i in order], rotation=90, fontsize=7)
    ax.set(title=title, xlabel="response y (sorted by reward)", ylabel="probability of y " + UNITLESS)
    ax2 = ax.twinx()
    ax2.plot(x, r[order], "k.-", ms=6, lw=0.8, label="reward R(y)")
    ax2.set_ylabel("reward R(y) (reward units)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    return _done(fig)


def per_position(
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str = "E[KL_t(s_t)] (nats)",
    styles: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Per-position curves (e.g. the per-state KL along the response) for several students, over t = 1..T
    (the first token is t = 1, as in the text)."""
    first = next(iter(curves.values()))
    return lines(
        range(1, len(_np(first)) + 1),
        curves,
        title=title,
        xlabel="position t in the response (1 = first token)",
        ylabel=ylabel,
        styles=styles,
        colors=colors,
    )


def timings(
    sizes: Sequence[int],
    times_ms: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str = "vocabulary size V (tokens)",
) -> Figure:
    """Log-log timing plot (milliseconds) for several implementations over problem sizes."""
    return lines(
        sizes,
        times_ms,
        title=title,
        xlabel=xlabel,
        ylabel="forward + backward time (ms)",
        logx=True,
        logy=True,
    )


def histogram(
    samples: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    bins: int = 40,
) -> Figure:
    """Overlaid histograms (densities) of scalar samples."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, s) in enumerate(samples.items()):
        ax.hist(_np(s), bins=bins, density=True, alpha=0.5, color=COLORS[i % len(COLORS)], label=name)
    ax.legend(fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel="density (1 / x units)")
    return _done(fig)


ROLE_COLORS = {"past": "0.75", "step": COLORS[0], "future": COLORS[1], "reward": COLORS[2]}
ROLE_LABELS = {
    "past": "past t' < t: drops out (the score has mean 0 given s_t)",
    "step": "step t: its score term is replaced by the gradient of KL_t(s_t) at fixed s_t (dense)",
    "future": "future t' > t: -beta k_t' goes into the return",
    "reward": "reward: +lam R goes into the return",
}


def token_roles(
    logratios: Sequence[float],
    t: int,
    reward: float,
    vocab_terms: Sequence[float],
    *,
    sampled: int,
    tokens: Sequence[str],
    vocab: Sequence[str],
    lam: float,
    beta: float,
    title: str = "Where each term of the sequence KL goes, for the token at step t",
) -> Figure:
    """The decomposition for one token of one response, in three panels.

    Top: the response's log-ratios k_1..k_T (the terms of the sequence KL's sample) and the reward, coloured by
    their role for the score of the token at step `t` (1-based): past (drops out), step t (dense), future and
    reward (the return). Bottom left: the dense term at step t, p(a|s_t) log(p(a|s_t)/q(a|s_t)) for every token a
    of `vocab` (they sum to KL_t; the sampled token is outlined). Bottom right: the return G_t it multiplies.
    """
    k = _np(logratios)
    terms = _np(vocab_terms)
    n = len(k)
    if not 1 <= t <= n:
        raise ValueError(f"t must be a position 1..{n} of the response (1-based), got {t}")
    if len(tokens) != n or len(vocab) != len(terms) or not 0 <= sampled < len(terms):
        raise ValueError(
            f"shapes: {n} log-ratios need {n} tokens (got {len(tokens)}); {len(terms)} vocabulary terms need as "
            f"many vocab labels (got {len(vocab)}) and 0 <= sampled < {len(terms)} (got {sampled})"
        )
    roles = ["past" if i + 1 < t else "step" if i + 1 == t else "future" for i in range(n)]
    fig = plt.figure(figsize=(9, 6.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    top = fig.add_subplot(grid[0, :])
    x = np.arange(1, n + 1)
    for role in ("past", "step", "future"):
        idx = [i for i, r in enumerate(roles) if r == role]
        if idx:
            top.bar(x[idx], k[idx], color=ROLE_COLORS[role], edgecolor="k", label=ROLE_LABELS[role],
                    hatch="//" if role == "past" else None)  # fmt: skip
    top.bar([n + 1.3], [reward], color=ROLE_COLORS["reward"], edgecolor="k", label=ROLE_LABELS["reward"])
    kl_t = float(terms.sum())
    top.plot([t - 0.45, t + 0.45], [kl_t, kl_t], "k--", lw=1.5)
    top.annotate(
        f"KL_t(s_t) = {kl_t:.2f}, the mean of k_t over y_t (this sample: {k[t - 1]:.2f});\n"
        "the dense term is its gradient at fixed s_t, not its value in the return",
        (t + 0.45, kl_t),
        xytext=(6, 0),
        textcoords="offset points",
        fontsize=8,
        va="center",
        bbox=dict(boxstyle="round", fc="white", alpha=0.85),
    )
    top.axhline(0, color="k", lw=0.8)
    top.set_xticks(list(x) + [n + 1.3], [f"y{i}={tok!r}" for i, tok in zip(x, tokens)] + ["R(y)"])
    top.set(
        title=f"One response: its log-ratios k_t' and reward, seen from step t = {t}",
        xlabel="position t' in the response (token), then the reward",
        ylabel="k_t' (nats); R (reward units)",
    )
    top.legend(fontsize=7, loc="best")

    left = fig.add_subplot(grid[1, 0])
    edge = ["k" if a == sampled else "none" for a in range(len(terms))]
    widths = [2.5 if a == sampled else 0 for a in range(len(terms))]
    left.bar(np.arange(len(terms)), terms, color=ROLE_COLORS["step"], edgecolor=edge, linewidth=widths)
    left.axhline(0, color="k", lw=0.8)
    left.set_xticks(
        np.arange(len(terms)),
        [f"{v!r}" + (" (sampled)" if a == sampled else "") for a, v in enumerate(vocab)],
    )
    left.set(
        title=f"Dense term at step t: all tokens a (sum KL_t = {terms.sum():.3f})",
        xlabel="token a in the vocabulary",
        ylabel="p log(p/q) at s_t (nats)",
    )

    right = fig.add_subplot(grid[1, 1])
    future = float(k[t:].sum())
    parts = {"lam R": lam * reward, "-beta sum k_t' (t' > t)": -beta * future}
    parts["G_t (their sum)"] = sum(parts.values())
    right.bar(range(3), list(parts.values()), color=[ROLE_COLORS["reward"], ROLE_COLORS["future"], "0.35"],
              edgecolor="k")  # fmt: skip
    right.axhline(0, color="k", lw=0.8)
    right.set_xticks(range(3), list(parts), fontsize=8)
    right.set(
        title="Sparse term at step t: the return G_t",
        xlabel="part of the return",
        ylabel="return (reward units)",
    )
    fig.suptitle(title)
    return _done(fig)


def topk_gaps(
    ks: Sequence[int],
    gaps: Mapping[str, Mapping[int, Sequence[float]]],
    *,
    title: str = "Top-k teachers: per-row gap to the full KL",
    tol: float = 1e-9,
    linthresh: float = 0.01,
) -> Figure:
    """Every row's gap (estimate - full KL) against k, one strip of points per estimate, with the share of rows
    above zero (beyond rounding, `tol`) written over each strip: a lower bound never crosses zero; an estimate that
    is not a bound does. Symmetric-log y axis, linear within +-`linthresh`."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rng = np.random.default_rng(0)
    n_kinds = len(gaps)
    for i, (name, per_k) in enumerate(gaps.items()):
        offset = (i - (n_kinds - 1) / 2) * 0.3
        for j, k in enumerate(ks):
            y = _np(per_k[k])
            xs = j + offset + rng.uniform(-0.1, 0.1, size=len(y))
            ax.scatter(xs, y, s=4, alpha=0.35, color=COLORS[i % len(COLORS)], label=name if j == 0 else None)
            above = float((y > tol).mean())
            ax.annotate(f"{above:.0%}", (j + offset, float(y.max())), ha="center", va="bottom", fontsize=6,
                        color=COLORS[i % len(COLORS)])  # fmt: skip
    ax.axhline(0, color="k", lw=1, ls="--", label="full KL (gap 0)")
    ax.set_yscale(
        "symlog", linthresh=linthresh
    )  # small positive gaps stay visible next to large negative ones
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set(title=title, xlabel="teacher top-k size k (tokens); labels: share of rows above the full KL",
           ylabel="estimate - full KL (nats, symlog)")  # fmt: skip
    ax.legend(fontsize=8, markerscale=3, loc="upper left")
    ax.grid(alpha=0.3)
    return _done(fig)
