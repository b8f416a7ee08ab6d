"""Memory arithmetic of the [N, V] logits, and what the fused path saves (notebook 07).

N = response tokens in a micro-batch (rows), V = vocabulary, H = hidden size, C = rows per fused chunk.
`logits_memory_table` counts the *vocabulary-wide* buffers alive at the peak of the loss computation (model
weights, optimizer state and transformer activations are the same for every path and left out):

materialised (`hybrid_loss` on the model's logits; `hybridlab.train` with fused_linear=false):
    student logits [N, V]                 student dtype   kept to backward (the score gradient needs them)
    closed-form gradient [N, V]           student dtype   computed in forward, scaled in place in backward
    teacher logits [N, V]                 teacher dtype   alive during the loss forward
    (the log-softmaxes run row-chunked: their fp32 workspace is bounded, ~64 MB, and left out)

fused (`fused_hybrid_loss`: hidden states + LM head; fused_linear=true, teacher as hidden + LM head too):
    student logits chunk [C, V]           compute dtype   (the gradient overwrites it)
    teacher logits chunk [C, V]           teacher dtype
    fp32 workspace [C, V]                 fp32            (torch path's softmax pieces; the log-prob pass)
    weight-gradient accumulator [V, H]    fp32            kept from forward to backward (precomputed grads)
    LM-head weight cast [V, H]            compute dtype   only when fp32 master weights run under bf16 autocast

`saved_tensor_bytes` measures, on real tensors, the bytes autograd keeps from forward to backward (the notebook
checks at a small size that the materialised path keeps two [N, V] buffers and the fused path none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
GIB = 1024**3


def _b(dtype: str) -> int:
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    return BYTES[dtype]


def materialised_bytes(n: int, v: int, student: str = "bf16", teacher: str = "bf16") -> dict[str, int]:
    """Vocabulary-wide buffers of the materialised `hybrid_loss` path (see the module docstring)."""
    s, t = _b(student), _b(teacher)
    return {
        "student logits [N,V]": n * v * s,
        "dense gradient [N,V]": n * v * s,
        "teacher logits [N,V]": n * v * t,
    }


def fused_bytes(
    n: int,
    v: int,
    h: int,
    chunk: int = 1024,
    student: str = "bf16",
    teacher: str = "bf16",
    weight_cast: bool = True,
) -> dict[str, int]:
    """Vocabulary-wide buffers of `fused_hybrid_loss` (see the module docstring); no term grows with N * V."""
    c = min(chunk, n)
    s, t = _b(student), _b(teacher)
    parts = {
        "student chunk [C,V]": c * v * s,
        "teacher chunk [C,V]": c * v * t,
        "fp32 workspace [C,V]": c * v * 4,
        "fp32 weight-grad accumulator [V,H]": v * h * 4,
    }
    if weight_cast:
        parts["LM-head cast [V,H]"] = v * h * s
    return parts


def logits_memory_table(
    n: int = 8192, v: int = 152064, h: int = 3584, chunk: int = 1024, teacher: str = "bf16"
) -> list[dict]:
    """Rows {"what", "bytes", "GiB", "vs materialised"}: one [N, V] tensor in bf16 and fp32, the materialised
    `hybrid_loss` path in bf16 and fp32, and the fused path (chunk C, fp32 accumulator)."""
    if min(n, v, h, chunk) < 1:
        raise ValueError(f"n, v, h and chunk must be >= 1, got n={n}, v={v}, h={h}, chunk={chunk}")
    mat16 = sum(materialised_bytes(n, v, "bf16", teacher).values())
    rows = [
        ("one [N, V] tensor, bf16", n * v * 2),
        ("one [N, V] tensor, fp32", n * v * 4),
        (f"materialised hybrid_loss, bf16 student, {teacher} teacher", mat16),
        (f"materialised hybrid_loss, fp32 student, {teacher} teacher", sum(materialised_bytes(n, v, "fp32", teacher).values())),
        (f"fused hybrid loss, bf16, C={chunk}", sum(fused_bytes(n, v, h, chunk, "bf16", teacher).values())),
        (f"fused hybrid loss, fp32, C={chunk}", sum(fused_bytes(n, v, h, chunk, "fp32", teacher, False).values())),
    ]  # fmt: skip
    return [{"what": w, "bytes": int(b), "GiB": b / GIB, "vs materialised": b / mat16} for w, b in rows]


def format_memory_table(rows: list[dict], n: int | None = None, v: int | None = None) -> str:
    """Markdown table of `logits_memory_table` rows."""
    head = "" if n is None else f"N = {n:,} tokens, V = {v:,}\n\n"
    lines = ["| buffer(s) | GiB | x materialised bf16 |", "|---|---:|---:|"]
    lines += [f"| {r['what']} | {r['GiB']:.2f} | {r['vs materialised']:.3f} |" for r in rows]
    return head + "\n".join(lines)


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """(bytes of distinct storages autograd saves for backward while running fn(), fn's result).

    Counts what `save_for_backward` and built-in ops pack (custom Functions included), except the storages of
    `exclude` (tensors that exist anyway, e.g. the hidden states and the LM-head weight). Attributes kept on a
    Function's ctx (e.g. fused_linear's fp32 accumulator) are not seen.
    """
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


__all__ = [
    "fused_bytes",
    "format_memory_table",
    "logits_memory_table",
    "materialised_bytes",
    "saved_tensor_bytes",
]
