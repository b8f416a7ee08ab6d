"""Sparse gradient: the Monte Carlo part of the decomposition (task reward plus *future* KL).

    sparse = E_y [ sum_t grad log pi(y_t | s_t) * ( lam R - beta * sum_{t' > t} gamma^(t'-t) k_t' - b(s_t) ) ]

The current step's log-ratio is not in the return: its conditional expectation is grad KL_t, which the
dense term computes analytically. `k_t'` may be any unbiased estimate of KL_t'(s_t'): "k1" (log-ratio),
"k3" (r - 1 - log r, r = pi_T / pi_theta at the sampled token) or "analytic" (the full-vocabulary KL at the
visited state, lowest variance). gamma < 1 changes the objective (gamma = 0 is the myopic rule).

Everything here is plain tensor math over [B, T] with a bool mask of response tokens.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._checks import (
    check_actions,
    check_float,
    check_mask,
    check_temperature,
    describe_nonfinite,
    describe_temperature_overflow,
    first_order_only,
)
from ._logits import add_score_grad, row_logsumexp, selected_logprob

FUTURE_ESTIMATORS = ("analytic", "k1", "k3", "none")


class _SelectedLogprob(torch.autograd.Function):
    """log softmax(z / tau)[a] per row; backward (onehot(a) - p) / tau, chunked (no autograd [N, V] graph)."""

    @staticmethod
    def forward(ctx, z, actions, temperature, active):
        shift, lse = row_logsumexp(z, temperature, active)
        if not torch.isfinite(lse).all():  # a cheap [N] test: NaN, +inf or all -inf on a counted row
            msg = describe_nonfinite("logits", z, active) or describe_temperature_overflow(
                z, temperature, active, "logits"
            )
            raise ValueError(msg or f"logits {list(z.shape)} have a row whose log-sum-exp is not finite")
        ctx.save_for_backward(z, actions, shift, lse, active)
        ctx.temperature = temperature
        return selected_logprob(z, actions, shift, lse, temperature, active)

    @staticmethod
    @first_order_only("selected_logprobs")
    @once_differentiable
    def backward(ctx, g):
        z, actions, shift, lse, active = ctx.saved_tensors
        grad = add_score_grad(torch.zeros_like(z), z, actions, shift, lse, g, ctx.temperature, active)
        return grad, None, None, None


def selected_logprobs(
    logits: torch.Tensor, actions: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log softmax(logits / temperature)[actions]: [..., V] x [...] -> [...], differentiable w.r.t. logits.

    Rows where `mask` ([...] bool) is False give 0 and no gradient, whatever their logits hold. NaN, +inf or a
    row of only -inf on a counted row is an error (no silent NaN); `temperature` must be finite and > 0.
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {list(logits.shape)}")
    check_mask(mask, logits.shape[:-1], "logits", logits.device)
    check_actions(actions, logits.shape[:-1], logits.shape[-1], logits.device, mask)
    return selected_logprobs_checked(logits, actions, check_temperature(temperature), mask)


def selected_logprobs_checked(
    logits: torch.Tensor, actions: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """`selected_logprobs` on arguments its caller has validated (no argument checks here)."""
    v = logits.shape[-1]
    active = None if mask is None else mask.reshape(-1)
    out = _SelectedLogprob.apply(
        logits.reshape(-1, v), actions.reshape(-1).clamp(0, v - 1), temperature, active
    )
    return out.reshape(actions.shape)


def kl_estimate(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token unbiased estimate of KL_t from the sampled token's log-probs ([B, T] each).

    k1 = log pi - log pi_T; k3 = r - 1 - log r with r = pi_T / pi (non-negative, lower variance near pi_T).
    """
    log_r = teacher_logp - student_logp
    if kind == "k1":
        return -log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")


def future_sum(x: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """F_t = sum_{t' > t} gamma^(t' - t) x_t' over unmasked t' (strictly future): [B, T] -> [B, T].

    gamma = 1 is the exact objective's future KL; gamma = 0 gives zeros (the myopic rule). gamma must lie in
    [0, 1] (a discount): above 1 the sum grows geometrically with T.
    """
    try:
        ok = not isinstance(gamma, bool) and 0.0 <= float(gamma) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if gamma == 1.0:  # exclusive reverse cumsum: no (sum - x) cancellation in low precision
        rev = x.flip(-1).cumsum(-1).flip(-1)
        return torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1)
    if gamma == 0.0:
        return torch.zeros_like(x)
    out = torch.zeros_like(x)
    acc = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):  # F_t = gamma * (x_{t+1} + F_{t+1}); stable for any T
        out[:, t] = acc
        acc = gamma * (x[:, t] + acc)
    return out


def group_loo_mean(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out mean over contiguous groups of `group_size` rows: [B, ...] -> [B, ...].

    Row b gets the mean of the other members of its group: independent of b's own sample, so a valid baseline.
    """
    b = x.shape[0]
    if group_size < 2 or b % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the batch: group_size={group_size}, batch size B={b} "
            f"(x has shape [{', '.join(map(str, x.shape))}])"
        )
    g = x.reshape(b // group_size, group_size, *x.shape[1:])
    loo = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return loo.reshape(x.shape)


def combined_returns(
    rewards: torch.Tensor,
    future_kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float,
    beta: float | torch.Tensor,
) -> torch.Tensor:
    """G_t = lam R - beta F_t on response tokens, 0 on padding: [B] x [B, T] -> [B, T] (beta: a number or [B])."""
    if isinstance(beta, torch.Tensor):
        beta = beta.to(future_kl.dtype)[:, None]
    g = lam * rewards[:, None].to(future_kl.dtype) - beta * future_kl
    return torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))


def state_baseline(
    kind: str | torch.Tensor,
    rewards: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float,
    group_size: int | None,
) -> torch.Tensor:
    """b(s_t) [B, T]. "none"; "reward_group": LOO group mean of lam R (ignores the future KL in the return);
    "return_group": LOO group mean, per position, of the combined return G_t (a finished sample counts lam R);
    or a [B, T] tensor given by the caller (must not depend on y_t)."""
    if isinstance(kind, torch.Tensor):
        if kind.shape != returns.shape:
            raise ValueError(f"baseline tensor must have shape {list(returns.shape)}, got {list(kind.shape)}")
        return kind.detach().to(returns.dtype)
    if kind == "none":
        return torch.zeros_like(returns)
    if group_size is None:
        raise ValueError(f"baseline={kind!r} needs group_size (contiguous samples per prompt)")
    if kind == "reward_group":
        loo = group_loo_mean(lam * rewards.to(returns.dtype), group_size)
        return loo[:, None].expand_as(returns).clone()
    if kind == "return_group":
        padded = torch.where(mask, returns, lam * rewards[:, None].to(returns.dtype))
        return group_loo_mean(padded, group_size)
    raise ValueError(
        f"baseline must be 'none', 'reward_group', 'return_group' or a [B, T] tensor, got {kind!r}"
    )
