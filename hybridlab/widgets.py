"""The mixing-weights lab: ipywidgets controls that drive training, and live figures of what happens.

    J(theta) = E_y[ lam R(y) ] - beta KL(pi_theta || pi_T),      pi* ∝ pi_T exp(lam R / beta)

A student `TinyPolicy` learns on an enumerable toy (vocabulary {a, b, EOS}, at most 3 tokens: 15 responses)
from a fixed teacher. Every metric is exact (the space is enumerated); only the *gradient* depends on the mode:

- ``mode="exact"``: the expected estimator (`enumerated_loss`, every response weighted by pi_theta(y));
- ``mode="sampled"``: Monte Carlo batches of `samples` responses through `hybrid_loss`, with the per-sample
  spread giving the variance of the step's gradient estimate.

Exact mode computes an expectation, which no valid baseline changes, so it ignores `baseline`; and
``normalize="tokens"`` has no random denominator there (it acts as a constant normaliser: its small bias only
exists in sampled mode). Gradient norms are reported on the scale of grad J in both modes.

Python API (the controls call the same methods)::

    lab = MixingLab(seed=0)
    lab.widget                                  # display this in a notebook
    lab.set(lam=1.0, beta=0.5, mode="sampled")  # validates; the widgets follow
    lab.run(steps=200); lab.step(); lab.reset()
    lab.history["reward"], lab.history["kl"]    # one entry per optimiser step

Figures are rendered with Agg into an `ipywidgets.Image`, so they update in place (no flicker, no new outputs)
whatever the matplotlib backend, and redraw a few times a second while a run is in progress. The widgets (and
the live figure) are built the first time `lab.widget` (or `controls`, `buttons`, `image`) is used: a lab driven
from Python only renders its dashboard when asked (`lab.show()`), and a notebook stores widget state only for the
labs it displays.

cos(dense, sparse) is shown only where both gradient norms exceed `COSINE_MIN_NORM` times the run's largest
norm (`visible_cosine`): the angle between two vanishing vectors is rounding noise (it swings between -1 and 1
once pure imitation has converged), and with beta = 0 or lam = beta = 0 one part is exactly zero.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import ipywidgets as W
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .exact import (
    DTYPE,
    TinyPolicy,
    enumerate_sequences,
    enumerated_loss,
    prefix_codes,
    reward_table,
    sample,
    sequence_codes,
    sequence_probs,
    tilted_distribution,
    token_logprobs,
    total_variation,
)
from .hybrid import NORMALIZATIONS, hybrid_loss
from .sparse import FUTURE_ESTIMATORS

VOCAB, HORIZON = 3, 3
TOKENS = ("a", "b", ".")  # "." is EOS (token id 2)
LOOPHOLE = (1, 1, 1)  # "bbb": the response the loophole reward over-values and the teacher almost never says
LOOPHOLE_REWARD = 2.0
MODES = ("exact", "sampled")
BASELINES = ("none", "reward_group", "return_group")
REWARDS = ("count0", "loophole", "random")
METRICS = (
    "step",
    "reward",
    "kl",
    "objective",
    "dist_to_opt",
    "hack",
    "dense_norm",
    "sparse_norm",
    "cosine",
    "grad_var",
)
DEFAULTS = {
    "lam": 1.0,
    "beta": 0.5,
    "gamma": 1.0,
    "lr": 0.1,
    "samples": 32,
    "steps": 100,
    "future": "analytic",
    "baseline": "none",
    "normalize": "sequences",
    "mode": "exact",
    "reward": "count0",
}
#: cos(dense, sparse) is drawn only where both norms exceed this fraction of the run's largest gradient norm.
COSINE_MIN_NORM = 1e-3
_CHOICES = {
    "future": FUTURE_ESTIMATORS,
    "baseline": BASELINES,
    "normalize": NORMALIZATIONS,
    "mode": MODES,
    "reward": REWARDS,
}


# ----------------------------------------------------------------------------------------------- the toy world


def response_label(actions: Sequence[int], mask: Sequence[bool]) -> str:
    """'ab.' for the response a, b, EOS."""
    return "".join(TOKENS[int(a)] for a, m in zip(actions, mask) if m)


def make_teacher(space) -> TinyPolicy:
    """A fixed tabular teacher: likes 'a', sometimes 'b', rarely says a third 'b' after 'bb' (pi_T(bbb) ≈ 0.2%)."""
    teacher = TinyPolicy(space.vocab, space.horizon, kind="tabular", seed=0)
    usual = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE).log()
    after_bb = torch.tensor([0.6, 0.02, 0.38], dtype=DTYPE).log()
    codes = prefix_codes(space.actions, space.vocab)
    with torch.no_grad():
        teacher.table.copy_(usual.expand_as(teacher.table))
        for s in range(space.size):
            for t in range(2, space.horizon):
                if space.mask[s, t] and tuple(space.actions[s, t - 2 : t].tolist()) == (1, 1):
                    teacher.table[codes[s, t]] = after_bb
    teacher.requires_grad_(False)
    return teacher


def table_reward(space, values: torch.Tensor) -> Callable:
    """R(actions, mask) -> [B] from one value per response of `space` (a reward table over the enumeration)."""
    codes = sequence_codes(space.actions, space.mask, space.vocab)
    table = torch.zeros((space.vocab + 1) ** space.horizon + 1, dtype=DTYPE)
    table[codes] = values.to(DTYPE)
    return lambda actions, mask: table[sequence_codes(actions, mask, space.vocab)]


def make_reward(space, kind: str, seed: int = 0) -> Callable:
    """ "count0": fraction of the 3 slots that say 'a' (the honest task); "random": N(0, 1) per response;
    "loophole": count0, except that the reward model scores the degenerate 'bbb' at 2 (above any honest answer)."""
    if kind in ("count0", "random"):
        return reward_table(space, kind, seed=seed)
    if kind == "loophole":
        values = reward_table(space, "count0")(space.actions, space.mask).clone()
        values[_response_index(space, LOOPHOLE)] = LOOPHOLE_REWARD
        return table_reward(space, values)
    raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")


def _response_index(space, response: Sequence[int]) -> int:
    for s in range(space.size):
        if tuple(space.actions[s][space.mask[s]].tolist()) == tuple(response):
            return s
    raise ValueError(f"response {response} is not in the space")


def optimal_policy(logq: torch.Tensor, rewards: torch.Tensor, lam: float, beta: float) -> torch.Tensor | None:
    """pi* ∝ pi_T exp(lam R / beta) over the enumeration; beta = 0: the teacher restricted to argmax R (the
    limit); None when lam = beta = 0 (J is constant)."""
    if lam == 0 and beta == 0:
        return None
    return tilted_distribution(logq, rewards, lam=lam, beta=beta)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread (restored afterwards): the lab's tensors are tiny, and on a busy CPU extra threads
    only spin (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trace_variance(per: torch.Tensor) -> float:
    """per [n, P]: per-sample gradients summing to the batch gradient. The trace of the covariance of the batch
    estimate, sum_b ||u_b - mean u||^2 / ((n - 1) n), with single-sample estimates u_b = n per_b."""
    n = per.shape[0]
    u = n * per
    return float((u - u.mean(0)).pow(2).sum() / ((n - 1) * n))


# --------------------------------------------------------------------------------------------------- plotting


def visible_cosine(history: Mapping[str, Sequence[float]], rel: float = COSINE_MIN_NORM) -> np.ndarray:
    """history["cosine"] with NaN (not drawn) wherever min(dense_norm, sparse_norm) < rel x the largest norm of
    the run: there the angle is between vanishing (or exactly zero) vectors and carries no information."""
    cos = np.asarray(history["cosine"], dtype=float)
    d = np.asarray(history["dense_norm"], dtype=float)
    sp = np.asarray(history["sparse_norm"], dtype=float)
    if cos.size == 0:
        return cos
    peak = float(np.nanmax(np.maximum(d, sp)))
    small = np.minimum(d, sp) < rel * peak if peak > 0 else np.ones_like(cos, dtype=bool)
    return np.where(small, np.nan, cos)


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """Render a (pyplot-free) matplotlib Figure to PNG bytes with Agg."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _fast_png(fig: Figure) -> bytes:
    """Draw at the figure's dpi with a fixed layout and encode with light compression (~0.1 s for the dashboard)."""
    from PIL import Image

    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="png", compress_level=1)
    return buf.getvalue()


