"""`TeacherClient`: a trainer's side of the teacher service (the `teacher_url` config key).

At connect it reads /v1/info and refuses a teacher that does not fit the student (vocabulary sizes, tokenizer
fingerprint) before step 1; it fetches the LM head once (unless top-k is chosen), then asks for the teacher's
final hidden states (or top-k log-probs) at every step's response positions. `teacher_inputs` returns exactly
what `hybridlab.train.rollout.teacher_inputs` returns for a local teacher, so the losses are unchanged:

    fused path:   (teacher_hidden [B, N, H], teacher_weight [V, H][, teacher_bias [V]])  -> fused_hybrid_loss
    top-k:        TopKTeacher(logprobs [B, N, K], ids [B, N, K])                          -> fused_hybrid_loss
    otherwise:    teacher logits [B, N, V], computed here from hidden states and head     -> hybrid_loss

Only the positions inside the response mask travel; the others are zeros (hidden) or a copy of a real row (top-k),
which every loss ignores (masked rows get KL 0 and cost no matmul).

Faults. Transport failures (refused or dropped connection, a timeout, 502/503/504) are retried `retries` times
with exponential backoff (`backoff_s`, 2x, 4x, ...), then raise `TeacherUnavailable` naming the URL; a reply
that fails the frame checks (truncated, checksum, shape, dtype, row count) raises `ProtocolError` at once; 4xx
answers raise `TeacherServiceError` with the server's message. Nothing is ever filled in: a step without its
teacher term raises.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import torch

from ..topk import TopKTeacher
from .protocol import CONTENT_TYPE, DTYPES, PROTOCOL_VERSION, ProtocolError, decode, encode, expect

RETRY_STATUS = (502, 503, 504)


class TeacherServiceError(RuntimeError):
    """The server answered with an error status (its message included)."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body or {}


class TeacherUnavailable(ConnectionError):
    """The teacher server could not be reached (after the retries)."""


