"""Training throughput and peak memory of `hybridlab.train`, with and without the fused-linear path.

    python benchmarks/train_throughput.py                                  # CUDA: Qwen2-0.5B-shaped student,
                                                                           # Qwen2-1.5B-shaped teacher
    python benchmarks/train_throughput.py --student llama-1b --teacher llama-1b
    python benchmarks/train_throughput.py --student tiny --teacher tiny --cpu   # a CPU check of the harness

Models are *random* weights in real architectures' shapes (vocabulary, hidden size, layers, heads), built from
transformers configs and saved under --models (nothing is downloaded): throughput and memory depend on the
shapes, not on the weights. A random model rarely samples EOS, so every response runs to max_new_tokens and both
variants process the same number of tokens. For each variant (fused_linear = false, true) this runs
`python -m hybridlab.train` for --steps steps (bf16 autocast, Triton dense kernel, gradient checkpointing), drops
the first --skip steps (compilation, allocator warm-up) and prints one Markdown row per variant:

    response tokens/s end to end (rollout + update), response tokens/s of the update alone,
    peak GPU memory of the update (activations + loss buffers) and of the rollout (KV cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

# name -> (config class, vocab, hidden, intermediate, layers, heads, kv heads)
SHAPES = {
    "qwen2-0.5b": ("qwen2", 151936, 896, 4864, 24, 14, 2),
    "qwen2-1.5b": ("qwen2", 151936, 1536, 8960, 28, 12, 2),
    "llama-1b": ("llama", 128256, 2048, 8192, 16, 32, 8),
    "tiny": ("qwen2", 4096, 64, 128, 2, 4, 2),
}


def build(name: str, path: Path, dtype: torch.dtype, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if (path / "config.json").exists():
        return path
    arch, v, h, inter, layers, heads, kv = SHAPES[name]
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--teacher", default="qwen2-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--models", default="runs/bench_models")
    ap.add_argument("--out", default="runs/bench_train")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="build and validate the two training configs and print the commands, run nothing",
    )
    args = ap.parse_args(argv)
    if SHAPES[args.student][:2] != SHAPES[args.teacher][:2]:
        raise SystemExit(
            f"--student {args.student} and --teacher {args.teacher} need the same family and vocabulary"
        )

    models = Path(args.models)
    student, teacher = models / args.student, models / f"{args.teacher}-teacher"
    tok, prompts = models / "tokenizer", models / "prompts.jsonl"
    if not args.dry_run:
        from hybridlab.tasks.models import build_tokenizer
        from hybridlab.tasks.toy import generate_examples

        build(args.student, student, torch.float32, 0)
        build(args.teacher, teacher, torch.bfloat16, 1)
        if not (tok / "tokenizer.json").exists():
            build_tokenizer().save_pretrained(tok)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in generate_examples("reverse", 256, seed=0)))

    device = "cpu" if args.cpu or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    rows = []
    for fused in (False, True):
        out = Path(args.out) / f"{args.student}_fused_{str(fused).lower()}"
        cfg = {
            "student": str(student), "teacher": str(teacher), "tokenizer": str(tok), "prompts": str(prompts),
            "reward": "hybridlab.tasks.rewards:reverse_partial", "lr": 1e-6, "scheduler": "constant",
            "steps": args.steps, "prompts_per_step": args.prompts_per_step, "samples_per_prompt": args.samples,
            "grad_accum": args.grad_accum, "max_new_tokens": args.max_new_tokens, "bf16": True,
            "gradient_checkpointing": not args.no_gradient_checkpointing, "dense_backend": "auto",
            "fused_linear": fused, "output_dir": str(out), "overwrite": True, "checkpoint_every": 0,
            "save_final": False, "progress": False, "cpu": bool(args.cpu), "cpu_threads": 1 if args.cpu else None,
        }  # fmt: skip
        cmd = [sys.executable, "-m", "hybridlab.train", "--config", str(out / "bench.yaml")]
        if args.dry_run:  # every key must be a TrainConfig field (the training CLI would refuse it later)
            from dataclasses import fields

            from hybridlab.train.config import TrainConfig

            unknown = sorted(set(cfg) - {f.name for f in fields(TrainConfig)})
            if unknown:
                raise SystemExit(f"train_throughput.py: config keys unknown to hybridlab.train: {unknown}")
            print(f"[dry-run] would build {args.student} / {args.teacher} under {models} and run:", *cmd)
            continue
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run(
            [sys.executable, "-m", "hybridlab.train", "--config", str(out / "bench.yaml")], check=True
        )
        ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.skip :]
        tok_n = sum(m["tokens"] for m in ms)
        row = {
            "student": args.student, "teacher": args.teacher, "fused_linear": fused, "steps": len(ms),
            "tokens_per_step": tok_n / len(ms),
            "tokens_per_s": tok_n / sum(m["step_s"] for m in ms),
            "train_tokens_per_s": tok_n / sum(m["step_s"] - m["gen_s"] for m in ms),
            "train_peak_gib": max((m.get("train_peak_mem_gib", float("nan")) for m in ms), default=float("nan")),
            "gen_peak_gib": max((m.get("gen_peak_mem_gib", float("nan")) for m in ms), default=float("nan")),
        }  # fmt: skip
        rows.append(row)
    if args.dry_run:
        return rows
    print(f"\n# {device}; {args.prompts_per_step} prompts x {args.samples} samples x {args.max_new_tokens} new tokens "
          f"per step, grad_accum {args.grad_accum}, bf16, steps {args.skip + 1}-{args.steps}")  # fmt: skip
    print(
        "| student | teacher | fused_linear | resp. tokens/step | tokens/s (end to end) | tokens/s (update) "
        "| peak GiB (update) | peak GiB (rollout) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['student']} | {r['teacher']} | {r['fused_linear']} | {r['tokens_per_step']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | {r['train_peak_gib']:.2f} | {r['gen_peak_gib']:.2f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
