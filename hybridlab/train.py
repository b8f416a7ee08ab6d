"""`python -m hybridlab.train`: hybrid imitation + RL fine-tuning of any Hugging Face causal LM, one GPU or many.

    python -m hybridlab.train --config configs/tiny_cpu.yaml [key=value ...] [--resume]
    accelerate launch --config_file configs/accelerate_ddp.yaml -m hybridlab.train --config configs/NAME.yaml

One step (the data flow of the brief):

    prompts (this process's share of `prompts_per_step`, shuffled epochs from `seed`)
      -> rollouts: `generate(do_sample=True, temperature=tau, top_k=0, top_p=1)` from the student, each prompt
         `samples_per_prompt` times (contiguous groups), mask = response tokens up to and including EOS
      -> rewards from the configured function R(prompts, responses, answers)
      -> student (with grad) and teacher (no grad) forwards on prompt + response, row t <-> response token t
      -> `hybrid_loss` on materialised logits, or `fused_hybrid_loss` on hidden states + LM heads
         (fused_linear=true: no [N, V] logits on either side)
      -> backward per micro-batch (gradient sync on the last), clip, AdamW, LR schedule
      -> metrics JSONL / progress bar / TensorBoard; atomic checkpoints every `checkpoint_every` steps

Normalisation across processes and micro-batches. The loss of the global batch is L = sum_b c_b l_b with c_b
from the *global* batch (normalize="sequences": c_b = 1 / B_global; "tokens": 1 / tokens_global;
"per_sequence": 1 / (B_global |y_b|); a number K: 1 / K). Each process backpropagates P * sum_{b in its share}
c_b l_b over its micro-batches (P processes); DDP averages gradients over processes, so the update is the
gradient of L, exactly the single-process one (tests/test_distributed.py checks it with 2 gloo processes).

Sampling randomness is a pure function of (seed, step, process index): the global torch RNG is reseeded before
each step's generation, so `--resume` reproduces an uninterrupted run exactly (tests/test_train.py), and the
data order is a pure function of (seed, prompts consumed).

Precision: on CUDA with bf16=true the student keeps fp32 master weights under bf16 autocast (accelerate's
mixed precision) and the teacher is loaded in bf16; on CPU everything runs in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import types
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import yaml

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .fused_hybrid import fused_hybrid_loss
from .hybrid import NORMALIZATIONS, _normalizer, hybrid_loss
from .memory import format_memory_table, logits_memory_table  # noqa: F401  (re-exported for notebook 07)
from .models import _quiet_progress
from .rewards import call_reward, load_reward
from .sparse import FUTURE_ESTIMATORS
from .trainer import Rollout, response_logits_of

log = logging.getLogger("hybridlab.train")

BASELINES = ("none", "reward_group", "return_group")
SCHEDULERS = ("constant", "linear", "cosine")
BACKENDS = ("auto", "torch", "triton")


# ------------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything a run depends on; written to `<output_dir>/config.yaml`. See configs/README.md."""

    # models and data (local paths; hub names only where you have network)
    student: str = ""
    teacher: str = ""
    tokenizer: str | None = None  # default: the student's folder
    prompts: str = ""  # JSONL, one {"prompt": str, "answer": str (optional)} per line
    reward: str = "hybridlab.rewards:exact_match"  # "module:function" or "module.function"
    trust_remote_code: bool = False  # never run a model folder's Python unless you ask
    chat_template: bool = False  # wrap each prompt as a user turn with the tokenizer's chat template
    max_prompt_tokens: int | None = None  # truncate prompts from the left to this many tokens
    # objective J = E[lam R] - beta KL(student || teacher) and its estimator (see hybridlab.hybrid_loss)
    lam: float = 1.0
    beta: float = 1.0
    future: str = "analytic"  # future-KL estimator in the sparse return: analytic | k1 | k3 | none
    gamma: float = 1.0  # discount of the future KL; < 1 optimises a different objective
    baseline: str = (
        "return_group"  # none | reward_group | return_group (leave-one-out over a prompt's samples)
    )
    group_size: int | None = None  # must equal samples_per_prompt (a group is one prompt's samples)
    temperature: float = 1.0  # sampling temperature == the loss's temperature
    normalize: str | float = "sequences"  # sequences (unbiased) | tokens | per_sequence | a positive number
    teacher_floor: float | None = None  # clamp of the teacher's log-probs (None: an infinite KL is an error)
    # optimisation
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    scheduler: str = "cosine"  # constant | linear | cosine (decay to min_lr_ratio * lr after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    steps: int = 100
    prompts_per_step: int = 8  # global, over all processes
    samples_per_prompt: int = 4
    max_new_tokens: int = 128
    grad_accum: int = 1  # micro-batches per process and step
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    # precision and kernels
    bf16: bool = True  # CUDA only: fp32 master weights + bf16 autocast, bf16 teacher; CPU runs fp32
    gradient_checkpointing: bool = False
    dense_backend: str = "auto"  # auto (Triton on CUDA) | torch | triton
    fused_linear: bool = False  # dense KL and log-probs from hidden states + LM head (no [N, V] logits)
    fused_chunk: int = 1024  # rows per chunk of the fused path
    disable_dropout: bool = True  # dropout would make the training policy differ from the sampling policy
    # run
    output_dir: str = "runs/train"
    overwrite: bool = False  # allow starting fresh in an output_dir that already has checkpoints
    checkpoint_every: int = 0  # steps; 0 = only at the end of the invocation
    keep_checkpoints: int = 2
    stop_after: int | None = None  # stop this invocation after N steps (resume later with --resume)
    save_final: bool = True  # write a Hugging Face model folder to <output_dir>/final when the run completes
    seed: int = 0
    progress: bool = True
    tensorboard: bool = False  # needs the optional `tensorboard` package
    cpu: bool = False  # force CPU even when CUDA is available
    cpu_threads: int | None = None  # torch threads of a CPU run (None: torch's default; 1 suits tiny models)

    # -- parsing ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a mapping of keys to values, got {type(d).__name__}")
        hints = get_type_hints(cls)
        kw = {}
        for k, v in d.items():
            if k not in hints:
                raise ValueError(_unknown_key(k, source))
            kw[k] = _coerce(k, v, hints[k])
        return cls(**kw)

    def replace(self, **changes) -> TrainConfig:
        hints = get_type_hints(type(self))
        for k, v in changes.items():
            if k not in hints:
                raise ValueError(_unknown_key(k, "override"))
            changes[k] = _coerce(k, v, hints[k])
        return dataclasses.replace(self, **changes)

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the key and the value for anything out of range."""
        for name in ("student", "teacher", "prompts", "reward", "output_dir"):
            if not getattr(self, name):
                raise ValueError(
                    f"{name} must be set (a path{'' if name != 'reward' else ' or dotted name'}), got ''"
                )
        _choice("future", self.future, FUTURE_ESTIMATORS)
        _choice("baseline", self.baseline, BASELINES)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("dense_backend", self.dense_backend, BACKENDS)
        if isinstance(self.normalize, str):
            _choice("normalize", self.normalize, NORMALIZATIONS, extra=" or a positive number")
        elif not (self.normalize > 0 and math.isfinite(self.normalize)):
            raise ValueError(f"normalize as a number must be positive and finite, got {self.normalize!r}")
        for name in ("lam", "beta", "temperature", "lr", "grad_clip", "weight_decay"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        _positive("temperature", self.temperature)
        _positive("lr", self.lr)
        for name in ("beta", "grad_clip", "weight_decay", "lam"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma!r}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ValueError(
                f"adam_beta1, adam_beta2 must lie in [0, 1), got {self.adam_beta1}, {self.adam_beta2}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "grad_accum",
                     "fused_chunk", "keep_checkpoints"):  # fmt: skip
            _positive(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.stop_after is not None:
            _positive("stop_after", self.stop_after)
        if self.max_prompt_tokens is not None:
            _positive("max_prompt_tokens", self.max_prompt_tokens)
        if self.cpu_threads is not None:
            _positive("cpu_threads", self.cpu_threads)
        if self.teacher_floor is not None and not (
            math.isfinite(self.teacher_floor) and self.teacher_floor < 0
        ):
            raise ValueError(
                f"teacher_floor must be a negative log-probability (e.g. -30.0), got {self.teacher_floor!r}"
            )
        if self.group_size is not None and self.group_size != self.samples_per_prompt:
            raise ValueError(
                f"group_size={self.group_size} must equal samples_per_prompt={self.samples_per_prompt} "
                "(a group is the samples of one prompt)"
            )
        if self.baseline != "none" and self.samples_per_prompt < 2:
            raise ValueError(
                f"baseline={self.baseline!r} is a leave-one-out mean over a prompt's samples: it needs "
                f"samples_per_prompt >= 2, got {self.samples_per_prompt}"
            )
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} must be divisible by grad_accum={self.grad_accum} "
                "(each micro-batch holds whole prompt groups)"
            )
        return self


def _unknown_key(key: str, source: str) -> str:
    names = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"; valid keys: {', '.join(names)}"
    )
    return f"unknown {source} key {key!r}{hint}"


def _choice(name: str, value, allowed, extra: str = "") -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}{extra}, got {value!r}")


def _positive(name: str, value) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(name: str, value, hint):
    """Check/convert one config value against its annotation; ValueError naming key, value and type."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        order = {bool: 0, int: 1, float: 2, str: 3}
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: order.get(a, 9)):
            try:
                return _coerce(name, value, a)
            except ValueError:
                continue
        allowed = " or ".join("null" if a is type(None) else a.__name__ for a in args)
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise ValueError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    raise TypeError(f"unsupported config annotation {hint!r} for {name}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["lr=1e-5", "bf16=false", "teacher_floor=null"] -> {"lr": "1e-5" -> 1e-5, ...} (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. lr=1e-5)")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A validated `TrainConfig` from a YAML file (or defaults) plus key=value overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of keys to values")
    cfg = TrainConfig.from_dict(data, source=f"config {str(path)!r}" if path else "config")
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    return cfg.replace(**ov).validate()


