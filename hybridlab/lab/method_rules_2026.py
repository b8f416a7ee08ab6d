"""The 2026 family of related methods: rules that combine a teacher with a task reward, each written from its
published formula (see `hybridlab.lab.method_rules` for the calling convention, the notation and the list), at the
on-policy step (importance ratios 1, clipping inactive). What could not be checked against the source (its code
or its exact form) is said in each docstring.
"""

from __future__ import annotations

import torch

from .method_rules import _group_centred, _reinforce, _rule_terms, _score_loss, _weights, opd_loss


def additive_opd_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    group_size: int,
    mask=None,
    temperature: float = 1.0,
    lam: float = 1.0,
    beta: float = 1.0,
    **_,
) -> torch.Tensor:
    """The additive advantage of slime's `--opd-kl-coef` (its docs: A_t - coef * KL_t, KL_t the sampled-token
    log-ratio), Tinker's cookbook, verl / AReaL / prime-rl recipes: the group-relative RL advantage plus
    on-policy distillation's sampled-token term,

        A_t = lam (R_i - mean_group R) - beta k_t,    loss = -(1/B) sum_i sum_t log pi(y_it) stopgrad(A_t)

    Summed over tokens per response (the frameworks' token-mean aggregation adds the TRL row's bias); no std."""
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    adv = lam * _group_centred(rewards, group_size, logp.dtype)[:, None] - beta * (logp - logq)
    return _reinforce(logp, adv, mask, None)


def kdrl_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    group_size: int,
    mask=None,
    temperature: float = 1.0,
    lam: float = 1.0,
    beta: float = 1.0,
    gate: float = 0.0,
    **_,
) -> torch.Tensor:
    """KDRL's unified objective: the GRPO advantage and the reverse-KL KD loss with the k2 estimator
    (1/2 k_t^2, differentiated), masked on responses the reward calls correct (R >= gate):

        loss = -(1/B) sum_i sum_t [ log pi(y_it) stopgrad(lam (R_i - mean R)) - beta 1[R_i < gate] k_it^2 / 2 ]

    Written from the paper's description (k2, reward-guided masking); its GRPO normalisation and std are left
    out (the GRPO rows measure those). grad k2/2 = k_t grad log pi(y_t): per sample the gated k1 advantage."""
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    c = _weights(mask, None, logp.dtype)
    rl = _score_loss(logp, lam * _group_centred(rewards, group_size, logp.dtype)[:, None], mask, c)
    wrong = (rewards.to(logp.dtype) < gate).to(logp.dtype)
    return rl + beta * (c * wrong * (0.5 * (logp - logq) ** 2).sum(1)).sum()


def opdvr_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    lam: float = 1.0,
    beta: float = 1.0,
    gate: float = 0.0,
    **_,
) -> torch.Tensor:
    """Verifier-gated on-policy distillation (OPDVR, as its abstract describes it: the teacher's log-ratio
    only where the verifier rejects the response; the exact form was not available here):

        A_t = lam R - beta 1[R < gate] k_t   (sampled token, discount 0),   REINFORCE, summed over tokens / B"""
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    r = rewards.to(logp.dtype)[:, None]
    adv = lam * r - beta * (r < gate).to(logp.dtype) * (logp - logq)
    return _reinforce(logp, adv, mask, seq_weights)


def gopd_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    lam_x: float = 1.5,
    reference=None,
    **_,
) -> torch.Tensor:
    """G-OPD (Yang et al. 2026): J = E_y[ lam_x log(pi_T(y) / pi_ref(y)) - log(pi(y) / pi_ref(y)) ] (lam_x > 1:
    ExOPD, reward extrapolation), estimated per token as on-policy distillation does (discount 0, assumed):

        A_t = lam_x (log pi_T(y_t) - log pi_ref(y_t)) - (log pi(y_t) - log pi_ref(y_t)),   REINFORCE

    `reference`: a policy (actions -> logits) or None for a uniform reference (then the teacher at temperature
    1 / lam_x). The objective is from the paper; the per-token discount 0 is OPD's, not checked in its code."""
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    ref = torch.zeros_like(student_logits) if reference is None else reference(actions)
    logr = torch.log_softmax(ref.detach().to(logp.dtype), -1).gather(-1, actions.clamp_min(0)[..., None])[
        ..., 0
    ]
    adv = lam_x * (logq - logr) - (logp - logr)
    return _reinforce(logp, adv, mask, seq_weights)


def vopd_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    beta: float = 1.0,
    **_,
) -> torch.Tensor:
    """vOPD (Oh et al. 2026): on-policy distillation's sampled-token advantage -beta k_t minus its value,
    which has the closed form V(s_t) = -beta KL_t(s_t) (the full-vocabulary KL at the visited state):

        A_t = -beta (k_t - KL_t(s_t)),   REINFORCE (a baseline that does not depend on y_t: same mean, less variance)"""
    mask, logp, logq, kl = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    adv = -beta * ((logp - logq) - kl)
    return _reinforce(logp, adv, mask, seq_weights)


def sequential_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    step: int,
    switch_step: int,
    lam: float = 1.0,
    beta: float = 1.0,
    **kw,
) -> torch.Tensor:
    """Distil, then RL (sequential OPD -> RL): update `step` (0-based) uses on-policy distillation
    (A_t = -beta k_t) before `switch_step` and REINFORCE on lam R from then on."""
    if step < switch_step:
        return opd_loss(student_logits, teacher_logits, actions, rewards, lam=0.0, beta=beta, **kw)
    return opd_loss(student_logits, teacher_logits, actions, rewards, lam=lam, beta=0.0, **kw)


def trust_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    lam: float = 1.0,
    beta: float = 1.0,
    success: float = 1.0,
    **_,
) -> torch.Tensor:
    """Teacher trust (the `hybrid_trust` preset): the myopic hybrid with beta scaled by the teacher's success rate
    p_T on the prompt (here one prompt, so per-prompt and global trust coincide):

        loss = sum_b c_b sum_t [ beta p_T KL_t(s_t) - log pi(y_t) stopgrad(lam R) ]"""
    mask, logp, _, kl = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    c = _weights(mask, seq_weights, logp.dtype)
    r = lam * rewards.to(logp.dtype)[:, None].expand_as(logp)
    return (c[:, None] * beta * success * kl).sum() + _score_loss(logp, r, mask, c)
