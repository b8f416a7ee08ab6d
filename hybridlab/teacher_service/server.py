"""The teacher as a service: one process holds the teacher model and answers many trainers over HTTP.

Stack: Starlette + uvicorn. Every payload here is a binary tensor frame (`protocol.py`), not JSON, so FastAPI's
strength (pydantic validation and OpenAPI docs of JSON bodies) would buy nothing; Starlette is the small,
maintained ASGI toolkit FastAPI itself is built on, and uvicorn the standard ASGI server for it (pure-Python
h11 transport, no compiled extras needed).

Endpoints (all under /v1; with a token, every one but /v1/health needs `Authorization: Bearer <token>`):

    GET  /v1/health   {"status": "ok"}
    GET  /v1/info     JSON: name, vocab_size, tokenizer_fingerprint, hidden_size, dtype, tied_head, head_bias,
                      head_bytes, head_available, fused_compatible, limits, protocol version
    GET  /v1/head     frame: weight [V, H] (+ bias [V]) in the model's dtype; 403 if over --max-head-bytes
    POST /v1/hidden   frame in: input_ids [B, L] int32, attention_mask [B, L] int32, positions [B, M] int32
                      (index into L; -1 = not needed). Out: hidden [R, H], R = number of positions >= 0, in
                      row-major order: the final-layer hidden state at each position (it predicts token pos + 1)
    POST /v1/topk     same request, meta {"k": K, "vocab": V_student, "logprob_dtype": "float32"|"bfloat16"};
                      out: logprobs [R, K] and ids [R, K] int32 of log_softmax(logits[:V_student]), meta
                      {"logprob_precision": an absolute bound (fp32 values, `log_softmax_precision`) or
                      "bfloat16"}: the rounding the values carry, for TopKTeacher's tail bound

Errors are JSON {"error": message, ...}: 400 malformed request, 401 missing or wrong token, 403 head too large,
409 hidden states asked of a model whose logits are not lm_head(hidden), 413 request over a limit (the limit is
in the body), 500 a failed forward.

Batching: requests wait in one queue; a worker takes the first, waits `batch_wait_s` for others to arrive, and
merges requests (left-padding every sequence to the longest) while the merged batch stays within
`max_batch_tokens` padded tokens; one forward serves them all, run in a worker thread so the server keeps
accepting requests meanwhile. The teacher prompt is applied by the client: the server sees token ids only.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .protocol import (
    CONTENT_TYPE,
    DTYPE_NAMES,
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    expect,
    log_softmax_precision,
)

log = logging.getLogger("hybridlab.serve_teacher")

DEFAULT_MAX_BATCH_TOKENS = 32_768
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
DEFAULT_MAX_HEAD_BYTES = 2 << 30
MAX_TOPK = 1024


class RequestError(Exception):
    """An error answered with an HTTP status and a JSON body."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


@dataclass
class _Item:
    kind: str  # "hidden" or "topk"
    ids: torch.Tensor  # [B, L] int64
    am: torch.Tensor  # [B, L] int64
    pos: torch.Tensor  # [B, M] int64, -1 = skip
    k: int = 0
    vocab: int = 0
    lq_dtype: torch.dtype = torch.float32
    future: asyncio.Future | None = field(default=None, repr=False)


