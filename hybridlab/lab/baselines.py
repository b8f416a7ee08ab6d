"""Baselines compared on the same sampled groups: the change in the estimate's variance against no baseline.

A baseline b keeps the score-function estimate unbiased when it is independent of y_t given s_t: a function of
the state, or a leave-one-out mean over *other* responses of the group (GRPO, RLOO). Which one lowers the
variance depends on the return: b removes (roughly) the square of the return's mean, and a leave-one-out mean
adds its own noise, about Var(G_t) / (G - 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from . import controls as C
from .exact import SequenceSpace


def variance_changes(
    loss_fn: Callable,
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    baselines: Mapping[str, object],
    *,
    group_size: int,
    n_groups: int,
    seed: int = 1,
    **kwargs,
) -> dict[str, dict[str, float]]:
    """Monte Carlo variance of the per-group estimate for each baseline, on the **same** sampled groups.

    `baselines` maps a name to what `hybrid_loss` takes as `baseline=` ("none", "reward_group", "return_group",
    or a callable (actions, mask) -> [G, H] state baseline); the first entry is the reference (normally "none").
    Returns {"variance": name -> tr Cov x G (per-sample units), "variance_se": its standard error, "change": name -> (variance change vs the
    reference) / reference variance, "se": name -> its standard error over the groups}. Because every baseline sees
    the same groups, the change is measured far more precisely than each variance alone.
    """
    sq = {}  # per group: squared deviation of its estimate from the mean, in per-sample units (x G)
    for name, b in baselines.items():
        est = C.sampled_gradients(loss_fn, policy, teacher, space, reward, n_groups=n_groups, group_size=group_size,
                                  seed=seed, baseline=b, **kwargs)  # fmt: skip
        sq[name] = (est - est.mean(0)).pow(2).sum(1) * group_size
    ref_name = next(iter(baselines))
    ref = sq[ref_name]
    ref_var = float(ref.mean())
    out: dict[str, dict[str, float]] = {
        "variance": {k: float(v.mean()) for k, v in sq.items()},
        "variance_se": {k: float(v.std()) / n_groups**0.5 for k, v in sq.items()},
        "change": {},
        "se": {},
    }
    for k, v in sq.items():
        if k != ref_name:
            out["change"][k] = float((v - ref).mean()) / ref_var
            out["se"][k] = float((v - ref).std()) / n_groups**0.5 / ref_var
    return out


def shifted(reward: Callable, shift: float) -> Callable:
    """R(y) + shift: the same grad J (a constant reward has a zero expected score) with a return mean far from 0."""
    return lambda actions, mask: reward(actions, mask) + shift
