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
from .method_rules_2026 import (
    additive_opd_loss,
    gopd_loss,
    kdrl_loss,
    opdvr_loss,
    sequential_loss,
    trust_loss,
    vopd_loss,
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
    def show(v):
        return (
            repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, (int, float)) else type(v).__name__
        )

    return ", ".join(f"{k}={show(v)}" for k, v in kwargs.items() if v is not None)


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
    wrong_fn: Callable = hybrid_loss  # what `wrong` is passed to
    j_reward: Callable | None = None  # teacher -> the reward of this row's J (default: the toy's reward)


def gated_hybrid(student_logits, teacher_logits, actions, rewards, *, beta: float, gate: float, **kw):
    """`TrainConfig(dense_gate="incorrect", gate_reward=gate)`: hybrid_loss with beta_b = beta 1[R_b < gate]."""
    beta_b = beta * (rewards < gate).to(DTYPE)
    return hybrid_loss(student_logits, teacher_logits, actions, rewards, beta=beta_b, **kw)


def extrapolated_teacher(
    student_logits, teacher_logits, actions, rewards, *, lam_x: float, reference=None, **kw
):
    """hybrid_loss against the per-token extrapolated teacher, logits lam_x log pi_T + (1 - lam_x) log pi_ref
    (renormalised by the softmax); `reference` None: uniform."""
    logq = torch.log_softmax(teacher_logits.to(DTYPE), -1)
    logr = torch.log_softmax(
        torch.zeros_like(logq) if reference is None else reference(actions).to(DTYPE), -1
    )
    return hybrid_loss(student_logits, lam_x * logq + (1 - lam_x) * logr.detach(), actions, rewards, **kw)


def teacher_success(teacher: nn.Module, space: E.SequenceSpace, reward: Callable, gate: float) -> float:
    """p_T = P_{y ~ pi_T}(R(y) >= gate), exactly over the enumeration (what teacher trust estimates by sampling)."""
    with torch.no_grad():
        p = E.sequence_probs(teacher, space)
        return float((p * (reward(space.actions, space.mask) >= gate).to(DTYPE)).sum())


def _log_ratio_reward(reference) -> Callable:
    """teacher -> R(y) = log pi_T(y) - log pi_ref(y): the reward of G-OPD's J, written as hybridlab's J."""

    def make(teacher):
        def reward(actions, mask):
            with torch.no_grad():
                logq = E.token_logprobs(teacher, actions, mask).sum(1)
                if reference is None:
                    v = teacher(actions).shape[-1]
                    return logq + mask.sum(1).to(DTYPE) * torch.log(torch.tensor(float(v), dtype=DTYPE))
                return logq - E.token_logprobs(reference, actions, mask).sum(1)

        return reward

    return make