class TeacherModel:
    """The model side, no HTTP: a causal LM, its tokenizer's fingerprint, and a batched forward."""

    def __init__(self, model, tokenizer, name: str, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES):
        from ..train.loading import check_fused_compatible
        from .protocol import tokenizer_fingerprint

        self.model = model.eval().requires_grad_(False)
        self.head = model.get_output_embeddings()
        self.device = self.head.weight.device
        self.dtype = self.head.weight.dtype
        self.vocab = self.head.weight.shape[0]
        self.hidden_size = self.head.weight.shape[1]
        try:
            check_fused_compatible(model, "teacher", name, self.vocab)
            self.fused_ok = True
        except ValueError as e:
            log.warning("%s: /v1/hidden and /v1/head are refused (%s); /v1/topk works", name, e)
            self.fused_ok = False
        emb = model.get_input_embeddings()
        tied = emb is not None and emb.weight.data_ptr() == self.head.weight.data_ptr()
        bias = getattr(self.head, "bias", None)
        self.bias = None if bias is None else bias.detach()
        self.head_bytes = self.head.weight.numel() * self.head.weight.element_size() + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )
        self.max_head_bytes = int(max_head_bytes)
        self.info = {
            "protocol": PROTOCOL_VERSION, "name": name, "model_type": getattr(model.config, "model_type", None),
            "vocab_size": self.vocab, "tokenizer_size": len(tokenizer),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "hidden_size": self.hidden_size,
            "dtype": DTYPE_NAMES[self.dtype], "device": str(self.device), "tied_head": bool(tied),
            "head_bias": self.bias is not None, "head_bytes": self.head_bytes, "max_head_bytes": self.max_head_bytes,
            "head_available": self.fused_ok and self.head_bytes <= self.max_head_bytes,
            "fused_compatible": self.fused_ok,
        }  # fmt: skip

    def head_frame(self) -> bytes:
        if not self.fused_ok:
            raise RequestError(409, f"{self.info['name']}: its logits are not lm_head(last hidden state); only "
                               "/v1/topk is served")  # fmt: skip
        if self.head_bytes > self.max_head_bytes:
            raise RequestError(403, f"the LM head is {self.head_bytes} bytes, over this server's --max-head-bytes "
                               f"{self.max_head_bytes}: use /v1/topk (teacher_topk) instead",
                               head_bytes=self.head_bytes, limit_bytes=self.max_head_bytes)  # fmt: skip
        t = {"weight": self.head.weight.detach()}
        if self.bias is not None:
            t["bias"] = self.bias
        return encode(t, {"vocab_size": self.vocab, "hidden_size": self.hidden_size})

    @torch.no_grad()
    def run(self, items: list[_Item]) -> list[dict[str, torch.Tensor]]:
        """One forward over every item's sequences (left-padded to the longest); each item's rows out."""
        length = max(it.ids.shape[1] for it in items)
        ids, am, shifts = [], [], []
        for it in items:
            d = length - it.ids.shape[1]
            ids.append(torch.nn.functional.pad(it.ids, (d, 0), value=0))
            am.append(torch.nn.functional.pad(it.am, (d, 0), value=0))
            shifts.append(d)
        ids = torch.cat(ids).to(self.device)
        am = torch.cat(am).to(self.device)
        pos_ids = (am.cumsum(1) - 1).clamp_min(0)  # the trainer's `rollout.positions`
        kw = {"input_ids": ids, "attention_mask": am, "position_ids": pos_ids, "use_cache": False}
        if self.fused_ok:
            states = self.model.base_model(**kw).last_hidden_state  # [B_all, L, H]
        else:
            states = self.model(**kw).logits  # [B_all, L, V]: logits post-processed by the model
        out, row = [], 0
        for it, d in zip(items, shifts):
            b = it.ids.shape[0]
            sel = it.pos >= 0
            bi = torch.arange(row, row + b)[:, None].expand_as(it.pos)[sel].to(self.device)
            rows = states[bi, (it.pos[sel] + d).to(self.device)]  # [R, H] or [R, V]
            row += b
            if it.kind == "hidden":
                out.append({"hidden": rows.to(self.dtype)})
                continue
            logits = (self.head(rows) if self.fused_ok else rows).float()[:, : it.vocab]
            lq, top = torch.log_softmax(logits, dim=-1).topk(it.k, dim=-1)
            # the rounding the values carry: bf16 storage, or the fp32 log-softmax's own error
            prec = "bfloat16" if it.lq_dtype == torch.bfloat16 else log_softmax_precision(logits, lq)
            out.append({"logprobs": lq.to(it.lq_dtype), "ids": top.to(torch.int32), "precision": prec})
        return out


class Batcher:
    """Gathers concurrent requests into forwards of at most `max_batch_tokens` padded tokens."""

    def __init__(self, teacher: TeacherModel, max_batch_tokens: int, batch_wait_s: float = 0.005):
        self.teacher, self.max_tokens, self.wait = teacher, int(max_batch_tokens), batch_wait_s
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")
        self.task = None
        self.forwards = self.requests = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def cost(items: list[_Item]) -> int:
        return sum(it.ids.shape[0] for it in items) * max(it.ids.shape[1] for it in items)

    async def submit(self, item: _Item) -> dict[str, torch.Tensor]:
        item.future = asyncio.get_running_loop().create_future()
        await self.queue.put(item)
        return await item.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Item | None = None
        while True:
            first = carry if carry is not None else await self.queue.get()
            carry = None
            batch = [first]
            if self.wait > 0:
                await asyncio.sleep(self.wait)  # let requests sent at the same moment join this forward
            while not self.queue.empty():
                nxt = self.queue.get_nowait()
                if self.cost(batch + [nxt]) > self.max_tokens:
                    carry = nxt  # first of the next forward
                    break
                batch.append(nxt)
            live = [it for it in batch if not it.future.done()]  # a client that hung up is skipped
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.pool, self.teacher.run, live)
            except Exception as e:  # one failed forward fails its requests, not the server
                log.exception("teacher forward failed")
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(
                            RequestError(500, f"teacher forward failed: {type(e).__name__}: {e}")
                        )
                continue
            self.forwards += 1
            self.requests += len(live)
            for it, r in zip(live, results):
                if not it.future.done():
                    it.future.set_result(r)


