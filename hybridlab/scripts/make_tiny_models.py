"""Tiny random student/teacher pairs of real architectures, for smoke runs of `hybridlab.train` (no download).

    python -m hybridlab.scripts.make_tiny_models --out runs/tiny_models [--arch llama qwen2] [--hidden 32]

writes

    <out>/tokenizer/        the shared tokenizer (config key `tokenizer`)
    <out>/<arch>/student/   model.safetensors, config.json, generation_config.json
    <out>/<arch>/teacher/   same architecture, one layer more, another seed, a sharper random init
    <out>/prompts.jsonl     "reverse" toy-task prompts with answers (reward: hybridlab.tasks.rewards:reverse)

The tokenizer is the repository's character tokenizer (`hybridlab.tasks.models.build_tokenizer`): <pad>, <bos>, <eos>
and the digits, "+" and "=". It lives in its own folder because transformers' AutoTokenizer, given a folder whose
config.json says model_type "qwen2", loads it as a Qwen2Tokenizer and adds Qwen's <|endoftext|> token. The
models are randomly initialised: a smoke run shows the machinery (the KL to the teacher falls), not a skill.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from ..tasks.models import BOS_ID, EOS_ID, PAD_ID, _quiet_progress, build_tokenizer
from ..tasks.toy import generate_examples

ARCHS = ("llama", "qwen2")


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    init_std: float = 0.02,
):
    """A `LlamaConfig` / `Qwen2Config` with the given sizes (grouped-query attention: kv_heads < heads);
    `init_std` is the weights' initialisation scale (larger: sharper next-token distributions)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"hidden={hidden} must be divisible by heads={heads}, and heads by kv_heads={kv_heads}"
        )
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        initializer_range=init_std,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def make_model(arch: str, vocab_size: int, seed: int, **sizes):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **sizes))
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    return model


def _save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_models(
    out: str | Path,
    archs: tuple[str, ...] = ARCHS,
    hidden: int = 32,
    layers: int = 2,
    n_prompts: int = 64,
    seed: int = 0,
    teacher_vocab_pad: int = 0,
) -> dict[str, dict[str, Path]]:
    """Write the folders described in the module docstring; returns {arch: {"student", "teacher"}},
    {"tokenizer": {"path"}} and {"prompts": {"path"}}. `teacher_vocab_pad` > 0 pads the teacher's vocabulary
    (tests of the slicing rule)."""
    out = Path(out)
    tok = build_tokenizer()
    v = len(tok)
    tok.save_pretrained(out / "tokenizer")
    paths: dict[str, dict[str, Path]] = {"tokenizer": {"path": out / "tokenizer"}}
    for i, arch in enumerate(archs):
        student = make_model(arch, v, seed + 10 * i, hidden=hidden, layers=layers)
        # A sharper random teacher (larger init scale) so that the KL to it is visibly reduced by training.
        teacher = make_model(
            arch, v + teacher_vocab_pad, seed + 10 * i + 1, hidden=hidden, layers=layers + 1, init_std=0.2
        )
        paths[arch] = {
            "student": _save(student, out / arch / "student"),
            "teacher": _save(teacher, out / arch / "teacher"),
        }
    rows = generate_examples("reverse", n_prompts, seed=seed)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["prompts"] = {"path": prompts}
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tiny_models")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = make_tiny_models(args.out, tuple(args.arch), args.hidden, args.layers, args.prompts, args.seed)
    for k, d in paths.items():
        for name, p in d.items():
            print(f"{k:8s} {name:8s} {p}")


if __name__ == "__main__":
    main()