def png_image(fig: Figure):
    """An IPython Image of the figure (shows inline under any matplotlib backend, Agg included)."""
    from IPython.display import Image

    return Image(data=figure_png(fig), format="png")


_TITLES = {
    "reward": "task reward  E[R]",
    "kl": "KL(π‖π_T)  (sequence)",
    "objective": "J = λE[R] − βKL",
    "dist_to_opt": "TV distance to π*",
    "hack": "P(loophole 'bbb')",
    "dense_norm": "‖dense‖",
    "sparse_norm": "‖sparse‖",
    "cosine": "cos(dense, sparse)",
    "grad_var": "gradient variance (trace)",
}


_YLABELS = {
    "reward": "E[R]",
    "kl": "KL (nats)",
    "objective": "J",
    "dist_to_opt": "TV distance",
    "hack": "probability",
    "dense_norm": "norm (∇J scale)",
    "sparse_norm": "norm (∇J scale)",
    "norms": "norm (∇J scale)",
    "cosine": "cosine",
    "grad_var": "trace of covariance",
    "dist": "probability",
}


def _series(hist: Mapping[str, Sequence[float]], key: str) -> np.ndarray:
    if key == "cosine" and {"dense_norm", "sparse_norm"} <= set(hist):
        return visible_cosine(hist)
    return np.asarray(hist[key], dtype=float)


