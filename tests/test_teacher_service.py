"""The teacher as a service: the wire format, a real server process (started here on a free localhost port and
stopped after), training through `teacher_url` against a local teacher, and every fault: server down at start,
killed mid-run (state saved, --resume continues), truncated / corrupted / slow answers, wrong token, requests
over the limits, a tokenizer mismatch. Tiny random Llama models built locally."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hybridlab.scripts.make_tiny_models import make_tiny_models
from hybridlab.teacher_service.client import TeacherClient, TeacherServiceError, TeacherUnavailable
from hybridlab.teacher_service.protocol import ProtocolError, decode, encode, expect
from hybridlab.train import TrainConfig, Trainer
from hybridlab.train.loop import run
from tests._net import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
MAX_BATCH_TOKENS = 2048
MAX_REQUEST_BYTES = 200_000
# fp32 rounding of a different batch layout (padding) in the teacher's forward, relative to the largest entry:
# a few ulps per accumulated product over hidden 32 and 2 layers, far above 2^-23 ~ 1.2e-7 and far below any
# real difference (the negative control below differs by > 1e-2)
REL_TOL = 1e-5


def start_server(
    model: Path, tokenizer: Path, token_file: Path | None, *args: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "hybridlab.serve_teacher", "--model", str(model), "--tokenizer", str(tokenizer),
           "--port", str(port), "--threads", "1", *args]  # fmt: skip
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the teacher server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=1) as r:
                if json.loads(r.read())["status"] == "ok":
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the teacher server did not come up within 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts_models")
    paths = make_tiny_models(root, ("llama",), hidden=32, layers=1, n_prompts=32)
    tf = root / "token.txt"
    tf.write_text(TOKEN + "\n")
    paths["token"] = {"path": tf}
    return paths


@pytest.fixture(scope="module")
def server(tiny):
    proc, url = start_server(tiny["llama"]["teacher"], tiny["tokenizer"]["path"], tiny["token"]["path"],
                             "--max-batch-tokens", str(MAX_BATCH_TOKENS), "--max-request-bytes",
                             str(MAX_REQUEST_BYTES), "--batch-wait-ms", "50")  # fmt: skip
    yield url
    stop(proc)


def _cfg(tiny, tmp_path, **kw) -> TrainConfig:
    base = dict(
        student=str(tiny["llama"]["student"]), tokenizer=str(tiny["tokenizer"]["path"]),
        prompts=str(tiny["prompts"]["path"]), reward="hybridlab.tasks.rewards:reverse", lr=3e-3, steps=3,
        prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, grad_accum=2, bf16=False,
        dense_backend="torch", output_dir=str(tmp_path / "run"), progress=False, cpu=True, cpu_threads=1, seed=0,
        save_final=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _served(tiny, url, **kw) -> dict:
    return {"teacher_url": url, "teacher_token_file": str(tiny["token"]["path"]), **kw}


def _steps(cfg: TrainConfig, n: int = 2) -> tuple[list[dict], torch.Tensor]:
    """n updates; the metrics and the last update's student gradient (flattened)."""
    tr = Trainer(cfg)
    ms = [tr.train_step(keep_grads=i == n - 1) for i in range(n)]
    g = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
    if cfg.eval_prompts:
        ms[-1] = {**ms[-1], **tr.evaluate()}
    return ms, g


def _assert_close(a: list[dict], ga: torch.Tensor, b: list[dict], gb: torch.Tensor) -> None:
    for x, y in zip(a, b):
        for k in ("kl", "loss", "dense", "sparse"):
            assert abs(x[k] - y[k]) <= REL_TOL * max(1.0, abs(x[k])), (k, x[k], y[k])
    assert (ga - gb).abs().max() <= REL_TOL * ga.abs().max()


