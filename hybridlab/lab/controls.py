"""Negative controls: named, documented *wrong* estimators of grad J, built from the same pieces as `hybrid_loss`.

Each control returns a scalar loss with the same normaliser as `hybrid_loss` (``normalize="sequences"`` by
default), so the conventions are identical:

- on a sampled batch, ``-grad(loss)`` is the control's estimate of grad J (a mean over the batch);
- over an enumerated space with ``seq_weights = pi(y)``, ``-S * grad(loss)`` is its exact expectation.

The controls (the pitfalls of the decomposition):

``myopic``        the future KL dropped from the return: ``hybrid_loss(future="none")``. Right for lam = 0 at the
                  fixed point, wrong with a reward.
``double_count``  the current step's log-ratio k_t added to the sparse return *as well as* the dense term:
                  E[grad log pi(y_t|s_t) k_t | s_t] = grad KL_t(s_t), so the dense gradient is counted twice.
``k1_loss``       the KL estimate k1 = log pi - log pi_T differentiated as a loss at the sampled tokens, plus the
                  REINFORCE reward term: E[grad k1 | s_t] = E[grad log pi(y_t|s_t)] = 0, so the KL has no effect.
``k2_loss``       k2 = (log r)^2 / 2 (r = pi_T / pi) as a loss: grad k2 = k_t grad log pi(y_t|s_t), whose
                  expectation is grad KL_t(s_t) at the fixed state: only the per-token (dense) part = myopic.
``k3_loss``       k3 = r - 1 - log r as a loss: grad k3 = (1 - r) grad log pi(y_t|s_t), whose expectation is
                  -sum_a pi_T(a|s_t) grad log pi(a|s_t) = grad KL(pi_T(.|s_t) || pi(.|s_t)): the *forward* KL.

The ``k*_loss`` controls use the REINFORCE reward term ``-sum_t log pi(y_t|s_t) * stopgrad(lam R - b)`` so that
each is a complete estimator (the GRPO-style "KL in the loss, reward in the advantage").

Below the controls: exact expectations of any such loss by enumeration (`expected_gradient`,
`expected_control`), exact first and second moments over every group of samples (`exact_moments`), and Monte
Carlo estimates (`sampled_gradients`) that work for `hybrid_loss` and the controls alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..hybrid import HybridLossOutput, hybrid_loss
from ..sparse import kl_estimate, selected_logprobs
from .exact import (
    DTYPE,
    SequenceSpace,
    enumerated_loss,
    flat_grad,
    group_estimate,
    prefix_codes,
    sampled_estimates,
    sequence_probs,
)

LossFn = Callable[..., "torch.Tensor | HybridLossOutput"]

KL_LOSS_KINDS = ("k1", "k2", "k3")


def _as_scalar(out) -> torch.Tensor:
    return out.loss if isinstance(out, HybridLossOutput) else out


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _teacher_logprobs(
    teacher_logits: torch.Tensor, actions: torch.Tensor, dtype, teacher_floor
) -> torch.Tensor:
    with torch.no_grad():
        out = selected_logprobs(teacher_logits.detach(), actions, 1.0).to(dtype)
    return out if teacher_floor is None else out.clamp_min(teacher_floor)


def myopic_loss(student_logits, teacher_logits, actions, rewards, **kwargs) -> torch.Tensor:
    """Control (c): the future KL dropped from the sparse return, i.e. ``hybrid_loss(future="none").loss``.

    Its expectation is E[sum_t (-beta grad KL_t(s_t) + grad log pi(y_t|s_t) lam R)]: right at the fixed point only
    for lam = 0; with a reward it ascends a different objective and converges to a different policy.
    """
    kwargs = {**kwargs, "future": "none"}
    return hybrid_loss(student_logits, teacher_logits, actions, rewards, **kwargs).loss


def double_count_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Control (a): the current step's log-ratio k_t put in the sparse return in addition to the dense term.

    Return used: lam R - beta (k_t + sum_{t'>t} khat_t') - b(s_t). Because E[grad log pi(y_t|s_t) k_t | s_t]
    = grad KL_t(s_t), the expectation is grad J - beta E[sum_t grad KL_t(s_t)]: the dense gradient twice.
    Other keyword arguments go to `hybrid_loss` (the baseline is computed on the correct return).
    """
    out = hybrid_loss(
        student_logits,
        teacher_logits,
        actions,
        rewards,
        beta=beta,
        temperature=temperature,
        mask=mask,
        **kwargs,
    )
    if mask is None:
        mask = torch.ones(actions.shape, dtype=torch.bool, device=actions.device)
    logp = selected_logprobs(student_logits, actions, temperature)
    c = out.token_weights
    extra = beta * (c[:, None] * _masked(logp, mask) * out.logratio.to(logp.dtype)).sum()
    return out.loss + extra


