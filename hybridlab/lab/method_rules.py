"""Related methods, each written from its published formula, and the hybridlab setting that reproduces it.

Every rule below is a *loss* with `hybrid_loss`'s calling convention, f(student_logits [B, T, V],
teacher_logits [B, T, V], actions [B, T], rewards [B], *, mask, seq_weights, temperature, group_size, ...),
so the exact-expectation machinery of `hybridlab.lab.controls` (enumeration with seq_weights = pi(y), or every
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

The 2026 family (combining a teacher with a reward; each written from the formula its paper or documentation
states, at the on-policy step; what could not be checked against the source is said in the docstring) lives in
`hybridlab.lab.method_rules_2026`, with the same calling convention:

``additive_opd_loss``   slime / verl / Tinker / AReaL / prime-rl: A_t = A_RL - beta k_t (sampled token, discount 0).
``kdrl_loss``           KDRL (Xu et al. 2025): GRPO advantage + the k2 KD loss, masked on correct responses.
``opdvr_loss``          OPDVR: lam R plus the sampled-token log-ratio advantage on responses the verifier rejects.
``gopd_loss``           G-OPD / ExOPD (Yang et al. 2026): reward lam_x log(pi_T / pi_ref) - log(pi / pi_ref).
``vopd_loss``           vOPD (Oh et al. 2026): OPD minus its closed-form value baseline -beta KL_t(s_t).
``sequential_loss``     distil, then RL: OPD for the first `switch_step` updates, then REINFORCE on lam R.
``trust_loss``          teacher trust: the myopic hybrid with beta scaled by the teacher's success rate p_T.
dGRPO (GRPO whose KL anchor is the teacher) is ``grpo_loss`` with ``beta_kl`` (this map's reference is the teacher).

`hybridlab.lab.method_map` checks every rule against its hybridlab setting, a deliberately wrong setting (the
negative control) and grad J, exactly.
"""

from __future__ import annotations

import torch

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


def _rule_terms(student_logits, teacher_logits, actions, mask, temperature: float):
    """(mask [B, T], logp, logq, kl): the default all-True mask where none is given, then `token_terms`."""
    mask = _mask(mask, actions)
    return (mask, *token_terms(student_logits, teacher_logits, actions, mask, temperature))


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


def _score_loss(logp, adv, mask, c) -> torch.Tensor:
    """-sum_b c_b sum_t log pi(y_t) stopgrad(A_t): REINFORCE with per-token advantages [B, T]."""
    return -(c[:, None] * logp * torch.where(mask, adv.detach(), _zero(adv))).sum()


def _reinforce(logp, adv, mask, seq_weights) -> torch.Tensor:
    """`_score_loss` with c_b = w_b / B (a mean over the batch; w_b = pi(y_b) when enumerating)."""
    return _score_loss(logp, adv, mask, _weights(mask, seq_weights, logp.dtype))


def _group_centred(rewards, group_size: int, dtype) -> torch.Tensor:
    b = rewards.shape[0]
    if group_size < 2 or b % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch size: group_size={group_size}, B={b}")
    r = rewards.to(dtype).reshape(b // group_size, group_size)
    return (r - r.mean(1, keepdim=True)).reshape(b)


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
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    adv = lam * rewards.to(logp.dtype)[:, None] - beta * (logp - logq)
    return _reinforce(logp, adv, mask, seq_weights)


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
    mask, logp, logq, kl = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
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
    b = actions.shape[0]
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    adv = _group_centred(rewards, group_size, logp.dtype)
    if scale_std:
        std = rewards.to(logp.dtype).reshape(b // group_size, group_size).std(1, keepdim=True)
        adv = adv / (std + std_eps).repeat_interleave(group_size, 0).reshape(b)
    adv = lam * adv
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
    mask, logp, logq, _ = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
    k = torch.where(mask, (logp - logq).detach(), _zero(logp))
    from_t = _future(k, mask, 1.0) + k  # sum_{t' >= t}
    g = lam * rewards.to(logp.dtype)[:, None] - beta * from_t
    return _reinforce(logp, g, mask, seq_weights)


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
    mask, logp, _, kl = _rule_terms(student_logits, teacher_logits, actions, mask, temperature)
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
