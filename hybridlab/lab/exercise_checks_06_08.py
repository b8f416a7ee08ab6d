"""The checkers of notebooks 06 and 08 (the framework and the cell pattern: `hybridlab.lab.exercises`).

Each computes its own reference: exact enumeration of the shortcut toy (06.length), a grid over the two-outcome
objective (06.trust), explicit loops over positions and tokens (08.kl), a loop over every count (08.wilson).
"""

from __future__ import annotations

import math

import torch

from .exercise_checks import F64, _number, _tensor
from .exercises import Wrong, register, result_of

# ---------------------------------------------------------------------------------------------------------------
# 06 small model


def _enumerated_length(eos: float, horizon: int) -> float:
    from .exact import enumerate_sequences, sequence_probs
    from .shortcut import OneStatePolicy

    space = enumerate_sequences(3, horizon, eos=True)
    student = OneStatePolicy(horizon, probs=((1 - eos) / 2, (1 - eos) / 2, eos))
    with torch.no_grad():
        return float((sequence_probs(student, space) * space.mask.sum(1).to(F64)).sum())


@register(
    "06.length", "function", "the expected length of a response that ends with probability e at each step"
)
def _length(fn, **_):
    for eos, horizon in ((0.06, 4), (0.5, 4), (0.2, 3), (0.9, 5), (0.3, 2)):
        ref = _enumerated_length(eos, horizon)
        got = _number(result_of(fn, eos, horizon), "the expected length")
        if abs(got - ref) > 1e-9:
            if abs(got - 1 / eos) < 1e-9:
                raise Wrong(f"at e = {eos}, H = {horizon}: that is the geometric mean length; a response also "
                            "stops after H tokens.")  # fmt: skip
            raise Wrong(f"at e = {eos}, H = {horizon} you return {got:.4f}: add up, over the positions t = 1..H, the "
                        "probability that the response is still going at t.")  # fmt: skip
    return "matches the enumeration of every response: sum_t (1 - e)^(t-1)."


def _trust_optimum(lam: float, beta: float, p: float) -> float:
    """argmax over pi in (0, 1) of lam pi - beta p KL(Bern(pi) || Bern(p)), on a fine grid."""
    pi = torch.linspace(1e-7, 1 - 1e-7, 2_000_001, dtype=F64)
    kl = pi * (pi / p).log() + (1 - pi) * ((1 - pi) / (1 - p)).log()
    return float(pi[(lam * pi - beta * p * kl).argmax()])


@register("06.trust", "value", "where the optimum puts a prompt's right answer under teacher trust")
def _trust(answer, **_):
    got = _number(answer, "pi*(correct | x), a probability")
    ref = _trust_optimum(1.0, 1.0, 0.25)
    if abs(got - ref) > 2e-3:
        if abs(got - _trust_optimum(1.0, 1.0 / 0.25, 0.25)) < 2e-3 or abs(got - 0.4753) < 2e-3:
            raise Wrong("that is the optimum at beta = 1: with teacher trust the KL weight on this prompt is "
                        "beta p_T(x), not beta.")  # fmt: skip
        if abs(got - 0.25) < 2e-3:
            raise Wrong(
                "that is the teacher itself: the reward tilts pi* away from pi_T by exp(lam R / beta_x)."
            )
        raise Wrong("over the two outcomes, pi*(correct) = p w / (p w + 1 - p) with w = exp(lam / beta_x).")
    return (
        f"pi*(correct) = {ref:.4f}: trusting a teacher that is right a quarter of the time tilts far past it."
    )


# ---------------------------------------------------------------------------------------------------------------
# 08 real model


def _loop_kl(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> float:
    total = 0.0
    for t in range(logp.shape[0]):
        if mask[t]:
            total += sum(
                math.exp(float(logp[t, v])) * float(logp[t, v] - logq[t, v]) for v in range(logp.shape[1])
            )
    return total


@register("08.kl", "function", "the sequence KL of one response, from its per-position log-probabilities")
def _kl(fn, **_):
    g = torch.Generator().manual_seed(8)
    for t, v in ((5, 7), (3, 11), (6, 4)):
        logp = torch.log_softmax(torch.randn(t, v, generator=g, dtype=F64), -1)
        logq = torch.log_softmax(2 * torch.randn(t, v, generator=g, dtype=F64), -1)
        mask = torch.arange(t) < t - 2  # the last two positions are padding
        ref = _loop_kl(logp, logq, mask)
        got = float(_tensor(torch.as_tensor(result_of(fn, logp, logq, mask)), (), "the sequence KL"))
        if abs(got - ref) > 1e-9 * max(1.0, abs(ref)):
            if abs(got - _loop_kl(logq, logp, mask)) < 1e-9 * max(1.0, abs(ref)):
                raise Wrong("that is KL(teacher || student): the direction is off; the sequence KL of J weights by "
                            "the student's probabilities.")  # fmt: skip
            if abs(got - _loop_kl(logp, logq, torch.ones(t, dtype=torch.bool))) < 1e-9 * max(1.0, abs(ref)):
                raise Wrong("the padding positions (mask False) counted: leave them out.")
            raise Wrong(f"got {got:.6f}, expected {ref:.6f}: a sum over the response positions of "
                        "sum_v p_v (log p_v - log q_v).")  # fmt: skip
    return "matches the explicit loop: a sum over tokens, each the full-vocabulary KL at that state."


def _wilson_low(k: int, n: int, z: float = 1.96) -> float:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half


@register("08.wilson", "value", "how many of 20 right answers put a 95% interval above the teacher")
def _wilson(answer, **_):
    got = _number(answer, "a count of right answers, 0 to 20")
    truth = next((k for k in range(21) if _wilson_low(k, 20) > 0.7875), None)
    if got != truth:
        if 0.7875 < got / 20 and got < truth:
            raise Wrong(f"{got:g}/20 only puts the point estimate above 0.7875: compute the Wilson interval's lower "
                        "end for each count.")  # fmt: skip
        raise Wrong("loop k = 0..20: the first k whose Wilson lower end (z = 1.96) is above 0.7875.")
    return (f"{truth}/20: lower end {_wilson_low(truth, 20):.3f} (19/20 gives {_wilson_low(19, 20):.3f}): "
            "20 questions cannot tell a student from a teacher that is right 79% of the time.")  # fmt: skip