# --------------------------------------------------------------------------------------- data and order
def load_prompts(path: str | os.PathLike) -> list[dict[str, str | None]]:
    """Rows {"prompt": str, "answer": str | None} from a JSONL file; ValueError naming the bad line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
                raise ValueError(
                    f'{p}:{i}: each line must be an object with a string "prompt", got {line.strip()[:80]!r}'
                )
            a = r.get("answer")
            rows.append({"prompt": r["prompt"], "answer": None if a is None else str(a)})
    if not rows:
        raise ValueError(f"prompts file {str(p)!r} has no rows")
    return rows


class PromptOrder:
    """Shuffled epochs over n prompts from a seed; the whole state is the number of prompts consumed."""

    def __init__(self, n: int, seed: int, consumed: int = 0):
        self.n, self.seed, self.consumed = n, seed, consumed
        self._perm: tuple[int, list[int]] | None = None

    def _epoch(self, e: int) -> list[int]:
        if self._perm is None or self._perm[0] != e:
            order = list(range(self.n))
            random.Random(f"hybridlab-prompts:{self.seed}:{e}").shuffle(order)
            self._perm = (e, order)
        return self._perm[1]

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            e, i = divmod(self.consumed, self.n)
            out.append(self._epoch(e)[i])
            self.consumed += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, st: dict[str, int]) -> None:
        if int(st["n"]) != self.n or int(st["seed"]) != self.seed:
            raise ValueError(
                f"checkpoint's data order is over {st['n']} prompts with seed {st['seed']}, this run has "
                f"{self.n} prompts and seed {self.seed}: resume with the same prompts file and seed"
            )
        self.consumed = int(st["consumed"])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of a step's sampling on one process (well mixed; independent of the world size)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[B, N] bool: response tokens up to and including the first EOS (all N when there is none)."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= tokens == e
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    return before == 0


# ------------------------------------------------------------------------------------------- models
def _from_pretrained(path: str, dtype: torch.dtype, trust_remote_code: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    _check_path(path, "model")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    with _quiet_progress():
        return AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code, **{key: dtype}
        )


def _check_path(path: str, what: str) -> None:
    """A missing local folder is an error here; a hub name ("org/name", one slash) is left to transformers."""
    if Path(path).expanduser().exists():
        return
    first = path.split("/")[0]
    hub_like = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(first).is_dir()
    if not hub_like:
        raise FileNotFoundError(
            f"{what} path {path!r} does not exist (give a local folder; a hub name 'org/name' needs network)"
        )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_path(path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # generation continues the prompt's right end
    tok.truncation_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(student, teacher, tokenizer, student_path: str, teacher_path: str) -> int:
    """The student's vocabulary size V after checking the pair; raises ValueError naming both sizes and paths.

    The teacher must cover the student's vocabulary. A teacher whose LM head is padded *larger* (common: rows
    rounded up to a multiple of 64/128 past the tokenizer) is accepted when the student covers the tokenizer;
    its logits are sliced to the student's V, which renormalises the teacher over the first V ids (the padding
    rows are never produced by the tokenizer and carry ~0 probability in a trained model).
    """
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    nt = len(tokenizer)
    if vs < nt:
        raise ValueError(
            f"vocabulary mismatch: student {student_path!r} has vocab_size={vs} but the tokenizer has {nt} tokens"
        )
    if vt < vs:
        raise ValueError(
            f"vocabulary mismatch: student {student_path!r} has vocab_size={vs}, teacher {teacher_path!r} has "
            f"vocab_size={vt}; they must share the tokenizer ({nt} tokens) and the teacher must cover every "
            "student id"
        )
    if vt > vs:
        log.warning(
            "teacher %r has vocab_size=%d > student's %d (tokenizer: %d tokens): slicing the teacher's logits to "
            "the first %d ids", teacher_path, vt, vs, nt, vs,
        )  # fmt: skip
    return vs


def check_tokenizers_agree(
    tokenizer, teacher_path: str, student_tok_path: str, trust_remote_code: bool
) -> None:
    """If the teacher's folder has its own tokenizer, it must map the same strings to the same ids."""
    p = Path(teacher_path)
    if not any(
        (p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    a, b = tokenizer.get_vocab(), other.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(
            f"tokenizer mismatch: {student_tok_path!r} ({len(a)} tokens) and teacher {teacher_path!r} ({len(b)} "
            f"tokens) differ, e.g. {diff}; student and teacher must share a tokenizer"
        )


def check_fused_compatible(model, name: str, path: str, vocab: int) -> None:
    """fused_linear needs logits == lm_head(last hidden state); refuse models that post-process logits."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise ValueError(
            f"fused_linear: {name} {path!r} has no separate base model and LM head; set fused_linear=false"
        )
    dev = head.weight.device
    ids = (torch.arange(2, 8, device=dev) % vocab)[None]
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        got = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
    model.train(was)
    tol = (1e-3 if head.weight.dtype == torch.float32 else 3e-2) * (1 + ref.abs().max())
    if got.shape != ref.shape or (got - ref).abs().max() > tol:
        raise ValueError(
            f"fused_linear: {name} {path!r} ({type(model).__name__}) does not compute its logits as "
            "lm_head(last hidden state) (e.g. logit soft-capping or scaling); set fused_linear=false"
        )


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability to 0 (modules and attention-dropout attributes); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p:
            m.p, n = 0.0, n + 1
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float) and getattr(m, attr) > 0:
                setattr(m, attr, 0.0)
                n += 1
    return n


class PolicyModel(torch.nn.Module):
    """The student wrapped so that everything touching its weights runs inside one `forward` (DDP / FSDP hooks
    see it): mode="generate" samples, mode="loss" computes the hybrid loss of a rollout."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap policy

    def forward(self, mode: str, **kw):
        if mode == "generate":
            return self.model.generate(**kw)
        if mode == "loss":
            return self._loss(**kw)
        raise ValueError(f"mode must be 'generate' or 'loss', got {mode!r}")

    def _loss(self, input_ids, attention_mask, position_ids, prompt_len, actions, mask, rewards, seq_weights,
              teacher, loss_kw, fused, chunk):  # fmt: skip
        p, n = prompt_len, actions.shape[1]
        dev = input_ids.device.type
        if fused:
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state[:, p - 1 : p + n - 1]
            head = self.model.get_output_embeddings()
            auto = torch.is_autocast_enabled(dev)
            cdt = torch.get_autocast_dtype(dev) if auto else head.weight.dtype
            with torch.autocast(dev, enabled=False):
                bias = None if head.bias is None else head.bias.to(cdt)
                out = fused_hybrid_loss(
                    hidden.to(cdt), head.weight.to(cdt), teacher, actions, rewards, mask=mask, bias=bias,
                    seq_weights=seq_weights, normalize=1.0, chunk_size=chunk, **loss_kw,
                )  # fmt: skip
        else:
            kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            logits = response_logits_of(self.model, kw, n)
            with torch.autocast(dev, enabled=False):
                out = hybrid_loss(
                    logits,
                    teacher,
                    actions,
                    rewards,
                    mask=mask,
                    seq_weights=seq_weights,
                    normalize=1.0,
                    **loss_kw,
                )
        return {"loss": out.loss, "dense": out.dense.detach(), "sparse": out.sparse.detach(), "kl": out.kl}


# ------------------------------------------------------------------------------------------- trainer
#: Config keys that may change between a run and its --resume without changing what it computes.
RESUME_MAY_CHANGE = frozenset(
    {"stop_after", "output_dir", "progress", "tensorboard", "checkpoint_every", "keep_checkpoints", "save_final",
     "overwrite", "cpu_threads", "resume"}
)  # fmt: skip


def _check_same_run(saved: dict, now: dict, path) -> None:
    """--resume continues the *same* run: refuse a checkpoint written under different settings."""
    diff = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)
    ]
    if saved and diff:
        raise ValueError(
            f"checkpoint {path} was written with other settings ({'; '.join(diff)}); resume with the same "
            "config, or start a new output_dir"
        )


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = cfg.cpu or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if (cfg.bf16 and not cpu) else "no",
        step_scheduler_with_optimizer=False,  # we step it once per update, whatever the number of processes
    )


