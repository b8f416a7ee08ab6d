"""Every plotting helper returns a Figure with a title, axis labels and units; check_figure catches omissions."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hybridlab import viz  # noqa: E402

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
}


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