# ------------------------------------------------------------------------------------------ wire format
def test_frame_round_trip_and_every_damage_is_an_error():
    t = {"h": torch.randn(3, 5, dtype=torch.bfloat16), "i": torch.arange(7, dtype=torch.int32),
         "e": torch.empty(0, 4), "f": torch.randn(2, 2, dtype=torch.float64)}  # fmt: skip
    frame = encode(t, {"k": 3})
    got, meta = decode(frame)
    assert meta == {"k": 3} and set(got) == set(t)
    for k in t:
        assert got[k].dtype == t[k].dtype and torch.equal(got[k], t[k])
    with pytest.raises(ProtocolError, match="truncated"):
        decode(frame[:-3])
    with pytest.raises(ProtocolError, match="payload"):
        decode(frame + b"\0")
    bad = bytearray(frame)
    bad[-5] ^= 0x01  # one bit of the last tensor
    with pytest.raises(ProtocolError, match="CRC-32"):
        decode(bytes(bad))
    with pytest.raises(ProtocolError, match="not a teacher-service frame"):
        decode(b"{}")
    with pytest.raises(ProtocolError, match="expected"):
        expect(got, "h", torch.bfloat16, (3, 6), "reply")
    with pytest.raises(ProtocolError, match="expected"):
        expect(got, "h", torch.float32, (3, 5), "reply")
    assert expect(got, "h", torch.bfloat16, (None, 5), "reply").shape == (3, 5)


@pytest.mark.parametrize("kw, words", [
    ({"teacher": "t", "teacher_url": "http://127.0.0.1:1"}, "not both"),
    ({"teacher_url": "127.0.0.1:8000"}, "http:// or https://"),
    ({"teacher_url": "http://127.0.0.1:1", "loss": "sft"}, "only scores"),
    ({"teacher": "t", "teacher_token_file": "f"}, "without teacher_url"),
    ({"teacher": "t", "teacher_timeout": 0.0}, "teacher_timeout"),
    ({"teacher": "t", "teacher_retries": -1}, "teacher_retries"),
    ({"teacher": "t", "teacher_topk": 8}, "fused_linear=true"),
    ({"teacher": "t", "teacher_topk": 8, "fused_linear": True, "future": "k1"}, "future"),
    ({"teacher": "t", "teacher_topk": 0, "fused_linear": True}, "teacher_topk must be >= 1"),
])  # fmt: skip
def test_config_refuses_teacher_settings_it_cannot_honour(kw, words):
    base = {"student": "s", "prompts": "p.jsonl"}
    with pytest.raises(ValueError, match=words):
        TrainConfig(**base, **kw).validate()
    ok = {"teacher_url": "http://127.0.0.1:1", "teacher_topk": 8, "fused_linear": True}
    assert TrainConfig(**base, **ok).validate().teacher_url  # a valid served top-k config passes


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("extra", [{"fused_linear": True}, {"fused_linear": False},
                                   {"fused_linear": True, "teacher_topk": 4}], ids=["fused", "logits", "topk"])  # fmt: skip
def test_served_teacher_trains_like_the_local_one(tiny, server, tmp_path, extra):
    ev = {"eval_prompts": str(tiny["prompts"]["path"]), "eval_count": 4}  # evaluation's KL too
    local, g_local = _steps(_cfg(tiny, tmp_path, teacher=str(tiny["llama"]["teacher"]), **ev, **extra))
    served, g_served = _steps(_cfg(tiny, tmp_path, **_served(tiny, server), **ev, **extra))
    _assert_close(local, g_local, served, g_served)
    assert all(m["kl"] > 0 for m in served)
    assert abs(local[-1]["eval_kl"] - served[-1]["eval_kl"]) <= REL_TOL * max(1.0, local[-1]["eval_kl"])


def test_negative_control_another_teacher_differs(tiny, server, tmp_path):
    """The equality above can fail: the student as its own local teacher gives a clearly different KL."""
    other, g_other = _steps(_cfg(tiny, tmp_path, teacher=str(tiny["llama"]["student"]), fused_linear=True))
    served, g_served = _steps(_cfg(tiny, tmp_path, **_served(tiny, server), fused_linear=True))
    assert abs(other[0]["kl"] - served[0]["kl"]) > 1e-2
    assert (g_other - g_served).abs().max() > 100 * REL_TOL * g_served.abs().max()


