"""Serve a teacher model to trainers over HTTP (see hybridlab/teacher_service/server.py for the endpoints).

    python -m hybridlab.serve_teacher --model runs/tiny_models/llama/teacher --tokenizer runs/tiny_models/tokenizer

Then point a trainer at it: `python -m hybridlab.train ... --teacher_url http://127.0.0.1:8000` (no --teacher).
Bound to 127.0.0.1 by default; any other address needs --token-file (clients send it as a bearer token).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from .teacher_service.server import (
        DEFAULT_MAX_BATCH_TOKENS,
        DEFAULT_MAX_HEAD_BYTES,
        DEFAULT_MAX_REQUEST_BYTES,
    )

    p = argparse.ArgumentParser(prog="python -m hybridlab.serve_teacher", allow_abbrev=False,
                                description="Serve a teacher's hidden states, LM head and top-k log-probs to trainers.")  # fmt: skip
    p.add_argument("--model", required=True, help="teacher model folder (safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None, help="file holding the bearer token; required off 127.0.0.1")
    p.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help="padded tokens per forward (and per request)",
    )
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument(
        "--max-head-bytes",
        type=int,
        default=DEFAULT_MAX_HEAD_BYTES,
        help="a larger LM head is not sent (clients use top-k instead)",
    )
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a forward waits for more requests"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from .teacher_service.server import is_loopback, read_token

    token = read_token(args.token_file)
    if token is None and not is_loopback(args.host):
        sys.exit(f"refusing to serve on {args.host!r} without --token-file: anyone who can reach the port could use "
                 "the teacher. Write a token (python -c \"import secrets; print(secrets.token_urlsafe(32))\" > "
                 "token.txt), pass --token-file token.txt, and give the same file to the trainers (teacher_token_file)")  # fmt: skip
    import torch
    import uvicorn

    from .teacher_service.server import TeacherModel, create_app
    from .train import loading

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")
    ]
    model = loading.load_model(args.model, "--model", dtype, args.trust_remote_code).to(device)
    tok_path = args.tokenizer or args.model
    tokenizer = loading.load_tokenizer(
        tok_path, args.trust_remote_code, "--tokenizer" if args.tokenizer else "--model"
    )
    teacher = TeacherModel(model, tokenizer, args.model, args.max_head_bytes)
    app = create_app(teacher, token, args.max_batch_tokens, args.max_request_bytes, args.batch_wait_ms / 1000)
    info = teacher.info
    logging.getLogger("hybridlab.serve_teacher").info(
        "serving %s (V=%d, H=%d, %s on %s) at http://%s:%d/v1 %s", args.model, info["vocab_size"], info["hidden_size"],
        info["dtype"], device, args.host, args.port, "(bearer token required)" if token else "(no token)")  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
