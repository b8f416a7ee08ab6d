"""The method map: each related method's published rule (`method_rules`) checked exactly against the hybridlab
setting that reproduces it, a nearby setting that must not (the negative control), and grad J.

A row is data (`MethodRow`): the rule, the setting, the wrong setting, the weights of the J it is compared with,
whether it is claimed unbiased, and what it gets right or wrong. `method_rows` lists them; `check_row` measures
one row in the one way every row is measured (float64, every response or every group of responses enumerated);
`method_map` checks them all. A new method is one more `MethodRow` in `method_rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..hybrid import hybrid_loss
from . import controls as C
from . import exact as E
from .method_rules import (
    DTYPE,
    dpo_loss,
    gkd_loss,
    grpo_loss,
    hybrid_rule_loss,
    minillm_loss,
    opd_loss,
    ppo_kl_reward_loss,
    trl_distillation_loss,
)


@dataclass
class MethodCheck:
    """One row of the method map, with exact measurements (relative errors of expected gradients)."""

    name: str
    setting: str  # the hybridlab setting that reproduces the rule ("not expressible: ..." if none)
    match: float  # ||E[rule] - E[setting]|| / ||E[rule]||  (must be ~1e-15 when expressible)
    wrong_setting: str  # a nearby setting that must NOT reproduce the rule (negative control)
    wrong_gap: float  # ||E[rule] - E[wrong]|| / ||E[rule]||  (must be visible)
    vs_grad_j: float  # ||E[rule] - grad J|| / ||grad J||, J with the row's own weights
    unbiased: bool  # the claim: E[rule] == grad J (True) or not (False)
    verdict: str  # what the rule gets right or wrong about grad J
    tol: float = 1e-10  # the agreement `match` must reach (float64 rules: rounding; TRL's float32 code: 1e-5)

    @property
    def expressible(self) -> bool:
        return not self.setting.startswith("not expressible")


def _setting_str(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v:g}" for k, v in kwargs.items())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class MethodRow:
    """One related method as data: its rule, the hybridlab setting that should reproduce it, and the claim."""

    name: str
    rule: Callable  # the method's loss, written from its formula (`method_rules`)
    setting: dict | None  # the hybridlab options that reproduce it (None: not expressible)
    wrong: dict  # a nearby hybridlab setting that must NOT reproduce it (the negative control)
    j_weights: tuple[float, float]  # (lam, beta) of the J the rule is compared with
    unbiased: bool  # the claim: E[rule] == grad J
    verdict: str  # what the rule gets right or wrong about grad J
    batch: bool = False  # a token mean or a group: checked over every ordered group of G responses
    setting_fn: Callable = hybrid_loss  # what `setting` is passed to (a negative control for some rows)
    setting_text: str | None = None  # how the setting reads in the table (default: the options)
    tol: float = 1e-10  # the agreement `match` must reach (float64 rules: rounding; TRL's float32 code: 1e-5)


def method_rows(*, lam: float = 1.0, beta: float = 0.5, group_size: int = 2) -> list[MethodRow]:
    """Every related method of the map, as rows (GKD, TRL distillation, on-policy distillation, MiniLLM, GRPO,
    PPO-RLHF, this paper's hybrid). Distillation rows use J with lam = 0, beta = 1; GRPO without its KL term
    uses J = lam E[R]."""
    g = group_size
    distill = dict(lam=0.0, beta=1.0)
    grpo_kw = dict(
        beta=0.0, lam=lam * (g - 1) / g, baseline="reward_group", group_size=g, normalize="per_sequence"
    )
    return [
        MethodRow(
            "GKD (on-policy, reverse KL, 1/length per response)",
            partial(gkd_loss, reduction="per_sequence"),
            dict(**distill, future="none", normalize="per_sequence"),
            dict(**distill, future="none", normalize="sequences"),
            (0.0, 1.0),
            False,
            "myopic (no future KL), and 1/length reweights responses: not grad KL; fixed point the teacher if reachable",
        ),
        MethodRow(
            f"TRL DistillationTrainer (beta=1, token mean, batch of {g})",
            partial(gkd_loss, reduction="tokens"),
            dict(**distill, future="none", normalize="tokens"),
            dict(**distill, future="none", normalize="per_sequence"),
            (0.0, 1.0),
            False,
            "myopic, and a token mean over the batch (a ratio of random sums): not grad KL",
            batch=True,
        ),
        MethodRow(
            f"TRL DistillationTrainer, its own code (_chunked_divergence_loss, float32, batch of {g})",
            trl_distillation_loss,
            dict(**distill, future="none", normalize="tokens"),
            dict(**distill, future="analytic", normalize="tokens"),
            (0.0, 1.0),
            False,
            "the same rule as the row above, run through TRL itself (agreement to float32 rounding)",
            batch=True,
            tol=1e-5,
        ),
        MethodRow(
            "GKD with forward KL (TRL beta=0) on the student's samples, summed over tokens",
            partial(gkd_loss, reduction="sequences", divergence="forward"),
            dict(**distill),
            dict(**distill, future="none"),
            (0.0, 1.0),
            False,
            "follows the forward KL per visited state (mode covering), not the reverse KL of J: "
            "only the Bregman-as-loss negative control (k3_loss) reproduces it",
            setting_fn=C.CONTROLS["k3_loss"],
            setting_text="controls.kl_as_loss(kind='k3', lam=0, beta=1) (a negative control)",
        ),
        MethodRow(
            "On-policy distillation, sampled-token advantage (discount 0)",
            partial(opd_loss, lam=0.0, beta=1.0),
            dict(**distill, future="none"),
            dict(**distill, future="k1"),
            (0.0, 1.0),
            False,
            "same expectation as the dense term alone (myopic): misses the future KL; "
            "fixed point the teacher for pure imitation, the wrong one once a reward is added",
        ),
        MethodRow(
            "MiniLLM (single-step decomposition, gamma = 1)",
            partial(minillm_loss, beta=1.0),
            dict(**distill, future="k1"),
            dict(**distill, future="none"),
            (0.0, 1.0),
            True,
            "exact: dense term + sampled future log-ratios (the log-ratio future estimator)",
        ),
        MethodRow(
            "MiniLLM with discount gamma = 0.9",
            partial(minillm_loss, beta=1.0, gamma=0.9),
            dict(**distill, future="k1", gamma=0.9),
            dict(**distill, future="k1"),
            (0.0, 1.0),
            False,
            "gamma < 1 shrinks the future KL: the gradient of a different objective",
        ),
        MethodRow(
            "MiniLLM with length normalisation",
            partial(minillm_loss, beta=1.0, length_normalize=True),
            None,
            dict(**distill, future="k1"),
            (0.0, 1.0),
            False,
            "the future sum becomes a mean over the remaining tokens: a different objective (not a discount)",
            setting_text="not expressible: hybridlab discounts geometrically; a mean over remaining tokens is not",
        ),
        MethodRow(
            f"GRPO, no KL term, no std scaling (group of {g})",
            partial(grpo_loss, lam=lam, group_size=g),
            grpo_kw,
            {**grpo_kw, "lam": lam},
            (lam, 0.0),
            False,
            "the group mean includes the sample: a leave-one-out baseline times (G-1)/G; "
            "1/length per response changes the objective (favours short answers)",
            batch=True,
        ),
        MethodRow(
            f"GRPO with std scaling (group of {g})",
            partial(grpo_loss, lam=lam, group_size=g, scale_std=True),
            None,
            grpo_kw,
            (lam, 0.0),
            False,
            "dividing by the group's reward spread is a data-dependent step size: a different, biased direction",
            batch=True,
            setting_text="not expressible: hybridlab's advantages are not rescaled per group",
        ),
        MethodRow(
            f"GRPO with its KL in the loss (Bregman estimator, beta_KL = {beta:g})",
            partial(grpo_loss, lam=lam, group_size=g, beta_kl=beta),
            {**grpo_kw, "beta": beta},
            {**grpo_kw, "beta": beta},
            (lam, beta),
            False,
            "differentiating the Bregman estimate r - 1 - log r gives the forward KL per state, not the reverse KL of J: "
            "only the Bregman-as-loss negative control (k3_loss) reproduces it",
            batch=True,
            setting_fn=C.CONTROLS["k3_loss"],
            setting_text="controls.kl_as_loss(kind='k3', ...) with the GRPO options (a negative control)",
        ),
        MethodRow(
            "PPO-RLHF, log-ratio penalty in the reward, no critic",
            partial(ppo_kl_reward_loss, lam=lam, beta=beta),
            dict(lam=lam, beta=beta, future="k1"),
            dict(lam=lam, beta=beta, future="none"),
            (lam, beta),
            True,
            "exact (the return from t on includes k_t once); hybridlab replaces the sampled k_t by its "
            "expectation, the full-vocabulary KL_t: same mean, less variance",
        ),
        MethodRow(
            "This paper's hybrid (dense + analytic future KL)",
            partial(hybrid_rule_loss, lam=lam, beta=beta),
            dict(lam=lam, beta=beta, future="analytic"),
            dict(lam=lam, beta=beta, future="analytic", gamma=0.5),
            (lam, beta),
            True,
            "exact: grad J",
        ),
    ]


def check_row(
    row: MethodRow,
    student: nn.Module,
    teacher: nn.Module,
    space: E.SequenceSpace,
    reward: Callable,
    *,
    group_size: int = 2,
    group_space: E.SequenceSpace | None = None,
    group_reward: Callable | None = None,
) -> MethodCheck:
    """Measure one row exactly (float64, every response enumerated): the rule against its setting, against the
    wrong setting, and against grad J.

    Per-response rules are compared through `controls.expected_gradient` (every response weighted by pi(y));
    rules that need a batch (a token mean, a group mean) through `controls.exact_moments` over every ordered group
    of `group_size` responses, on `group_space` / `group_reward` if given (S^G groups: keep S small there).
    """
    ctx = (student, teacher, space, reward)
    ctx_g = (student, teacher, group_space or space, group_reward or reward)

    def evaluate(loss_fn, **kw):
        if not row.batch:
            return C.expected_gradient(loss_fn, *ctx, **kw)
        kw.pop("group_size", None)  # every group has group_size responses
        return C.exact_moments(loss_fn, *ctx_g, group_size=group_size, **kw)["mean"]

    lam_j, beta_j = row.j_weights
    grad_j = E.exact_gradient(*(ctx_g if row.batch else ctx), lam=lam_j, beta=beta_j)
    e_rule = evaluate(row.rule)
    e_wrong = evaluate(hybrid_loss, **row.wrong)
    if row.setting is None:
        match, setting = float("nan"), row.setting_text
    else:
        match = _rel(evaluate(row.setting_fn, **row.setting), e_rule)
        setting = row.setting_text or _setting_str(row.setting)
    return MethodCheck(
        name=row.name,
        setting=setting,
        match=match,
        wrong_setting=_setting_str(row.wrong),
        wrong_gap=_rel(e_wrong, e_rule),
        vs_grad_j=_rel(e_rule, grad_j),
        unbiased=row.unbiased,
        verdict=row.verdict,
        tol=row.tol,
    )


def method_map(
    student: nn.Module,
    teacher: nn.Module,
    space: E.SequenceSpace,
    reward: Callable,
    *,
    lam: float = 1.0,
    beta: float = 0.5,
    group_size: int = 2,
    group_space: E.SequenceSpace | None = None,
    group_reward: Callable | None = None,
) -> list[MethodCheck]:
    """Check every row of `method_rows` on one toy, exactly (see `check_row`)."""
    ctx = dict(group_size=group_size, group_space=group_space, group_reward=group_reward)
    return [
        check_row(row, student, teacher, space, reward, **ctx)
        for row in method_rows(lam=lam, beta=beta, group_size=group_size)
    ]


@dataclass
class DPOCheck:
    """DPO's population loss at the optimum of J and elsewhere (gradients w.r.t. sequence log-probabilities)."""

    grad_at_optimum: float  # ||grad L_DPO|| at pi* = pi_T exp(lam R / beta) / Z (relative to the one at pi_T)
    grad_j_at_optimum: float  # ||grad J|| at pi* (relative to the one at pi_T)
    grad_at_wrong: float  # ||grad L_DPO|| at the optimum for 2 lam / beta (relative): must be visible
    implicit_reward_spread: (
        float  # max |beta log(pi*/pi_T) - lam R - c|: DPO's implicit reward is lam R + const
    )


def dpo_check(
    teacher: nn.Module, space: E.SequenceSpace, reward: Callable, *, lam: float, beta: float
) -> DPOCheck:
    """DPO against hybridlab's optimum, over a free distribution on the S responses (pi = softmax(u)).

    hybridlab's J and DPO's loss (Bradley-Terry preferences from lam R, pairs drawn from pi_T) are both stationary
    at pi* = pi_T exp(lam R / beta) / Z; moving lam/beta moves the point where DPO is stationary.
    """
    with torch.no_grad():
        logq = E.token_logprobs(teacher, space.actions, space.mask).sum(1)
        r = reward(space.actions, space.mask).to(DTYPE)

    def grads(u0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = u0.clone().requires_grad_(True)
        logp = torch.log_softmax(u, 0)
        (g_dpo,) = torch.autograd.grad(dpo_loss(logp, logq, r, lam=lam, beta=beta), u)
        u = u0.clone().requires_grad_(True)
        logp = torch.log_softmax(u, 0)
        j = (logp.exp() * (lam * r - beta * (logp - logq))).sum()
        (g_j,) = torch.autograd.grad(j, u)
        return g_dpo, g_j

    log_star = E.tilted_distribution(logq, r, lam=lam, beta=beta).log()
    log_wrong = E.tilted_distribution(logq, r, lam=2 * lam, beta=beta).log()
    ref_dpo, ref_j = grads(logq)
    at_star_dpo, at_star_j = grads(log_star)
    at_wrong_dpo, _ = grads(log_wrong)
    implicit = beta * (log_star - logq) - lam * r
    return DPOCheck(
        grad_at_optimum=float(at_star_dpo.norm() / ref_dpo.norm()),
        grad_j_at_optimum=float(at_star_j.norm() / ref_j.norm()),
        grad_at_wrong=float(at_wrong_dpo.norm() / ref_dpo.norm()),
        implicit_reward_spread=float(implicit.max() - implicit.min()),
    )


def markdown_table(rows: list[MethodCheck]) -> str:
    """The method map's measured columns as a Markdown table (for `IPython.display.Markdown`)."""
    lines = [
        "| method | hybridlab setting | rule vs setting | wrong setting (negative control) | its gap | "
        "rule vs grad J | what the rule gets right or wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        match = "—" if not r.expressible else f"{r.match:.0e}"
        lines.append(
            f"| {r.name} | `{r.setting}` | {match} | `{r.wrong_setting}` | {r.wrong_gap:.2f} | "
            f"{r.vs_grad_j:.0e} | {r.verdict} |"
        )
    return "\n".join(lines)
