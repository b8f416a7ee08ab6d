"""Reference solutions of the notebooks' exercises, and typical wrong answers (see `hybridlab.lab.exercises`).

Try an exercise before reading its solution here. `SOLUTIONS[key]` is what ``HYBRIDLAB_SOLUTIONS=1`` puts in place
of the learner's stub; `WRONG[key]` lists common mistakes, each with a fragment of the hint its checker must give
(``tests/test_exercises.py`` checks that every solution passes and every listed mistake fails).
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------------------------
# 00 quickstart


def count_responses(vocab: int, horizon: int) -> int:
    """Responses end at the end token (the last id) or after `horizon` tokens: (V-1)^k ways to write k ordinary
    tokens and then the end token (k < horizon - 1), plus (V-1)^(horizon-1) * V of full length (any last token)."""
    v = vocab - 1
    return sum(v**k for k in range(horizon - 1)) + v ** (horizon - 1) * vocab


def future_return(rewards, k, mask, lam, beta):
    """G_t = lam R - beta sum_{t' > t} k_t': a reverse cumulative sum, minus the current step. [B, T]"""
    k = torch.where(mask, k, 0.0)
    later = k.flip(1).cumsum(1).flip(1) - k  # sum over t' > t
    return torch.where(mask, lam * rewards[:, None] - beta * later, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# 01 objective


def optimum(q, r, lam, beta):
    """pi* = softmax(log q + lam r / beta): the teacher tilted by the exponentiated reward, in log space."""
    return torch.softmax(q.log() + lam * r / beta, 0)


# ---------------------------------------------------------------------------------------------------------------
# 02 the surrogate, written out


def surrogate(student_logits, teacher_logits, actions, rewards, mask, lam, beta):
    """-grad of this is the hybrid estimate of grad J, averaged over the batch. Shapes: logits [B, T, V],
    actions and mask [B, T], rewards [B]. Its *value* is not J."""
    m = mask.to(student_logits.dtype)
    logp = torch.log_softmax(student_logits, -1)
    logq = torch.log_softmax(teacher_logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * m  # KL_t(s_t), the state held fixed: [B, T]
    future = (kl.flip(1).cumsum(1).flip(1) - kl).detach()  # sum_{t' > t} KL_t', no gradient
    advantage = (lam * rewards[:, None] - beta * future).detach()
    logp_y = logp.gather(-1, actions[..., None])[..., 0] * m  # log pi(y_t | s_t)
    dense = beta * kl.sum(1)
    sparse = -(logp_y * advantage).sum(1)
    return (dense + sparse).mean()


def surrogate_no_detach(student_logits, teacher_logits, actions, rewards, mask, lam, beta):
    """Bug 1: the advantage is not detached, so autograd also differentiates the future KL inside it."""
    m = mask.to(student_logits.dtype)
    logp = torch.log_softmax(student_logits, -1)
    logq = torch.log_softmax(teacher_logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * m
    future = kl.flip(1).cumsum(1).flip(1) - kl  # no .detach()
    logp_y = logp.gather(-1, actions[..., None])[..., 0] * m
    return (beta * kl.sum(1) - (logp_y * (lam * rewards[:, None] - beta * future)).sum(1)).mean()


def surrogate_double_count(student_logits, teacher_logits, actions, rewards, mask, lam, beta):
    """Bug 2: the sampled k_t of the current step also sits in the return: the current step counts twice."""
    m = mask.to(student_logits.dtype)
    logp = torch.log_softmax(student_logits, -1)
    logq = torch.log_softmax(teacher_logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * m
    k_now = (logp - logq).gather(-1, actions[..., None])[..., 0] * m  # k_t at the sampled token
    future = (kl.flip(1).cumsum(1).flip(1) - kl + k_now).detach()
    logp_y = logp.gather(-1, actions[..., None])[..., 0] * m
    return (beta * kl.sum(1) - (logp_y * (lam * rewards[:, None] - beta * future)).sum(1)).mean()


WRONG_SURROGATES = {
    "the advantage is not detached, so autograd also differentiates the future KL inside it (call .detach())":
        surrogate_no_detach,
    "the current step is counted twice: once by the dense term and once in the return (the future starts at t+1)":
        surrogate_double_count,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 03 dense gradient


def kl_logit_grad(z, t, tau):
    """(1/tau) p_j (log p_j - log q_j - KL), with p = softmax(z / tau), q = softmax(t); 0 where p_j = 0."""
    logp = torch.log_softmax(z / tau, -1)
    logq = torch.log_softmax(t, -1)
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, 0.0)
    kl = (p * diff).sum(-1, keepdim=True)
    return p * (diff - kl) / tau


def forward_kl_logit_grad(z, q):
    """d KL(q || softmax(z)) / dz = p - q."""
    return torch.softmax(z, -1) - q


# ---------------------------------------------------------------------------------------------------------------
# 04 sparse gradient


def reward_baseline_raises_variance(lam_er: float, beta_ef: float) -> bool:
    """Var(g (G - b)) = E[g^2] (Var G + (E G - b)^2): b = lam E R wins over b = 0 iff (beta E F)^2 <
    (lam E R - beta E F)^2; it loses, i.e. raises the variance, iff 0 < lam E R < 2 beta E F (for beta E F > 0)."""
    return 0 < lam_er < 2 * beta_ef


# ---------------------------------------------------------------------------------------------------------------
# 05 mixing lab


def beta_half(q, r, k, lam):
    """Bisection (in log beta) on log pi_T(k) + lam R_k / beta - logsumexp_{y != k}(log pi_T(y) + lam R(y) / beta),
    which falls as beta grows when R_k is the largest reward."""
    others = torch.arange(len(q)) != k

    def excess(beta):
        return float(
            q[k].log() + lam * r[k] / beta - torch.logsumexp(q[others].log() + lam * r[others] / beta, 0)
        )

    lo, hi = 1e-3, 1e3
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return math.sqrt(lo * hi)


# ---------------------------------------------------------------------------------------------------------------
# 07 scaling up


def kept_checkpoints(steps: int, every: int, keep: int) -> list[int]:
    """Written at the multiples of `every` and at the last step; the newest `keep` stay."""
    written = [s for s in range(1, steps + 1) if (every and s % every == 0) or s == steps]
    return written[-keep:]


SOLUTIONS = {
    "00.count": count_responses,
    "00.return": future_return,
    "01.optimum": optimum,
    "01.doubling": 2.0,
    "02.surrogate": surrogate,
    "02.past_and_current": {"past only": False, "past and current": True},
    "02.grpo_constant": 0.75,
    "03.reverse_grad": kl_logit_grad,
    "03.forward_grad": forward_kl_logit_grad,
    "04.unbiased": {
        "leave-one-out mean reward of the other responses of the group": True,
        "a constant, lam E[R]": True,
        "the response's own reward, lam R(y)": False,
        "beta times the current step's log-ratio k_t": False,
    },
    "04.scalar": reward_baseline_raises_variance,
    "05.same_end": "same",
    "05.beta_half": beta_half,
    "07.gib": 3 * 32768 * 152064 * 2 / 2**30,
    "07.checkpoints": kept_checkpoints,
}

# Typical wrong answers and a fragment of the hint each must produce.
WRONG = {
    "00.count": [(lambda v, h: v**h, "nothing follows the end token")],
    "00.return": [
        (
            lambda r, k, m, lam, beta: lam * r[:, None] - beta * k.flip(1).cumsum(1).flip(1),
            "includes the current",
        ),
        (lambda r, k, m, lam, beta: lam * r[:, None] + beta * (k.flip(1).cumsum(1).flip(1) - k), "sign"),
    ],
    "01.optimum": [
        (
            lambda q, r, lam, beta: q * torch.exp(lam * r / beta) / (q * torch.exp(lam * r / beta)).sum(),
            "NaN",
        ),
        (lambda q, r, lam, beta: torch.softmax(q.log() + lam * r, 0), "not zero"),
    ],
    "01.doubling": [(1.0, "linear"), (4.0, "linear")],
    "02.surrogate": [(surrogate_no_detach, "not detached"), (surrogate_double_count, "counted twice")],
    "02.past_and_current": [({"past only": True, "past and current": True}, "past only")],
    "02.grpo_constant": [(1.0, "group mean"), (4 / 3, "group mean")],
    "03.reverse_grad": [
        (lambda z, t, tau: kl_logit_grad(z, t, tau) * tau, "chain rule"),
        (lambda z, t, tau: -kl_logit_grad(z, t, tau), "sign"),
        (
            lambda z, t, tau: (
                torch.softmax(z / tau, -1) * (torch.log_softmax(z / tau, -1) - torch.log_softmax(t, -1))
            ),
            "NaN",
        ),
    ],  # fmt: skip
    "03.forward_grad": [(lambda z, q: q - torch.softmax(z, -1), "sign")],
    "04.unbiased": [
        (
            {
                **SOLUTIONS["04.unbiased"],
                "leave-one-out mean reward of the other responses of the group": False,
            },
            "leave-one-out",
        ),
    ],  # fmt: skip
    "04.scalar": [(lambda a, b: a > 0, "wrong at"), (lambda a, b: 0 < a < b, "wrong at")],
    "05.same_end": [("more rewarded", "lam and beta"), ("closer to the teacher", "lam and beta")],
    "05.beta_half": [(lambda q, r, k, lam: 0.5, "not 1/2")],
    "07.gib": [
        (3 * 32768 * 152064 * 2 / 2**30 / 3, "one [N, V]"),
        (2 * 3 * 32768 * 152064 * 2 / 2**30, "2 bytes"),
    ],
    "07.checkpoints": [(lambda s, e, k: [x for x in range(1, s + 1) if e and x % e == 0][-k:], "last step")],
}

# notebooks 06 and 08
from .solutions_06_08 import SOLUTIONS_LATE, WRONG_LATE  # noqa: E402

SOLUTIONS.update(SOLUTIONS_LATE)
WRONG.update(WRONG_LATE)