def make_scheduler(optimizer, cfg: TrainConfig):
    warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(step: int) -> float:  # LR multiplier of update `step` (0-based)
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        prog = min(1.0, (step - warm) / max(1, total - warm))
        shape = 1.0 - prog if cfg.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * prog))
        return floor + (1.0 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _StateDictModule(torch.nn.Module):
    """Stand-in handed to `save_checkpoint` when the weights were gathered from FSDP shards."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        self._sd = sd

    def state_dict(self, *a, **k):
        return self._sd


class _StateDictOptimizer:
    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


class Trainer:
    """One run of `hybridlab.train` (also usable from Python: `Trainer(cfg).train()`)."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate.utils import DistributedType
        from transformers import GenerationConfig

        self.cfg = cfg.validate()
        self.acc = accelerator if accelerator is not None else make_accelerator(cfg)
        acc = self.acc
        self.world, self.rank = acc.num_processes, acc.process_index
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if acc.gradient_accumulation_steps != 1:  # acc.backward would divide the loss by it on top of ours
            raise ValueError(
                f"accelerate's gradient_accumulation_steps={acc.gradient_accumulation_steps}: use the config key "
                "grad_accum instead (the loss is already normalised over the whole accumulated batch)"
            )
        per_proc = cfg.prompts_per_step // self.world
        if cfg.prompts_per_step % self.world or per_proc % cfg.grad_accum:
            raise ValueError(
                f"prompts_per_step={cfg.prompts_per_step} must be divisible by processes x grad_accum = "
                f"{self.world} x {cfg.grad_accum} (each process gets whole prompts, each micro-batch whole groups)"
            )
        self.micro_prompts = per_proc // cfg.grad_accum
        self.device = acc.device
        if self.device.type == "cpu" and cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        use_bf16 = cfg.bf16 and self.device.type == "cuda"
        if cfg.bf16 and not use_bf16:
            self._log("bf16=true needs CUDA: running in fp32 on CPU")

        # -- prompts and reward first (cheap to check), then tokenizer, models, checks
        self.rows = load_prompts(cfg.prompts)
        self.prompts_sha = hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()
        self.order = PromptOrder(len(self.rows), cfg.seed)
        self.reward_fn = load_reward(cfg.reward)
        tok_path = cfg.tokenizer or cfg.student
        self.tokenizer = load_tokenizer(tok_path, cfg.trust_remote_code)
        student = _from_pretrained(cfg.student, torch.float32, cfg.trust_remote_code)
        teacher = _from_pretrained(
            cfg.teacher, torch.bfloat16 if use_bf16 else torch.float32, cfg.trust_remote_code
        )
        self.vocab = check_vocab(student, teacher, self.tokenizer, cfg.student, cfg.teacher)
        check_tokenizers_agree(self.tokenizer, cfg.teacher, tok_path, cfg.trust_remote_code)
        if cfg.disable_dropout:
            disable_dropout(student)
        if cfg.fused_linear:
            check_fused_compatible(student, "student", cfg.student, self.vocab)
        eos = student.generation_config.eos_token_id
        eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None})
        if not eos_ids:
            raise ValueError(
                f"no EOS token: neither {cfg.student!r}'s generation config nor its tokenizer names one"
            )
        self.eos_ids = eos_ids
        ids = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eos_ids,
               "bos_token_id": self.tokenizer.bos_token_id}  # fmt: skip
        # A clean generation config: no model default (top_k=50, repetition penalty...) may reshape the sampling
        # distribution away from softmax(z / tau), the policy the loss differentiates.
        student.generation_config = GenerationConfig(**ids)
        self.gen_config = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
            use_cache=True, **ids,
        )  # fmt: skip
        if cfg.gradient_checkpointing:
            ckpt = {"use_reentrant": False}
            # transformers >= 5 names it activation checkpointing (the old name is deprecated)
            if hasattr(student, "activation_checkpointing_enable"):
                student.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)

        policy = PolicyModel(student)
        opt = torch.optim.AdamW(
            policy.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        sched = make_scheduler(opt, cfg)
        self.policy, self.optimizer, self.scheduler = acc.prepare(policy, opt, sched)

        teacher.to(self.device).eval()
        teacher.requires_grad_(False)
        if cfg.fused_linear:
            check_fused_compatible(teacher, "teacher", cfg.teacher, self.vocab)
        self.teacher = teacher
        self.loss_kw = {
            "beta": cfg.beta, "lam": cfg.lam, "future": cfg.future, "gamma": cfg.gamma, "baseline": cfg.baseline,
            "group_size": cfg.samples_per_prompt, "temperature": cfg.temperature, "backend": cfg.dense_backend,
            "teacher_floor": cfg.teacher_floor,
        }  # fmt: skip
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.out = Path(cfg.output_dir)
        self._tb = None

    # -- small helpers ------------------------------------------------------------------------------
    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def _log(self, msg: str) -> None:
        if self.acc.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"[hybridlab.train] {msg}", file=sys.stderr)

    @property
    def model(self):
        """The unwrapped Hugging Face student."""
        return self.acc.unwrap_model(self.policy).model

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a no-op with one)."""
        x = x.to(self.device)
        return self.acc.reduce(x, "sum") if self.world > 1 else x

    # -- data and rollouts --------------------------------------------------------------------------
    def next_rows(self) -> list[list[dict]]:
        """This process's share of the step's prompts, as `grad_accum` micro-batches of rows."""
        idx = self.order.take(self.cfg.prompts_per_step)  # the same global order on every process
        per = len(idx) // self.world
        mine = idx[self.rank * per : (self.rank + 1) * per]
        m = self.micro_prompts
        return [[self.rows[i] for i in mine[j : j + m]] for j in range(0, len(mine), m)]

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok, cfg = self.tokenizer, self.cfg
        if cfg.chat_template:
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]  # fmt: skip
            kw = {"add_special_tokens": False}
        else:
            texts, kw = prompts, {}
        if cfg.max_prompt_tokens is not None:
            kw.update(truncation=True, max_length=cfg.max_prompt_tokens)
        enc = tok(texts, padding=True, return_tensors="pt", **kw)
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> Rollout:
        """Student samples for `rows` (each `samples_per_prompt` times, contiguous) with rewards."""
        s = self.cfg.samples_per_prompt
        prompts = [r["prompt"] for r in rows for _ in range(s)]
        answers = [r["answer"] for r in rows for _ in range(s)]
        enc = self.encode(prompts)
        self.policy.eval()
        seq = self.policy(mode="generate", **enc, generation_config=self.gen_config, synced_gpus=self.fsdp)
        p = enc["input_ids"].shape[1]
        tokens = seq[:, p:]
        mask = response_mask(tokens, self.eos_ids)
        kept = [
            [t for t, m in zip(row, mr) if m and t not in self.eos_ids]
            for row, mr in zip(tokens.tolist(), mask.tolist())
        ]
        texts = self.tokenizer.batch_decode(kept, skip_special_tokens=True)  # text before EOS
        r = call_reward(self.reward_fn, prompts, texts, answers, name=repr(self.cfg.reward))
        return Rollout(
            prompts=prompts, texts=texts, input_ids=torch.cat([enc["input_ids"], tokens], 1),
            attention_mask=torch.cat([enc["attention_mask"], torch.ones_like(tokens)], 1), prompt_len=p,
            actions=tokens, mask=mask, rewards=torch.tensor(r, dtype=torch.float32, device=self.device),
            temperature=self.cfg.temperature,
        )  # fmt: skip

    def generate(self) -> list[Rollout]:
        """This step's rollouts on this process (seeded by (seed, step, process index))."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))
        return [self.rollout(mb) for mb in self.next_rows()]

    @torch.no_grad()
    def teacher_inputs(self, ro: Rollout):
        """Teacher logits [B, T, V] at the rollout's states, or (hidden [B, T, H'], LM head [V, H'][, bias])."""
        p, n, v = ro.prompt_len, ro.actions.shape[1], self.vocab
        kw = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "position_ids": ro.position_ids}
        if self.cfg.fused_linear:
            h = self.teacher.base_model(**kw, use_cache=False).last_hidden_state[:, p - 1 : p + n - 1]
            head = self.teacher.get_output_embeddings()
            w = head.weight[:v]
            h = h.to(w.dtype)
            return (h, w) if head.bias is None else (h, w, head.bias[:v])
        return response_logits_of(self.teacher, kw, n)[..., :v]

    def _coefficients(self, ro: Rollout, n_seq: float, n_tok: float) -> torch.Tensor:
        """[B] c_b of the *global* batch (see the module docstring)."""
        return _normalizer(self.cfg.normalize, ro.mask, None, torch.float32, n_seq=n_seq, n_tok=n_tok)

    # -- one update ---------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout] | None = None, keep_grads: bool = False) -> dict[str, float]:
        """Generate (unless `rollouts`, this process's micro-batches, are given), then one optimizer update.

        Gradients are freed after the update (so they do not sit beside the next rollout's KV cache) unless
        `keep_grads` (tests read them).
        """
        cfg, acc = self.cfg, self.acc
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        if rollouts is None:
            rollouts = self.generate()
        else:
            rollouts = [_to_device(r, self.device) for r in rollouts]
        t_gen = time.perf_counter() - t0
        if cuda:  # the rollout phase's peak (KV cache), then the update's (activations, loss buffers)
            gen_peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        local = torch.tensor(
            [sum(r.actions.shape[0] for r in rollouts), sum(int(r.mask.sum()) for r in rollouts)],
            dtype=torch.float64,
        )
        n_seq, n_tok = (float(x) for x in self._sum(local))
        lr = float(self.scheduler.get_last_lr()[0])
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        # sums over this process's micro-batches: loss, dense, sparse, KL, reward, responses ending in EOS
        stats = torch.zeros(6, dtype=torch.float64, device=self.device)
        for i, ro in enumerate(rollouts):
            c = self._coefficients(ro, n_seq, n_tok) * self.world  # DDP averages over processes
            t_in = self.teacher_inputs(ro)
            sync = i == len(rollouts) - 1
            with nullcontext() if sync else acc.no_sync(self.policy):
                out = self.policy(
                    mode="loss", input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                    position_ids=ro.position_ids, prompt_len=ro.prompt_len, actions=ro.actions, mask=ro.mask,
                    rewards=ro.rewards, seq_weights=c, teacher=t_in, loss_kw=self.loss_kw,
                    fused=cfg.fused_linear, chunk=cfg.fused_chunk,
                )  # fmt: skip
                acc.backward(out["loss"])
            ends = (ro.mask & _isin(ro.actions, self.eos_ids)).any(1)
            stats += torch.stack([
                out["loss"].detach().double() / self.world, out["dense"].double() / self.world,
                out["sparse"].double() / self.world, out["kl"].sum().double(), ro.rewards.sum().double(),
                ends.sum().double(),
            ])  # fmt: skip
            del out, t_in
        norm = acc.clip_grad_norm_(
            self.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if not torch.isfinite(torch.as_tensor(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm ({float(norm)}) at step {self.step + 1}: the update was not applied "
                f"and nothing was saved; the last checkpoint is {latest_checkpoint(self.out)} "
                "(lower lr, check rewards and logits, then --resume)"
            )
        self.optimizer.step()
        self.scheduler.step()
        if not keep_grads:
            self.optimizer.zero_grad(set_to_none=True)
        stats = self._sum(stats)
        self.step += 1
        self.samples_seen += int(n_seq)
        self.tokens_seen += int(n_tok)
        dt = time.perf_counter() - t0
        m = {
            "step": self.step, "loss": float(stats[0]), "dense": float(stats[1]), "sparse": float(stats[2]),
            "kl": float(stats[3]) / n_seq, "reward": float(stats[4]) / n_seq, "eos_frac": float(stats[5]) / n_seq,
            "resp_len": n_tok / n_seq, "grad_norm": float(norm), "lr": lr, "samples": self.samples_seen,
            "tokens": int(n_tok), "tokens_seen": self.tokens_seen, "gen_s": t_gen, "step_s": dt,
            "tokens_per_s": n_tok / dt if dt > 0 else float("nan"),
        }  # fmt: skip
        m["train_tokens_per_s"] = n_tok / (dt - t_gen) if dt > t_gen else float("nan")
        if cuda:
            m["gen_peak_mem_gib"] = gen_peak
            m["train_peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return m

    # -- checkpoints --------------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        return {
            "data_order": self.order.state_dict(), "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen, "prompts_sha256": self.prompts_sha, "world_size": self.world,
            "config": _plain(asdict(self.cfg)), "optimizer_format": "fqn" if self.fsdp else "torch",
        }  # fmt: skip

    def save(self) -> Path | None:
        """Atomic checkpoint of step `self.step` (model, optimizer, scheduler, RNG, data order); main process writes."""
        acc, cfg = self.acc, self.cfg
        acc.wait_for_everyone()
        path = None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.policy, options=opts)  # collective: every process takes part
            osd = get_optimizer_state_dict(self.policy, self.optimizer.optimizer, options=opts)
            if self.main:
                sd = {k.removeprefix("model."): v for k, v in msd.items()}
                path = save_checkpoint(self.out, self.step, _StateDictModule(sd), _StateDictOptimizer(osd),
                                       self.scheduler, self._extra(), cfg.keep_checkpoints)  # fmt: skip
        elif self.main:
            path = save_checkpoint(
                self.out,
                self.step,
                self.model,
                self.optimizer,
                self.scheduler,
                self._extra(),
                cfg.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint in output_dir (True), or leave the fresh state (False)."""
        path = latest_checkpoint(self.out)
        if path is None:
            return False
        if self.fsdp:
            info = self._load_fsdp(path)
        else:
            info = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        ex = info["extra"]
        if ex.get("optimizer_format", "torch") != ("fqn" if self.fsdp else "torch"):
            raise ValueError(
                f"checkpoint {path} was written {'with' if ex.get('optimizer_format') == 'fqn' else 'without'} FSDP; "
                "resume it with the same kind of launch"
            )
        _check_same_run(ex.get("config", {}), _plain(asdict(self.cfg)), path)
        self.order.load_state_dict(ex["data_order"])
        self.step, self.samples_seen, self.tokens_seen = (
            info["step"],
            int(ex["samples_seen"]),
            int(ex["tokens_seen"]),
        )
        if ex.get("prompts_sha256") != self.prompts_sha:
            self._log(f"warning: {self.cfg.prompts} changed since the checkpoint was written")
        if int(ex.get("world_size", self.world)) != self.world:
            self._log(f"note: checkpoint from {ex['world_size']} processes, resuming on {self.world}: "
                      "the samples drawn from here on differ from an uninterrupted run")  # fmt: skip
        self._log(f"resumed from {path} at step {self.step}")
        return True

    def _load_fsdp(self, path: Path) -> dict:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from .checkpoint import set_rng_state

        sd = {f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.policy, sd, options=opts)
        set_optimizer_state_dict(self.policy, self.optimizer.optimizer, state["optimizer"], options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return {"step": int(state["step"]), "extra": state["extra"]}

    def save_final(self) -> Path | None:
        """A Hugging Face model folder (safetensors + config + tokenizer) at <output_dir>/final."""
        acc = self.acc
        sd = acc.get_state_dict(self.policy) if self.fsdp else None
        dst = self.out / "final"
        if self.main:
            kw = {} if sd is None else {"state_dict": {k.removeprefix("model."): v for k, v in sd.items()}}
            with _quiet_progress():
                self.model.save_pretrained(dst, safe_serialization=True, **kw)
            self.tokenizer.save_pretrained(dst)
        acc.wait_for_everyone()
        return dst

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to `steps` (or `stop_after` more steps), logging and checkpointing; returns the summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = self.step
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
        metrics_path = self.out / "metrics.jsonl"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(_plain(asdict(cfg)), sort_keys=False))
            _truncate_metrics(metrics_path, start)
            self._open_tensorboard()
        bar = tqdm(total=end - start, desc="hybridlab.train", disable=not (self.main and cfg.progress),
                   dynamic_ncols=True)  # fmt: skip
        t0 = time.perf_counter()
        saved = []
        try:
            while self.step < end:
                m = self.train_step()
                if self.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(m) + "\n")
                    if self._tb is not None:
                        for k, v in m.items():
                            if k != "step":
                                self._tb.add_scalar(f"train/{k}", v, m["step"])
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3g}", kl=f"{m['kl']:.3g}", reward=f"{m['reward']:.2f}",
                                tok_s=f"{m['tokens_per_s']:.0f}")  # fmt: skip
                last = self.step == end
                if last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    p = self.save()
                    if p is not None:
                        saved.append(str(p))
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        final = self.save_final() if (cfg.save_final and self.step == cfg.steps) else None
        summary = self._summary(metrics_path, start, time.perf_counter() - t0, saved, final)
        if self.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._log(format_summary(summary))
        return summary

    def _open_tensorboard(self) -> None:
        if not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._log("tensorboard=true but the tensorboard package is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only")  # fmt: skip
            return
        self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def _summary(
        self, metrics_path: Path, start: int, wall: float, saved: list[str], final
    ) -> dict[str, Any]:
        rows = []
        if self.main and metrics_path.exists():
            rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        this = [r for r in rows if r["step"] > start]
        k = max(1, len(rows) // 10)

        def mean(key, rs):
            return float(np.mean([r[key] for r in rs])) if rs else float("nan")

        out = {
            "steps": self.step, "steps_this_run": self.step - start, "total_steps": self.cfg.steps,
            "complete": self.step == self.cfg.steps, "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in this) / max(1e-9, sum(r["step_s"] for r in this)) if this else float("nan"),
            "reward_first": mean("reward", rows[:k]), "reward_last": mean("reward", rows[-k:]),
            "kl_first": mean("kl", rows[:k]), "kl_last": mean("kl", rows[-k:]),
            "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen, "world_size": self.world,
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "fused_linear": self.cfg.fused_linear, "checkpoints": saved, "final_model": None if final is None else str(final),
            "metrics": str(metrics_path),
        }  # fmt: skip
        if this and "train_peak_mem_gib" in this[0]:
            out["peak_mem_gib"] = max(max(r["train_peak_mem_gib"], r["gen_peak_mem_gib"]) for r in this)
            out["train_peak_mem_gib"] = max(r["train_peak_mem_gib"] for r in this)
        return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"summary: step {s['steps']}/{s['total_steps']} ({s['steps_this_run']} this run, "
        f"{'complete' if s['complete'] else 'stopped early: continue with --resume'}) on {s['world_size']} x {s['device']}",
        f"  wall {s['wall_s']:.1f} s, {s['tokens_per_s']:.1f} response tokens/s"
        + (f", peak memory {s['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in s else ""),
        f"  reward {s['reward_first']:.3f} -> {s['reward_last']:.3f}, KL/sequence {s['kl_first']:.3f} -> {s['kl_last']:.3f}"
        " (first / last 10% of steps)",
        f"  metrics {s['metrics']}; checkpoints {len(s['checkpoints'])}"
        + (f"; final model {s['final_model']}" if s["final_model"] else ""),
    ]
    return "\n".join(lines)


def _isin(x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    out = torch.zeros_like(x, dtype=torch.bool)
    for i in ids:
        out |= x == i
    return out


def _to_device(ro: Rollout, device) -> Rollout:
    return dataclasses.replace(
        ro,
        **{
            f.name: getattr(ro, f.name).to(device)
            for f in fields(ro)
            if isinstance(getattr(ro, f.name), torch.Tensor)
        },
    )


def _plain(x):
    """Config values as YAML/`weights_only`-safe plain types."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after `step` (work a crash lost and a resume redoes); atomic."""
    if not path.exists():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def run(cfg: TrainConfig, resume: bool = False, accelerator=None) -> tuple[Trainer, dict[str, Any]]:
    """Build a `Trainer`, resume if asked (and a checkpoint exists), train; returns (trainer, summary)."""
    out = Path(cfg.output_dir)
    if not resume and not cfg.overwrite and latest_checkpoint(out) is not None:
        raise ValueError(
            f"output_dir {str(out)!r} already has checkpoints (step {latest_checkpoint(out).name}); pass --resume to "
            "continue that run, or overwrite=true / another output_dir to start fresh"
        )
    tr = Trainer(cfg, accelerator)
    if resume and not tr.resume():
        tr._log(f"--resume: no checkpoint in {str(out)!r}, starting at step 0")
    if not resume and tr.main:  # a fresh run (overwrite=true): no stale checkpoints, metrics or final model
        for stale in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(out / stale, ignore_errors=True)
        for stale in ("metrics.jsonl", "summary.json"):
            (out / stale).unlink(missing_ok=True)
    tr.acc.wait_for_everyone()
    return tr, tr.train()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m hybridlab.train",
        description="Hybrid imitation + RL fine-tuning of a Hugging Face causal LM (see configs/README.md).",
    )
    ap.add_argument("--config", help="YAML file of TrainConfig keys (configs/*.yaml)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys, e.g. lr=1e-5 steps=10"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    cfg = load_config(args.config, args.overrides)
    _, summary = run(cfg, resume=args.resume)
    return summary


__all__ = [
    "PolicyModel",
    "PromptOrder",
    "TrainConfig",
    "Trainer",
    "check_vocab",
    "format_summary",
    "load_config",
    "load_prompts",
    "logits_memory_table",
    "main",
    "parse_overrides",
    "response_mask",
    "run",
    "step_seed",
]

if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        # bad config, paths, vocabularies: a message, not a traceback
        print(f"hybridlab.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        # Multi-process CPU runs: skip the gloo teardown at interpreter exit, which can deadlock (its destructor
        # joins a worker thread while holding the GIL that thread waits for). Everything is written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