@dataclass
class _Ro:
    """The part of a `Rollout` the client reads."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    actions: torch.Tensor
    mask: torch.Tensor

    def teacher_view(self):
        return self.input_ids, self.attention_mask, self.prompt_len


def _ro(b: int, p: int, n: int, seed: int = 0) -> _Ro:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 15, (b, p + n), generator=g)
    am = torch.ones(b, p + n, dtype=torch.long)
    am[0, :2] = 0  # left padding on the first row
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n - 2 :] = False  # a response that ended early
    return _Ro(ids, am, p, ids[:, p:], mask)


def test_concurrent_clients_share_forwards_and_get_their_own_rows(tiny, server):
    """Requests of several clients at once: merged into fewer forwards, each answered with its own rows equal
    (to fp32 rounding) to the answer it gets alone."""
    ros = [_ro(2, 5 + i, 4, seed=i) for i in range(4)]
    clients = [TeacherClient(server, TOKEN) for _ in ros]
    alone = [c.hidden_rows(ro)[0] for c, ro in zip(clients, ros)]

    def health():
        with urllib.request.urlopen(server + "/v1/health") as r:
            return json.loads(r.read())

    merged = False
    for _ in range(3):  # the 50 ms gathering window makes a merge near certain; three tries make it certain
        h0 = health()
        gate, out = threading.Barrier(len(ros)), [None] * len(ros)

        def ask(i, gate=gate, out=out):
            gate.wait()
            out[i] = clients[i].hidden_rows(ros[i])[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ros))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        h1 = health()
        for a, b in zip(alone, out):
            assert a.shape == b.shape and (a - b).abs().max() <= REL_TOL * a.abs().max()
        assert h1["requests"] - h0["requests"] == len(ros)
        if h1["forwards"] - h0["forwards"] < len(ros):
            merged = True
            break
    assert merged, "concurrent requests were never merged into one forward"


# ------------------------------------------------------------------------------------------ faults
def test_server_down_at_start_names_teacher_url(tiny, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherUnavailable, match=f"teacher_url='{url}'"):
        Trainer(_cfg(tiny, tmp_path, teacher_url=url, teacher_retries=0))


def test_wrong_or_missing_token_is_401(tiny, server, tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-token-but-long-enough")
    with pytest.raises(TeacherServiceError, match="401.*bearer token") as e:
        Trainer(_cfg(tiny, tmp_path, teacher_url=server, teacher_token_file=str(wrong)))
    assert e.value.status == 401
    with pytest.raises(TeacherServiceError) as e:
        TeacherClient(server).connect()
    assert e.value.status == 401
    assert TeacherClient(server, TOKEN).connect()["vocab_size"] == 15  # the right one passes


def test_over_the_limits_is_413_with_the_limit(server):
    c = TeacherClient(server, TOKEN)
    big = _ro(MAX_BATCH_TOKENS // 16 + 1, 8, 8)  # B x L over max_batch_tokens
    with pytest.raises(TeacherServiceError, match="max-batch-tokens") as e:
        c.hidden_rows(big)
    assert e.value.status == 413 and e.value.body["limit_tokens"] == MAX_BATCH_TOKENS
    with pytest.raises(TeacherServiceError) as e:
        c._request("POST", "/v1/hidden", b"\0" * (MAX_REQUEST_BYTES + 1))
    assert e.value.status == 413 and e.value.body["limit_bytes"] == MAX_REQUEST_BYTES
    with pytest.raises(TeacherServiceError) as e:  # and a malformed body is a 400, not a crash
        c._request("POST", "/v1/hidden", b"HLT1garbage")
    assert e.value.status == 400


def test_tokenizer_mismatch_fails_before_step_1(tiny, server, tmp_path):
    from hybridlab.tasks.models import build_tokenizer
    from hybridlab.tasks.toy import CHARS

    other = build_tokenizer(CHARS[::-1])  # the same size, other ids
    assert len(other) == 15
    with pytest.raises(ValueError, match="tokenizer mismatch.*fingerprint"):
        Trainer(_cfg(tiny, tmp_path, **_served(tiny, server)), tokenizer=other)


class _Proxy(http.server.ThreadingHTTPServer):
    """A localhost proxy in front of the real server that damages its answers to POST requests."""

    def __init__(self, upstream: str, mode: str):
        self.upstream, self.mode, self.posts = upstream, mode, 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):  # a client that timed out and left: expected here
        pass


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _forward(self, body=None):
        req = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})  # fmt: skip
        with urllib.request.urlopen(req) as r:
            return r.status, r.read()

    def do_GET(self):
        status, data = self._forward()
        self._send(status, data, damage=False)

    def do_POST(self):
        status, data = self._forward(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts += 1
        self._send(status, data, damage=True)

    def _send(self, status, data, damage):
        mode = self.server.mode if damage else "none"
        if mode.startswith("die_after_"):  # a server that answers N requests, then is gone
            mode = "drop" if self.server.posts > int(mode.rsplit("_", 1)[1]) else "none"
        if mode == "corrupt_second":  # the first micro-batch's answer is fine, the second one's is not
            mode = "corrupt" if self.server.posts == 2 else "none"
        if mode == "slow":
            time.sleep(1.5)
        if mode == "corrupt":
            data = data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:]
        if mode == "short_frame":  # a consistent HTTP body holding a cut-off frame
            data = data[: len(data) // 2]
        self.send_response(status)
        self.send_header("Content-Type", "application/x-hybridlab-tensors")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode == "drop":  # the connection dies mid-body
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.mark.parametrize("mode, error, words", [
    ("corrupt", ProtocolError, "CRC-32"),
    ("corrupt_second", ProtocolError, "CRC-32"),
    ("short_frame", ProtocolError, "truncated"),
    ("drop", TeacherUnavailable, "after 2 attempts"),
    ("slow", TeacherUnavailable, "teacher_timeout=0.5"),
])  # fmt: skip
def test_damaged_or_late_answers_are_errors_and_the_step_does_not_train(
    tiny, server, tmp_path, mode, error, words
):
    proxy = _Proxy(server, mode)
    try:
        tr = Trainer(_cfg(tiny, tmp_path, **_served(tiny, proxy.url, teacher_retries=1, teacher_timeout=0.5),
                          fused_linear=True))  # fmt: skip
        before = [p.detach().clone() for p in tr.model.parameters()]
        with pytest.raises(error, match=words):
            tr.train_step()
        assert tr.step == 0
        assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))  # no update applied
        assert all(p.grad is None for p in tr.model.parameters())  # not even a half-accumulated gradient
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_server_killed_mid_run_saves_the_finished_step_and_resume_continues(tiny, server, tmp_path):
    """Kill the server after step 1: bounded retries, an error naming teacher_url, the state after step 1 saved;
    --resume (against another server with the same teacher) ends where an uninterrupted run ends."""
    proc, url = start_server(tiny["llama"]["teacher"], tiny["tokenizer"]["path"], tiny["token"]["path"])
    try:
        cfg = _cfg(
            tiny, tmp_path, **_served(tiny, url, teacher_retries=2), fused_linear=True, checkpoint_every=0
        )
        tr = Trainer(cfg)
        step = tr.train_step

        def kill_after_first(*a, **k):
            if tr.step == 1:
                proc.kill()
                proc.wait()
            return step(*a, **k)

        tr.train_step = kill_after_first
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable, match=f"teacher_url='{url}'.*3 attempts"):
            tr.train()
        assert time.monotonic() - t0 < 60  # bounded: 0.5 s + 1 s of backoff, not a hang
    finally:
        stop(proc)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000001"]
    _, summary = run(cfg.replace(teacher_url=server), resume=True)
    assert summary["steps"] == 3 and summary["steps_this_run"] == 2
    ref_cfg = _cfg(tiny, tmp_path, teacher=str(tiny["llama"]["teacher"]), fused_linear=True,
                   output_dir=str(tmp_path / "ref"))  # fmt: skip
    run(ref_cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, ref):
        assert abs(a["kl"] - b["kl"]) <= REL_TOL * max(1.0, abs(b["kl"])), (a["step"], a["kl"], b["kl"])
        assert abs(a["loss"] - b["loss"]) <= REL_TOL * max(1.0, abs(b["loss"]))


def test_server_refuses_a_public_address_without_a_token(tiny):
    r = subprocess.run([sys.executable, "-m", "hybridlab.serve_teacher", "--model", str(tiny["llama"]["teacher"]),
                        "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode != 0 and "without --token-file" in r.stderr


def test_head_over_the_limit_is_refused_and_topk_still_works(tiny):
    """In process (Starlette's test client): a server whose head is over --max-head-bytes answers 403 with the
    sizes and keeps serving top-k; info says so, and a trainer without teacher_topk is told to set it."""
    from starlette.testclient import TestClient

    from hybridlab.teacher_service.server import TeacherModel, create_app
    from hybridlab.train import loading

    model = loading.load_model(str(tiny["llama"]["teacher"]), "model", torch.float32)
    tok = loading.load_tokenizer(str(tiny["tokenizer"]["path"]))
    teacher = TeacherModel(model, tok, "tiny", max_head_bytes=100)
    with TestClient(create_app(teacher)) as c:
        info = c.get("/v1/info").json()
        assert info["head_available"] is False and info["head_bytes"] == 15 * 32 * 4
        r = c.get("/v1/head")
        assert r.status_code == 403 and r.json()["limit_bytes"] == 100 and "topk" in r.json()["error"]
        req, mask = TeacherClient.request_of(_ro(2, 4, 3))
        r = c.post("/v1/topk", content=encode(req, {"k": 3, "vocab": 15}))
        t, meta = decode(r.content)
        assert r.status_code == 200 and t["logprobs"].shape == (int(mask.sum()), 3)
        assert 0 < meta["logprob_precision"] < 1e-4


@pytest.mark.slow
def test_the_real_model_served(tmp_path):
    """SmolLM2-135M-Instruct (make real-model) served in fp32: its info, and hidden states and top-k log-probs
    equal to the local model's at the response positions (fp32 rounding of another batch layout)."""
    from hybridlab.scripts.fetch_real_model import real_model_path
    from hybridlab.teacher_service.protocol import tokenizer_fingerprint
    from hybridlab.train import loading

    try:
        path = real_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = loading.load_model(str(path), "model", torch.float32).eval()
    tok = loading.load_tokenizer(str(path))
    proc, url = start_server(path, path, None, "--dtype", "fp32")
    try:
        c = TeacherClient(url, timeout=300)
        info = c.connect()
        assert (info["vocab_size"], info["hidden_size"], info["tied_head"]) == (49152, 576, True)
        assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
        enc = tok(["The capital of France is", "2 + 2 ="], padding=True, return_tensors="pt")
        ids, am = enc["input_ids"], enc["attention_mask"]
        p = ids.shape[1] - 2
        ro = _Ro(ids, am, p, ids[:, p:], torch.ones(2, 2, dtype=torch.bool))
        rows, _ = c.hidden_rows(ro)
        with torch.no_grad():
            pos = (am.cumsum(1) - 1).clamp_min(0)
            ref = model.base_model(input_ids=ids, attention_mask=am, position_ids=pos).last_hidden_state
        ref = ref[:, p - 1 : p + 1].reshape(-1, 576)
        assert (rows - ref).abs().max() <= 1e-4 * ref.abs().max()
        lq, top, prec, _ = c.topk_rows(ro, 5, 49152)
        ref_lq = torch.log_softmax(model.lm_head(ref).float(), -1).topk(5, -1)
        assert torch.equal(top, ref_lq.indices)
        assert (lq - ref_lq.values).abs().max() <= 1e-4 and 0 < prec < 1e-3
    finally:
        stop(proc)


def test_a_head_with_a_bias_travels_and_gives_the_model_logits(tiny):
    """A teacher whose LM head has a bias (served in process by uvicorn on a free port): the client's logits from
    hidden states + weight + bias equal the model's own logits at the response positions."""
    import uvicorn

    from hybridlab.teacher_service.server import TeacherModel, create_app
    from hybridlab.train import loading

    model = loading.load_model(str(tiny["llama"]["teacher"]), "model", torch.float32)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie, then add a bias
    model.lm_head.bias = torch.nn.Parameter(torch.linspace(-2.0, 2.0, 15))
    tok = loading.load_tokenizer(str(tiny["tokenizer"]["path"]))
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(TeacherModel(model, tok, "biased")), port=port, log_level="warning")
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    try:
        c = TeacherClient(f"http://127.0.0.1:{port}")
        for _ in range(100):
            try:
                info = c.connect()
                break
            except TeacherUnavailable:
                time.sleep(0.1)
        assert info["head_bias"] and not info["tied_head"]
        ro = _ro(3, 5, 4)
        logits = c.teacher_inputs(ro, 15, fused=False)
        w, b = c.head()
        assert torch.equal(b, model.lm_head.bias.detach())
        with torch.no_grad():
            pos = (ro.attention_mask.cumsum(1) - 1).clamp_min(0)
            ref = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits[
                :, 4:8
            ]
        m = ro.mask
        assert (logits[m] - ref[m]).abs().max() <= REL_TOL * ref.abs().max()
        assert (logits[m] - (ref[m] - model.lm_head.bias)).abs().max() > 0.5  # the bias counts
    finally:
        srv.should_exit = True
        th.join(10)


