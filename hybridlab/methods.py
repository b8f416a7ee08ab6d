"""Related methods, each written from its published formula, and the hybridlab setting that reproduces it.

Every rule below is a *loss* with `hybrid_loss`'s calling convention, f(student_logits [B, T, V],
teacher_logits [B, T, V], actions [B, T], rewards [B], *, mask, seq_weights, temperature, group_size, ...),
so the exact-expectation machinery of `hybridlab.controls` (enumeration with seq_weights = pi(y), or every
group of G responses) applies unchanged. Each is implemented from scratch with `log_softmax` (no code from
`dense`, `sparse` or `hybrid`), so agreement with a hybridlab setting is an independent check.

Notation: k_t = log pi_theta(y_t|s_t) - log pi_T(y_t|s_t) (sampled-token log-ratio), KL_t(s) the full-vocabulary
reverse KL at a visited state, r_t = pi_T(y_t|s_t) / pi_theta(y_t|s_t). On the teacher side "pi_T" is the
teacher, or the reference policy for methods that regularise towards one (GRPO, PPO-RLHF, DPO).

The rules (on-policy step: importance ratios are 1 and clipping is inactive):

``gkd_loss``            GKD (Agarwal et al. 2024) with on-policy data and reverse KL, which is also TRL's
                        DistillationTrainer / GKDTrainer at beta = 1: sum_t KL_t(s_t) at the sampled states, no
                        gradient through the sampling; per response 1/|y| (paper) or a token mean over the batch
                        (TRL).
``opd_loss``            on-policy distillation with sampled-token advantages (the Thinking Machines / Tinker
                        recipe): per-token advantage A_t = -beta k_t (+ lam R when a reward is mixed in),
                        discount 0, REINFORCE.
``minillm_loss``        MiniLLM (Gu et al. 2024): the single-step term (full-vocabulary KL at step t) plus the
                        long-term term with the future log-ratios, optionally discounted (gamma) and length
                        normalised (averaged over the remaining tokens).
``grpo_loss``           GRPO (Shao et al. 2024): group-relative advantage (R_i - mean R) [/ std R], 1/|o_i| per
                        response, and the KL to the reference added to the loss with the k3 estimator.
``ppo_kl_reward_loss``  PPO-RLHF (Ziegler et al. 2019; Ouyang et al. 2022): per-token reward -beta k_t, lam R at
                        the end, undiscounted return from t on (no critic), REINFORCE.
``hybrid_rule_loss``    this paper's estimator: beta KL_t at step t (dense) plus the score times lam R - beta
                        sum_{t'>t} KL_t' (sparse).
``dpo_loss``            DPO (Rafailov et al. 2023), population loss over every pair of responses with
                        Bradley-Terry preferences sigma(lam R_i - lam R_j): sequence-level, offline.

`method_map` evaluates every rule against its hybridlab setting, a deliberately wrong setting (the negative
control) and grad J, exactly, and returns one `MethodCheck` per row.

The module also holds the small reference experiments of notebook 03 (`fit_bump`: a two-parameter student fitted
by reverse vs forward KL, i.e. on-policy distillation vs supervised KD / GKD at TRL's beta = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import controls as C
from . import exact as E
from .hybrid import hybrid_loss

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------------------
# Shared pieces, from the formulas (plain autograd).


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def token_terms(student_logits, teacher_logits, actions, mask, temperature: float = 1.0):
    """(logp [B, T], logq [B, T], kl [B, T]): sampled-token log-probs of student (differentiable) and teacher,
    and the full-vocabulary reverse KL per visited state (differentiable, states fixed). 0 on padding."""
    logp_all = torch.log_softmax(student_logits / temperature, -1)
    logq_all = torch.log_softmax(teacher_logits.detach().to(logp_all.dtype), -1)
    idx = actions.clamp_min(0)[..., None]
    logp = logp_all.gather(-1, idx)[..., 0]
    logq = logq_all.gather(-1, idx)[..., 0]
    kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    z = _zero(logp)
    return torch.where(mask, logp, z), torch.where(mask, logq, z), torch.where(mask, kl, z)


def _weights(mask: torch.Tensor, seq_weights, dtype) -> torch.Tensor:
    """w_b / B: each response's multiplier for a mean over the batch (w_b = pi(y_b) when enumerating)."""
    b = mask.shape[0]
    w = torch.ones(b, dtype=dtype, device=mask.device) if seq_weights is None else seq_weights.to(dtype)
    return w / b