def _parse_request(body: bytes, kind: str, max_tokens: int) -> _Item:
    t, meta = decode(body, f"/v1/{kind} request")
    ids = expect(t, "input_ids", (torch.int32, torch.int64), (None, None), "request")
    b, length = ids.shape
    am = expect(t, "attention_mask", (torch.int32, torch.int64, torch.bool), (b, length), "request")
    pos = expect(t, "positions", (torch.int32, torch.int64), (b, None), "request")
    if b * length > max_tokens:
        raise RequestError(413, f"request of {b} x {length} = {b * length} tokens is over this server's "
                           f"--max-batch-tokens {max_tokens}: send fewer or shorter sequences per request",
                           limit_tokens=max_tokens, tokens=b * length)  # fmt: skip
    pos = pos.long()
    if pos.numel() and (int(pos.min()) < -1 or int(pos.max()) >= length):
        raise RequestError(400, f"positions must lie in [-1, {length - 1}] (-1: not needed), got values in "
                           f"[{int(pos.min())}, {int(pos.max())}]")  # fmt: skip
    item = _Item(kind, ids.long(), am.long(), pos)
    if kind == "topk":
        try:
            item.k, item.vocab = int(meta["k"]), int(meta["vocab"])
        except (KeyError, TypeError, ValueError):
            raise RequestError(400, "/v1/topk needs meta {'k': int, 'vocab': int}") from None
        name = meta.get("logprob_dtype", "float32")
        if name not in ("float32", "bfloat16"):
            raise RequestError(400, f"logprob_dtype must be 'float32' or 'bfloat16', got {name!r}")
        item.lq_dtype = torch.float32 if name == "float32" else torch.bfloat16
    return item


def create_app(teacher: TeacherModel, token: str | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, batch_wait_s: float = 0.005):  # fmt: skip
    """The Starlette application serving `teacher` (see the module docstring for the endpoints)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    batcher = Batcher(teacher, max_batch_tokens, batch_wait_s)
    limits = {
        "max_batch_tokens": int(max_batch_tokens),
        "max_request_bytes": int(max_request_bytes),
        "max_topk": MAX_TOPK,
    }
    info = {**teacher.info, "limits": limits}
    head_cache: list[bytes] = []

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e), **e.extra}, status_code=e.status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode())

    def guarded(fn):
        async def endpoint(request: Request):
            if not authorised(request):
                return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>, the "
                                     "contents of the server's --token-file)"}, status_code=401)  # fmt: skip
            try:
                return await fn(request)
            except RequestError as e:
                return error(e)
            except ProtocolError as e:
                return error(RequestError(400, str(e)))

        return endpoint

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        too_big = RequestError(413, f"request body over this server's --max-request-bytes {max_request_bytes}",
                               limit_bytes=max_request_bytes)  # fmt: skip
        if size is not None and size.isdigit() and int(size) > max_request_bytes:
            raise too_big
        chunks, n = [], 0
        async for c in request.stream():
            n += len(c)
            if n > max_request_bytes:
                raise too_big
            chunks.append(c)
        return b"".join(chunks)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "forwards": batcher.forwards, "requests": batcher.requests})

    async def get_info(request: Request):
        return JSONResponse(info)

    async def get_head(request: Request):
        if not head_cache:
            head_cache.append(teacher.head_frame())
        return Response(head_cache[0], media_type=CONTENT_TYPE)

    def forward_endpoint(kind: str):
        async def fn(request: Request):
            item = _parse_request(await read_body(request), kind, max_batch_tokens)
            if kind == "hidden" and not teacher.fused_ok:
                raise RequestError(409, f"{info['name']}: its logits are not lm_head(last hidden state), so its hidden "
                                   "states would give the wrong KL; use /v1/topk (teacher_topk)")  # fmt: skip
            if kind == "topk" and not (
                1 <= item.k <= min(MAX_TOPK, item.vocab) and 1 <= item.vocab <= teacher.vocab
            ):
                raise RequestError(400, f"need 1 <= k <= min({MAX_TOPK}, vocab) and 1 <= vocab <= {teacher.vocab}, "
                                   f"got k={item.k}, vocab={item.vocab}")  # fmt: skip
            t0 = time.perf_counter()
            out = await batcher.submit(item)
            meta = {"rows": int((item.pos >= 0).sum()), "server_s": time.perf_counter() - t0}
            if kind == "topk":
                meta["logprob_precision"] = out.pop("precision")
            return Response(encode(out, meta), media_type=CONTENT_TYPE)

        return fn

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    routes = [
        Route("/v1/health", health),
        Route("/v1/info", guarded(get_info)),
        Route("/v1/head", guarded(get_head)),
        Route("/v1/hidden", guarded(forward_endpoint("hidden")), methods=["POST"]),
        Route("/v1/topk", guarded(forward_endpoint("topk")), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | None, what: str = "--token-file") -> str | None:
    """The bearer token in file `path` (surrounding whitespace stripped), None for no path; errors name the file."""
    if path is None:
        return None
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    tok = p.read_text().strip()
    if len(tok) < 16:
        raise ValueError(f"{what} {str(p)!r} holds a token of {len(tok)} characters; use at least 16 (e.g. "
                         "`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > token.txt`)")  # fmt: skip
    return tok


__all__ = ["Batcher", "RequestError", "TeacherModel", "create_app", "is_loopback", "read_token"]
