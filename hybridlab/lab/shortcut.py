"""The short-answer shortcut of the exact objective, on the mixing lab's enumerable toy (vocabulary {a, b, EOS}).

    J(theta) = E_y[ lam R(y) ] - beta KL(pi_theta || pi_T),     KL = E_y sum_t KL_t(s_t)  (a sum over tokens)

A sharp teacher alternates a, b, a, b (probability 0.96 on the right token, 0.02 on the other and on EOS). The
student is too small to follow it: one distribution for every state (`OneStatePolicy`), so each token it says costs
about 1.2 nats of KL at the least, whatever it learns (`per_token_floor`). The sequence KL is a sum over the tokens
said, so the cheapest way to lower it is to say fewer: the exact gradient of J (future="analytic") raises the EOS probability and the responses
shorten, while the myopic rule (future="none": each state's KL, not the KL still to come) keeps the length. The
reward gives credit only to a full-length response (the fraction of its tokens that follow the teacher), as exact
match scores a too-short answer 0, so the shortcut costs reward although it raises J: the estimator is right, the
objective's landscape has the shortcut.

    runs = shortcut_runs(steps=200)
    runs["exact (future='analytic')"]["length"]     # one entry per step: E_y |y| under the student

Every number is exact (every response enumerated, float64); the gradients are the estimator's expectations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .exact import (
    DTYPE,
    SequenceSpace,
    TinyPolicy,
    enumerate_sequences,
    enumerated_loss,
    expected_estimate,
    prefix_codes,
    sequence_probs,
    token_logprobs,
)

VOCAB = 3  # a, b, EOS (the mixing lab's tokens)
EOS = 2
SETTINGS = {"exact (future='analytic')": {"future": "analytic"}, "myopic (future='none')": {"future": "none"}}
METRICS = ("length", "eos_rate", "reward", "kl", "objective", "dense_norm", "future_norm", "cosine")


class OneStatePolicy(TinyPolicy):
    """A student with one next-token distribution for every state (it cannot see the prefix): logits [B, H, V]."""

    def __init__(self, horizon: int, probs: tuple[float, float, float] = (0.47, 0.47, 0.06)):
        super().__init__(VOCAB, horizon, kind="tabular", seed=0, scale=0.0)
        self.table = torch.nn.Parameter(torch.tensor(probs, dtype=DTYPE).log()[None])

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        b, h = actions.shape
        return self.table[0].expand(b, h, self.vocab)


def alternating_teacher(space: SequenceSpace, p: float = 0.96, p_eos: float = 0.02) -> TinyPolicy:
    """A tabular teacher that says a at even positions and b at odd ones with probability p, EOS with p_eos."""
    if not (0 < p_eos and 0 < p and p + p_eos < 1):
        raise ValueError(f"need 0 < p, 0 < p_eos, p + p_eos < 1; got p={p}, p_eos={p_eos}")
    teacher = TinyPolicy(VOCAB, space.horizon, kind="tabular", seed=0)
    codes = prefix_codes(space.actions, VOCAB)
    with torch.no_grad():
        for t in range(space.horizon):
            row = torch.full((VOCAB,), 1 - p - p_eos, dtype=DTYPE)
            row[t % 2], row[EOS] = p, p_eos
            teacher.table[codes[:, t]] = row.log()
    return teacher.requires_grad_(False)


def per_token_floor(p: float = 0.96, p_eos: float = 0.02, grid: int = 400) -> float:
    """The least KL per token a one-state student can reach against `alternating_teacher`: the minimum over its
    distribution (on a grid of step 1/grid) of the mean of KL(student || teacher) at an a-state and at a b-state."""
    qa = torch.tensor([p, 1 - p - p_eos, p_eos], dtype=DTYPE)
    qb = qa[[1, 0, 2]]
    i, j = torch.meshgrid(torch.arange(1, grid), torch.arange(1, grid), indexing="ij")
    keep = i + j < grid
    probs = torch.stack([i[keep], j[keep], grid - i[keep] - j[keep]], -1).to(DTYPE) / grid
    kl = 0.5 * ((probs * (probs / qa).log()).sum(-1) + (probs * (probs / qb).log()).sum(-1))
    return float(kl.min())


def full_length_reward(horizon: int) -> Callable:
    """R(actions [B, H], mask [B, H]) -> [B]: the fraction of tokens that follow a, b, a, ..., if the response has
    all `horizon` tokens; 0 for a shorter one (exact match scores a too-short answer 0)."""
    want = torch.tensor([t % 2 for t in range(horizon)])

    def reward(actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        right = ((actions == want) & mask).sum(1).to(DTYPE) / horizon
        return right * (mask.sum(1) == horizon).to(DTYPE)

    return reward


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def shortcut_runs(
    steps: int = 200,
    *,
    horizon: int = 4,
    lam: float = 1.0,
    beta: float = 1.0,
    lr: float = 0.05,
    settings: Mapping[str, dict] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Train the one-state student from the same start under each setting (label -> `hybrid_loss` options, default
    `SETTINGS`) with the estimator's *expected* gradient (Adam), and record per step (before the update):

    length (E|y|), eos_rate (the student's EOS probability), reward (E R), kl (the sequence KL), objective (J),
    dense_norm and future_norm (norms of the expected dense term and of the future-KL part of the sparse term) and
    cosine (between those two; nan without a future term). Returns {label: {metric: [steps]}}.
    """
    if steps < 1 or horizon < 2:
        raise ValueError(f"steps must be >= 1 and horizon >= 2, got steps={steps}, horizon={horizon}")
    space = enumerate_sequences(VOCAB, horizon, eos=True)
    teacher = alternating_teacher(space)
    reward = full_length_reward(horizon)
    with torch.no_grad():
        logq = token_logprobs(teacher, space.actions, space.mask).sum(1)
        r = reward(space.actions, space.mask)
    lengths = space.mask.sum(1).to(DTYPE)
    out = {}
    for label, kw in (settings or SETTINGS).items():
        kw = {"lam": lam, "beta": beta, **kw}
        student = OneStatePolicy(horizon)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        hist: dict[str, list[float]] = {k: [] for k in METRICS}
        for _ in range(steps):
            with torch.no_grad():
                p = sequence_probs(student, space)
                kl = float((p * (p.log() - logq)).sum())
                reward_mean = float((p * r).sum())
                eos = float(torch.softmax(student.table[0], -1)[EOS])
            parts = expected_estimate(student, teacher, space, reward, **kw)
            myopic = expected_estimate(student, teacher, space, reward, **{**kw, "future": "none"})
            future = parts["sparse"] - myopic["sparse"]  # the future-KL score term (the reward part cancels)
            for key, value in (("length", float((p * lengths).sum())), ("eos_rate", eos), ("reward", reward_mean),
                               ("kl", kl), ("objective", kw["lam"] * reward_mean - kw["beta"] * kl),
                               ("dense_norm", float(parts["dense"].norm())), ("future_norm", float(future.norm())),
                               ("cosine", _cos(parts["dense"], future))):  # fmt: skip
                hist[key].append(value)
            opt.zero_grad()
            enumerated_loss(student, teacher, space, reward, **kw).loss.backward()
            opt.step()
        out[label] = hist
    return out
