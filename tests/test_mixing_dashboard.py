"""The mixing lab at laptop width: a readable dashboard (fonts, size), no empty panel in exact mode, and the
controls that do nothing in exact mode greyed out."""

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from hybridlab.lab.mixing_lab import MixingLab  # noqa: E402


def _panels_with_data(fig) -> list[bool]:
    shown = []
    for ax in fig.axes:
        lines = [
            ln
            for ln in ax.get_lines()
            if ln.get_visible() and np.isfinite(np.asarray(ln.get_ydata(), float)).any()
        ]
        bars = [p for p in ax.patches if p.get_height() > 0]
        shown.append(bool(lines or bars))
    return shown


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_every_panel_shows_data(mode):
    lab = MixingLab(seed=0, mode=mode, samples=8)
    lab.run(4)
    fig = lab.figure
    assert len(fig.axes) == 8
    assert all(_panels_with_data(fig)), [
        ax.get_title() for ax, ok in zip(fig.axes, _panels_with_data(fig)) if not ok
    ]


def test_exact_mode_panel_shows_the_loophole_mass_and_sampled_mode_the_variance():
    lab = MixingLab(seed=0, reward="loophole").run(3)
    titles = [ax.get_title() for ax in lab.figure.axes]
    assert any("bbb" in t for t in titles) and not any("variance" in t for t in titles)
    lab.set(mode="sampled", samples=8).run(2)
    titles = [ax.get_title() for ax in lab.figure.axes]
    assert any("variance" in t for t in titles)


def test_fonts_and_size_readable_at_laptop_width():
    lab = MixingLab(seed=0).run(3)
    lab.set(lam=2.0).run(2)  # a mark with its label
    fig = lab.figure
    width_px = fig.get_size_inches()[0] * fig.dpi
    assert width_px <= 1000  # shown at (nearly) full size in a ~1000 px window
    texts = [
        t
        for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
        if t.get_text()
    ]
    assert texts
    smallest = min(t.get_fontsize() for t in texts)
    # at 85% of its natural size (a ~1000 px window with margins) the smallest label is still >= 9 px
    assert smallest * fig.dpi / 72 * 0.85 >= 9, smallest


def test_controls_without_effect_in_exact_mode_are_disabled_and_the_figure_sits_below_them():
    lab = MixingLab(seed=0)
    assert lab.controls["baseline"].disabled and lab.controls["samples"].disabled
    lab.set(mode="sampled")
    assert not lab.controls["baseline"].disabled and not lab.controls["samples"].disabled
    lab.set(mode="exact")
    assert lab.controls["baseline"].disabled
    children = lab.widget.children
    assert children[-1] is lab.image  # full width under the controls, not squeezed beside them
    assert lab.image.layout.width == "100%" and lab.image.layout.max_width == "1000px"
    assert (
        lab.image.layout.margin == "0"
    )  # a 100%-wide image with the default 2 px margins overflows its cell


def test_things_to_try_loophole_recovery_takes_what_notebook_05_says():
    """05's "Things to try": with beta -> 0 the loophole takes over (P(bbb) > 0.99 after about 50 steps); raised
    to beta = 0.5 after 150 hacked steps, the student leaves it (P(bbb) < 0.1) in roughly 70-90 steps and settles
    on pi* (TV < 0.05) after roughly 340 steps. Measured with the lab's defaults (Adam, lr 0.1, exact mode)."""
    from hybridlab.lab.mixing import MixingModel

    lab = MixingModel(seed=0, reward="loophole", beta=0.0).run(150)
    first = next(i + 1 for i, p in enumerate(lab.history["hack"]) if p > 0.99)
    assert 35 <= first <= 70, first
    lab.set(beta=0.5)
    leave = settle = None
    for step in range(1, 601):
        lab.step()
        m = lab.metrics()
        leave = leave or (step if m["hack"] < 0.1 else None)
        if m["dist_to_opt"] < 0.05:
            settle = step
            break
    assert leave is not None and 60 <= leave <= 95, leave  # "leaves quickly", not at once
    assert settle is not None and 290 <= settle <= 400, settle  # "roughly 340 steps": several Runs of 100
