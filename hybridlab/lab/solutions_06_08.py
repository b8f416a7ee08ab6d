"""Reference solutions of notebooks 06 and 08's exercises, and typical wrong answers (merged into
`hybridlab.lab.solutions.SOLUTIONS` / `WRONG`; try an exercise before reading its solution here)."""

from __future__ import annotations

import torch


def expected_length(eos: float, horizon: int) -> float:
    """The response is still going at position t (1-based) with probability (1 - e)^(t-1)."""
    return sum((1 - eos) ** t for t in range(horizon))


def sequence_kl(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over the response positions of the full-vocabulary KL(p_t || q_t)."""
    per_state = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(mask, per_state, torch.zeros_like(per_state)).sum()


SOLUTIONS_LATE = {
    "06.length": expected_length,
    "06.trust": 0.25 * torch.e**4 / (0.25 * torch.e**4 + 0.75),  # w = exp(lam / (beta p_T)) = e^4
    "08.kl": sequence_kl,
    "08.wilson": 20,
}

WRONG_LATE = {
    "06.length": [(lambda e, h: 1 / e, "also stops after"), (lambda e, h: h * (1 - e), "still going")],
    "06.trust": [(0.4753, "beta p_T(x)"), (0.25, "the teacher itself")],
    "08.kl": [
        (lambda p, q, m: sequence_kl(q, p, m), "direction"),
        (lambda p, q, m: sequence_kl(p, q, torch.ones_like(m)), "padding"),
    ],
    "08.wilson": [(16, "point estimate"), (19, "point estimate")],
}