def method_rows(
    *,
    lam: float = 1.0,
    beta: float = 0.5,
    group_size: int = 2,
    gate: float = 0.0,
    success: float = 0.5,
    reference: nn.Module | None = None,
    lam_x: float = 1.5,
) -> list[MethodRow]:
    """Every related method of the map, as rows (GKD, TRL distillation, on-policy distillation, MiniLLM, GRPO,
    PPO-RLHF, this paper's hybrid, then the 2026 family that mixes a teacher with a reward). Distillation rows use
    J with lam = 0, beta = 1; GRPO without its KL term uses J = lam E[R].

    gate: a response with R < gate is incorrect (KDRL, OPDVR, the dense gate); success: the teacher's success rate
    p_T (teacher trust; `method_map` measures it exactly); reference, lam_x: G-OPD's reference policy (None:
    uniform) and reward scale."""
    g = group_size
    shrunk = lam * (g - 1) / g  # the group mean includes the sample: a leave-one-out baseline times (G-1)/G
    myopic_g = dict(lam=shrunk, beta=beta, future="none", baseline="reward_group", group_size=g)
    distill = dict(lam=0.0, beta=1.0)
    grpo_kw = dict(
        beta=0.0, lam=lam * (g - 1) / g, baseline="reward_group", group_size=g, normalize="per_sequence"
    )

    def grpo_k3() -> dict:
        """GRPO with the k3 KL in its loss (the reference, or the teacher for dGRPO): a fresh copy per row."""
        return dict(
            rule=partial(grpo_loss, lam=lam, group_size=g, beta_kl=beta),
            setting={**grpo_kw, "beta": beta},
            wrong={**grpo_kw, "beta": beta},
            j_weights=(lam, beta),
            unbiased=False,
            batch=True,
            setting_fn=C.CONTROLS["k3_loss"],
            setting_text="controls.kl_as_loss(kind='k3', ...) with the GRPO options (a negative control)",
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
            dict(**distill, future="k1", future_norm="mean"),
            dict(**distill, future="k1"),
            (0.0, 1.0),
            False,
            "the future sum becomes a mean over the remaining tokens (TOP-D's length-neutral return): ending early "
            "no longer lowers it, but it is the gradient of no fixed objective",
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
            verdict="differentiating the Bregman estimate r - 1 - log r gives the forward KL per state, not the "
            "reverse KL of J: only the Bregman-as-loss negative control (k3_loss) reproduces it",
            **grpo_k3(),
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
        # -- the 2026 family: a teacher and a reward together
        MethodRow(
            f"Additive advantage A_RL - beta k1 (slime, verl, Tinker, AReaL, prime-rl; group of {g})",
            partial(additive_opd_loss, lam=lam, beta=beta, group_size=g),
            myopic_g,
            {**myopic_g, "future": "analytic"},
            (shrunk, beta),
            False,
            "the sampled k_t has the dense term's mean: myopic (no future KL), so biased once a reward is mixed "
            "in (J's lam is the group mean's (G-1)/G lam)",
            batch=True,
        ),
        MethodRow(
            f"KDRL: GRPO + k2 KD loss masked on correct responses (R >= {gate:g}; group of {g})",
            partial(kdrl_loss, lam=lam, beta=beta, group_size=g, gate=gate),
            None,
            {**myopic_g, "gate": gate},
            (shrunk, beta),
            False,
            "myopic, and the mask depends on the response: no fixed objective. The nearest setting, "
            "dense_gate='incorrect' (the wrong-setting column), gates the analytic KL_t: another mean",
            batch=True,
            setting_text="not expressible: dense_gate gates the analytic KL_t, KDRL the sampled k2 (the gate "
            "depends on y_t, so the means differ)",
            wrong_fn=gated_hybrid,
        ),
        MethodRow(
            f"OPDVR: lam R + verifier-gated log-ratio (-beta k_t where R < {gate:g})",
            partial(opdvr_loss, lam=lam, beta=beta, gate=gate),
            None,
            dict(lam=lam, beta=beta, future="none", gate=gate),
            (lam, beta),
            False,
            "KDRL's mask on the sampled log-ratio (per sample the same gradient as the gated k2): myopic, gated, "
            "biased; the wrong-setting column is dense_gate='incorrect'",
            setting_text="not expressible: dense_gate gates the analytic KL_t, not the sampled log-ratio",
            wrong_fn=gated_hybrid,
        ),
        MethodRow(
            f"G-OPD / ExOPD: reward lam_x log(pi_T / pi_ref), lam_x = {lam_x:g} (per token, discount 0)",
            partial(gopd_loss, lam_x=lam_x, reference=reference),
            dict(lam=0.0, beta=1.0, future="none", lam_x=lam_x, reference=reference),
            dict(**distill, future="none"),
            (lam_x - 1.0, 1.0),
            False,
            "per token it is myopic distillation towards the extrapolated teacher pi_T^lam_x pi_ref^(1-lam_x); its J "
            "is hybridlab's with reward log(pi_T / pi_ref)(y), lam = lam_x - 1, beta = 1 (the exact estimator "
            "follows that J; the per-token rule misses its future terms)",
            setting_fn=extrapolated_teacher,
            setting_text=f"hybrid_loss(lam=0, beta=1, future='none') against the teacher logits {lam_x:g} log pi_T "
            f"+ {1 - lam_x:g} log pi_ref (a transformed teacher; no TrainConfig key)",
            j_reward=_log_ratio_reward(reference),
        ),
        MethodRow(
            f"dGRPO: GRPO with the teacher as its KL anchor (k3 in the loss, beta_KL = {beta:g}; group of {g})",
            verdict="the 'GRPO with its KL' row with the teacher as reference (written from its description): the "
            "k3 loss follows the forward KL per state, not the reverse KL of J",
            **grpo_k3(),
        ),
        MethodRow(
            "vOPD: sampled-token OPD minus its value baseline -beta KL_t(s_t)",
            partial(vopd_loss, beta=1.0),
            dict(**distill, future="none"),
            dict(**distill, future="k1"),
            (0.0, 1.0),
            False,
            "the baseline keeps OPD's mean (the dense term's: myopic); it lowers the variance with a sharp teacher "
            "far from the student, not always near it; the analytic KL_t has less than both",
        ),
        MethodRow(
            "Sequential OPD -> RL, phase 1 (distil: lam = 0)",
            partial(sequential_loss, step=0, switch_step=1, lam=lam, beta=beta),
            dict(lam=0.0, beta=beta, future="none"),
            dict(lam=lam, beta=beta, future="none"),
            (0.0, beta),
            False,
            "phase 1 is OPD (myopic, right fixed point for pure imitation); TrainConfig lam_schedule='switch' "
            "(lam 0 -> lam_final), beta_schedule='switch' (beta -> 0) at switch_step",
        ),
        MethodRow(
            "Sequential OPD -> RL, phase 2 (RL: beta = 0)",
            partial(sequential_loss, step=1, switch_step=1, lam=lam, beta=beta),
            dict(lam=lam, beta=0.0),
            dict(lam=lam, beta=beta, future="none"),
            (lam, 0.0),
            True,
            "phase 2 is REINFORCE: exact for its J = lam E[R]; each phase follows its own J, the run no single one",
        ),
        MethodRow(
            f"Teacher trust (preset hybrid_trust): myopic hybrid, beta x p_T = {beta:g} x {success:.3f}",
            partial(trust_loss, lam=lam, beta=beta, success=success),
            dict(lam=lam, beta=beta * success, future="none"),
            dict(lam=lam, beta=beta, future="none"),
            (lam, beta * success),
            False,
            "myopic for J with beta p_T (keeping the future KL makes it exact for that J); per prompt, "
            "beta_x = beta p_T(x) is the gradient of E_x[lam E R - beta_x KL_x]",
            setting_text=f"teacher_trust='per_prompt', future='none': beta={beta * success:.4g}",
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
    j_ctx = list(ctx_g if row.batch else ctx)
    if row.j_reward is not None:
        j_ctx[3] = row.j_reward(teacher)
    grad_j = E.exact_gradient(*j_ctx, lam=lam_j, beta=beta_j)
    e_rule = evaluate(row.rule)
    e_wrong = evaluate(row.wrong_fn, **row.wrong)
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
    gate: float = 0.0,
    reference: nn.Module | None = None,
    lam_x: float = 1.5,
) -> list[MethodCheck]:
    """Check every row of `method_rows` on one toy, exactly (see `check_row`); the teacher's success rate for
    teacher trust is measured exactly on the toy (`teacher_success` with `gate`)."""
    ctx = dict(group_size=group_size, group_space=group_space, group_reward=group_reward)
    p_t = teacher_success(teacher, space, reward, gate)
    rows = method_rows(lam=lam, beta=beta, group_size=group_size, gate=gate, success=p_t, reference=reference,
                       lam_x=lam_x)  # fmt: skip
    return [check_row(row, student, teacher, space, reward, **ctx) for row in rows]


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
    """The method map's measured numbers as a narrow Markdown table (for `IPython.display.Markdown`): short
    columns only, so that it fits a laptop page; the settings and verdicts are in `markdown_settings`."""
    lines = [
        "| method | rule vs its setting | negative control's gap | rule vs grad J | unbiased for grad J |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        match = "— (not expressible)" if not r.expressible else f"{r.match:.0e}"
        lines.append(
            f"| {r.name} | {match} | {r.wrong_gap:.2f} | {r.vs_grad_j:.0e} | {'yes' if r.unbiased else 'no'} |"
        )
    return "\n".join(lines)


def markdown_settings(rows: list[MethodCheck]) -> str:
    """One Markdown list item per row of the map: its hybridlab setting, the negative control and the verdict
    (a list, not table columns: long settings wrap instead of widening the page)."""
    return "\n".join(
        f"- **{r.name}**: setting `{r.setting}`; negative control `{r.wrong_setting}`. {r.verdict}"
        for r in rows
    )