def kl_as_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    *,
    kind: str = "k1",
    beta: float = 1.0,
    lam: float = 1.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    teacher_floor: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """Control (b): a per-token KL *estimate* differentiated as a loss, plus the REINFORCE reward term.

        loss = beta sum_b c_b sum_t khat_t(theta)  -  sum_b c_b sum_t log pi(y_t|s_t) stopgrad(lam R - b(s_t))

    kind "k1" (log pi - log pi_T): the KL term's expected gradient is zero. "k2" ((log r)^2 / 2): the per-token
    reverse-KL gradient at fixed states (= the myopic rule). "k3" (r - 1 - log r): the gradient of the per-state
    *forward* KL(pi_T || pi) at the student's states. The estimates are unbiased *values* of KL_t; their
    gradients are not gradients of the KL. Other keyword arguments (baseline, group_size, normalize,
    seq_weights, backend) go to `hybrid_loss`, whose ``future="none"`` sparse term is the REINFORCE reward term.
    """
    if kind not in KL_LOSS_KINDS:
        raise ValueError(f"kind must be one of {KL_LOSS_KINDS}, got {kind!r}")
    kwargs.pop("future", None)
    out = hybrid_loss(
        student_logits,
        teacher_logits,
        actions,
        rewards,
        beta=beta,
        lam=lam,
        temperature=temperature,
        mask=mask,
        teacher_floor=teacher_floor,
        future="none",
        **kwargs,
    )
    if mask is None:
        mask = torch.ones(actions.shape, dtype=torch.bool, device=actions.device)
    logp = selected_logprobs(student_logits, actions, temperature)  # differentiable
    logq = _teacher_logprobs(teacher_logits, actions, logp.dtype, teacher_floor)
    if kind == "k2":
        khat = 0.5 * (logq - logp) ** 2
    else:
        khat = kl_estimate(logp, logq, kind)
    c = out.token_weights
    return out.sparse + beta * (c[:, None] * _masked(khat, mask)).sum()


#: The negative controls by name: each f(student_logits, teacher_logits, actions, rewards, **kw) -> scalar loss.
CONTROLS: dict[str, LossFn] = {
    "myopic": myopic_loss,
    "double_count": double_count_loss,
    "k1_loss": partial(kl_as_loss, kind="k1"),
    "k2_loss": partial(kl_as_loss, kind="k2"),
    "k3_loss": partial(kl_as_loss, kind="k3"),
}


# ----------------------------------------------------------------------------------------------------------
# Exact expectations by enumeration (mirrors hybridlab.lab.exact.expected_estimate).


