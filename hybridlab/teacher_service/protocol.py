"""The teacher service's wire format, shared by the server and the client: one binary frame per message.

    frame   = MAGIC (4 bytes, b"HLT1") | header length L (uint32, little-endian) | header (L bytes, UTF-8 JSON)
              | payload (the tensors' raw bytes)
    header  = {"version": 1, "meta": {...}, "payload_bytes": P,
               "tensors": [{"name", "dtype", "shape", "offset", "nbytes", "crc32"}, ...]}

Each tensor is stored C-contiguous, little-endian, at `offset` into the payload (aligned to 64 bytes), with its
CRC-32. `decode` checks everything a damaged or cut-off message could break before a single value is used: the
magic, the header size, the payload length (a truncated body is an error, never zeros), every tensor's dtype,
shape, byte count and bounds, and its checksum. Floats travel as raw bytes in their own dtype (bf16 as bf16):
no JSON numbers, no rounding in transit.

Requests use the same frame (token ids as int32), so one parser guards both directions.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import zlib
from typing import Any

import torch

PROTOCOL_VERSION = 1
MAGIC = b"HLT1"
CONTENT_TYPE = "application/x-hybridlab-tensors"
ALIGN = 64
MAX_HEADER_BYTES = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(ValueError):
    """A message that is not a well-formed frame (truncated, corrupted, wrong shapes or dtypes)."""


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # raw bytes are little-endian on the wire; no byte swapping is implemented
        raise RuntimeError("the teacher service's wire format needs a little-endian machine")


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """One frame holding `tensors` (any shapes, dtypes of DTYPES) and a JSON-serialisable `meta` dict."""
    _check_little_endian()
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"tensor {name!r}: dtype {t.dtype} cannot be sent (allowed: {list(DTYPES)})")
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        pad = (-offset) % ALIGN
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        entries.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "offset": offset,
                        "nbytes": len(raw), "crc32": zlib.crc32(raw)})  # fmt: skip
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps(
        {"version": PROTOCOL_VERSION, "meta": meta or {}, "payload_bytes": offset, "tensors": entries},
        separators=(",", ":"),
    ).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *chunks])


def decode(
    data: bytes | bytearray | memoryview, what: str = "message"
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) from one frame; ProtocolError naming `what` for anything malformed (see the module doc)."""
    _check_little_endian()
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise ProtocolError(
            f"{what}: not a teacher-service frame (got {len(view)} bytes, magic {bytes(view[:4])!r})"
        )
    (hlen,) = struct.unpack("<I", view[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(view):
        raise ProtocolError(
            f"{what}: header of {hlen} bytes does not fit in the {len(view)}-byte message (truncated?)"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what}: unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: protocol version {header.get('version') if isinstance(header, dict) else None!r}, "
                            f"this side speaks {PROTOCOL_VERSION}")  # fmt: skip
    payload = view[8 + hlen :]
    want = header.get("payload_bytes")
    if want != len(payload):
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, the header announces {want} (truncated or "
                            "corrupted in transit)")  # fmt: skip
    buf = bytearray(payload)  # one writable copy: the tensors are views of it
    out: dict[str, torch.Tensor] = {}
    for e in header.get("tensors", []):
        try:
            name, dtype, shape = e["name"], DTYPES[e["dtype"]], [int(s) for s in e["shape"]]
            offset, nbytes, crc = int(e["offset"]), int(e["nbytes"]), int(e["crc32"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"{what}: malformed tensor entry {e!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = math.prod(shape)
        if any(s < 0 for s in shape) or nbytes != numel * itemsize:
            raise ProtocolError(f"{what}: tensor {name!r} {e['dtype']} {shape} needs {numel * itemsize} bytes, "
                                f"the header says {nbytes}")  # fmt: skip
        if offset < 0 or offset % ALIGN or offset + nbytes > len(buf):
            raise ProtocolError(f"{what}: tensor {name!r} at bytes [{offset}, {offset + nbytes}) lies outside the "
                                f"{len(buf)}-byte payload")  # fmt: skip
        if zlib.crc32(memoryview(buf)[offset : offset + nbytes]) != crc:
            raise ProtocolError(f"{what}: tensor {name!r} fails its CRC-32 checksum (corrupted in transit)")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).reshape(shape)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise ProtocolError(f"{what}: meta must be a mapping, got {type(meta).__name__}")
    return out, meta


def expect(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype | tuple, shape: tuple, what: str):
    """tensors[name], checked: dtype (one of a tuple) and shape (None entries are free). ProtocolError otherwise."""
    if name not in tensors:
        raise ProtocolError(f"{what}: missing tensor {name!r} (got {sorted(tensors)})")
    t = tensors[name]
    dts = dtype if isinstance(dtype, tuple) else (dtype,)
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if t.dtype not in dts or not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ProtocolError(f"{what}: tensor {name!r} is {t.dtype} {list(t.shape)}, expected "
                            f"{'/'.join(str(d) for d in dts)} {want}")  # fmt: skip
    return t


def log_softmax_precision(logits: torch.Tensor, lq: torch.Tensor) -> float:
    """An absolute bound on the rounding error of fp32 log-probs lq = log_softmax(logits) (any top-k of them).

    lq = z - lse with lse = m + log s, s = sum exp(z - m): s carries a relative error of at most about
    (log2 V + 4) eps (exp and a pairwise sum), m + log s and z - lse one rounding each, so every entry lies within
    eps (|lq| + |m| + |lse| + log V + log2 V + 4) of the exact value (eps = 2^-23). Doubled for margin, maximised over
    the rows: what `TopKTeacher` users pass as `logprob_precision` (an fp32 log-softmax is not "exact to half an
    ulp", which is what a guess from the values would assume). logits [R, V] fp32, lq [R, K] -> float."""
    if logits.numel() == 0:
        return 1e-7
    z = logits.detach().float()
    v = z.shape[-1]
    lse = torch.logsumexp(z, dim=-1).abs().max()
    bound = z.abs().max() + 2 * lse + lq.detach().float().abs().max() + 2 * math.log2(max(v, 2)) + 4
    return float(2 * 2.0**-23 * bound)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the token -> id map and the special tokens: equal fingerprints, same ids for the same strings."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(
        (str(k), str(v)) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()
    )
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


__all__ = ["CONTENT_TYPE", "DTYPES", "PROTOCOL_VERSION", "ProtocolError", "decode", "encode", "expect",
           "log_softmax_precision", "tokenizer_fingerprint"]  # fmt: skip
