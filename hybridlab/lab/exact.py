"""Exact enumeration on tiny autoregressive policies: J, grad J, the expected dense and sparse terms, fixed points.

A sequence space has vocabulary V (2-4 tokens, the last one EOS when `eos=True`) and horizon H <= 4. Generation
stops at EOS or after H tokens, so every sequence can be listed (at most a few hundred) and every expectation
computed exactly in float64: the identity  grad J = E[dense] + E[sparse]  is checked to ~1e-12 here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..hybrid import flat_grad as _flat_grad
from ..hybrid import hybrid_loss

DTYPE = torch.float64


@dataclass(frozen=True)
class SequenceSpace:
    """All responses: actions [S, H] (0 after the end), mask [S, H] bool, with the EOS id (or None)."""

    vocab: int
    horizon: int
    eos: int | None
    actions: torch.Tensor
    mask: torch.Tensor

    @property
    def size(self) -> int:
        return self.actions.shape[0]


def enumerate_sequences(vocab: int, horizon: int, eos: bool = True) -> SequenceSpace:
    """Every response of at most `horizon` tokens; with `eos`, token `vocab - 1` ends a response."""
    if not 2 <= vocab <= 6 or not 1 <= horizon <= 6:
        raise ValueError(
            f"enumeration is for tiny spaces: vocab in [2, 6], horizon in [1, 6]; got {vocab}, {horizon}"
        )
    eos_id = vocab - 1 if eos else None
    body = [a for a in range(vocab) if a != eos_id]
    seqs: list[tuple[int, ...]] = []
    if eos_id is None:
        seqs = list(itertools.product(range(vocab), repeat=horizon))
    else:
        for length in range(1, horizon + 1):
            for prefix in itertools.product(body, repeat=length - 1):
                lasts = [eos_id] if length < horizon else range(vocab)
                seqs.extend(prefix + (a,) for a in lasts)
    actions = torch.zeros(len(seqs), horizon, dtype=torch.long)
    mask = torch.zeros(len(seqs), horizon, dtype=torch.bool)
    for i, s in enumerate(seqs):
        actions[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return SequenceSpace(vocab, horizon, eos_id, actions, mask)


def prefix_codes(actions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Unique integer per state s_t = y_<t: code_t = sum_{i<t} (y_i + 1) (V + 1)^i. [B, H] -> [B, H]."""
    h = actions.shape[1]
    powers = (vocab + 1) ** torch.arange(h, device=actions.device)
    digits = (actions + 1) * powers
    return torch.cumsum(digits, 1) - digits  # exclusive: the state before token t