def plot_histories(
    runs: Mapping[str, Mapping[str, Sequence[float]]],
    keys: Sequence[str] = ("reward", "kl", "dist_to_opt"),
    *,
    ncols: int | None = None,
    logy: Sequence[str] = ("grad_var",),
    title: str | None = None,
) -> Figure:
    """Compare several labs' histories: one panel per key, one line per run (label -> history). The legend sits
    below the panels (it never covers a curve); "cosine" is drawn only where it is defined (`visible_cosine`)."""
    ncols = ncols or min(len(keys), 4)
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.5 * nrows + 0.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for label, hist in runs.items():
            y = _series(hist, key)
            x = np.asarray(hist.get("step", range(1, len(y) + 1)), dtype=float)
            ax.plot(x, y, label=label, lw=1.5)
        if key in logy and _has_positive(ax):
            ax.set_yscale("log")
        ax.set_title(_TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("optimiser step", fontsize=9)
        ax.set_ylabel(_YLABELS.get(key, key), fontsize=9)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    longest = max((len(h[keys[0]]) for h in runs.values()), default=1)
    for ax in axes[: len(keys)]:
        ax.set_xlim(0.5, longest + 0.5)  # hidden stretches (cosine) keep the full range of steps
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9, frameon=False
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _has_positive(ax) -> bool:
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=float)
        if np.any(np.isfinite(y) & (y > 0)):
            return True
    return False


