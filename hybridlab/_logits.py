"""Row-chunked helpers over [N, V] logits shared by the dense and sparse terms (one fp32 chunk at a time).

`active` ([N] bool or None) marks the rows that count: inactive rows (padding) are never read into a result,
so garbage there (NaN, all -inf) cannot leak into a loss or a gradient.
"""

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


def row_shift(z: torch.Tensor) -> torch.Tensor:
    """The row maximum [N, 1] of fp32/fp64 logits z [N, V], 0 where it is not finite (so an all -inf or a NaN row
    keeps its NaN/-inf downstream instead of turning into -inf - -inf here)."""
    m = z.amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=z.dtype, device=z.device))


def centered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(z - max z) / tau in z's dtype: the maximum is subtracted *before* dividing, so logits of size 1e4 are
    not rounded at the scale 1e4 / tau first (which costs ulp(1e4 / tau) in every log-prob)."""
    return (z - row_shift(z)) / temperature


def row_logsumexp(
    z: torch.Tensor, temperature: float, active: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, lse) per row of [N, V] logits, both [N] in the compute dtype: shift = max z (raw), lse =
    logsumexp((z - shift) / tau), so log softmax(z / tau)_j = (z_j - shift) / tau - lse; 0 on inactive rows."""
    cdt = compute_dtype(z)
    out = torch.empty(z.shape[0], dtype=cdt, device=z.device)
    shift = torch.empty(z.shape[0], dtype=cdt, device=z.device)
    for sl in row_chunks(*z.shape):
        zc = z[sl].to(cdt)
        m = row_shift(zc)
        shift[sl] = m[:, 0]
        out[sl] = torch.logsumexp((zc - m) / temperature, dim=-1)
    if active is not None:
        zero = torch.zeros((), dtype=cdt, device=z.device)
        out = torch.where(active, out, zero)
        shift = torch.where(active, shift, zero)
    return shift, out


def selected_logprob(
    z: torch.Tensor,
    actions: torch.Tensor,
    shift: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(z / tau)[a] per row given `row_logsumexp`'s (shift, lse): [N, V], [N], [N], [N] -> [N];
    0 on inactive rows."""
    out = (z.gather(1, actions[:, None])[:, 0].to(lse.dtype) - shift) / temperature - lse
    if active is not None:
        out = torch.where(active, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def add_score_grad(
    out: torch.Tensor,
    z: torch.Tensor,
    actions: torch.Tensor,
    shift: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    temperature: float,
    active: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = out * out_scale[:, None] + g * d log softmax(z / tau)[a] / dz, i.e. + g (onehot(a) - p) / tau,
    in place, chunked: [N, V]; (shift, lse) from `row_logsumexp`. `out_scale` ([N] or None for 1) folds a
    per-row rescale of `out` (the dense term's upstream gradient) into this pass instead of a pass of its own
    over [N, V].

    Each chunk is formed in fp32 (one-hot term included) and rounded once into `out`: for a bf16 buffer,
    rounding before adding the one-hot term would cancel two nearly equal numbers when p_a is close to 1.
    """
    cdt = lse.dtype
    scale = g.to(cdt) / temperature
    if active is not None:
        scale = torch.where(active, scale, torch.zeros((), dtype=cdt, device=scale.device))
    if out_scale is not None:
        out_scale = out_scale.to(cdt)
    for sl in row_chunks(*z.shape):
        p = torch.exp((z[sl].to(cdt) - shift[sl, None]) / temperature - lse[sl, None])
        if active is not None:
            p = torch.where(active[sl, None], p, torch.zeros((), dtype=cdt, device=p.device))
        tmp = p.mul_(-scale[sl, None])  # in place on the fresh fp32 chunk
        if out_scale is None:
            tmp += out[sl]
        else:
            tmp.addcmul_(out[sl], out_scale[sl, None])  # bf16 x fp32 promotes to fp32 per element
        tmp.scatter_add_(1, actions[sl, None], scale[sl, None])
        out[sl] = tmp  # one rounding into out's dtype
    return out
