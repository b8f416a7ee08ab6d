"""The mixing lab's recipe controls: lam / beta schedules (incl. the plateau switch), teacher trust, the reward gate and the length-neutral
future KL (the `MixingModel` settings of the same names, which document each one's objective or bias).

They sit in a collapsed accordion under the main controls, so the lab looks as before until a learner opens it."""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as W

from ..hybrid import FUTURE_NORMS
from .mixing import GATES, SCHEDULES, TRUSTS

RECIPE_TIPS = {
    "lam_schedule": "how lam moves from its value to 'λ final' over a run of steps/run updates",
    "beta_schedule": "how beta moves from its value to 'β final'; switch: at 'switch at' (distil, then RL)",
    "switch_step": "update (since the last reset) at which a 'switch' schedule takes its final weight; "
    "'plateau': the latest such update (0: none)",
    "plateau_window": "'plateau' schedule: switch once the mean E[R] over this many updates has stopped rising "
    "for this many updates",
    "plateau_tol": "'plateau' schedule: the rise of the windowed mean E[R] that still counts as rising",
    "teacher_trust": "global: beta x the teacher's success rate E_teacher[R] (exact here)",
    "dense_gate": "incorrect: the teacher's terms only on responses with R < 1 (biased)",
    "future_norm": "mean: the future KL per remaining token, length-neutral (biased for J)",
}


def recipe_controls(settings: Mapping) -> tuple[dict[str, W.ValueWidget], W.Accordion]:
    """(controls by setting name, the accordion that holds them, collapsed)."""
    s = settings
    controls: dict[str, W.ValueWidget] = {
        "lam_schedule": W.Dropdown(options=SCHEDULES, value=s["lam_schedule"], description="λ schedule"),
        "lam_final": W.FloatSlider(value=s["lam_final"], min=0, max=5, step=0.05, description="λ final"),
        "beta_schedule": W.Dropdown(options=SCHEDULES, value=s["beta_schedule"], description="β schedule"),
        "beta_final": W.FloatSlider(value=s["beta_final"], min=0, max=2, step=0.05, description="β final"),
        "switch_step": W.IntSlider(value=s["switch_step"], min=0, max=1000, description="switch at"),
        "plateau_window": W.IntSlider(
            value=s["plateau_window"], min=1, max=200, description="plateau window"
        ),
        "plateau_tol": W.FloatSlider(
            value=s["plateau_tol"], min=0, max=0.1, step=0.001, description="plateau tol"
        ),
        "teacher_trust": W.Dropdown(options=TRUSTS, value=s["teacher_trust"], description="teacher trust"),
        "dense_gate": W.Dropdown(options=GATES, value=s["dense_gate"], description="dense gate"),
        "future_norm": W.Dropdown(options=FUTURE_NORMS, value=s["future_norm"], description="future norm"),
    }
    controls["plateau_tol"].readout_format = ".3f"  # a tolerance of 0.002 must not read 0.00
    names = list(controls)
    column = {"layout": W.Layout(flex="0 1 330px")}
    body = W.HBox(
        [
            W.VBox([controls[n] for n in names[:4]], **column),  # the two schedules
            W.VBox([controls[n] for n in names[4:7]], **column),  # when a switch / plateau schedule switches
            W.VBox([controls[n] for n in names[7:]], **column),  # trust, gate, future norm
        ],
        layout=W.Layout(flex_flow="row wrap", align_items="flex-start"),
    )
    box = W.Accordion(children=[body], selected_index=None)
    box.set_title(0, "Recipe: schedules, teacher trust, reward gate, length-neutral future KL")
    box.add_class("hybridlab-recipe")
    return controls, box
