"""The mixing-weights lab: ipywidgets controls that drive `MixingModel`'s training, and live figures of it.

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

import io
import math
import time
from collections.abc import Callable, Mapping, Sequence

import ipywidgets as W
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..hybrid import NORMALIZATIONS
from ..sparse import FUTURE_ESTIMATORS
from .mixing import BASELINES, MODES, REWARDS, MixingModel
from .mixing_recipe import RECIPE_TIPS, recipe_controls

#: cos(dense, sparse) is drawn only where both norms exceed this fraction of the run's largest gradient norm.
COSINE_MIN_NORM = 1e-3


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


def _spaced(marks: Sequence[tuple[int, str]], span: int, gap: float = 0.06) -> list[tuple[int, str]]:
    """The marks whose labels fit: each `gap` of the x range from the next labelled one (the newest always)."""
    kept: list[tuple[int, str]] = []
    for step, label in reversed(list(marks)):
        if not kept or kept[-1][0] - step >= gap * span:
            kept.append((step, label))
    return kept[::-1]


class _Dashboard:
    """The lab's live figure: 7 time series and the current distribution over the 15 responses."""

    SERIES = (  # panel -> lines in it
        ("reward", ("reward",)),
        ("kl", ("kl",)),
        ("dist_to_opt", ("dist_to_opt",)),
        ("objective", ("objective",)),
        ("norms", ("dense_norm", "sparse_norm")),
        ("cosine", ("cosine",)),
        ("grad_var", ("grad_var", "hack")),  # sampled mode: the variance; exact mode (no noise): P(bbb)
    )
    FONT = 10  # the smallest font (pt): 11 px at dpi 80, still >= 9 px when shown at 85% in a ~1000 px window
    DPI = 80  # 12.5 x 6.4 in -> 1000 x 512 px

    def __init__(self, labels: Sequence[str], loophole_index: int):
        self.fig = Figure(figsize=(12.5, 6.4), dpi=self.DPI)  # 1000 x 512 px
        FigureCanvasAgg(self.fig)
        axes = self.fig.subplots(2, 4).ravel()
        # A fixed layout: a layout engine would re-measure every label at every redraw (2x slower).
        self.fig.subplots_adjust(left=0.065, right=0.99, top=0.93, bottom=0.15, wspace=0.45, hspace=0.5)
        self.axes: dict[str, object] = {}
        self.lines: dict[str, object] = {}
        self.ghosts: dict[str, object] = {}  # the run before the last reset, drawn faintly for comparison
        colors = {"dense_norm": "C0", "sparse_norm": "C1", "hack": "C3"}
        f = self.FONT
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
            ax.set_title(title, fontsize=f + 1)
            ax.set_ylabel(_YLABELS[panel], fontsize=f)
            ax.tick_params(labelsize=f)
            ax.grid(alpha=0.3)
        self.axes["cosine"].set_ylim(-1.05, 1.05)
        self.var_note = self.axes["grad_var"].text(
            0.5, 0.5, "exact mode:\nno sampling noise", ha="center", va="center",
            transform=self.axes["grad_var"].transAxes, fontsize=f, color="0.4",
        )  # fmt: skip
        self.cos_note = self.axes["cosine"].text(
            0.97, 0.04, "", ha="right", va="bottom", transform=self.axes["cosine"].transAxes, fontsize=f,
            color="0.4",
        )  # fmt: skip
        for panel in ("norms", "cosine", "grad_var", "objective"):
            self.axes[panel].set_xlabel("optimiser step", fontsize=f)
        ax = self.axes["dist"] = axes[7]
        x = np.arange(len(labels))
        self.bars = ax.bar(x, np.zeros(len(labels)), color="C0", alpha=0.75, label="π_θ")
        (self.teacher_marks,) = ax.plot(x, np.zeros(len(labels)), "k_", ms=10, mew=2, label="π_T")
        (self.opt_marks,) = ax.plot(x, np.zeros(len(labels)), "o", color="C3", ms=4, label="π*")
        ax.set_xticks(x, labels, rotation=90, fontsize=f, family="monospace")
        ax.get_xticklabels()[loophole_index].set_color("C3")
        ax.set_title("π_θ (bars), π_T (—), π* (•)", fontsize=f + 1)
        ax.set_ylabel(_YLABELS["dist"], fontsize=f)
        ax.tick_params(axis="y", labelsize=f)
        self.mark_artists: list = []
        self.fig.text(
            0.005,
            0.005,
            "faint: the run before the last Reset · dotted: a setting changed",
            fontsize=f,
            color="0.4",
        )

    def update(self, history, marks, dist, teacher, optimum, previous, mode: str = "exact") -> None:
        steps = np.asarray(history["step"], dtype=float)
        exact = mode == "exact"  # no sampling noise: the variance panel shows the loophole's mass instead
        for key in ("grad_var", "hack"):
            shown = (key == "hack") == exact
            self.lines[key].set_visible(shown)
            self.ghosts[key].set_visible(shown)
        self.axes["grad_var"].set_title(_TITLES["hack" if exact else "grad_var"], fontsize=self.FONT + 1)
        self.axes["grad_var"].set_ylabel(_YLABELS["hack" if exact else "grad_var"], fontsize=self.FONT)
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
                fontsize=self.FONT,
                color="0.35",
                transform=self.axes["reward"].get_xaxis_transform(),
                clip_on=True,
            )
            for step, label in _spaced(marks, max(len(steps), len(previous["step"]), 1))
        ]
        var = np.asarray(history["grad_var"] + previous["grad_var"], dtype=float)
        positive = var[np.isfinite(var) & (var > 0)] if not exact else var[:0]
        self.axes["grad_var"].set_yscale("log" if positive.size else "linear")
        self.var_note.set_visible(not positive.size and not exact)
        for panel, ax in self.axes.items():
            if panel == "dist":
                continue
            ax.set_xlim(0.5, max(len(steps), len(previous["step"]), 1) + 0.5)
            ax.relim(visible_only=True)
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


