"""The teacher as a service, measured: bytes over the wire per response token, and steps/s local vs served.

    python benchmarks/teacher_service.py                 # both tables (a few minutes on 2 CPU cores)
    python benchmarks/teacher_service.py --only bytes    # or --only speed

1. Bytes per response token, SmolLM2-135M shapes (hidden 576, vocabulary 49,152): a real server process
   (`python -m hybridlab.serve_teacher`, bf16) answers /v1/hidden and /v1/topk for 8 sequences x 128 response
   tokens; the HTTP bodies are counted (request and answer). "Full logits" is the same frame format holding the
   [R, V] bf16 logits, what a logits endpoint would send. The model is SmolLM2-135M-Instruct if found under
   $HYBRIDLAB_MODELS or runs/models, otherwise a random model of the same shapes built from a config (the payload
   depends on the shapes only), with 2 layers instead of 30 to keep the CPU forward short (the table says which).
2. Steps/s on this CPU: a tiny Llama pair (make_tiny_models), `Trainer.train_step` with the teacher local, served
   to one trainer process, and served to two trainer processes at once (one server shared), each process
   single-threaded. The update's maths is identical in all three (tests/test_teacher_service.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, tokenizer: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "hybridlab.serve_teacher", "--model", str(model), "--tokenizer", str(tokenizer),
           "--port", str(port), "--threads", "1", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}") from None
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not come up")


def find_smollm() -> Path | None:
    for base in (os.environ.get("HYBRIDLAB_MODELS"), str(ROOT / "runs" / "models")):
        if base:
            for p in sorted(Path(base).glob("**/config.json")):
                if "smollm2-135m" in str(p.parent).lower() and any(p.parent.glob("*.safetensors")):
                    return p.parent
    return None


def bytes_table(work: Path, seqs: int, prompt: int, resp: int, k: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hybridlab.tasks.models import build_tokenizer
    from hybridlab.teacher_service.client import TeacherClient
    from hybridlab.teacher_service.protocol import encode

    real = find_smollm()
    if real is not None:
        model_dir, tok_dir, what = real, real, f"SmolLM2-135M-Instruct ({real})"
    else:
        model_dir, tok_dir = work / "smol_shaped", work / "tok"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(
                LlamaConfig(**SMOL, num_hidden_layers=2), dtype=torch.bfloat16
            )
        m.save_pretrained(model_dir, safe_serialization=True)
        build_tokenizer().save_pretrained(tok_dir)
        what = "random weights in SmolLM2-135M's shapes (hidden 576, V 49,152; 2 layers instead of 30)"
    proc, url = serve(model_dir, tok_dir, "--dtype", "bf16")
    try:
        c = TeacherClient(url, timeout=600)
        info = c.connect()
        v, h = info["vocab_size"], info["hidden_size"]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 15, (seqs, prompt + resp), generator=g)

        class Ro:  # the part of a Rollout the client reads: every response token counted
            input_ids, attention_mask, prompt_len = ids, torch.ones_like(ids), prompt
            actions, mask = ids[:, prompt:], torch.ones(seqs, resp, dtype=torch.bool)

            def teacher_view(self):
                return self.input_ids, self.attention_mask, self.prompt_len

        ro, n_tok = Ro(), seqs * resp
        rows = {}
        c.bytes_sent = c.bytes_received = 0
        hidden, _ = c.hidden_rows(ro)
        rows["hidden states (bf16)"] = (c.bytes_sent, c.bytes_received)
        for dt in ("float32", "bfloat16"):
            c.bytes_sent = c.bytes_received = 0
            c.topk_rows(ro, k, v, dt)
            rows[f"top-{k} log-probs ({'fp32' if dt == 'float32' else 'bf16'}) + int32 ids"] = (
                c.bytes_sent,
                c.bytes_received,
            )
        c.bytes_sent = c.bytes_received = 0
        w, _ = c.head()
        head_bytes = c.bytes_received
        logits = (hidden.float() @ w.float().t()).to(torch.bfloat16)  # [R, V]
        rows["full logits (bf16), same frame format"] = (
            rows["hidden states (bf16)"][0],
            len(encode({"logits": logits})),
        )
    finally:
        proc.terminate()
        proc.wait(30)
    ref = rows["full logits (bf16), same frame format"][1] / n_tok
    lines = [f"Model: {what}; {seqs} sequences x ({prompt} prompt + {resp} response) tokens, {n_tok} response tokens.",
             f"LM head, fetched once per client: {head_bytes / 2**20:.1f} MiB (bf16 [{v}, {h}]).", "",
             "| payload | answer bytes / response token | vs full logits | request bytes / response token |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for name, (sent, got) in rows.items():
        ratio = "1 (reference)" if got / n_tok >= ref else f"{ref / (got / n_tok):,.1f}x smaller"
        lines.append(f"| {name} | {got / n_tok:,.1f} | {ratio} | {sent / n_tok:,.1f} |")
    return "\n".join(lines)


def worker(args) -> None:
    """One trainer process: --steps updates, prints the per-step seconds as JSON."""
    import torch

    torch.set_num_threads(1)
    from hybridlab.train import TrainConfig, Trainer

    t = Path(args.tiny)
    src = {"teacher_url": args.url} if args.url else {"teacher": str(t / "llama" / "teacher")}
    cfg = TrainConfig(student=str(t / "llama" / "student"), tokenizer=str(t / "tokenizer"),
                      prompts=str(t / "prompts.jsonl"), reward="hybridlab.tasks.rewards:reverse", lr=1e-3,
                      steps=args.steps, prompts_per_step=8, samples_per_prompt=4, max_new_tokens=16, grad_accum=1,
                      bf16=False, dense_backend="torch", output_dir=None, progress=False, cpu=True, cpu_threads=1,
                      fused_linear=True, seed=args.seed, **src)  # fmt: skip
    tr = Trainer(cfg)
    secs = [tr.train_step()["step_s"] for _ in range(args.steps)]
    print(json.dumps({"step_s": secs}))


def speed_table(work: Path, steps: int) -> str:
    from hybridlab.scripts.make_tiny_models import make_tiny_models

    tiny = work / "tiny"
    make_tiny_models(tiny, ("llama",), hidden=64, layers=2, n_prompts=64)
    me = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--tiny",
        str(tiny),
        "--steps",
        str(steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(url: str | None, seed: int) -> subprocess.Popen:
        return subprocess.Popen(me + (["--url", url] if url else []) + ["--seed", str(seed)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip

    def rate(p: subprocess.Popen) -> float:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a trainer process failed ({p.returncode})")
        secs = json.loads(out.strip().splitlines()[-1])["step_s"][1:]  # the first step warms up
        return 1.0 / statistics.median(secs)

    local = rate(launch(None, 0))
    proc, url = serve(tiny / "llama" / "teacher", tiny / "tokenizer")
    try:
        one = rate(launch(url, 0))
        a, b = launch(url, 0), launch(url, 1)
        two = (rate(a), rate(b))
        with urllib.request.urlopen(url + "/v1/health") as r:
            h = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(30)
    return "\n".join([
        "Tiny Llama pair (hidden 64, 2 layers / 3 layers, V 15), 8 prompts x 4 samples x 16 new tokens per step, "
        "fused_linear, every process one thread; median over steps 2..N.", "",
        "| teacher | trainer processes | steps/s per process | steps/s in all |", "|---|---:|---:|---:|",
        f"| local (in the trainer) | 1 | {local:.2f} | {local:.2f} |",
        f"| served (one server) | 1 | {one:.2f} | {one:.2f} |",
        f"| served (one server, shared) | 2 | {two[0]:.2f}, {two[1]:.2f} | {sum(two):.2f} |", "",
        f"Server: {h['requests']} requests in {h['forwards']} forwards over the whole benchmark ("
        + ("concurrent requests were merged)." if h["forwards"] < h["requests"] else
           "none arrived within another's 5 ms gathering window, so none was merged)."),
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("bytes", "speed"), default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", help=argparse.SUPPRESS)
    ap.add_argument("--url", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.only in (None, "bytes"):
            print(bytes_table(work, seqs=8, prompt=32, resp=128, k=20), "\n", flush=True)
        if args.only in (None, "speed"):
            print(speed_table(work, args.steps), flush=True)


if __name__ == "__main__":
    main()