def _future(x: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_{t' > t} gamma^(t' - t) x_t' over response tokens, written as a loop: [B, T]."""
    x = torch.where(mask, x, _zero(x))
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for u in range(t + 1, x.shape[1]):
            out[:, t] = out[:, t] + gamma ** (u - t) * x[:, u]
    return out


def _mask(mask, actions):
    return torch.ones(actions.shape, dtype=torch.bool) if mask is None else mask


# ----------------------------------------------------------------------------------------------------------
# The rules. Each returns a scalar loss; -grad(loss) is the rule's estimate (a mean over the batch).


def gkd_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    reduction: str = "per_sequence",
    divergence: str = "reverse",
    beta: float = 1.0,
    **_,
) -> torch.Tensor:
    """GKD, on-policy (lambda_GKD = 1), divergence = reverse KL (TRL's beta = 1):

        loss = beta * sum_b c_b sum_t KL(pi_theta(.|s_t) || pi_T(.|s_t)),   states s_t from the student, held fixed

    reduction "per_sequence": c_b = w_b / (B |y_b|) (the paper's 1/L_y); "sequences": c_b = w_b / B; "tokens": c_b = w_b / (number of response
    tokens in the batch) (TRL's DistillationTrainer and GKDTrainer). The reward is not used.
    divergence "forward" uses KL(pi_T(.|s_t) || pi_theta(.|s_t)) instead (TRL's beta = 0, supervised KD's loss).
    """
    mask = _mask(mask, actions)
    if divergence == "reverse":
        _, _, kl = token_terms(student_logits, teacher_logits, actions, mask, temperature)
    elif divergence == "forward":
        logp_all = torch.log_softmax(student_logits / temperature, -1)
        logq_all = torch.log_softmax(teacher_logits.detach().to(logp_all.dtype), -1)
        kl = torch.where(mask, (logq_all.exp() * (logq_all - logp_all)).sum(-1), _zero(logp_all))
    else:
        raise ValueError(f"divergence must be 'reverse' or 'forward', got {divergence!r}")
    per_seq = kl.sum(1)
    if reduction == "per_sequence":
        c = _weights(mask, seq_weights, kl.dtype) / mask.sum(1).clamp_min(1).to(kl.dtype)
    elif reduction == "sequences":
        c = _weights(mask, seq_weights, kl.dtype)
    elif reduction == "tokens":
        w = torch.ones_like(per_seq) if seq_weights is None else seq_weights.to(kl.dtype)
        c = w / mask.sum().clamp_min(1).to(kl.dtype)
    else:
        raise ValueError(f"reduction must be 'per_sequence', 'sequences' or 'tokens', got {reduction!r}")
    return beta * (c * per_seq).sum()


def trl_distillation_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    **_,
) -> torch.Tensor:
    """TRL's own code: `trl.trainer.distillation_trainer._chunked_divergence_loss` at beta = 1 (reverse KL), with
    identity LM heads so that its "hidden states" are our logits. A token mean over the batch; TRL computes in
    float32. Needs `trl` (in hybridlab's dev extra); a batch rule (no seq_weights).
    """
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as err:  # pragma: no cover - trl is in the dev extra
        raise ImportError(
            "trl_distillation_loss needs trl>=1.16 (pip install -e '.[dev]' or '.[trl]')"
        ) from err
    if seq_weights is not None:
        raise ValueError("trl_distillation_loss is a batch rule (a token mean): pass no seq_weights")
    if temperature != 1.0:
        raise ValueError("TRL divides the teacher's logits by the temperature too: compare at temperature 1")
    mask = _mask(mask, actions)
    v = student_logits.shape[-1]
    eye = torch.eye(v, dtype=student_logits.dtype, device=student_logits.device)
    loss, _, _ = _chunked_divergence_loss(
        student_logits,
        teacher_logits.detach(),
        eye,
        eye,
        mask.long(),
        beta=1.0,
        num_items_in_batch=mask.sum(),
    )
    return loss.to(student_logits.dtype)


