"""Every plotting helper returns a Figure with a title, axis labels and units; check_figure catches omissions."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hybridlab.lab import figures as viz  # noqa: E402

UNIT_MARKERS = ("(", "[")


def _labels(fig):
    for ax in fig.axes:
        twins = ax.get_shared_x_axes().get_siblings(ax)
        yield (
            next((t.get_title() for t in twins if t.get_title()), "") or fig._suptitle.get_text(),
            next((t.get_xlabel() for t in twins if t.get_xlabel()), ""),
            ax.get_ylabel(),
        )


FIGURES = {
    "relative_errors": lambda: viz.relative_errors(["a", "b"], [1e-15, 0.3], title="t"),
    "cosines": lambda: viz.cosines(["a", "b"], [1.0, 0.9], title="t"),
    "variances": lambda: viz.variances(["a", "b"], [1.0, 2.0], title="t", errors=[0.1, 0.2]),
    "bars": lambda: viz.bars(
        ["a"], [1.0], title="t", ylabel="y (units)", log=True, hline=0.5, hline_label="h"
    ),
    "lines": lambda: viz.lines([1, 2], {"x": [1, 2], "y": [2, 1]}, title="t", xlabel="x (s)", ylabel="y (m)"),
    "lines_ragged": lambda: viz.lines(
        None, {"x": [1, 2, 3], "y": [2]}, title="t", xlabel="x (s)", ylabel="y (m)"
    ),
    "convergence": lambda: viz.convergence([1, 4, 16], [1.0, 0.5, 0.25], predicted=[1.0, 0.5, 0.25]),
    "convergence_noref": lambda: viz.convergence([1, 4, 16], [1.0, 0.5, 0.25]),
    "vocab_gradients": lambda: viz.vocab_gradients(
        [{"p": torch.ones(5) / 5, "q": torch.ones(5) / 5, "grad": torch.zeros(5), "label": "pair"}]
    ),
    "optimum": lambda: viz.optimum(["a", "b"], [0.5, 0.5], [0.0, 1.0], {"pi*": [0.3, 0.7]}),
    "per_position": lambda: viz.per_position({"a": [0.0, 0.1, 0.2]}, title="t"),
    "timings": lambda: viz.timings([1024, 4096], {"a": [1.0, 4.0]}, title="t"),
    "histogram": lambda: viz.histogram({"a": [0.0, 1.0, 1.0]}, title="t", xlabel="x (nats)"),
    "token_roles": lambda: _token_roles(),
    "topk_gaps": lambda: viz.topk_gaps(
        [1, 5], {"bound": {1: [-0.1, -0.2], 5: [0.0, -0.01]}, "no bound": {1: [0.1, -0.1], 5: [0.02, -0.02]}}
    ),
    "relative_errors_target": lambda: viz.relative_errors(["a"], [0.1], title="t", target="grad J / E|y|"),
}


def _token_roles(t=3):
    return viz.token_roles(
        [0.1, -0.2, 0.3, 0.4, -0.1], t, 0.5, [0.2, -0.05, 0.1], sampled=0, tokens=list("abcab"),
        vocab=list("abc"), lam=1.0, beta=0.5,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_has_title_labels_and_units(name):
    fig = FIGURES[name]()
    assert isinstance(fig, matplotlib.figure.Figure)
    assert fig.axes
    for title, xlabel, ylabel in _labels(fig):
        assert title and xlabel and ylabel, (name, title, xlabel, ylabel)
        assert any(m in ylabel for m in UNIT_MARKERS), (name, ylabel)
    assert not plt.get_fignums() or all(
        plt.figure(n) is not fig for n in plt.get_fignums()
    )  # closed in pyplot


def test_check_figure_rejects_missing_labels():
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    ax.set_title("t")
    with pytest.raises(AssertionError, match="x label"):
        viz.check_figure(fig)
    ax.set_xlabel("x (s)")
    with pytest.raises(AssertionError, match="y label"):
        viz.check_figure(fig)
    ax.set_ylabel("y (m)")
    viz.check_figure(fig)
    ax.set_title("")
    with pytest.raises(AssertionError, match="title"):
        viz.check_figure(fig)
    plt.close(fig)


def test_token_roles_colours_each_term_by_its_role():
    fig = _token_roles(t=3)
    top = fig.axes[0]
    legend = [txt.get_text() for txt in top.get_legend().get_texts()]
    for role in ("past", "step t", "future", "reward"):
        assert any(text.startswith(role) for text in legend), (role, legend)
    bars = [p for p in top.patches if p.get_height() != 0]
    colours = [matplotlib.colors.to_hex(p.get_facecolor()) for p in sorted(bars, key=lambda p: p.get_x())]
    expected = ["past", "past", "step", "future", "future", "reward"]
    assert colours == [matplotlib.colors.to_hex(viz.ROLE_COLORS[r]) for r in expected]
    # the return panel: lam R, -beta * (future log-ratios 0.4 - 0.1), and their sum
    heights = [p.get_height() for p in fig.axes[2].patches]
    assert heights == pytest.approx([0.5, -0.5 * 0.3, 0.5 - 0.15])


def test_token_roles_rejects_a_step_outside_the_response():
    with pytest.raises(ValueError, match="1..5"):
        _token_roles(t=6)
    with pytest.raises(ValueError, match="1..5"):
        _token_roles(t=0)


def test_long_titles_and_labels_are_wrapped_not_clipped():
    fig = viz.relative_errors(["a", "b"], [0.1, 0.2], title="a title far too long to fit " * 4, target="x")
    ax = fig.axes[0]
    assert "\n" in ax.get_title() and "\n" in ax.get_ylabel()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    assert fig.bbox.contains(*ax.title.get_window_extent(renderer).p0)
    assert ax.title.get_window_extent(renderer).x1 <= fig.bbox.x1 + 1