def sequence_codes(actions: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Unique integer per whole response (for reward tables): [B, H] -> [B]."""
    powers = (vocab + 1) ** torch.arange(actions.shape[1], device=actions.device)
    return (((actions + 1) * powers) * mask).sum(1)


class TinyPolicy(nn.Module):
    """Autoregressive policy on a tiny vocabulary.

    kind="shared": one MLP maps features of the state (previous token, position, token counts so far) to
    logits, so every parameter moves every state's distribution (what real models do).
    kind="tabular": one logit vector per prefix state (can represent any policy; used for fixed points).
    """

    def __init__(
        self,
        vocab: int,
        horizon: int,
        *,
        kind: str = "shared",
        hidden: int = 8,
        seed: int = 0,
        scale: float = 1.0,
    ):
        super().__init__()
        if kind not in ("shared", "tabular"):
            raise ValueError(f"kind must be 'shared' or 'tabular', got {kind!r}")
        self.vocab, self.horizon, self.kind = vocab, horizon, kind
        g = torch.Generator().manual_seed(seed)
        if kind == "shared":
            d_in = (vocab + 1) + horizon + vocab
            self.w1 = nn.Parameter(scale * torch.randn(d_in, hidden, generator=g, dtype=DTYPE) / d_in**0.5)
            self.b1 = nn.Parameter(0.1 * scale * torch.randn(hidden, generator=g, dtype=DTYPE))
            self.w2 = nn.Parameter(scale * torch.randn(hidden, vocab, generator=g, dtype=DTYPE) / hidden**0.5)
            self.b2 = nn.Parameter(0.1 * scale * torch.randn(vocab, generator=g, dtype=DTYPE))
        else:
            self.table = nn.Parameter(
                scale * torch.randn((vocab + 1) ** horizon, vocab, generator=g, dtype=DTYPE)
            )

    def features(self, actions: torch.Tensor) -> torch.Tensor:
        b, h = actions.shape
        v = self.vocab
        prev = torch.cat([torch.full((b, 1), v, dtype=torch.long), actions[:, :-1]], 1)  # v = BOS
        onehot_prev = nn.functional.one_hot(prev, v + 1).to(DTYPE)
        pos = nn.functional.one_hot(torch.arange(h), self.horizon).to(DTYPE).expand(b, h, self.horizon)
        taken = nn.functional.one_hot(actions, v).to(DTYPE)
        counts = (torch.cumsum(taken, 1) - taken) / self.horizon
        return torch.cat([onehot_prev, pos, counts], -1)

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        """Logits of pi(. | s_t) at every position given the prefix: actions [B, H] -> [B, H, V]."""
        if self.kind == "tabular":
            return self.table[prefix_codes(actions, self.vocab)]
        hidden = torch.tanh(self.features(actions) @ self.w1 + self.b1)
        return hidden @ self.w2 + self.b2


def reward_table(space: SequenceSpace, kind: str = "random", seed: int = 0) -> Callable:
    """A reward function R(actions, mask) -> [B] over the space's responses.

    "random": i.i.d. N(0, 1) per response (no structure for anything to exploit);
    "count0": fraction of tokens equal to 0 (a smooth, learnable task reward).
    """
    if kind == "count0":
        return lambda actions, mask: ((actions == 0) & mask).sum(1).to(DTYPE) / space.horizon
    if kind != "random":
        raise ValueError(f"kind must be 'random' or 'count0', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    table = torch.randn((space.vocab + 1) ** space.horizon + 1, generator=g, dtype=DTYPE)
    return lambda actions, mask: table[sequence_codes(actions, mask, space.vocab)]


def token_logprobs(policy: nn.Module, actions: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0):
    """log pi(y_t | s_t) on response tokens (0 on padding): [B, H]."""
    logp = torch.log_softmax(policy(actions) / temperature, -1).gather(-1, actions[..., None])[..., 0]
    return torch.where(mask, logp, torch.zeros((), dtype=logp.dtype))


def sequence_probs(policy: nn.Module, space: SequenceSpace, temperature: float = 1.0) -> torch.Tensor:
    """pi(y) for every response in the space: [S]; sums to 1. Differentiable (detach it for weights)."""
    return token_logprobs(policy, space.actions, space.mask, temperature).sum(1).exp()


def objective(
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    lam: float,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """J = sum_y pi(y) [lam R(y) - beta log(pi(y) / pi_T(y))], exact and differentiable (float64 scalar)."""
    logp = token_logprobs(policy, space.actions, space.mask, temperature).sum(1)
    with torch.no_grad():
        logq = token_logprobs(teacher, space.actions, space.mask).sum(1)
    r = reward(space.actions, space.mask)
    return (logp.exp() * (lam * r - beta * (logp - logq))).sum()


def flat_grad(y: torch.Tensor, policy: nn.Module) -> torch.Tensor:
    """grad of y w.r.t. all of the policy's parameters, flattened: [P]."""
    return _flat_grad(y, policy.parameters())


def exact_gradient(policy, teacher, space, reward, *, lam, beta, temperature=1.0) -> torch.Tensor:
    """grad J by autograd through the exact objective: [P] (all parameters flattened)."""
    return flat_grad(
        objective(policy, teacher, space, reward, lam=lam, beta=beta, temperature=temperature), policy
    )


def enumerated_loss(
    policy,
    teacher,
    space,
    reward,
    *,
    temperature: float = 1.0,
    rollout_temperature: float | None = None,
    loss_fn: Callable = hybrid_loss,
    **loss_kwargs,
):
    """`loss_fn` (default `hybrid_loss`) over every response with seq_weights = pi(y) at `rollout_temperature`
    (default: the loss's `temperature`; set it apart to model a rollout/training mismatch).
    -S * grad(loss) is then the *expected* estimate."""
    t_roll = temperature if rollout_temperature is None else rollout_temperature
    with torch.no_grad():
        weights = sequence_probs(policy, space, t_roll)
        teacher_logits = teacher(space.actions)
    return loss_fn(
        policy(space.actions),
        teacher_logits,
        space.actions,
        reward(space.actions, space.mask),
        mask=space.mask,
        seq_weights=weights,
        temperature=temperature,
        backend="torch",
        **loss_kwargs,
    )


def expected_estimate(policy, teacher, space, reward, **hybrid_kwargs) -> dict[str, torch.Tensor]:
    """Exact expectation of the estimator's dense, sparse and total gradient (as ascent directions on J): [P] each."""
    out = enumerated_loss(policy, teacher, space, reward, **hybrid_kwargs)
    s = space.size
    dense = -s * flat_grad(out.dense, policy) if out.dense.requires_grad else None
    out = enumerated_loss(policy, teacher, space, reward, **hybrid_kwargs)  # fresh graph (in-place backward)
    sparse = -s * flat_grad(out.sparse, policy)
    if dense is None:
        dense = torch.zeros_like(sparse)
    return {"dense": dense, "sparse": sparse, "total": dense + sparse}


def tilted_distribution(
    logq: torch.Tensor, rewards: torch.Tensor, *, lam: float, beta: float
) -> torch.Tensor:
    """pi*(y) proportional to pi_T(y) exp(lam R(y) / beta) from sequence log-probs and rewards ([S] each).

    beta = 0 (pure RL) is the limit: the teacher restricted to the responses of maximal reward.
    """
    if beta > 0:
        return torch.softmax(logq + lam * rewards / beta, 0)
    if lam > 0:
        best = rewards >= rewards.max() - 1e-12
        return torch.softmax(torch.where(best, logq, torch.full_like(logq, -float("inf"))), 0)
    raise ValueError(
        f"lam and beta are both 0: J is constant and has no unique optimum (lam={lam}, beta={beta})"
    )


def optimal_distribution(teacher, space, reward, *, lam: float, beta: float) -> torch.Tensor:
    """pi*(y) proportional to pi_T(y) exp(lam R(y) / beta): the maximiser of J over all policies. [S]"""
    with torch.no_grad():
        logq = token_logprobs(teacher, space.actions, space.mask).sum(1)
        return tilted_distribution(logq, reward(space.actions, space.mask), lam=lam, beta=beta)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def ascend(
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    lam: float,
    beta: float,
    steps: int = 2000,
    lr: float = 0.05,
    future: str = "analytic",
    gamma: float = 1.0,
    tol: float = 1e-10,
) -> dict[str, list[float]]:
    """Exact gradient ascent with the *expected* estimator (Adam), until the update stalls.

    future="analytic" follows grad J and reaches pi*; future="none" (myopic) converges elsewhere.
    Returns the history of J and the total variation to pi*.
    """
    target = optimal_distribution(teacher, space, reward, lam=lam, beta=beta)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    hist: dict[str, list[float]] = {"J": [], "tv": []}
    for _ in range(steps):
        opt.zero_grad()
        out = enumerated_loss(policy, teacher, space, reward, lam=lam, beta=beta, future=future, gamma=gamma)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            j = objective(policy, teacher, space, reward, lam=lam, beta=beta)
            hist["J"].append(float(j))
            hist["tv"].append(total_variation(sequence_probs(policy, space), target))
        grad_sq = sum(float(p.grad.pow(2).sum()) for p in policy.parameters())
        if grad_sq < tol**2:
            break
    return hist


def sample(
    policy: nn.Module, n: int, generator: torch.Generator, temperature: float = 1.0, eos: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n responses from pi_theta at `temperature`: actions [n, H], mask [n, H] (stops at `eos`)."""
    h = policy.horizon
    actions = torch.zeros(n, h, dtype=torch.long)
    mask = torch.zeros(n, h, dtype=torch.bool)
    alive = torch.ones(n, dtype=torch.bool)
    with torch.no_grad():
        for t in range(h):
            probs = torch.softmax(policy(actions)[:, t] / temperature, -1)
            a = torch.multinomial(probs, 1, generator=generator)[:, 0]
            actions[:, t] = torch.where(alive, a, 0)
            mask[:, t] = alive
            if eos is not None:
                alive = alive & (a != eos)
    return actions, mask


def group_estimate(
    policy: nn.Module,
    teacher: nn.Module,
    actions: torch.Tensor,
    mask: torch.Tensor,
    reward: Callable,
    *,
    temperature: float = 1.0,
    loss_fn: Callable = hybrid_loss,
    **loss_kwargs,
) -> torch.Tensor:
    """-grad(loss) on one group of responses ([G, H] actions and mask): the group's mean estimate. [P]

    `loss_fn` has hybrid_loss's signature (a control from `hybridlab.lab.controls` works too); a callable
    `baseline=` is evaluated on the group's (actions, mask) to give the [G, H] state baseline.
    """
    g = actions.shape[0]
    if callable(loss_kwargs.get("baseline")):
        loss_kwargs = {**loss_kwargs, "baseline": loss_kwargs["baseline"](actions, mask)}
    with torch.no_grad():
        teacher_logits = teacher(actions)
    out = loss_fn(
        policy(actions),
        teacher_logits,
        actions,
        reward(actions, mask),
        mask=mask,
        temperature=temperature,
        backend="torch",
        group_size=g if g > 1 else None,
        **loss_kwargs,
    )
    return -flat_grad(out.loss if hasattr(out, "loss") else out, policy)


def sampled_estimates(
    policy: nn.Module,
    teacher: nn.Module,
    space: SequenceSpace,
    reward: Callable,
    *,
    n_groups: int,
    group_size: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    rollout_temperature: float | None = None,
    loss_fn: Callable = hybrid_loss,
    **loss_kwargs,
) -> torch.Tensor:
    """Independent Monte Carlo estimates of grad J, one per group of `group_size` fresh samples: [n_groups, P].

    Each row is -grad(loss) on one group of G = group_size samples (the loss already averages over the
    group's sequences), so the rows' mean converges to grad J at 1/sqrt(N). `rollout_temperature` other
    than `temperature` samples at one temperature and trains at another (the mismatch pitfall).
    """
    t_roll = temperature if rollout_temperature is None else rollout_temperature
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_groups):
        actions, mask = sample(policy, group_size, g, t_roll, space.eos)
        rows.append(
            group_estimate(
                policy,
                teacher,
                actions,
                mask,
                reward,
                temperature=temperature,
                loss_fn=loss_fn,
                **loss_kwargs,
            )
        )
    return torch.stack(rows)