def opd_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    lam: float = 0.0,
    beta: float = 1.0,
    **_,
) -> torch.Tensor:
    """On-policy distillation with sampled-token advantages (discount 0), optionally with a task reward:

    A_t = lam R - beta k_t,     loss = -sum_b c_b sum_t log pi_theta(y_t|s_t) * stopgrad(A_t)
    """
    mask = _mask(mask, actions)
    logp, logq, _ = token_terms(student_logits, teacher_logits, actions, mask, temperature)
    adv = (lam * rewards.to(logp.dtype)[:, None] - beta * (logp - logq)).detach()
    c = _weights(mask, seq_weights, logp.dtype)
    return -(c[:, None] * logp * torch.where(mask, adv, _zero(adv))).sum()


def minillm_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    mask=None,
    seq_weights=None,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    length_normalize: bool = False,
    **_,
) -> torch.Tensor:
    """MiniLLM's gradient of the reverse KL with the single-step decomposition:

        grad = (grad L)_single + (grad L)_long
        (grad L)_single = sum_t grad KL_t(s_t)                        (full vocabulary, states fixed)
        (grad L)_long   = -sum_t grad log pi_theta(y_t|s_t) R_{t+1},    R_{t+1} = sum_{t'>t} gamma^(t'-t) (-k_t')

    With `length_normalize`, R_{t+1} is divided by sum_{t'>t} gamma^(t'-t) over the remaining tokens (the mean
    future log-ratio; 0 when none remain). No reward (pure distillation); importance weights of the teacher-mixed
    sampling are 1 (samples from the student).
    """
    mask = _mask(mask, actions)
    logp, logq, kl = token_terms(student_logits, teacher_logits, actions, mask, temperature)
    r_future = _future(-(logp - logq).detach(), mask, gamma)
    if length_normalize:
        n_future = _future(torch.ones_like(logp), mask, gamma)
        r_future = torch.where(n_future > 0, r_future / n_future.clamp_min(1e-300), _zero(r_future))
    c = _weights(mask, seq_weights, logp.dtype)
    return beta * (c[:, None] * (kl - logp * r_future)).sum()