class MixingLab(MixingModel):
    """Interactive hybrid imitation + RL training on an enumerable toy: `MixingModel` with a live dashboard
    and ipywidgets controls; see the module docstring.

    Args:
        seed: initialises the student and the sampler (a reset restores both).
        **kwargs: `MixingModel`'s (kind, init_scale, redraw_interval and initial settings).
    """

    def __init__(self, seed: int = 0, **kwargs):
        self._syncing = False
        self._dashboard: _Dashboard | None = None  # built on first use (`figure`, `show`, `widget`)
        self._widgets: dict | None = None  # built on first use (`widget`, `controls`, `buttons`, `image`)
        super().__init__(seed, **kwargs)

    def _settings_changed(self, changed: Mapping) -> None:
        if self._widgets is not None:
            self._sync_widgets(changed)
            self._refresh_status()

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
            self.settings["mode"],
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
            "baseline": "sampled mode only (an exact expectation has no noise to reduce): leave-one-out group "
            "baseline on R only, or on the whole return",
            "samples": "sampled mode only: responses per Monte Carlo batch",
            "mode": "exact: expected gradient over all 15 responses; sampled: Monte Carlo batches",
            "reward": "count0: fraction of 'a'; loophole: count0 but 'bbb' scores 2; random: N(0,1) table",
            **RECIPE_TIPS,
        }
        names = list(controls)  # the main panel; the recipe controls go in their accordion
        recipe, recipe_box = recipe_controls(s)
        controls.update(recipe)
        for name, control in controls.items():
            control.style = style
            control.layout = W.Layout(width="320px")
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
        # The figure takes the full width under the controls (1000 px wide, never stretched beyond its size):
        # beside them it would be shrunk to ~60% on a laptop screen and its labels would become unreadable.
        # (no margin: ipywidgets' default 2 px each side would push a 100%-wide image past the output's edge)
        image = W.Image(
            format="png", layout=W.Layout(width="100%", max_width="1000px", min_width="0", margin="0")
        )
        image.add_class("hybridlab-figure")
        column = {"layout": W.Layout(flex="0 1 330px")}
        panel = W.HBox(
            layout=W.Layout(flex_flow="row wrap", align_items="flex-start"),
            children=[
                W.VBox([controls[n] for n in names[:6]], **column),
                W.VBox([controls[n] for n in names[6:]], **column),
                W.VBox([W.HBox(list(buttons.values())), status], **column),
            ],
        )
        title = W.HTML("<b>Mixing-weights lab</b> &nbsp; J = λ E[R] − β KL(π‖π<sub>T</sub>)")
        widget = W.VBox([title, panel, recipe_box, image], layout=W.Layout(align_items="stretch"))
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
            exact = self.settings["mode"] == "exact"
            for name in ("baseline", "samples"):  # they do nothing in exact mode: greyed out there
                self.controls[name].disabled = exact
        finally:
            self._syncing = False

    def _refresh_status(self) -> None:
        if self._widgets is None:
            return
        n = len(self.history["step"])
        m, s, t = self.metrics(), self.settings, self.timings
        lam, beta = self.weights_now(trusted=True)  # the next update's weights: the sliders' without a recipe
        self.status.value = (
            f"<span style='font-family:monospace;font-size:11px'>step {n} · E[R] {m['reward']:.3f} · "
            f"KL {m['kl']:.3f} · TV(π*) {m['dist_to_opt']:.3f}<br>"
            f"λ {lam:.2f} · β {beta:.2f} · γ {s['gamma']:.2f} · {s['mode']} · {s['reward']}<br>"
            f"last run {t['train_s']:.2f} s · draw {t['draw_s']:.2f} s</span>"
        )

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"MixingLab(seed={self.seed}, kind={self.kind!r}, step={len(self.history['step'])}, {body})"