# ------------------------------------------------------------------------------------------ TRL adapter
def _trl_trainer(tiny, tmp_path, served_url=None, **kw):
    pytest.importorskip("trl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    from hybridlab.integrations.trl import HybridGRPOConfig, HybridGRPOTrainer
    from hybridlab.tasks.models import build_tokenizer
    from hybridlab.tasks.toy import generate_examples
    from hybridlab.train import loading

    def reward(completion_ids, **_):
        return [sum(t % 3 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    src = {"teacher_url": served_url, "teacher_token_file": str(tiny["token"]["path"])} if served_url else {}
    base = dict(
        output_dir=str(tmp_path / "trl"), num_generations=4, per_device_train_batch_size=8, max_completion_length=5,
        learning_rate=1e-2, max_steps=1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, teacher_beta=0.7, lam=1.5, temperature=0.8, dataloader_num_workers=0, bf16=False, **src,
    )  # fmt: skip
    args = HybridGRPOConfig(**{**base, **kw})
    teacher = (
        None if served_url else loading.load_model(str(tiny["llama"]["teacher"]), "teacher", torch.float32)
    )
    student = loading.load_model(str(tiny["llama"]["student"]), "student", torch.float32)
    return HybridGRPOTrainer(
        model=student, teacher_model=teacher, reward_funcs=[reward], args=args,
        train_dataset=Dataset.from_list(generate_examples("reverse", n=16, seed=0)), processing_class=build_tokenizer(),
    )  # fmt: skip


def _trl_grad(tr) -> tuple[torch.Tensor, float]:
    """One generation batch (seeded), its loss and gradient through the adapter's compute_loss."""
    torch.manual_seed(0)
    tr.model.train()
    gen = tr._generate_and_score_completions(next(iter(tr.get_train_dataloader())))
    tr.model.zero_grad(set_to_none=True)
    loss = tr.compute_loss(tr.model, gen)
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
    return g, float(loss.detach())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_trl_adapter_with_a_served_teacher_equals_the_local_one(tiny, server, tmp_path, fused):
    g_local, l_local = _trl_grad(_trl_trainer(tiny, tmp_path, fused_linear=fused))
    served = _trl_trainer(tiny, tmp_path, served_url=server, fused_linear=fused)
    assert served.teacher_model is None and served.teacher_client is not None
    g_served, l_served = _trl_grad(served)
    assert abs(l_local - l_served) <= REL_TOL * max(1.0, abs(l_local))
    assert (g_local - g_served).abs().max() <= REL_TOL * g_local.abs().max()
    # negative control: without the teacher term (teacher_beta 0) the gradient differs clearly
    g_free, _ = _trl_grad(
        _trl_trainer(tiny, tmp_path, served_url=server, fused_linear=fused, teacher_beta=0.0)
    )
    assert (g_free - g_served).abs().max() > 100 * REL_TOL * g_served.abs().max()


def test_trl_adapter_with_a_server_down_names_teacher_url(tiny, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherUnavailable, match=f"teacher_url='{url}'"):
        _trl_trainer(tiny, tmp_path, served_url=url, teacher_retries=0)


def test_trl_adapter_saves_the_finished_step_when_the_teacher_dies(tiny, server, tmp_path):
    """The served teacher is gone after the first update's requests: bounded retries, an error naming
    teacher_url, checkpoint-1 written; resume_from_checkpoint against a live server finishes the run."""
    proxy = _Proxy(server, "die_after_2")  # step 1: the baseline's forward and the loss's
    try:
        tr = _trl_trainer(
            tiny, tmp_path, served_url=proxy.url, fused_linear=True, max_steps=2, teacher_retries=1
        )
        with pytest.raises(TeacherUnavailable, match=f"teacher_url='{proxy.url}'") as e:
            tr.train()
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert tr.state.global_step == 1 and "checkpoint-1" in " ".join(e.value.__notes__)
    assert (tmp_path / "trl" / "checkpoint-1").is_dir()
    again = _trl_trainer(tiny, tmp_path, served_url=server, fused_linear=True, max_steps=2)
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 2
