"""Latency of the mixing-weights lab: a slider change plus Run, until the figure is redrawn (kernel side).

    .venv/bin/python benchmarks/lab_latency.py [--repeats 5]

Moves the λ slider through the widget (its observer calls `lab.set`), clicks Run (`steps` optimiser steps with live
redraws, then a final redraw) and times the whole callback, per mode and policy kind. The browser adds ~0.1 s
for the comm message and the image decode (tests/browser/test_lab_browser.py records it in artifacts/browser/).
"""

from __future__ import annotations

import argparse
import statistics
import time

from hybridlab.lab.mixing_lab import MixingLab


def measure(mode: str, kind: str, repeats: int, steps: int, samples: int) -> dict[str, float]:
    lab = MixingLab(seed=0, kind=kind, mode=mode, steps=steps, samples=samples)
    totals, trains, draws = [], [], []
    for i in range(repeats):
        before = lab.image.value
        start = time.perf_counter()
        lab.controls["lam"].value = 0.5 + 0.25 * (i % 4)  # a slider change ...
        lab.buttons["run"].click()  # ... then Run: returns once the final figure is in the image widget
        totals.append(time.perf_counter() - start)
        assert lab.image.value != before
        trains.append(lab.timings["train_s"])
        draws.append(lab.timings["draw_s"])
    return {
        "total_s": statistics.median(totals),
        "max_s": max(totals),
        "train_s": statistics.median(trains),
        "draw_s": statistics.median(draws),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per Run (the lab's default)")
    parser.add_argument("--samples", type=int, default=32, help="samples per step in sampled mode (default)")
    args = parser.parse_args()
    print(f"slider change + Run ({args.steps} steps) -> figure redrawn; median of {args.repeats}")
    print(f"{'mode':8s} {'policy':8s} {'total s':>8s} {'max s':>7s} {'train s':>8s} {'last draw s':>11s}")
    for mode in ("exact", "sampled"):
        for kind in ("tabular", "shared"):
            r = measure(mode, kind, args.repeats, args.steps, args.samples)
            print(
                f"{mode:8s} {kind:8s} {r['total_s']:8.2f} {r['max_s']:7.2f} {r['train_s']:8.2f} {r['draw_s']:11.2f}"
            )


if __name__ == "__main__":
    main()