def expected_gradient(
    loss_fn: LossFn,
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    temperature: float = 1.0,
    rollout_temperature: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """Exact expectation of the estimate -grad(loss) (an ascent direction on J): [P].

    Every response is enumerated with seq_weights = pi(y) at `rollout_temperature` (default: `temperature`, the
    one the loss uses; set it differently to model a rollout/training temperature mismatch). `loss_fn` is
    `hybrid_loss` or any control (it must accept seq_weights and normalise like `hybrid_loss`).
    """
    out = enumerated_loss(
        policy, teacher, space, reward, temperature=temperature, rollout_temperature=rollout_temperature,
        loss_fn=loss_fn, **kwargs,
    )  # fmt: skip
    return -space.size * flat_grad(_as_scalar(out), policy)


def expected_control(name: str, policy, teacher, space, reward, **kwargs) -> torch.Tensor:
    """Exact expectation of the named control's estimate (see `CONTROLS`): [P]."""
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; choose one of {sorted(CONTROLS)}")
    return expected_gradient(CONTROLS[name], policy, teacher, space, reward, **kwargs)


def expected_state_kl_gradient(
    policy: nn.Module, teacher: nn.Module, space: SequenceSpace, *, direction: str = "reverse"
) -> torch.Tensor:
    """E_y[ sum_t grad KL_t(s_t) ] with the visited states held fixed: [P] (a descent direction of the KL).

    direction "reverse": KL(pi || pi_T) per state (the expected dense term / beta); "forward": KL(pi_T || pi) per
    state, which is what the k3-as-loss control follows.
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    with torch.no_grad():
        weights = sequence_probs(policy, space)
        logq = torch.log_softmax(teacher(space.actions), -1)
    logp = torch.log_softmax(policy(space.actions), -1)
    if direction == "reverse":
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logp)).sum(-1)
    total = (weights[:, None] * torch.where(space.mask, kl, 0.0)).sum()
    return flat_grad(total, policy)


# ----------------------------------------------------------------------------------------------------------
# Per-group estimates: exact moments over every group, and Monte Carlo.


def sampled_gradients(loss_fn: LossFn, policy, teacher, space, reward, **kwargs) -> torch.Tensor:
    """Monte Carlo estimates of `loss_fn`'s target, one row per group: `exact.sampled_estimates` with a loss.

    Row = -grad(loss) on one group with normalize="sequences": the group's mean estimate of the control's
    target (grad J for `hybrid_loss`). Group baselines ("reward_group", "return_group") use the group.
    """
    return sampled_estimates(policy, teacher, space, reward, loss_fn=loss_fn, **kwargs)


def exact_moments(
    loss_fn: LossFn,
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    group_size: int = 1,
    temperature: float = 1.0,
    rollout_temperature: float | None = None,
    max_groups: int = 5000,
    **kwargs,
) -> dict[str, torch.Tensor | float]:
    """Exact mean and covariance trace of the per-group estimate over all S^G ordered groups of responses.

    Returns {"mean": [P], "variance": float (E||g - mean||^2, the total variance of one group's estimate),
    "estimates": [S^G, P], "weights": [S^G]}. With group_size=1 this is the per-response estimate.
    """
    n = space.size**group_size
    if n > max_groups:
        raise ValueError(
            f"exact_moments would enumerate S^G = {space.size}^{group_size} = {n} groups (> max_groups={max_groups})"
        )
    t_roll = temperature if rollout_temperature is None else rollout_temperature
    with torch.no_grad():
        probs = sequence_probs(policy, space, t_roll)
    rows, weights = [], []
    for idx in itertools.product(range(space.size), repeat=group_size):
        sel = torch.tensor(idx)
        rows.append(
            group_estimate(
                policy,
                teacher,
                space.actions[sel],
                space.mask[sel],
                reward,
                temperature=temperature,
                loss_fn=loss_fn,
                **kwargs,
            )
        )
        weights.append(math.prod(float(probs[i]) for i in idx))
    est = torch.stack(rows)
    w = torch.tensor(weights, dtype=DTYPE)
    mean = w @ est
    variance = float(w @ (est - mean).pow(2).sum(1))
    return {"mean": mean, "variance": variance, "estimates": est, "weights": w}


def _enumerated_returns(policy, teacher, space, reward, *, lam, beta, temperature):
    """pi(y) [S] and the combined returns G_t = lam R - beta sum_{t'>t} KL_t' [S, H] of every response."""
    with torch.no_grad():
        probs = sequence_probs(policy, space, temperature)
        out = hybrid_loss(
            policy(space.actions),
            teacher(space.actions),
            space.actions,
            reward(space.actions, space.mask),
            mask=space.mask,
            lam=lam,
            beta=beta,
            temperature=temperature,
            future="analytic",
            backend="torch",
        )
    return probs, out.returns.to(DTYPE)


def mean_baselines(
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    lam: float,
    beta: float,
    temperature: float = 1.0,
) -> dict[str, str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Ideal constant baselines (population means, exact by enumeration), keyed by a readable name:

    "none"; "reward mean lam E[R]" (what a baseline on R alone targets); "return mean E[G_t]" (per position, the
    combined return's mean over responses still running at t). Each value works as ``baseline=`` in
    `exact_moments` and `sampled_gradients` (the callables map actions, mask -> [B, H]).
    """
    probs, returns = _enumerated_returns(
        policy, teacher, space, reward, lam=lam, beta=beta, temperature=temperature
    )
    with torch.no_grad():
        mean_reward = lam * float(probs @ reward(space.actions, space.mask).to(DTYPE))
        alive = probs[:, None] * space.mask
        per_position = (alive * returns).sum(0) / alive.sum(0).clamp_min(1e-300)  # [H]

    def reward_mean(actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, mean_reward, 0.0).to(DTYPE)

    def return_mean(actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, per_position[None, : actions.shape[1]].expand(actions.shape), 0.0)

    return {"none": "none", "reward mean lam E[R]": reward_mean, "return mean E[G_t]": return_mean}


def state_value_baseline(
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    lam: float,
    beta: float,
    temperature: float = 1.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-state baseline b(s_t) = E[G_t | s_t] (G_t = lam R - beta sum_{t'>t} KL_t'), exact by enumeration.

    It depends on the state only (not on y_t), so it keeps the estimator unbiased; it is the variance-reducing
    target a learned value head would approximate. Returns f(actions [B, H], mask [B, H]) -> [B, H] (0 on padding),
    usable as ``baseline=`` in `exact_moments` and `sampled_gradients`.
    """
    probs, returns = _enumerated_returns(
        policy, teacher, space, reward, lam=lam, beta=beta, temperature=temperature
    )
    codes = prefix_codes(space.actions, space.vocab)
    n_codes = (space.vocab + 1) ** space.horizon
    num = torch.zeros(n_codes, dtype=DTYPE)
    den = torch.zeros(n_codes, dtype=DTYPE)
    w = probs[:, None].expand_as(codes)
    num.index_add_(0, codes[space.mask], (w * returns)[space.mask])
    den.index_add_(0, codes[space.mask], w[space.mask])
    table = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)

    def baseline(actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = table[prefix_codes(actions, space.vocab)]
        return torch.where(mask, values, 0.0)

    return baseline


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """||estimate - target|| / ||target||."""
    return float((estimate - target).norm() / target.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened gradients; 0 if either is zero (below 1e-12 of the other's norm)."""
    na, nb = float(a.norm()), float(b.norm())
    if na <= 1e-12 * nb or nb <= 1e-12 * na or na == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def block_rmse(estimates: torch.Tensor, target: torch.Tensor, sizes) -> list[float]:
    """RMS of ||mean of N estimates - target|| over the disjoint blocks of N rows, for each N in `sizes`.

    `estimates` [M, P] are i.i.d. rows; each N uses floor(M / N) blocks. For an unbiased estimator the expected
    squared error is tr Cov / N, so the result should follow sqrt(tr Cov / N).
    """
    out = []
    for n in sizes:
        k = estimates.shape[0] // n
        if k < 1:
            raise ValueError(f"block size {n} exceeds the {estimates.shape[0]} estimates")
        means = estimates[: k * n].reshape(k, n, -1).mean(1)
        out.append(float((means - target).pow(2).sum(1).mean().sqrt()))
    return out


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x) (-0.5 for a 1/sqrt(N) law)."""
    x = torch.log(torch.as_tensor(xs, dtype=DTYPE))
    y = torch.log(torch.as_tensor(ys, dtype=DTYPE))
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())
