"""Tolerances derived from the arithmetic, not from what one machine printed.

A KL over V vocabulary entries computed in a working precision with machine epsilon `eps` (fp32 for fp32,
bf16 and fp16 inputs) differs from the float64 value by roughly
- eps * (|x|_max + |lse|) per log-probability (log p_j = x_j - lse is formed from numbers of that size), and
- the error of order-dependent sums over V terms (the log-sum-exp's and the KL's own): at most ~V * eps in
  an adversarial order, ~sqrt(V) * eps for the rounding errors of real CPUs and GPUs, whatever their SIMD
  width or summation order.
`kl_tolerance` adds the two with a safety factor of 4 on each; the gradient entries p_j (r_j - KL) / tau inherit
p_j times the same error plus their own relative rounding.
"""

from __future__ import annotations

import math

import torch

SAFETY = 4.0


def working_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the precision the kernels accumulate in for inputs of `dtype`."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def kl_tolerance(
    z64: torch.Tensor, kl_ref: torch.Tensor, dtype: torch.dtype, tau: float = 1.0
) -> torch.Tensor:
    """Per-row absolute bound [N] for |KL(dtype) - KL(float64)| given float64 logits z64 [N, V] and the
    reference KL [N]. Inputs rounded to bf16/fp16 must be compared with references built from the rounded values."""
    eps = working_eps(dtype)
    x = z64.double() / tau
    finite = torch.isfinite(x)
    peak = torch.where(finite, x.abs(), 0.0).amax(-1)
    lse = torch.logsumexp(x, -1).abs()
    v = z64.shape[-1]
    return SAFETY * eps * ((peak + lse) + math.sqrt(v) * (1.0 + kl_ref.double().abs()))