class _Dashboard:
    """The lab's live figure: 7 time series and the current distribution over the 15 responses."""

    SERIES = (  # panel -> lines in it
        ("reward", ("reward",)),
        ("kl", ("kl",)),
        ("dist_to_opt", ("dist_to_opt",)),
        ("objective", ("objective",)),
        ("norms", ("dense_norm", "sparse_norm")),
        ("cosine", ("cosine",)),
        ("grad_var", ("grad_var",)),
    )

    def __init__(self, labels: Sequence[str], loophole_index: int):
        self.fig = Figure(figsize=(12.5, 6.0), dpi=80)
        FigureCanvasAgg(self.fig)
        axes = self.fig.subplots(2, 4).ravel()
        # A fixed layout: a layout engine would re-measure every label at every redraw (2x slower).
        self.fig.subplots_adjust(left=0.06, right=0.99, top=0.94, bottom=0.14, wspace=0.42, hspace=0.45)
        self.axes: dict[str, object] = {}
        self.lines: dict[str, object] = {}
        self.ghosts: dict[str, object] = {}  # the run before the last reset, drawn faintly for comparison
        colors = {"dense_norm": "C0", "sparse_norm": "C1"}
        for ax, (panel, keys) in zip(axes, self.SERIES):
            self.axes[panel] = ax
            for key in keys:
                (self.lines[key],) = ax.plot(
                    [], [], lw=1.6, color=colors.get(key, "C0"), label=key[:-5] or key
                )
                (self.ghosts[key],) = ax.plot(
                    [], [], lw=1.2, color=colors.get(key, "C0"), alpha=0.3, zorder=1
                )
            # the colours are named in the title: no legend box over the curves
            title = "‖dense‖ (blue), ‖sparse‖ (orange)" if panel == "norms" else _TITLES[panel]
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(_YLABELS[panel], fontsize=9)
            ax.tick_params(labelsize=9)
            ax.grid(alpha=0.3)
        self.axes["cosine"].set_ylim(-1.05, 1.05)
        self.var_note = self.axes["grad_var"].text(
            0.5, 0.5, "exact mode:\nno sampling noise", ha="center", va="center",
            transform=self.axes["grad_var"].transAxes, fontsize=10, color="0.4",
        )  # fmt: skip
        self.cos_note = self.axes["cosine"].text(
            0.97, 0.04, "", ha="right", va="bottom", transform=self.axes["cosine"].transAxes, fontsize=8,
            color="0.4",
        )  # fmt: skip
        for panel in ("norms", "cosine", "grad_var", "objective"):
            self.axes[panel].set_xlabel("optimiser step", fontsize=9)
        ax = self.axes["dist"] = axes[7]
        x = np.arange(len(labels))
        self.bars = ax.bar(x, np.zeros(len(labels)), color="C0", alpha=0.75, label="π_θ")
        (self.teacher_marks,) = ax.plot(x, np.zeros(len(labels)), "k_", ms=10, mew=2, label="π_T")
        (self.opt_marks,) = ax.plot(x, np.zeros(len(labels)), "o", color="C3", ms=4, label="π*")
        ax.set_xticks(x, labels, rotation=90, fontsize=9, family="monospace")
        ax.get_xticklabels()[loophole_index].set_color("C3")
        ax.set_title("π_θ (bars), π_T (—), π* (•)", fontsize=10)
        ax.set_ylabel(_YLABELS["dist"], fontsize=9)
        ax.tick_params(axis="y", labelsize=9)
        self.mark_artists: list = []
        self.fig.text(
            0.005,
            0.005,
            "faint: the run before the last Reset · dotted: a setting changed",
            fontsize=8,
            color="0.4",
        )

    def update(self, history, marks, dist, teacher, optimum, previous) -> None:
        steps = np.asarray(history["step"], dtype=float)
        for key, line in self.lines.items():
            line.set_data(steps, _series(history, key))
            self.ghosts[key].set_data(np.asarray(previous["step"], dtype=float), _series(previous, key))
        cos = self.lines["cosine"].get_ydata()
        hidden = len(cos) > 0 and not np.isfinite(np.asarray(cos, dtype=float)[-1])
        self.cos_note.set_text(
            f"hidden: a gradient norm\n< {COSINE_MIN_NORM:g} × the run's peak" if hidden else ""
        )
        for artist in self.mark_artists:
            artist.remove()
        self.mark_artists = [
            self.axes[panel].axvline(step + 0.5, color="0.5", ls=":", lw=1)
            for step, _ in marks
            for panel, _ in self.SERIES
        ]
        self.mark_artists += [  # what changed, written along the reward panel's marks
            self.axes["reward"].text(
                step + 0.5,
                0.98,
                " " + label,
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color="0.35",
                transform=self.axes["reward"].get_xaxis_transform(),
                clip_on=True,
            )
            for step, label in marks
        ]
        var = np.asarray(history["grad_var"] + previous["grad_var"], dtype=float)
        positive = var[np.isfinite(var) & (var > 0)]
        self.axes["grad_var"].set_yscale("log" if positive.size else "linear")
        self.var_note.set_visible(not positive.size)
        for panel, ax in self.axes.items():
            if panel == "dist":
                continue
            ax.set_xlim(0.5, max(len(steps), len(previous["step"]), 1) + 0.5)
            ax.relim()
            ax.autoscale_view(scalex=False, scaley=panel != "cosine")
        if positive.size:  # a deterministic policy gives ~1e-30 variances: keep 6 decades in view
            top = positive.max()
            self.axes["grad_var"].set_ylim(max(positive.min(), top * 1e-6) / 1.5, top * 1.5)
        for bar, h in zip(self.bars, dist):
            bar.set_height(float(h))
        self.teacher_marks.set_ydata(teacher)
        self.opt_marks.set_ydata(optimum if optimum is not None else np.full(len(dist), np.nan))
        top = max(float(dist.max()), float(teacher.max()), 0.0 if optimum is None else float(optimum.max()))
        self.axes["dist"].set_ylim(0, 1.12 * top + 1e-3)

    def png(self) -> bytes:
        return _fast_png(self.fig)


# ----------------------------------------------------------------------------------------------------- the lab


