"""Small Hugging Face causal LMs for the toy tasks, built from configs (no download), and their tokenizer.

The tokenizer is a real `PreTrainedTokenizerFast` built offline from a `tokenizers` WordLevel model over single
characters: ids 0, 1, 2 are <pad>, <bos>, <eos>, then the task characters (`hybridlab.tasks.CHARS`). Encoding
prepends <bos>; padding is on the left, as `generate` wants. Checkpoints are a folder with `model.safetensors`,
`config.json` and `tokenizer.json`; loading refuses pickled weights (`use_safetensors=True`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .toy import CHARS

SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ARCHS = ("llama", "qwen2", "gpt2")
#: size -> (hidden, layers, heads, mlp multiplier)
SIZES = {"tiny": (64, 2, 4, 4), "small": (96, 3, 4, 4), "base": (128, 4, 4, 4)}
MAX_POSITIONS = 32


def build_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0, <bos>=1, <eos>=2, then one id per character of `chars`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if len(set(chars)) != len(chars) or any(c.isspace() for c in chars):
        raise ValueError(f"chars must be distinct non-space characters, got {chars!r}")
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(chars))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tk.decoder = decoders.Fuse()  # join without spaces
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )


def encode_prompts(
    tokenizer, prompts: list[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """<bos> + prompt, left-padded: {"input_ids": [B, P] long, "attention_mask": [B, P] long}."""
    vocab = tokenizer.get_vocab()
    for p in prompts:
        bad = sorted({c for c in p if c not in vocab})
        if bad:
            raise ValueError(f"prompt {p!r} has characters {bad} outside the tokenizer's vocabulary")
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def decode_responses(tokenizer, tokens: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Generated tokens [B, N] -> (texts before the first EOS, mask [B, N] bool up to and including EOS).

    Special tokens sampled inside a response stay visible (e.g. "<pad>"), so they never match an answer.
    A response without EOS keeps all N tokens (truncated by `max_new_tokens`).
    """
    is_eos = tokens == tokenizer.eos_token_id
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS count strictly before t
    mask = before == 0
    texts = []
    for row, m, e in zip(tokens.tolist(), mask.tolist(), is_eos.tolist()):
        ids = [i for i, keep, end in zip(row, m, e) if keep and not end]
        texts.append("".join(tokenizer.convert_ids_to_tokens(ids)))
    return texts, mask


def model_config(arch: str, size: str, vocab_size: int):
    """A transformers config for a small causal LM (`arch` in ARCHS, `size` in SIZES)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if vocab_size < len(SPECIALS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIALS)}, got {vocab_size}")
    hidden, layers, heads, mult = SIZES[size]
    ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=mult * hidden,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mult * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        **ids,
    )


def _set_generation_ids(model: PreTrainedModel) -> None:
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_ID, BOS_ID, EOS_ID


def build_model(
    arch: str = "llama", size: str = "tiny", vocab_size: int | None = None, seed: int = 0
) -> PreTrainedModel:
    """A freshly initialised `AutoModelForCausalLM` (fp32, eval mode off) from a config; no download.

    vocab_size defaults to the task tokenizer's (3 specials + len(CHARS)).
    """
    v = len(SPECIALS) + len(CHARS) if vocab_size is None else int(vocab_size)
    cfg = model_config(arch, size, v)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    _set_generation_ids(model)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _quiet_progress():
    """Silence transformers' per-shard / per-tensor progress bars (noise for a 20-tensor model)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_model_dir(model: PreTrainedModel, tokenizer, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write model.safetensors + config.json + tokenizer files (+ meta.json) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if meta is not None:
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_model_dir(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a folder written by `save_model_dir`; safetensors only, never unpickles."""
    p = Path(path)
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(f"no model.safetensors in {p} (checkpoints must be safetensors)")
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True).to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(p)
    tokenizer.padding_side = "left"
    _set_generation_ids(model)
    return model, tokenizer


def load_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint ({} if absent)."""
    f = Path(path) / "meta.json"
    return json.loads(f.read_text()) if f.exists() else {}
