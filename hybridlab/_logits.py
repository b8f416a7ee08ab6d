"""Row-chunked helpers over [N, V] logits shared by the dense and sparse terms (one fp32 chunk at a time)."""

from __future__ import annotations

import torch

# Elements per row chunk of the fp32 workspace (about 64 MB per temporary).
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64 (exact enumeration), else fp32 (bf16/fp16 inputs accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_chunks(n: int, v: int):
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def row_logsumexp(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(z / tau) per row: [N, V] -> [N] in the compute dtype."""
    cdt = compute_dtype(z)
    out = torch.empty(z.shape[0], dtype=cdt, device=z.device)
    for sl in row_chunks(*z.shape):
        out[sl] = torch.logsumexp(z[sl].to(cdt) / temperature, dim=-1)
    return out


def selected_logprob(
    z: torch.Tensor, actions: torch.Tensor, lse: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log softmax(z / tau)[a] per row given the row's log-sum-exp: [N, V], [N], [N] -> [N]."""
    return z.gather(1, actions[:, None])[:, 0].to(lse.dtype) / temperature - lse


def add_score_grad(
    out: torch.Tensor,
    z: torch.Tensor,
    actions: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """out += g * d log softmax(z / tau)[a] / dz = g * (onehot(a) - p) / tau, in place, chunked: [N, V]."""
    g = g.to(lse.dtype)
    for sl in row_chunks(*z.shape):
        p = torch.exp(z[sl].to(lse.dtype) / temperature - lse[sl, None])
        out[sl] = (out[sl].to(lse.dtype) - (g[sl, None] / temperature) * p).to(out.dtype)
    out.scatter_add_(1, actions[:, None], (g / temperature).to(out.dtype)[:, None])
    return out
