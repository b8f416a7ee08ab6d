"""Toys for notebook 01: exposure bias of offline (teacher-forced) imitation vs on-policy imitation.

The task: a "copy the previous token" chain. The teacher picks a first token uniformly, then repeats the previous
token with probability 1 - delta and switches to one of the other tokens with probability delta. Its
trajectories are therefore almost always constant; prefixes that contain a switch are rare under the teacher,
and prefixes with two switches rarer still.

The student is a tabular policy over whole prefixes (`hybridlab.lab.exact.TinyPolicy(kind="tabular")`, started
uniform): it *can* represent the teacher exactly, but learns a state only where it gets training signal.
Both imitation rules minimise the same per-state loss, the full-vocabulary reverse KL KL_t(s_t) of
`hybridlab.dense_kl`, with the same budget of sequences; only the source of the states differs:

- "offline": states from teacher rollouts (teacher forcing) - the student never trains on the states its own
  mistakes lead to, so at test time, when it generates, one mistake leads to an untrained state, where it
  makes more: errors compound along the sequence;
- "on_policy": states from the student's own rollouts - it trains where it actually goes.

Everything is evaluated exactly by enumerating all V^H responses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..dense import dense_kl
from .exact import (
    DTYPE,
    SequenceSpace,
    TinyPolicy,
    enumerate_sequences,
    prefix_codes,
    sample,
    sequence_probs,
    tilted_distribution,
)

IMITATION_MODES = ("offline", "on_policy")


class CopyTeacher(nn.Module):
    """Teacher of the copy chain: uniform first token, then repeat the previous one with prob 1 - delta.

    forward(actions [B, H]) -> logits [B, H, V] (float64 log-probabilities) of pi_T(. | s_t) at every position.
    """

    def __init__(self, vocab: int = 3, horizon: int = 6, delta: float = 0.05):
        super().__init__()
        if vocab < 2:
            raise ValueError(f"vocab must be >= 2, got {vocab}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
        self.vocab, self.horizon, self.delta = vocab, horizon, delta

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        b, h = actions.shape
        v = self.vocab
        stay, switch = math.log(1.0 - self.delta), math.log(self.delta / (v - 1))
        prev = actions[:, :-1]
        copy = nn.functional.one_hot(prev, v).to(DTYPE)
        later = switch + (stay - switch) * copy  # [B, H-1, V]
        first = torch.full((b, 1, v), -math.log(v), dtype=DTYPE)
        return torch.cat([first, later], 1)


def copy_task(vocab: int = 3, horizon: int = 6, delta: float = 0.05) -> tuple[CopyTeacher, SequenceSpace]:
    """The teacher and the space of all V^H responses (no EOS: every response has H tokens)."""
    return CopyTeacher(vocab, horizon, delta), enumerate_sequences(vocab, horizon, eos=False)


class BoundedTabularPolicy(nn.Module):
    """One logit vector per prefix state, squashed to [-max_logit, max_logit]: logits = max_logit * tanh(table).

    The bound is the student's limited capacity: it can never put more than
    e^c / (e^c + (V - 1) e^-c) on one token (c = max_logit), so it slips now and then however well it is
    trained. Starts uniform (table = 0). forward(actions [B, H]) -> logits [B, H, V].
    """

    def __init__(self, vocab: int = 3, horizon: int = 6, max_logit: float = 1.5):
        super().__init__()
        if not max_logit > 0:
            raise ValueError(f"max_logit must be > 0, got {max_logit!r}")
        self.vocab, self.horizon, self.max_logit = vocab, horizon, max_logit
        self.table = nn.Parameter(torch.zeros((vocab + 1) ** horizon, vocab, dtype=DTYPE))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        return self.max_logit * torch.tanh(self.table[prefix_codes(actions, self.vocab)])

    def max_prob(self) -> float:
        """The largest probability the student can give one token."""
        c, v = self.max_logit, self.vocab
        return math.exp(c) / (math.exp(c) + (v - 1) * math.exp(-c))


def tabular_student(vocab: int = 3, horizon: int = 6, max_logit: float | None = 1.5) -> nn.Module:
    """A uniform tabular student over prefixes: bounded logits (`BoundedTabularPolicy`), or free if None."""
    if max_logit is None:
        return TinyPolicy(vocab, horizon, kind="tabular", scale=0.0)
    return BoundedTabularPolicy(vocab, horizon, max_logit)


def train_imitation(
    student: nn.Module,
    teacher: nn.Module,
    *,
    mode: str,
    steps: int,
    batch: int = 32,
    lr: float = 0.3,
    seed: int = 0,
) -> list[float]:
    """Minimise the per-state reverse KL sum_t KL_t(s_t) at states from `mode`'s rollouts (Adam). In place.

    mode "offline": s_t from teacher samples (teacher forcing); "on_policy": s_t from the student's own samples.
    Both see `steps * batch` sequences. Returns the training loss per step (mean over the batch of sum_t KL_t).
    """
    if mode not in IMITATION_MODES:
        raise ValueError(f"mode must be one of {IMITATION_MODES}, got {mode!r}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        roller = teacher if mode == "offline" else student
        actions, mask = sample(roller, batch, g)
        with torch.no_grad():
            teacher_logits = teacher(actions)
        kl = dense_kl(student(actions), teacher_logits, mask=mask, backend="torch")
        loss = kl.sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def per_position_kl(student: nn.Module, teacher: nn.Module, space: SequenceSpace, states: str = "student"):
    """E[KL_t(s_t)] for each position t, exactly, with s_t drawn from the `states` policy's rollouts: [H].

    states="student": the error the student makes when it generates (what users see);
    states="teacher": the teacher-forced error (what offline training measures). Sums to the sequence KL
    KL(pi_theta || pi_T) when states="student".
    """
    if states not in ("student", "teacher"):
        raise ValueError(f"states must be 'student' or 'teacher', got {states!r}")
    roller = student if states == "student" else teacher
    w = sequence_probs(roller, space)
    kl = dense_kl(student(space.actions), teacher(space.actions), mask=space.mask, backend="torch")
    return (w[:, None] * kl).sum(0)


@torch.no_grad()
def switch_rate(policy: nn.Module, space: SequenceSpace) -> torch.Tensor:
    """P(y_t != y_{t-1}) under the policy's own rollouts for t = 1..H-1, exactly: [H-1].

    The copy teacher's rate is delta at every position; a drifting student's rate grows with t.
    """
    w = sequence_probs(policy, space)
    switched = (space.actions[:, 1:] != space.actions[:, :-1]).to(DTYPE)
    return w @ switched


# ----------------------------------------------------------------------------------------------------------
# Sequence-level objective on explicit distributions (notebook 01: the optimum pi*).


def sequence_objective(
    p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, *, lam: float, beta: float
) -> float:
    """J(p) = sum_y p(y) [lam R(y) - beta log(p(y) / q(y))] for distributions over responses ([S] each); 0 log 0 = 0."""
    p, q, r = (x.to(DTYPE) for x in (p, q, r))
    log_ratio = torch.where(p > 0, torch.log(p) - torch.log(q), 0.0)
    return float((p * (lam * r - beta * log_ratio)).sum())


def gibbs_optimum(q: torch.Tensor, r: torch.Tensor, *, lam: float, beta: float) -> torch.Tensor:
    """pi*(y) = q(y) exp(lam R(y) / beta) / Z: the maximiser of `sequence_objective` ([S])."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 for the optimum to exist, got {beta!r}")
    return tilted_distribution(torch.log(q.to(DTYPE)), r.to(DTYPE), lam=lam, beta=beta)


def log_partition(q: torch.Tensor, r: torch.Tensor, *, lam: float, beta: float) -> float:
    """beta log Z = beta log sum_y q(y) exp(lam R(y) / beta): the maximum value of J."""
    return beta * float(torch.logsumexp(torch.log(q.to(DTYPE)) + lam * r.to(DTYPE) / beta, 0))


def decode(
    actions: torch.Tensor, mask: torch.Tensor, eos: int | None = None, alphabet: str = "abcdef"
) -> list[str]:
    """Responses as strings for display: token i -> alphabet[i], EOS -> '$'. [B, H] -> B strings."""
    out = []
    for row, m in zip(actions.tolist(), mask.tolist()):
        out.append("".join("$" if a == eos else alphabet[a] for a, keep in zip(row, m) if keep))
    return out


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
