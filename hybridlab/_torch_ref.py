"""The closed-form dense KL rows in PyTorch (full teacher and top-k teacher), below both their callers.

`dense` / `topk` dispatch here for backend="torch", and the Triton launchers in `kernels/` fall back here for
float64 inputs; living below both, it lets the kernels import no module that imports them (no import circle).
Validation happens at the public functions (`dense_kl`, `dense_kl_topk`): these trust their caller.
"""

from __future__ import annotations

import torch

from ._logits import CHUNK_ELEMENTS, centered, compute_dtype


def _rows(n: int, active: torch.Tensor | None, v: int):
    rows = None if active is None else active.nonzero().squeeze(1)
    n_rows = n if rows is None else rows.numel()
    chunk = max(1, CHUNK_ELEMENTS // v)
    for start in range(0, n_rows, chunk):
        yield slice(start, min(start + chunk, n_rows)) if rows is None else rows[start : start + chunk]


def _grad_buffer(student, active, need_grad: bool):
    if not need_grad:
        return None
    return torch.zeros_like(student) if active is not None else torch.empty_like(student)


def dense_kl_torch(
    student, teacher, active, temperature: float, need_grad: bool, teacher_floor: float | None
):
    """KL(softmax(z / tau) || softmax(t)) per row and its logit gradient, chunked over rows:
    [N, V], [N, V] -> (kl [N], grad [N, V] | None); rows outside `active` get 0."""
    n, v = student.shape
    cdt = compute_dtype(student, teacher)
    kl = torch.zeros(n, dtype=cdt, device=student.device)
    grad = _grad_buffer(student, active, need_grad)
    for sel in _rows(n, active, v):
        logp = torch.log_softmax(centered(student[sel].to(cdt), temperature), dim=-1)
        logq = torch.log_softmax(teacher[sel].to(cdt), dim=-1)
        if teacher_floor is not None:
            logq = logq.clamp_min(teacher_floor)
        p = logp.exp()
        diff = torch.where(p > 0, logp - logq, 0.0)  # 0 log 0 = 0, also when both sides are -inf
        kl_rows = (p * diff).sum(-1)
        kl[sel] = kl_rows
        if grad is not None:
            grad[sel] = (p * (diff - kl_rows[:, None]) / temperature).to(student.dtype)
    return kl, grad


def topk_kl_torch(student, lq, ids, log_qt, active, temperature: float, need_grad: bool):
    """The tail-bucket KL and its gradient, chunked over rows: [N, V], [N, K], [N, K], [N] -> (kl [N], grad | None)."""
    n, v = student.shape
    cdt = compute_dtype(student, lq)
    kl = torch.zeros(n, dtype=cdt, device=student.device)
    grad = _grad_buffer(student, active, need_grad)
    for sel in _rows(n, active, v):
        logp = torch.log_softmax(centered(student[sel].to(cdt), temperature), dim=-1)
        idc = ids[sel]
        logp_k = logp.gather(1, idc)
        # The tail log-mass summed over the tail itself (top-k entries set to -inf), not as 1 - P_top.
        logp_t = logp.scatter(1, idc, float("-inf")).logsumexp(-1)
        p_k, p_t = logp_k.exp(), logp_t.exp()
        r_k = torch.where(p_k > 0, logp_k - lq[sel].to(cdt), 0.0)  # 0 log 0 = 0
        r_t = torch.where(p_t > 0, logp_t - log_qt[sel].to(cdt), 0.0)
        kl_rows = (p_k * r_k).sum(-1) + p_t * r_t
        kl[sel] = kl_rows
        if grad is not None:
            g = logp.exp_().mul_((r_t - kl_rows)[:, None])  # every column gets the tail coefficient ...
            g.scatter_(1, idc, p_k * (r_k - kl_rows[:, None]))  # ... then the top-k columns their own
            grad[sel] = (g / temperature).to(student.dtype)
    return kl, grad