def grpo_loss(
    student_logits,
    teacher_logits,
    actions,
    rewards,
    *,
    group_size: int,
    mask=None,
    temperature: float = 1.0,
    lam: float = 1.0,
    beta_kl: float = 0.0,
    scale_std: bool = False,
    std_eps: float = 1e-4,
    **_,
) -> torch.Tensor:
    """GRPO's loss at the on-policy step (ratio 1, clipping inactive), outcome rewards, reference = `teacher`:

        A_i  = lam (R_i - mean_group R) [/ (std_group R + eps)]
        loss = -(1/G) sum_i (1/|o_i|) sum_t [ log pi_theta(o_it) stopgrad(A_i) - beta_kl * k3_it ]
        k3   = r - 1 - log r,   r = pi_ref(o_it) / pi_theta(o_it)   (differentiated through pi_theta)

    The group mean includes the sample itself (unlike a leave-one-out baseline).
    """
    mask = _mask(mask, actions)
    b = actions.shape[0]
    if group_size < 2 or b % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch size: group_size={group_size}, B={b}")
    logp, logq, _ = token_terms(student_logits, teacher_logits, actions, mask, temperature)
    r = rewards.to(logp.dtype).reshape(b // group_size, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(1, keepdim=True) + std_eps)
    adv = (lam * adv).reshape(b)
    log_r = logq - logp
    k3 = torch.where(mask, torch.exp(log_r) - 1 - log_r, _zero(logp))
    per_token = logp * adv[:, None] - beta_kl * k3
    lengths = mask.sum(1).clamp_min(1).to(logp.dtype)
    return -((per_token * mask).sum(1) / lengths).sum() / b


def ppo_kl_reward_loss(
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
    **_,
) -> torch.Tensor:
    """PPO-RLHF's policy gradient at the on-policy step with no critic (GAE with gamma = lambda = 1):

    per-token reward  rew_t = -beta k_t  (+ lam R at the last token)
    return            G_t   = sum_{t' >= t} rew_t' = lam R - beta sum_{t' >= t} k_t'
    loss              = -sum_b c_b sum_t log pi_theta(y_t|s_t) * stopgrad(G_t)
    """
    mask = _mask(mask, actions)
    logp, logq, _ = token_terms(student_logits, teacher_logits, actions, mask, temperature)
    k = torch.where(mask, (logp - logq).detach(), _zero(logp))
    from_t = _future(k, mask, 1.0) + k  # sum_{t' >= t}
    g = lam * rewards.to(logp.dtype)[:, None] - beta * from_t
    c = _weights(mask, seq_weights, logp.dtype)
    return -(c[:, None] * logp * torch.where(mask, g, _zero(g))).sum()


def hybrid_rule_loss(
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
    **_,
) -> torch.Tensor:
    """The paper's decomposition, from the boxed formula (analytic future KL, no baseline):

    loss = sum_b c_b sum_t [ beta KL_t(s_t) - log pi_theta(y_t|s_t) stopgrad(lam R - beta sum_{t'>t} KL_t') ]
    """
    mask = _mask(mask, actions)
    logp, _, kl = token_terms(student_logits, teacher_logits, actions, mask, temperature)
    g = lam * rewards.to(logp.dtype)[:, None] - beta * _future(kl.detach(), mask, 1.0)
    c = _weights(mask, seq_weights, logp.dtype)
    return (c[:, None] * (beta * kl - logp * torch.where(mask, g, _zero(g)))).sum()


def dpo_loss(
    logp_seq: torch.Tensor,
    logq_seq: torch.Tensor,
    rewards: torch.Tensor,
    *,
    lam: float,
    beta: float,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO's expected loss over every ordered pair (i, j) of responses, preferences from Bradley-Terry with
    reward lam R: P(i > j) = sigma(lam (R_i - R_j)). With h = log pi_theta(y) - log pi_T(y) (pi_T = reference):

        loss = -sum_{i != j} w_ij P(i > j) log sigma(beta (h_i - h_j))

    logp_seq, logq_seq, rewards: [S]; pair_weights [S, S] (default: pi_T(y_i) pi_T(y_j), responses drawn from the
    reference, as in DPO's offline data). Differentiable in logp_seq.
    """
    h = logp_seq - logq_seq.detach()
    pref = torch.sigmoid(lam * (rewards[:, None] - rewards[None, :])).to(h.dtype)
    margin = beta * (h[:, None] - h[None, :])
    w = (logq_seq[:, None] + logq_seq[None, :]).exp().detach() if pair_weights is None else pair_weights
    w = w * (1 - torch.eye(len(h), dtype=h.dtype))
    return -(w * pref * torch.nn.functional.logsigmoid(margin)).sum()


# ----------------------------------------------------------------------------------------------------------
# The map: every rule against its hybridlab setting, a wrong setting and grad J.


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
    """Evaluate every related method on one toy, exactly (float64, every response enumerated).

    Per-response rules are compared through `controls.expected_gradient` (every response weighted by pi(y));
    rules that need a batch (a token mean, a group mean) through `controls.exact_moments` over every ordered group
    of `group_size` responses, on `group_space` / `group_reward` if given (S^G groups: keep S small there).
    Distillation rows use J with lam = 0, beta = 1; GRPO without its KL term uses J = lam E[R].
    """
    g = group_size
    ctx = (student, teacher, space, reward)
    ctx_g = (student, teacher, group_space or space, group_reward or reward)

    def expected(loss_fn, **kw):
        return C.expected_gradient(loss_fn, *ctx, **kw)

    def grouped(loss_fn, **kw):
        kw.pop("group_size", None)  # every group has g responses
        return C.exact_moments(loss_fn, *ctx_g, group_size=g, **kw)["mean"]

    rows: list[MethodCheck] = []

    def add(name, rule, setting_kw, wrong_kw, j_weights, unbiased, verdict, *, batch=False, setting_fn=hybrid_loss,
            setting_text=None, tol=1e-10):  # fmt: skip
        evaluate = grouped if batch else expected
        grad_j = E.exact_gradient(*(ctx_g if batch else ctx), lam=j_weights[0], beta=j_weights[1])
        e_rule = evaluate(rule)
        e_wrong = evaluate(hybrid_loss, **wrong_kw)
        if setting_kw is None:
            match = float("nan")
            setting = setting_text
        else:
            match = _rel(evaluate(setting_fn, **setting_kw), e_rule)
            setting = setting_text or _setting_str(setting_kw)
        rows.append(
            MethodCheck(
                name=name,
                setting=setting,
                match=match,
                wrong_setting=_setting_str(wrong_kw),
                wrong_gap=_rel(e_wrong, e_rule),
                vs_grad_j=_rel(e_rule, grad_j),
                unbiased=unbiased,
                verdict=verdict,
                tol=tol,
            )
        )

    distill = dict(lam=0.0, beta=1.0)
    add(
        "GKD (on-policy, reverse KL, 1/length per response)",
        partial(gkd_loss, reduction="per_sequence"),
        dict(**distill, future="none", normalize="per_sequence"),
        dict(**distill, future="none", normalize="sequences"),
        (0.0, 1.0),
        False,
        "myopic (no future KL), and 1/length reweights responses: not grad KL; fixed point the teacher if reachable",
    )
    add(
        f"TRL DistillationTrainer (beta=1, token mean, batch of {g})",
        partial(gkd_loss, reduction="tokens"),
        dict(**distill, future="none", normalize="tokens"),
        dict(**distill, future="none", normalize="per_sequence"),
        (0.0, 1.0),
        False,
        "myopic, and a token mean over the batch (a ratio of random sums): not grad KL",
        batch=True,
    )
    add(
        f"TRL DistillationTrainer, its own code (_chunked_divergence_loss, float32, batch of {g})",
        trl_distillation_loss,
        dict(**distill, future="none", normalize="tokens"),
        dict(**distill, future="analytic", normalize="tokens"),
        (0.0, 1.0),
        False,
        "the same rule as the row above, run through TRL itself (agreement to float32 rounding)",
        batch=True,
        tol=1e-5,
    )
    add(
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
    )
    add(
        "On-policy distillation, sampled-token advantage (discount 0)",
        partial(opd_loss, lam=0.0, beta=1.0),
        dict(**distill, future="none"),
        dict(**distill, future="k1"),
        (0.0, 1.0),
        False,
        "same expectation as the dense term alone (myopic): misses the future KL; "
        "fixed point the teacher for pure imitation, the wrong one once a reward is added",
    )
    add(
        "MiniLLM (single-step decomposition, gamma = 1)",
        partial(minillm_loss, beta=1.0),
        dict(**distill, future="k1"),
        dict(**distill, future="none"),
        (0.0, 1.0),
        True,
        "exact: dense term + sampled future log-ratios (the log-ratio future estimator)",
    )
    add(
        "MiniLLM with discount gamma = 0.9",
        partial(minillm_loss, beta=1.0, gamma=0.9),
        dict(**distill, future="k1", gamma=0.9),
        dict(**distill, future="k1"),
        (0.0, 1.0),
        False,
        "gamma < 1 shrinks the future KL: the gradient of a different objective",
    )
    add(
        "MiniLLM with length normalisation",
        partial(minillm_loss, beta=1.0, length_normalize=True),
        None,
        dict(**distill, future="k1"),
        (0.0, 1.0),
        False,
        "the future sum becomes a mean over the remaining tokens: a different objective (not a discount)",
        setting_text="not expressible: hybridlab discounts geometrically; a mean over remaining tokens is not",
    )
    grpo_kw = dict(
        beta=0.0, lam=lam * (g - 1) / g, baseline="reward_group", group_size=g, normalize="per_sequence"
    )
    add(
        f"GRPO, no KL term, no std scaling (group of {g})",
        partial(grpo_loss, lam=lam, group_size=g),
        grpo_kw,
        {**grpo_kw, "lam": lam},
        (lam, 0.0),
        False,
        "the group mean includes the sample: a leave-one-out baseline times (G-1)/G; "
        "1/length per response changes the objective (favours short answers)",
        batch=True,
    )
    add(
        f"GRPO with std scaling (group of {g})",
        partial(grpo_loss, lam=lam, group_size=g, scale_std=True),
        None,
        grpo_kw,
        (lam, 0.0),
        False,
        "dividing by the group's reward spread is a data-dependent step size: a different, biased direction",
        batch=True,
        setting_text="not expressible: hybridlab's advantages are not rescaled per group",
    )
    add(
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
    )
    add(
        "PPO-RLHF, log-ratio penalty in the reward, no critic",
        partial(ppo_kl_reward_loss, lam=lam, beta=beta),
        dict(lam=lam, beta=beta, future="k1"),
        dict(lam=lam, beta=beta, future="none"),
        (lam, beta),
        True,
        "exact (the return from t on includes k_t once); hybridlab replaces the sampled k_t by its "
        "expectation, the full-vocabulary KL_t: same mean, less variance",
    )
    add(
        "This paper's hybrid (dense + analytic future KL)",
        partial(hybrid_rule_loss, lam=lam, beta=beta),
        dict(lam=lam, beta=beta, future="analytic"),
        dict(lam=lam, beta=beta, future="analytic", gamma=0.5),
        (lam, beta),
        True,
        "exact: grad J",
    )
    return rows


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


# ----------------------------------------------------------------------------------------------------------
# Notebook 03's small experiment: which divergence, fitted with limited capacity.


def bump_logits(tokens: torch.Tensor, centre, width) -> torch.Tensor:
    """Unnormalised log-density of a Gaussian bump on the token axis: -(j - centre)^2 / (2 width^2)."""
    return -((tokens - centre) ** 2) / (2 * width**2)


def fit_bump(
    divergence: str,
    teacher_logits: torch.Tensor,
    *,
    steps: int,
    centre: float = 20.0,
    log_width: float = 1.4,
    lr: float = 0.2,
) -> dict[str, object]:
    """Fit a two-parameter student (a bump: centre, log width) to a teacher over the vocabulary with Adam.

    divergence "reverse": KL(p || q), what on-policy distillation minimises (via `hybridlab.dense_kl`);
    "forward": KL(q || p), what supervised KD (GKD at TRL's beta = 0) minimises.
    Returns {"centre", "width", "p" [V], "loss"}.
    """
    from .dense import dense_kl

    if divergence not in ("reverse", "forward"):
        raise ValueError(f"divergence must be 'reverse' or 'forward', got {divergence!r}")
    tokens = torch.arange(teacher_logits.shape[-1], dtype=DTYPE)
    logq = torch.log_softmax(teacher_logits.to(DTYPE), -1)
    mu = torch.tensor(centre, dtype=DTYPE, requires_grad=True)
    log_sigma = torch.tensor(log_width, dtype=DTYPE, requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=lr)
    for _ in range(steps):
        logits = bump_logits(tokens, mu, log_sigma.exp())
        if divergence == "reverse":
            loss = dense_kl(logits[None], logq[None], backend="torch").sum()
        else:
            loss = (logq.exp() * (logq - torch.log_softmax(logits, 0))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.softmax(bump_logits(tokens, mu, log_sigma.exp()), 0)
    return {"centre": mu.item(), "width": log_sigma.exp().item(), "p": p, "loss": loss.item()}


def one_token_view(
    student: nn.Module, teacher: nn.Module, actions: torch.Tensor, mask: torch.Tensor, t: int
) -> dict[str, object]:
    """The pieces of the decomposition for one response (actions, mask: [H]) seen from step t (1-based):

    {"logratios": k_1..k_T [T], "vocab_terms": p(a|s_t) log(p(a|s_t)/q(a|s_t)) for every token a [V] (they sum to
    KL_t(s_t)), "sampled": y_t, "kl_t": KL_t(s_t)}.
    """
    n = int(mask.sum())
    if not 1 <= t <= n:
        raise ValueError(f"t must be a position 1..{n} of the response (1-based), got {t}")
    with torch.no_grad():
        logp = torch.log_softmax(student(actions[None]), -1)[0]
        logq = torch.log_softmax(teacher(actions[None]), -1)[0]
    idx = actions[:n, None]
    k = (logp[:n].gather(-1, idx) - logq[:n].gather(-1, idx))[:, 0]
    terms = logp[t - 1].exp() * (logp[t - 1] - logq[t - 1])
    return {"logratios": k, "vocab_terms": terms, "sampled": int(actions[t - 1]), "kl_t": float(terms.sum())}