class MixingLab:
    """Interactive hybrid imitation + RL training on an enumerable toy; see the module docstring.

    Args:
        seed: initialises the student and the sampler (a reset restores both).
        kind: the student's `TinyPolicy` kind, "tabular" (any policy; exact fixed points) or "shared" (an MLP).
        init_scale: scale of the student's random initial logits (small: close to uniform).
        redraw_interval: seconds between figure redraws while a run is in progress (0: only at the end).
        **settings: initial values for `set` (lam, beta, gamma, lr, samples, steps, future, baseline,
            normalize, mode, reward).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        kind: str = "tabular",
        init_scale: float = 0.3,
        redraw_interval: float = 0.5,
        **settings,
    ):
        if kind not in ("tabular", "shared"):
            raise ValueError(f"kind must be 'tabular' or 'shared', got {kind!r}")
        self.seed, self.kind, self.redraw_interval = int(seed), kind, float(redraw_interval)
        self.space = enumerate_sequences(VOCAB, HORIZON, eos=True)
        self.labels = [
            response_label(a, m) for a, m in zip(self.space.actions.tolist(), self.space.mask.tolist())
        ]
        self.loophole_index = _response_index(self.space, LOOPHOLE)
        self.teacher = make_teacher(self.space)
        with torch.no_grad():
            self.teacher_logq = token_logprobs(self.teacher, self.space.actions, self.space.mask).sum(1)
        self.rewards = {name: make_reward(self.space, name, seed=self.seed) for name in REWARDS}
        self.policy = TinyPolicy(VOCAB, HORIZON, kind=kind, seed=self.seed, scale=init_scale)
        self._init_state = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        self.settings = dict(DEFAULTS)
        self.history: dict[str, list[float]] = {k: [] for k in METRICS}
        self.previous: dict[str, list[float]] = {k: [] for k in METRICS}  # the history before the last reset
        self.marks: list[tuple[int, str]] = []  # (step, "lam=0.3") where settings changed mid-training
        self.timings = {"train_s": 0.0, "draw_s": 0.0, "draws": 0}
        self._syncing = False
        self._dashboard: _Dashboard | None = None  # built on first use (`figure`, `show`, `widget`)
        self._widgets: dict | None = None  # built on first use (`widget`, `controls`, `buttons`, `image`)
        self.reset()
        if settings:
            self.set(**settings)

    # -------------------------------------------------------------------------------------------- settings

    def set(self, **settings) -> MixingLab:
        """Change settings (validated all together before any is applied); the widgets follow."""
        clean = {name: self._validate(name, value) for name, value in settings.items()}
        changed = {k: v for k, v in clean.items() if self.settings[k] != v}
        if not changed:
            return self
        self.settings.update(changed)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings["lr"]
        n = len(self.history["step"])
        training = {k: v for k, v in changed.items() if k != "steps"}
        if n and training:
            label = ", ".join(f"{k}={v}" for k, v in training.items())
            if self.marks and self.marks[-1][0] == n:
                label = self.marks[-1][1] + ", " + label
                self.marks.pop()
            self.marks.append((n, label))
        if self._widgets is not None:
            self._sync_widgets(changed)
            self._refresh_status()
        return self

    def _validate(self, name: str, value):
        if name not in DEFAULTS:
            raise TypeError(f"unknown setting {name!r}; valid settings: {', '.join(DEFAULTS)}")
        if name in _CHOICES:
            if value not in _CHOICES[name]:
                raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
            return value
        if name in ("samples", "steps"):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            low = 2 if name == "samples" else 1
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number, got {type(value).__name__} {value!r}")
        value = float(value)
        if name == "gamma" and not 0.0 <= value <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {value}")
        if name == "lr" and not value > 0:
            raise ValueError(f"lr must be > 0, got {value}")
        if name in ("lam", "beta") and value < 0:
            raise ValueError(f"{name} must be >= 0 (it weighs a term of J), got {value}")
        return value

    # ---------------------------------------------------------------------------------------------- training

    def reset(self) -> MixingLab:
        """Restore the student's initial parameters and the sampler's seed; start a new, empty history (the
        old one becomes `previous` and is drawn faintly)."""
        self.policy.load_state_dict(self._init_state)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.settings["lr"])
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.history["step"]:
            self.previous = self.history  # a reference to the old history stays valid: it is not cleared
        self.history = {k: [] for k in METRICS}
        self.marks.clear()
        self.redraw()
        return self

    def run(self, steps: int | None = None, *, live: bool = False) -> MixingLab:
        """`steps` optimiser steps (default: the `steps` setting), then redraw; `live` also redraws during."""
        if steps is None:
            steps = self.settings["steps"]
        elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(
                f"steps must be a non-negative int (or None for the `steps` setting), got {steps!r}"
            )
        start = last_draw = time.perf_counter()
        with _one_thread():
            for _ in range(steps):
                self._train_step()
                if (
                    live
                    and self.redraw_interval > 0
                    and time.perf_counter() - last_draw > self.redraw_interval
                ):
                    self.redraw()
                    last_draw = time.perf_counter()
        self.timings["train_s"] = time.perf_counter() - start
        self.redraw()
        return self

    def step(self) -> MixingLab:
        """One optimiser step, then redraw."""
        return self.run(1)

    def _train_step(self) -> None:
        s = self.settings
        params = list(self.policy.parameters())
        self.optimizer.zero_grad()
        if s["mode"] == "exact":
            # The expectation over every response: no baseline changes it, so none is used.
            out = enumerated_loss(
                self.policy,
                self.teacher,
                self.space,
                self.rewards[s["reward"]],
                parameters=params,
                **self._loss_kwargs(),
            )
            scale = float(self.space.size)  # enumerated_loss's gradient is grad J / S
            (scale * out.loss).backward()
            grad_var = math.nan
        else:
            out, per = self._sampled_gradient(self.generator, params)
            scale = 1.0
            total = per.sum(0)  # the batch gradient of the loss
            offset = 0
            for p in params:
                p.grad = total[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            grad_var = _trace_variance(per)
        self.optimizer.step()
        gn = out.grad_norms
        self._record(
            dense=scale * gn["dense"], sparse=scale * gn["sparse"], cosine=gn["cosine"], grad_var=grad_var
        )

    def _loss_kwargs(self) -> dict:
        s = self.settings
        return dict(
            lam=s["lam"], beta=s["beta"], future=s["future"], gamma=s["gamma"], normalize=s["normalize"]
        )

    def _sampled_gradient(self, generator: torch.Generator, params: list):
        """One Monte Carlo batch through `hybrid_loss`: (its output, per-sample gradients of the loss [n, P]).

        The loss is a sum over samples of terms that each depend on that sample's logits only (baselines are
        detached), so its gradient at the logits splits by row; pulling each row back through the policy gives
        per-sample gradients that sum to the batch gradient.
        """
        s = self.settings
        n = s["samples"]
        actions, mask = sample(self.policy, n, generator, eos=self.space.eos)
        logits = self.policy(actions)
        with torch.no_grad():
            teacher_logits = self.teacher(actions)
        grouped = s["baseline"] != "none"
        out = hybrid_loss(
            logits, teacher_logits, actions, self.rewards[s["reward"]](actions, mask), mask=mask,
            baseline=s["baseline"], group_size=n if grouped else None, backend="torch", parameters=params,
            **self._loss_kwargs(),
        )  # fmt: skip
        (g_logits,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
        rows = []
        for b in range(n):
            piece = torch.zeros_like(g_logits)
            piece[b] = g_logits[b]
            grads = torch.autograd.grad(logits, params, grad_outputs=piece, retain_graph=b < n - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return out, torch.stack(rows)

    def gradient_variance(self, batches: int = 20, seed: int = 1234, **settings) -> float:
        """Trace variance of the sampled gradient estimate at the *current* policy (no update), averaged over
        `batches` batches of `samples` responses; `settings` override the lab's for this measurement only."""
        saved = dict(self.settings)
        clean = {name: self._validate(name, value) for name, value in settings.items()}
        generator = torch.Generator().manual_seed(seed)
        try:
            self.settings.update(clean)
            params = list(self.policy.parameters())
            with _one_thread():
                values = [
                    _trace_variance(self._sampled_gradient(generator, params)[1]) for _ in range(batches)
                ]
            return float(np.mean(values))
        finally:
            self.settings = saved

    def metrics(self) -> dict[str, float]:
        """Exact metrics of the current student: reward, kl, objective, dist_to_opt, hack."""
        s = self.settings
        with torch.no_grad():
            p = sequence_probs(self.policy, self.space)
            r = self.reward_values()
            logp = p.clamp_min(1e-300).log()
            kl = float((p * (logp - self.teacher_logq)).sum())
            reward = float((p * r).sum())
            target = self.optimum()
        return {
            "reward": reward,
            "kl": kl,
            "objective": s["lam"] * reward - s["beta"] * kl,
            "dist_to_opt": math.nan if target is None else total_variation(p, target),
            "hack": float(p[self.loophole_index]),
        }

    def _record(self, dense: float, sparse: float, cosine: float, grad_var: float) -> None:
        h = self.history
        h["step"].append(len(h["step"]) + 1)
        for key, value in self.metrics().items():
            h[key].append(value)
        h["dense_norm"].append(dense)
        h["sparse_norm"].append(sparse)
        h["cosine"].append(cosine)
        h["grad_var"].append(grad_var)

    # -------------------------------------------------------------------------------------------- the world

    def reward_values(self, name: str | None = None) -> torch.Tensor:
        """R(y) for every response (order of `labels`): [15]."""
        return self.rewards[name or self.settings["reward"]](self.space.actions, self.space.mask)

    def distribution(self) -> torch.Tensor:
        """pi_theta(y) for every response: [15]."""
        with torch.no_grad():
            return sequence_probs(self.policy, self.space)

    def teacher_distribution(self) -> torch.Tensor:
        return self.teacher_logq.exp()

    def optimum(self) -> torch.Tensor | None:
        """pi* for the current lam, beta and reward (None when lam = beta = 0)."""
        return optimal_policy(
            self.teacher_logq, self.reward_values(), self.settings["lam"], self.settings["beta"]
        )

    # -------------------------------------------------------------------------------------------- drawing

    def _updated_dashboard(self) -> _Dashboard:
        """The dashboard (built on first use) with the current history drawn in."""
        if self._dashboard is None:
            self._dashboard = _Dashboard(self.labels, self.loophole_index)
        optimum = self.optimum()
        self._dashboard.update(
            self.history,
            self.marks,
            self.distribution().numpy(),
            self.teacher_distribution().numpy(),
            None if optimum is None else optimum.numpy(),
            self.previous,
        )
        return self._dashboard

    @property
    def figure(self) -> Figure:
        """The dashboard's matplotlib Figure, up to date."""
        return self._updated_dashboard().fig

    @property
    def lines(self) -> dict:
        """The dashboard's Line2D per history key, up to date."""
        return self._updated_dashboard().lines

    def redraw(self) -> None:
        """Push a fresh PNG of the dashboard to the image widget; a lab whose widgets were never built has
        nothing on screen, so it draws nothing (`show()` draws on demand)."""
        if self._widgets is None:
            return
        start = time.perf_counter()
        self._widgets["image"].value = self._updated_dashboard().png()
        self.timings["draw_s"] = time.perf_counter() - start
        self.timings["draws"] += 1
        self._refresh_status()

    def show(self):
        """The dashboard now, as a static IPython Image (for notebooks and reports; builds no widget)."""
        from IPython.display import Image

        return Image(data=self._updated_dashboard().png(), format="png")

    # -------------------------------------------------------------------------------------------- widgets

    def _ui(self) -> dict:
        if self._widgets is None:
            self._build_widgets()
            self._sync_widgets(self.settings)  # widens a slider's range for a value set from Python
            self.redraw()
        return self._widgets

    @property
    def widgets_built(self) -> bool:
        """Whether this lab's widgets exist (they are built by the first use of `widget`, `controls`, ...)."""
        return self._widgets is not None

    @property
    def widget(self) -> W.Box:
        """The lab as one ipywidgets box (controls, buttons, status line, live figure); built on first use."""
        return self._ui()["widget"]

    @property
    def controls(self) -> dict:
        """Setting name -> its slider or dropdown (builds the widgets)."""
        return self._ui()["controls"]

    @property
    def buttons(self) -> dict:
        """ "run", "step", "reset" -> its button (builds the widgets)."""
        return self._ui()["buttons"]

    @property
    def image(self) -> W.Image:
        """The live figure's image widget (builds the widgets)."""
        return self._ui()["image"]

    @property
    def status(self) -> W.HTML:
        return self._ui()["status"]

    def _build_widgets(self) -> None:
        style = {"description_width": "90px"}
        s = self.settings
        controls: dict[str, W.ValueWidget] = {
            "lam": W.FloatSlider(value=s["lam"], min=0, max=5, step=0.05, description="λ (reward)"),
            "beta": W.FloatSlider(value=s["beta"], min=0, max=2, step=0.05, description="β (KL)"),
            "gamma": W.FloatSlider(value=s["gamma"], min=0, max=1, step=0.05, description="γ (future)"),
            "lr": W.FloatLogSlider(
                value=s["lr"],
                base=10,
                min=-3,
                max=0,
                step=0.1,
                description="learning rate",
                readout_format=".3g",
            ),
            "samples": W.IntSlider(value=s["samples"], min=2, max=256, description="samples/step"),
            "steps": W.IntSlider(value=s["steps"], min=1, max=1000, description="steps/run"),
            "future": W.Dropdown(options=FUTURE_ESTIMATORS, value=s["future"], description="future KL"),
            "baseline": W.Dropdown(options=BASELINES, value=s["baseline"], description="baseline"),
            "normalize": W.Dropdown(options=NORMALIZATIONS, value=s["normalize"], description="normalize"),
            "mode": W.Dropdown(options=MODES, value=s["mode"], description="mode"),
            "reward": W.Dropdown(options=REWARDS, value=s["reward"], description="reward"),
        }
        tips = {
            "lam": "weight of the task reward in J",
            "beta": "weight of KL(student || teacher) in J",
            "gamma": "discount of the future KL in the return (< 1 changes the objective)",
            "future": "estimator of the future KL: analytic (Rao-Blackwell), k1, k3, none (myopic)",
            "baseline": "sampled mode: leave-one-out group baseline on R only, or on the whole return",
            "mode": "exact: expected gradient over all 15 responses; sampled: Monte Carlo batches",
            "reward": "count0: fraction of 'a'; loophole: count0 but 'bbb' scores 2; random: N(0,1) table",
        }
        for name, control in controls.items():
            control.style = style
            control.layout = W.Layout(width="340px")
            control.tooltip = tips.get(name)
            control.add_class(f"hybridlab-{name}")
            control.observe(self._on_control, names="value")
        buttons = {
            "run": W.Button(description="Run", button_style="success", icon="play"),
            "step": W.Button(description="Step", icon="step-forward"),
            "reset": W.Button(description="Reset", button_style="warning", icon="undo"),
        }
        for name, button in buttons.items():
            button.layout = W.Layout(width="105px")
            button.add_class(f"hybridlab-{name}")
        buttons["run"].on_click(lambda _: self._guarded(lambda: self.run(live=True)))
        buttons["step"].on_click(lambda _: self._guarded(self.step))
        buttons["reset"].on_click(lambda _: self._guarded(self.reset))
        status = W.HTML(layout=W.Layout(width="340px"))
        status.add_class("hybridlab-status")
        image = W.Image(format="png", layout=W.Layout(flex="1 1 600px", min_width="0", max_width="900px"))
        image.add_class("hybridlab-figure")
        panel = W.VBox(
            layout=W.Layout(flex="0 0 350px"),
            children=[
                W.HTML("<b>Mixing-weights lab</b> &nbsp; J = λ E[R] − β KL(π‖π<sub>T</sub>)"),
                *controls.values(),
                W.HBox(list(buttons.values())),
                status,
            ],
        )
        widget = W.HBox([panel, image], layout=W.Layout(flex_flow="row wrap", align_items="flex-start"))
        widget.add_class("hybridlab-mixing-lab")
        self._widgets = {"controls": controls, "buttons": buttons, "status": status, "image": image,
                         "widget": widget}  # fmt: skip

    def _on_control(self, change) -> None:
        if self._syncing:
            return
        name = next(k for k, c in self.controls.items() if c is change.owner)
        self._guarded(lambda: self.set(**{name: change.new}))

    def _guarded(self, action: Callable) -> None:
        """Run a widget callback; show an error in the status line instead of losing it in the log."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - shown to the user, then re-synced
            self.status.value = f"<span style='color:#b00'>{type(exc).__name__}: {exc}</span>"
            self._sync_widgets(self.settings)

    def _sync_widgets(self, values: Mapping) -> None:
        self._syncing = True
        try:
            for name, value in values.items():
                control = self.controls[name]
                if isinstance(control, W.FloatLogSlider):
                    exponent = math.log10(value)
                    control.min = min(control.min, math.floor(exponent))
                    control.max = max(control.max, math.ceil(exponent))
                elif isinstance(control, (W.FloatSlider, W.IntSlider)):
                    control.min = min(control.min, value)
                    control.max = max(control.max, value)
                control.value = value
        finally:
            self._syncing = False

    def _refresh_status(self) -> None:
        if self._widgets is None:
            return
        n = len(self.history["step"])
        m, s, t = self.metrics(), self.settings, self.timings
        self.status.value = (
            f"<span style='font-family:monospace;font-size:12px'>step {n} · E[R] {m['reward']:.3f} · "
            f"KL {m['kl']:.3f} · TV(π*) {m['dist_to_opt']:.3f}<br>"
            f"λ {s['lam']:.2f} · β {s['beta']:.2f} · γ {s['gamma']:.2f} · {s['mode']} · {s['reward']}<br>"
            f"last run {t['train_s']:.2f} s · draw {t['draw_s']:.2f} s</span>"
        )

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"MixingLab(seed={self.seed}, kind={self.kind!r}, step={len(self.history['step'])}, {body})"