@dataclass
class Sequences:
    """What the client reads of a rollout (`hybridlab.train`'s `Rollout` has the same `teacher_view` and `mask`):
    the teacher's left-padded prompt + response ids and attention mask [B, P + N], the prompt length P, and the
    response mask [B, N] (True: a position whose teacher term is needed)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    mask: torch.Tensor

    def teacher_view(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.input_ids, self.attention_mask, self.prompt_len


class TeacherClient:
    """HTTP client of one teacher server. `url` like "http://127.0.0.1:8000"; `token` the bearer token or None."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, key: str = "teacher_url"):  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{key} must be an http:// or https:// URL, got {url!r}")
        if not (timeout > 0) or retries < 0 or backoff_s < 0:
            raise ValueError(
                f"need timeout > 0, retries >= 0, backoff_s >= 0; got {timeout}, {retries}, {backoff_s}"
            )
        self.url, self.token, self.timeout = url.rstrip("/"), token, float(timeout)
        self.retries, self.backoff_s, self.key = int(retries), float(backoff_s), key
        self.info: dict[str, Any] | None = None
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.bytes_received = self.bytes_sent = 0

    @classmethod
    def from_config(cls, cfg) -> TeacherClient:
        """From a TrainConfig / HybridGRPOConfig: teacher_url, teacher_token_file, teacher_timeout, teacher_retries."""
        from .server import read_token

        token = read_token(cfg.teacher_token_file, "teacher_token_file")
        return cls(cfg.teacher_url, token, timeout=cfg.teacher_timeout, retries=cfg.teacher_retries)

    @classmethod
    def for_trainer(cls, cfg, tokenizer) -> TeacherClient:
        """`from_config`, connected, the tokenizer checked (vocabulary sizes follow once the student is loaded), and
        the LM head fetched unless `cfg.teacher_topk` is set: everything that can fail does so before step 1."""
        c = cls.from_config(cfg)
        c.connect()
        c.check_student(len(tokenizer), tokenizer, getattr(cfg, "student", "") or "student")
        if getattr(cfg, "teacher_topk", None) is None:
            if not c.info["head_available"]:
                raise ValueError(f"the teacher served at teacher_url={c.url!r} does not send its LM head (head of "
                                 f"{c.info['head_bytes']} bytes, limit {c.info['max_head_bytes']}; fused_compatible="
                                 f"{c.info['fused_compatible']}): set teacher_topk (and fused_linear=true) to train on "
                                 "its top-k log-probs")  # fmt: skip
            c.head()
        return c

    # -- transport ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {"Accept": f"{CONTENT_TYPE}, application/json"}
        if body is not None:
            headers["Content-Type"] = CONTENT_TYPE
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    data = r.read()  # IncompleteRead if the connection drops before Content-Length bytes
                self.bytes_sent += 0 if body is None else len(body)
                self.bytes_received += len(data)
                return data
            except urllib.error.HTTPError as e:
                try:
                    err = json.loads(e.read() or b"{}")
                except (ValueError, OSError, http.client.HTTPException):
                    err = {}
                msg = f"teacher server {self.url}{path} answered {e.code}: {err.get('error', e.reason)}"
                if e.code not in RETRY_STATUS:
                    raise TeacherServiceError(e.code, msg, err) from None
                last = msg
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last = f"no answer within teacher_timeout={self.timeout:g} s"
                else:
                    last = f"{type(reason).__name__}: {reason}"
        raise TeacherUnavailable(
            f"{self.key}={self.url!r}: the teacher server could not be reached for {method} {path} after "
            f"{self.retries + 1} attempts ({last}). Is `python -m hybridlab.serve_teacher` running there?"
        )

    # -- connect -----------------------------------------------------------------------------------
    def connect(self) -> dict[str, Any]:
        """/v1/info, checked for the protocol version; cached in `self.info`."""
        raw = self._request("GET", "/v1/info")
        try:
            info = json.loads(raw)
        except ValueError:
            raise ProtocolError(
                f"{self.key}={self.url!r}: /v1/info is not JSON (is this a teacher server?)"
            ) from None
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"{self.key}={self.url!r} speaks protocol {info.get('protocol')!r}, this client "
                                f"{PROTOCOL_VERSION}: use the same hybridlab version on both sides")  # fmt: skip
        self.info = info
        return info

    def check_student(self, student_vocab: int, tokenizer, student_name: str = "student") -> int:
        """Vocabulary and tokenizer checks of `loading.check_vocab` / `check_tokenizers_agree` against the served
        teacher; returns the student's V. ValueError (before any training) on a mismatch."""
        from ..train.loading import check_vocab_sizes
        from .protocol import tokenizer_fingerprint

        info = self.info if self.info is not None else self.connect()
        mine = tokenizer_fingerprint(tokenizer)
        if info["tokenizer_fingerprint"] != mine:
            raise ValueError(
                f"tokenizer mismatch: the teacher served at {self.key}={self.url!r} ({info['name']}) has tokenizer "
                f"fingerprint {info['tokenizer_fingerprint'][:16]}... ({info['tokenizer_size']} tokens), the "
                f"student's tokenizer {mine[:16]}... ({len(tokenizer)} tokens); student and teacher must share a "
                "tokenizer (serve the teacher with --tokenizer pointing at the student's)"
            )
        return check_vocab_sizes(student_vocab, int(info["vocab_size"]), len(tokenizer), student_name,
                                 f"{self.url} ({info['name']})")  # fmt: skip

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, H], bias [V] or None) in the server's dtype, fetched once."""
        if self._head is None:
            info = self.info if self.info is not None else self.connect()
            t, _ = decode(self._request("GET", "/v1/head"), f"{self.url}/v1/head reply")
            v, h, dt = info["vocab_size"], info["hidden_size"], DTYPES[info["dtype"]]
            w = expect(t, "weight", dt, (v, h), "/v1/head reply")
            b = expect(t, "bias", dt, (v,), "/v1/head reply") if info["head_bias"] else None
            for name, x in (("weight", w), ("bias", b)):
                if x is not None and not torch.isfinite(x).all():
                    raise ProtocolError(f"{self.url}/v1/head: the LM head's {name} holds NaN or inf")
            self._head = (w, b)
        return self._head

    # -- per step ----------------------------------------------------------------------------------
    @staticmethod
    def request_of(ro) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The request tensors for a rollout's response positions, and the mask [B, N] that selects them."""
        ids, am, p = ro.teacher_view()
        mask = ro.mask.cpu()
        n = mask.shape[1]
        pos = torch.arange(p - 1, p + n - 1, dtype=torch.int32)[None].expand(mask.shape[0], n)
        pos = torch.where(mask, pos, torch.full_like(pos, -1))
        return {"input_ids": ids.cpu().to(torch.int32), "attention_mask": am.cpu().to(torch.int32),
                "positions": pos.contiguous()}, mask  # fmt: skip

    def hidden_rows(self, ro) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [R, H] at the masked response positions, mask [B, N])."""
        info = self.info if self.info is not None else self.connect()
        req, mask = self.request_of(ro)
        t, meta = decode(self._request("POST", "/v1/hidden", encode(req)), f"{self.url}/v1/hidden reply")
        r = int(mask.sum())
        h = expect(t, "hidden", DTYPES[info["dtype"]], (r, info["hidden_size"]), "/v1/hidden reply")
        if not torch.isfinite(h).all():
            raise ProtocolError(f"{self.url}/v1/hidden: the teacher's hidden states hold NaN or inf")
        return h, mask

    def topk_rows(self, ro, k: int, vocab: int, logprob_dtype: str = "float32"):
        """(logprobs [R, K], ids [R, K] int64, precision, mask [B, N]); precision is the log-probs' rounding as
        `logprob_precision` takes it (an absolute float for fp32 values, torch.bfloat16 for bf16 ones)."""
        req, mask = self.request_of(ro)
        meta_in = {"k": int(k), "vocab": int(vocab), "logprob_dtype": logprob_dtype}
        t, meta = decode(self._request("POST", "/v1/topk", encode(req, meta_in)), f"{self.url}/v1/topk reply")
        r = int(mask.sum())
        prec = meta.get("logprob_precision")
        if prec == "bfloat16":
            dt, prec = torch.bfloat16, torch.bfloat16
        elif isinstance(prec, float) and 0 < prec < 1:
            dt = torch.float32
        else:
            raise ProtocolError(
                f"{self.url}/v1/topk: logprob_precision {prec!r} is neither 'bfloat16' nor a number in (0, 1)"
            )
        lq = expect(t, "logprobs", dt, (r, k), "/v1/topk reply")
        ids = expect(t, "ids", torch.int32, (r, k), "/v1/topk reply").long()
        if torch.isnan(lq).any() or (r and (int(ids.min()) < 0 or int(ids.max()) >= vocab)):
            raise ProtocolError(f"{self.url}/v1/topk: NaN log-probs or ids outside [0, {vocab})")
        return lq, ids, prec, mask

    def fetch(self, ro, vocab: int, topk: int | None = None):
        """This rollout's answer from the server (hidden rows, or top-k rows), checked; `build` turns it into
        teacher inputs (and `precision_of` gives a top-k answer's logprob_precision). Split so a trainer can ask
        for every micro-batch before its first backward."""
        if topk is not None:
            return ("topk", *self.topk_rows(ro, topk, vocab))
        rows, mask = self.hidden_rows(ro)
        self.head()
        return ("hidden", rows, mask)

    @staticmethod
    def precision_of(fetched):
        """logprob_precision of a top-k answer (None for hidden states)."""
        return fetched[3] if fetched[0] == "topk" else None

    def build(self, fetched, vocab: int, fused: bool = False, device=None):
        """Teacher inputs from `fetch`'s answer, laid out as `rollout.teacher_inputs` lays them (module docstring)."""
        kind, *rest = fetched
        mask = rest[-1]
        b, n = mask.shape
        if kind == "topk":
            lq_r, ids_r, _, _ = rest
            k = lq_r.shape[-1]
            lq = torch.empty(b, n, k, dtype=lq_r.dtype)
            ids = torch.empty(b, n, k, dtype=torch.int64)
            if lq_r.shape[0]:  # placeholders at masked rows: a copy of a real row (ignored by the loss)
                lq[:], ids[:] = lq_r[0], ids_r[0]
            else:
                lq.fill_(-float(torch.log(torch.tensor(float(vocab)))))
                ids.copy_(torch.arange(k).expand(b, n, k))
            lq[mask], ids[mask] = lq_r, ids_r
            return TopKTeacher(lq.to(device), ids.to(device))
        rows, _ = rest
        w, bias = self.head()
        w, bias = w[:vocab].to(device), None if bias is None else bias[:vocab].to(device)
        h = torch.zeros(b, n, rows.shape[-1], dtype=rows.dtype)
        h[mask] = rows
        h = h.to(device)
        if fused:
            return (h, w) if bias is None else (h, w, bias)
        logits = h @ w.t()
        return logits if bias is None else logits + bias

    def teacher_inputs(self, ro, vocab: int, fused: bool = False, topk: int | None = None, device=None):
        """What `rollout.teacher_inputs` gives for a local teacher (see the module docstring), on `device`
        (default: the rollout's)."""
        device = ro.mask.device if device is None else device
        return self.build(self.fetch(ro, vocab, topk), vocab, fused, device)


__all__ = ["ProtocolError", "Sequences", "TeacherClient", "TeacherServiceError", "TeacherUnavailable"]
