"""`hybrid_loss`: the surrogate whose gradient is the dense + sparse estimate of grad J.

    J(theta) = E_y[ lam R(x, y) ] - beta KL(pi_theta || pi_T)            (maximised)

    loss = dense + sparse                                                 (minimised)
    dense  =  beta * sum_b c_b sum_t KL_t(s_t)                            (closed-form logit gradient)
    sparse = -sum_b c_b sum_t log pi(y_t | s_t) * stopgrad(A_t)           (score function)
    A_t    = lam R - beta * sum_{t' > t} gamma^(t'-t) khat_t' - b(s_t)

with c_b = w_b / B for normalize="sequences". On B sampled responses (w_b = 1), -grad(loss) is the mean of B
unbiased estimates of grad J. Enumerating all S responses with w_b = pi(y_b) instead, -S * grad(loss) equals
grad J exactly (the weights carry the probabilities, the 1/S is undone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_actions,
    check_finite_vector,
    check_logits_pair,
    check_mask,
    check_teacher_floor,
    check_temperature,
    shape_of,
)
from ._onepass import hybrid_rows
from .dense import resolve_backend
from .sparse import (
    FUTURE_ESTIMATORS,
    combined_returns,
    future_sum,
    kl_estimate,
    state_baseline,
)

NORMALIZATIONS = ("sequences", "tokens", "per_sequence")


@dataclass
class HybridLossOutput:
    """What `hybrid_loss` returns. Tensors of shape [B, T] are detached diagnostics (0 on padding)."""

    loss: torch.Tensor  # scalar to minimise; == dense + sparse
    dense: torch.Tensor  # scalar
    sparse: torch.Tensor  # scalar
    kl: torch.Tensor  # [B, T] analytic KL_t at each visited state
    logratio: torch.Tensor  # [B, T] k1 at the sampled token
    returns: torch.Tensor  # [B, T] lam R - beta * future KL
    baseline: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T] returns - baseline
    token_weights: torch.Tensor  # [B] c_b: the multiplier of each sequence's token sum
    grad_norms: dict[str, float] | None = None  # {"dense", "sparse", "total", "cosine"} when asked


def _normalizer(
    normalize, mask: torch.Tensor, seq_weights: torch.Tensor | None, dtype, n_seq=None, n_tok=None
) -> torch.Tensor:
    """c_b [B]: each sequence's token-sum multiplier. `n_seq` / `n_tok` override this batch's numbers of
    sequences / tokens with the *global* ones when a batch is split over processes or micro-batches."""
    b = mask.shape[0]
    w = torch.ones(b, dtype=dtype, device=mask.device) if seq_weights is None else seq_weights.to(dtype)
    lengths = mask.sum(1).to(dtype)
    n_seq = b if n_seq is None else n_seq
    n_tok = lengths.sum().clamp_min(1.0) if n_tok is None else max(float(n_tok), 1.0)
    if isinstance(normalize, (int, float)) and not isinstance(normalize, bool):
        if not (normalize > 0 and math.isfinite(normalize)):  # inf would give a silent zero loss
            raise ValueError(f"normalize as a constant must be a finite number > 0, got {normalize!r}")
        return w / float(normalize)
    if normalize == "sequences":  # unbiased: sum over tokens / number of sequences
        return w / n_seq
    if normalize == "tokens":  # token mean over the batch: the random denominator biases it slightly
        return w / n_tok
    if normalize == "per_sequence":  # 1/|y| per sequence: changes the objective (favours short answers)
        return w / (n_seq * lengths.clamp_min(1.0))
    raise ValueError(f"normalize must be one of {NORMALIZATIONS} or a positive number, got {normalize!r}")


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    beta: float | torch.Tensor = 1.0,
    lam: float = 1.0,
    future: str = "analytic",
    gamma: float = 1.0,
    baseline: str | torch.Tensor = "none",
    group_size: int | None = None,
    temperature: float = 1.0,
    normalize: str | float = "sequences",
    seq_weights: torch.Tensor | None = None,
    backend: str = "auto",
    teacher_floor: float | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    future_norm: str = "sum",
) -> HybridLossOutput:
    """The hybrid imitation + RL surrogate loss over a batch of sampled responses.

    Args:
        student_logits: [B, T, V]; row t produced actions[:, t] (the caller shifts).
        teacher_logits: [B, T, V] teacher logits or log-probs at the same states (no gradient).
        actions: [B, T] integer token ids; rewards: [B] task rewards R(x, y).
        mask: [B, T] bool response tokens (padding False); default all True. All False (a micro-batch without
            response tokens) is legal: loss 0 and zero gradient, not an error.
        beta, lam: weights of the KL and the reward in J (only lam / beta matters up to the step size). `beta`
            may also be a [B] tensor of per-sequence weights beta_b >= 0: the gradient of
            E_x[lam E_y R - beta_x KL_x] when beta_b depends only on the prompt (teacher trust); a beta_b that
            depends on the response itself (a reward gate) is a heuristic with a bias, not that gradient.
        future: estimator of the future KL in the return: "analytic" | "k1" | "k3" | "none" (myopic control).
            The [B, T] returns are formed in fp64 (k3's r = pi_T / pi overflows fp32 beyond e^88); advantages
            that still do not fit the logits' dtype are an error naming the token, never an inf loss.
        gamma: discount of the future-KL sum; 1 is the exact objective, < 1 optimises a different one.
        baseline: "none" | "reward_group" | "return_group" (leave-one-out over `group_size` contiguous
            samples per prompt) | a [B, T] tensor b(s_t).
        temperature: the rollout's sampling temperature; the same softmax in both terms.
        normalize: "sequences" (unbiased default) | "tokens" | "per_sequence" | a finite positive constant.
        seq_weights: [B] multipliers (e.g. exact sequence probabilities when enumerating).
        backend, teacher_floor: as in `dense_kl` (teacher_floor: None or a finite log-probability < 0).
        parameters: if given, also report the dense and sparse parts' gradient norms and their cosine
            (costs two extra backward passes).
        future_norm: "sum" (the exact future KL) | "mean": the future KL divided by the number of remaining
            tokens (their discounted count under gamma), a length-neutral return as in TOP-D. "mean" is not the
            gradient of J, nor of any fixed objective: ending early no longer lowers the return's KL part, so
            it removes the short-answer incentive of the sequence KL, at a bias against grad J.
    """
    check_logits_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got {shape_of(student_logits)}")
    b, t, v = student_logits.shape
    dev = student_logits.device
    mask = check_batch(
        b, t, v, dev, actions, rewards, mask, seq_weights, baseline, future, gamma, "student_logits"
    )
    tau = check_temperature(temperature)
    check_weights(beta, lam, b)
    check_future_norm(future_norm)

    # Dense term: analytic KL per visited state (also the Rao-Blackwellised future estimate).
    floor = check_teacher_floor(teacher_floor)
    name = resolve_backend(backend, dev)
    # Validated once above: the inner calls trust their caller. One pass over the logits keeps only row
    # scalars (KL_t, log pi(y_t), log pi_T(y_t), the last clamped at the floor); backward writes the dense and
    # score gradients together in one more pass (`hybridlab._onepass`).
    kl, logp, teacher_logp = hybrid_rows(student_logits, teacher_logits, actions, mask, tau, floor, name)
    dtype = kl.dtype
    c = _normalizer(normalize, mask, seq_weights, dtype)  # [B]
    out = assemble(kl, logp, teacher_logp, rewards, mask, c, beta=beta, lam=lam, future=future, gamma=gamma,
                   baseline=baseline, group_size=group_size, future_norm=future_norm)  # fmt: skip
    if parameters is not None:
        out.grad_norms = _part_grad_norms(out.dense, out.sparse, list(parameters))
    return out


FUTURE_NORMS = ("sum", "mean")


def check_future_norm(future_norm: str) -> None:
    if future_norm not in FUTURE_NORMS:
        raise ValueError(f"future_norm must be one of {FUTURE_NORMS}, got {future_norm!r}")


def check_weights(beta, lam: float, batch: int | None = None) -> None:
    """beta (teacher KL) and lam (reward) are finite and >= 0: a NaN gives a NaN loss, a negative beta maximises
    the KL to the teacher, an infinite weight has no meaning (only lam / beta matters, up to the step size).
    beta may be a [B] tensor (per-sequence weights; `batch` = B checks its shape)."""
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 1 or (batch is not None and beta.shape[0] != batch):
            raise ValueError(f"beta as a tensor must have shape [B] = [{batch}], got {shape_of(beta)}")
        if not (torch.isfinite(beta).all() and (beta >= 0).all()):
            raise ValueError(f"beta as a tensor must be finite and >= 0, got min {float(beta.min())}")
        beta = 0.0
    for name, value in (("beta", beta), ("lam", lam)):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
        if not (math.isfinite(x) and x >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_batch(
    b: int, t: int, vocab: int, device, actions, rewards, mask, seq_weights, baseline, future, gamma, ref: str,
    mask_checked: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Validate the per-sequence inputs of a hybrid loss for B sequences of T tokens; return the mask [B, T].
    `mask_checked`: the caller has validated `mask` against [B, T] already (it is not checked twice)."""
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=device)
    elif not mask_checked:
        check_mask(mask, (b, t), ref, device)
    check_actions(actions, (b, t), vocab, device, mask, ref)
    check_finite_vector("rewards", rewards, (b,), device)
    if seq_weights is not None:
        check_finite_vector("seq_weights", seq_weights, (b,), device)
    if isinstance(baseline, torch.Tensor):
        check_finite_vector("baseline", baseline, (b, t), device)
    if future not in FUTURE_ESTIMATORS:
        raise ValueError(f"future must be one of {FUTURE_ESTIMATORS}, got {future!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    return mask


def assemble(
    kl: torch.Tensor,
    logp: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    c: torch.Tensor,
    *,
    beta: float,
    lam: float,
    future: str,
    gamma: float,
    baseline,
    group_size: int | None,
    future_norm: str = "sum",
) -> HybridLossOutput:
    """The dense and sparse terms from per-token KL [B, T] and log-probs [B, T] (both differentiable), the
    teacher's sampled-token log-probs [B, T] (needed for k1/k3; None gives a zero `logratio`) and weights c [B]."""
    if not torch.isfinite(logp.detach()[mask]).all():
        raise ValueError(
            "actions include a token the student gives probability 0 (a -inf logit): the rollout was not "
            "sampled from this softmax (other logits processors, masks, or a different temperature)"
        )
    zero = torch.zeros((), dtype=kl.dtype, device=mask.device)
    if isinstance(beta, torch.Tensor):  # per-sequence weights [B]
        beta = beta.detach().to(kl.dtype)
    dense = (beta * c * kl.sum(1)).sum()
    with torch.no_grad():
        if teacher_logp is None:
            if future in ("k1", "k3"):
                raise ValueError(f"future={future!r} needs the teacher's log-probs at the sampled tokens")
            logratio = torch.zeros_like(kl)
        else:
            logratio = torch.where(mask, logp.detach() - teacher_logp, zero)
        # The [B, T] returns are formed in fp64 (a few B x T numbers): k3 = r - 1 - log r overflows fp32 once
        # log r = log pi_T - log pi > 88 (a sampled token the student gives log-prob -100), although beta times
        # the future KL can still be a representable advantage.
        w64 = torch.float64
        if future == "analytic":
            k_future = kl.detach().to(w64)
        elif future == "none":
            k_future = torch.zeros_like(kl, dtype=w64)
        else:
            k_future = kl_estimate(logp.detach().to(w64), teacher_logp.to(w64), future)
        fut = future_sum(k_future, mask, gamma if future != "none" else 0.0)
        if future_norm == "mean" and future != "none":  # length-neutral: per remaining (discounted) token
            fut = fut / future_sum(mask.to(fut.dtype), mask, gamma).clamp_min(1e-30)
        returns = combined_returns(rewards, fut, mask, lam=lam, beta=beta)
        base = state_baseline(baseline, rewards, returns, mask, lam=lam, group_size=group_size)
        adv64 = torch.where(mask, returns - base, 0.0)
    sparse = (-(c[:, None].to(w64) * torch.where(mask, logp, zero).to(w64) * adv64).sum()).to(kl.dtype)
    adv = adv64.to(kl.dtype)
    returns, base = returns.to(kl.dtype), torch.where(mask, base, 0.0).to(kl.dtype)
    ok = [torch.isfinite(x).all() for x in (sparse.detach(), c[:, None] * adv, returns, base)]
    if not all(bool(x) for x in ok):  # no silent inf: the score gradient c * A would not fit the dtype either
        raise ValueError(_return_overflow(future, logp.detach(), teacher_logp, mask, kl.dtype))
    return HybridLossOutput(
        loss=dense + sparse,
        dense=dense,
        sparse=sparse,
        kl=kl.detach(),
        logratio=logratio,
        returns=returns,
        baseline=base,
        advantages=adv,
        token_weights=c.detach(),
    )


def _return_overflow(future, logp, teacher_logp, mask, dtype) -> str:
    msg = f"the returns / advantages of the sparse term overflow {dtype} (future={future!r})"
    if future == "k3" and teacher_logp is not None:
        log_r = torch.where(mask, teacher_logp.to(torch.float64) - logp.to(torch.float64), -math.inf)
        i = int(log_r.argmax())
        b, t = divmod(i, mask.shape[1])
        lr = float(log_r.reshape(-1)[i])
        msg += (
            f": at token [{b}, {t}] the student's log-prob is {float(logp[b, t]):.4g} and the teacher's "
            f"{float(teacher_logp[b, t]):.4g}, so r = pi_T / pi = exp({lr:.4g}) and k3 = r - 1 - log r = "
            f"{math.expm1(lr) - lr if lr < 709 else math.inf:.4g}"
        )
    return msg + "; use future='analytic' (the lowest variance) or 'k1', a smaller beta, or float64 logits"


def flat_grad(y: torch.Tensor, params, retain_graph: bool = False) -> torch.Tensor:
    """d y / d params, flattened into one [P] vector (zeros for parameters y does not depend on)."""
    params = list(params)
    if not y.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    gs = torch.autograd.grad(y, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)])


def _part_grad_norms(dense: torch.Tensor, sparse: torch.Tensor, params) -> dict[str, float]:
    gd, gs = flat_grad(dense, params, True), flat_grad(sparse, params, True)
    nd, ns = gd.norm(), gs.norm()
    cos = (gd @ gs) / (nd * ns) if nd > 0 and ns > 0 else torch.zeros(())
    return {"dense": float(nd), "sparse": float(ns), "total": float((gd + gs).norm()), "cosine": float(cos)}
