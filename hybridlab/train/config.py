"""`TrainConfig`: every setting of a training run, read from YAML and the command line; the methods as presets.

    python -m hybridlab.train --config configs/tiny_cpu.yaml --steps 20 --lr 1e-3

Precedence: the dataclass defaults < `--preset NAME` < the YAML file < command-line flags. Parsing goes through
transformers' `HfArgumentParser` (the parser TRL's `TrlParser` builds on), which converts every value with the
field's type; unknown keys are refused with the closest valid name. This module imports neither torch nor
transformers at import time, so a typo is reported before the heavy imports start.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

Loss = Literal["hybrid", "sft", "opd_sampled"]
Future = Literal["analytic", "k1", "k3", "none"]
Baseline = Literal["none", "reward_group", "return_group"]
Scheduler = Literal["constant", "linear", "cosine"]
Backend = Literal["auto", "torch", "triton", "compiled"]
WeightSchedule = Literal["constant", "linear", "cosine", "switch", "plateau"]
Trust = Literal["none", "global", "per_prompt"]
Gate = Literal["none", "incorrect"]
FutureNorm = Literal["sum", "mean"]
NORMALIZATIONS = ("sequences", "tokens", "per_sequence")  # == hybridlab.hybrid.NORMALIZATIONS (a test checks)

#: The methods of the comparison as named presets (each applies these settings on top of the others).
PRESETS: dict[str, dict[str, Any]] = {
    # offline distillation: cross-entropy on *teacher* samples (drawn at temperature 1)
    "sft": {"loss": "sft", "future": "none", "baseline": "none"},
    # sampled-token on-policy distillation: advantage -k_t at the sampled token, discount 0 (myopic)
    "opd_sampled": {"loss": "opd_sampled", "lam": 0.0, "future": "none", "gamma": 0.0, "baseline": "none"},
    # hybrid_loss with lam = 0 and no future KL: myopic full-vocabulary distillation
    "dense_only": {"loss": "hybrid", "lam": 0.0, "future": "none", "baseline": "none"},
    # hybrid_loss with beta = 0 and a leave-one-out baseline on the reward
    "rl_only": {"loss": "hybrid", "beta": 0.0, "future": "none", "baseline": "reward_group"},
    # dense + sparse with the analytic future KL and a baseline on the whole return
    "hybrid": {"loss": "hybrid", "future": "analytic", "baseline": "return_group"},
    # myopic hybrid (dense KL + reward policy gradient, no future KL) with beta scaled per prompt by the
    # teacher's measured success rate: the gradient of E_x[lam E_y R - beta p_T(x) sum_t KL_t] with the future
    # KL dropped (biased for that objective, as the myopic rule is for J); see the `teacher_trust` key
    "hybrid_trust": {
        "loss": "hybrid",
        "future": "none",
        "baseline": "reward_group",
        "teacher_trust": "per_prompt",
    },
}
METHODS = tuple(PRESETS)


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run depends on; written to `<output_dir>/config.yaml`. See configs/README.md."""

    # -- models and data
    student: str = _f("", "student model folder (safetensors); a hub name only where you have network")
    teacher: str = _f("", "teacher model folder; must cover the student's vocabulary")
    teacher_url: str | None = _f(
        None, "a teacher served by `python -m hybridlab.serve_teacher` (e.g. http://127.0.0.1:8000), instead of "
        "`teacher`: its hidden states (or top-k log-probs) come over HTTP",
    )  # fmt: skip
    teacher_token_file: str | None = _f(None, "file holding the teacher server's token (its --token-file)")
    teacher_timeout: float = _f(60.0, "seconds to wait for one answer of the teacher server")
    teacher_retries: int = _f(3, "retries (backoff 0.5 s, 1 s, 2 s, ...) before a teacher request fails")
    teacher_topk: int | None = _f(
        None, "use only the teacher's top-k log-probs per position (a tail-bucket lower bound on the KL; needs "
        "fused_linear=true): for a served teacher whose LM head is too large to ship",
    )  # fmt: skip
    tokenizer: str | None = _f(None, "tokenizer folder; unset: the student's folder")
    prompts: str = _f("", 'JSONL of training prompts, one {"prompt": str, "answer": str (optional)} per line')
    eval_prompts: str | None = _f(
        None, "JSONL of evaluation prompts (same format); evaluated every eval_every steps"
    )
    reward: str = _f("hybridlab.tasks.rewards:exact_match", "reward function as 'module:function'")
    trust_remote_code: bool = _f(False, "allow running Python code shipped in a model folder")
    chat_template: bool = _f(False, "wrap each prompt as a user turn with the tokenizer's chat template")
    teacher_prompt: str | None = _f(
        None,
        "the teacher's own prompt, a template with {prompt} (and optionally {answer}), e.g. worked examples + "
        "'{prompt}': the teacher scores the student's response after it (context distillation)",
    )
    max_prompt_tokens: int | None = _f(
        None, "truncate the student's prompts from the left to this many tokens"
    )
    max_teacher_prompt_tokens: int | None = _f(
        None, "truncate the teacher's own prompts (teacher_prompt, teacher_messages) from the left to this many "
        "tokens (unset: never; max_prompt_tokens does not apply to them)",
    )  # fmt: skip
    # -- objective J = E[lam R] - beta KL(student || teacher) and its estimator
    loss: Loss = _f("hybrid", "hybrid (hybrid_loss), sft (cross-entropy on teacher samples), opd_sampled")
    lam: float = _f(1.0, "weight of the task reward in J")
    beta: float = _f(1.0, "weight of the reverse KL to the teacher in J")
    future: Future = _f("analytic", "estimator of the future KL in the sparse return")
    gamma: float = _f(1.0, "discount of the future KL; < 1 optimises a different objective")
    baseline: Baseline = _f("return_group", "leave-one-out baseline over a prompt's samples (or none)")
    group_size: int | None = _f(None, "samples per baseline group; must equal samples_per_prompt")
    temperature: float = _f(1.0, "sampling temperature, also the loss's")
    normalize: str = _f("sequences", "sequences (unbiased) | tokens | per_sequence | a positive number")
    teacher_floor: float | None = _f(
        None, "clamp of the teacher's log-probs (unset: an infinite KL is an error)"
    )
    mask_truncated_completions: bool = _f(
        False, "leave responses that hit max_new_tokens without EOS out of the update (TRL's option)"
    )
    # -- weights over training, trust in the teacher, gating: each changes the objective (see SCHEDULES below)
    lam_schedule: WeightSchedule = _f(
        "constant", "lam over the run, from lam to lam_final: constant | linear | cosine | switch | plateau"
    )
    lam_final: float | None = _f(None, "lam at the end of a schedule (unset: lam, i.e. no change)")
    beta_schedule: WeightSchedule = _f(
        "constant",
        "beta over the run, from beta to beta_final: constant | linear | cosine | switch | plateau",
    )
    beta_final: float | None = _f(None, "beta at the end of a schedule (unset: beta, i.e. no change)")
    switch_step: int = _f(
        0, "schedule 'switch': the first update with the final weights; 'plateau': the latest one (0: none)"
    )
    plateau_window: int = _f(
        20, "schedule 'plateau': switch once the mean training reward over this many updates has not risen "
        "by more than plateau_tol for this many updates",
    )  # fmt: skip
    plateau_tol: float = _f(0.01, "schedule 'plateau': the rise of the windowed mean reward that counts")
    teacher_trust: Trust = _f(
        "none", "scale beta by the teacher's success rate, estimated before training: none | global (beta x the "
        "mean rate) | per_prompt (beta x the prompt's own rate)",
    )  # fmt: skip
    trust_samples: int = _f(8, "teacher samples per training prompt for teacher_trust")
    trust_cache: str | None = _f(
        None, "JSON file of the teacher's success rates (reused when it matches; unset: <output_dir>/"
        "teacher_trust.json, or none without output_dir)",
    )  # fmt: skip
    dense_gate: Gate = _f(
        "none",
        "none | incorrect: the teacher terms only on responses with reward < gate_reward (KDRL, OPDVR)",
    )
    gate_reward: float = _f(1.0, "dense_gate='incorrect': a response with a reward below this is incorrect")
    future_norm: FutureNorm = _f(
        "sum", "sum (exact) | mean: the future KL per remaining token, length-neutral (not the gradient of J)"
    )
    grad_diagnostics: bool = _f(
        False, "log the dense, reward and future-KL gradient norms and cosines (extra backward passes)"
    )
    shortcut_window: int = _f(
        20,
        "warn when, over two windows of this many updates, response length and KL both fall by > 10% (0: off)",
    )
    # -- optimisation
    lr: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    scheduler: Scheduler = _f("cosine", "learning-rate decay after warmup, down to min_lr_ratio * lr")
    warmup_steps: int = _f(0, "linear warmup steps")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr")
    steps: int = _f(100, "optimizer updates in the whole run")
    prompts_per_step: int = _f(8, "prompts per update, over all processes")
    samples_per_prompt: int = _f(4, "responses sampled per prompt (one baseline group)")
    max_new_tokens: int = _f(128, "response length limit")
    grad_accum: int = _f(1, "micro-batches per process and update")
    grad_clip: float = _f(1.0, "gradient-norm clip; 0 disables clipping (the norm is still logged)")
    # -- precision and kernels
    bf16: bool = _f(True, "CUDA: fp32 master weights under bf16 autocast, bf16 teacher; CPU runs fp32")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward")
    dense_backend: Backend = _f("auto", "auto: Triton on CUDA, else torch; compiled: torch.compile (compiles once)")  # fmt: skip
    fused_linear: bool = _f(False, "dense KL and log-probs from hidden states + LM head: no [N, V] logits")
    fused_chunk: int = _f(1024, "rows per chunk of the fused path")
    disable_dropout: bool = _f(True, "zero every dropout / layerdrop so the scored policy is the sampled one")
    # -- evaluation
    eval_every: int = _f(0, "evaluate every N steps, at the start and at the end (0: never)")
    eval_count: int | None = _f(None, "use only the first N evaluation prompts")
    # -- run
    output_dir: str | None = _f(
        "runs/train", "where metrics, checkpoints and the final model go (None: nowhere)"
    )
    overwrite: bool = _f(False, "start fresh in an output_dir that already has checkpoints")
    checkpoint_every: int = _f(0, "checkpoint every N steps (0: only at the end of each invocation)")
    keep_checkpoints: int = _f(2, "newest checkpoints kept")
    stop_after: int | None = _f(None, "stop this invocation after N steps (continue later with --resume)")
    save_final: bool = _f(
        True, "write a Hugging Face model folder to <output_dir>/final when the run completes"
    )
    seed: int = _f(0, "seed of the prompt order and the sampling")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(False, "also log to TensorBoard (needs the tensorboard package)")
    cpu: bool = _f(False, "run on CPU even when CUDA is available")
    cpu_threads: int | None = _f(None, "torch threads of a CPU run (1 suits tiny models)")

    def __post_init__(self):
        if not isinstance(self.normalize, str):  # a number from Python: kept as the command line reads it
            self.normalize = str(self.normalize)

    @classmethod
    def preset(cls, name: str, **kwargs) -> TrainConfig:
        """A config for the method `name`: `kwargs` first, then the preset on top (it wins: `lam` becomes 0 for
        "dense_only", `beta` 0 for "rl_only"), so one set of keyword arguments describes a whole comparison."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
        return dataclasses.replace(cls(**kwargs), **PRESETS[name])

    def replace(self, **changes) -> TrainConfig:
        bad = [k for k in changes if k not in _NAMES]
        if bad:
            raise ValueError(_unknown(bad[0], "config"))
        return dataclasses.replace(self, **changes)

    @property
    def normalize_value(self) -> str | float:
        """`normalize` as hybrid_loss takes it: a name or a positive number."""
        if isinstance(self.normalize, str) and self.normalize in NORMALIZATIONS:
            return self.normalize
        try:
            return float(self.normalize)
        except (TypeError, ValueError):
            return self.normalize

    def validate(self, given: tuple[str, ...] = ()) -> TrainConfig:
        """Raise ValueError naming the key and the value for anything out of range; `given` names the objects
        (student, teacher, prompts) handed to the Trainer directly instead of as paths."""
        from ..teacher_service.settings import check_teacher_settings  # no torch: still fast

        check_teacher_settings(self, given)
        for name in ("student", "teacher", "prompts", "reward"):
            if name == "teacher" and self.teacher_url:
                continue
            if name not in given and not getattr(self, name):
                raise ValueError(
                    f"{name} must be set (a {'dotted name' if name == 'reward' else 'path'}), got ''"
                )
        for name in ("loss", "future", "baseline", "scheduler", "dense_backend", "lam_schedule", "beta_schedule",
                     "teacher_trust", "dense_gate", "future_norm"):  # fmt: skip
            allowed = get_args(_HINTS[name])
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        nv = self.normalize_value
        if isinstance(nv, str) and nv not in NORMALIZATIONS:
            raise ValueError(
                f"normalize must be one of {list(NORMALIZATIONS)} or a positive number, got {nv!r}"
            )
        if not isinstance(nv, str) and not (nv > 0 and math.isfinite(nv)):
            raise ValueError(f"normalize as a number must be positive and finite, got {self.normalize!r}")
        for name in ("lam", "beta", "temperature", "lr", "grad_clip", "weight_decay", "gamma"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        for name in ("temperature", "lr"):
            _positive(name, getattr(self, name))
        for name in (
            "beta",
            "grad_clip",
            "weight_decay",
            "lam",
            "warmup_steps",
            "checkpoint_every",
            "eval_every",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        self._validate_recipe()
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
        for name in (
            "stop_after",
            "max_prompt_tokens",
            "max_teacher_prompt_tokens",
            "cpu_threads",
            "eval_count",
        ):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
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
        if self.fused_linear and self.loss != "hybrid":
            raise ValueError(f"fused_linear=true supports loss='hybrid' only, got loss={self.loss!r}")
        if self.teacher_prompt is not None:
            names = {f for _, f, _, _ in string.Formatter().parse(self.teacher_prompt) if f is not None}
            if "prompt" not in names or names - {"prompt", "answer"}:
                raise ValueError(
                    f"teacher_prompt must be a template containing {{prompt}} (and optionally {{answer}}), "
                    f"got {self.teacher_prompt!r} with fields {sorted(names)}"
                )
        return self

    def _validate_recipe(self) -> None:
        for name in ("lam_final", "beta_final", "gate_reward", "plateau_tol"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        for name in ("lam_final", "beta_final", "plateau_tol", "switch_step", "shortcut_window"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        _positive("trust_samples", self.trust_samples)
        _positive("plateau_window", self.plateau_window)
        for w in ("lam", "beta"):
            kind = getattr(self, f"{w}_schedule")
            if kind == "switch" and not 0 < self.switch_step:
                raise ValueError(f"{w}_schedule='switch' needs switch_step > 0 (the first update with "
                                 f"{w}_final), got switch_step={self.switch_step}")  # fmt: skip
            if kind != "constant" and getattr(self, f"{w}_final") is None:
                raise ValueError(f"{w}_schedule={kind!r} needs {w}_final (the weight it goes to)")
        if self.grad_diagnostics and (self.fused_linear or self.loss != "hybrid"):
            raise ValueError("grad_diagnostics=true needs loss='hybrid' and fused_linear=false")
        if self.loss != "hybrid" and (self.teacher_trust != "none" or self.dense_gate != "none"
                                      or self.future_norm != "sum"):  # fmt: skip
            raise ValueError(f"teacher_trust, dense_gate and future_norm act on loss='hybrid' only, got "
                             f"loss={self.loss!r}")  # fmt: skip

    def weight_at(self, name: str, step: int, switched_at: int | None = None) -> float:
        """lam or beta (`name`) at update `step` (0-based) under its schedule; `switched_at`: the update where a
        'plateau' schedule switched (None: not yet). See SCHEDULES."""
        return schedule_value(getattr(self, f"{name}_schedule"), getattr(self, name), getattr(self, f"{name}_final"),
                              step, self.steps, self.switch_step, switched_at)  # fmt: skip


def schedule_value(kind: str, start: float, end: float | None, step: int, steps: int, switch_step: int = 0,
                   switched_at: int | None = None) -> float:  # fmt: skip
    """A weight at update `step` (0-based) of `steps`: constant (start); linear / cosine from `start` at the first
    update to `end` at the last; switch (`end` from update `switch_step` on); plateau (`end` from `switched_at`,
    or from `switch_step` > 0 at latest)."""
    if kind == "constant" or end is None:
        return start
    prog = min(1.0, step / max(1, steps - 1))
    if kind == "linear":
        return start + (end - start) * prog
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * prog))
    if kind == "switch":
        return end if step >= switch_step else start
    if kind == "plateau":
        late = switch_step > 0 and step >= switch_step
        return end if late or (switched_at is not None and step >= switched_at) else start
    raise ValueError(f"schedule must be one of {list(get_args(WeightSchedule))}, got {kind!r}")


#: What each setting optimises (documentation; the tests check the exact ones on an enumerable toy).
SCHEDULES = """
lam_schedule / beta_schedule: update k follows the gradient of J_k = lam_k E[R] - beta_k KL, the objective of
  that step (the estimator stays unbiased for J_k); the run as a whole follows no single objective. constant: J;
  linear / cosine: from (lam, beta) at the first update to (lam_final, beta_final) at the last; switch: the final
  weights from update switch_step on ("distil, then RL": lam 0 -> lam_final, beta -> 0); plateau: the same switch
  when the training reward's windowed mean stops rising (plateau_window, plateau_tol), at switch_step at latest.
teacher_trust: per_prompt: beta_x = beta p_T(x), p_T(x) the teacher's success rate on the prompt (trust_samples
  samples at temperature 1, drawn once before training): the gradient of E_x[lam E_y R - beta_x KL_x], exactly
  with the future KL kept; global: beta x the mean rate, i.e. J with a smaller beta.
dense_gate: incorrect: the teacher's terms count only on responses with R < gate_reward. The gate depends on the
  response, so it is not the gradient of E[lam R - beta 1[R < g] log(pi / pi_T)]: a heuristic, biased (measured
  on the enumerable toy in tests/test_recipe.py).
future_norm: mean: the future KL over the remaining (discounted) token count: length-neutral, not the gradient
  of J nor of any fixed objective (its bias against grad J is measured in tests/test_recipe.py).
"""


_NAMES = [f.name for f in fields(TrainConfig)]
_OPTIONAL_STR = [f.name for f in fields(TrainConfig) if f.type in ("str | None", str | None)]
_HINTS = {
    "loss": Loss,
    "future": Future,
    "baseline": Baseline,
    "scheduler": Scheduler,
    "dense_backend": Backend,
    "lam_schedule": WeightSchedule,
    "beta_schedule": WeightSchedule,
    "teacher_trust": Trust,
    "dense_gate": Gate,
    "future_norm": FutureNorm,
}


def _positive(name: str, value) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _unknown(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, _NAMES, n=3)
    hint = (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"; valid keys: {', '.join(_NAMES)}"
    )
    return f"unknown {source} key {key!r}{hint}"


def build_parser(prog: str = "python -m hybridlab.train"):
    """The command-line parser: one flag per `TrainConfig` field, plus --config, --preset and --resume."""
    from transformers import HfArgumentParser

    p = HfArgumentParser(
        TrainConfig, prog=prog, allow_abbrev=False, exit_on_error=False,
        description="Hybrid imitation + RL fine-tuning of a Hugging Face causal LM (every key: configs/README.md).",
    )  # fmt: skip
    p.add_argument(
        "--config", default=None, help="YAML file of config keys (configs/*.yaml); flags override it"
    )
    p.add_argument(
        "--preset", default=None, choices=METHODS, help="a method's settings, under the YAML and flags"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    for a in p._actions:  # argparse %-formats help: a literal "10%" broke --help (none of ours uses %(...)s)
        a.help = a.help.replace("%", "%%") if a.help and "%(" not in a.help else a.help
    return p


def _as_default(v):
    """A YAML value as a command-line string, so the parser converts it with the field's type (None stays)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    for k in data:
        if k not in _NAMES:
            raise ValueError(_unknown(str(k), f"config {str(p)!r}"))
    return {k: expand_env(v) if k in _PATH_KEYS and isinstance(v, str) else v for k, v in data.items()}


#: config keys holding paths, where a YAML file may write ${VAR} or ${VAR:-default} (relative paths are taken
#: from the working directory, the repository root for the shipped configs)
_PATH_KEYS = ("student", "teacher", "tokenizer", "prompts", "eval_prompts", "output_dir", "trust_cache")


def expand_env(value: str) -> str:
    """`${VAR}` / `${VAR:-default}` in a path from a config file: the variable when it is set and not empty,
    else the default (ValueError naming the variable when there is none)."""
    import os
    import re

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        got = os.environ.get(name, "").strip()
        if got:
            return got
        if default is None:
            raise ValueError(
                f"config path {value!r} uses ${{{name}}}, which is not set (or write ${{{name}:-default}})"
            )
        return default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(validated config, namespace with .config / .preset / .resume) from command-line arguments."""
    import sys

    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    defaults: dict[str, Any] = {}
    if known.preset is not None:
        if known.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {list(PRESETS)}, got {known.preset!r}")
        defaults.update(PRESETS[known.preset])
    if known.config is not None:
        defaults.update(read_yaml(known.config))
    parser.set_defaults(**{k: _as_default(v) for k, v in defaults.items()})
    try:
        ns, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
    for a in rest:
        if a.startswith("--"):
            raise ValueError(_unknown(a[2:].split("=")[0].replace("-", "_"), "command-line"))
        if "=" in a:
            k, _, v = a.partition("=")
            raise ValueError(f"unexpected argument {a!r}: give config keys as flags, e.g. --{k} {v}")
        raise ValueError(f"unexpected argument {a!r}")
    given = {k: getattr(ns, k) for k in _NAMES}
    for k in _OPTIONAL_STR:  # `--teacher_prompt null` (or None, ~) means unset, as `null` in a YAML file does
        if given[k] in ("null", "None", "~"):
            given[k] = None
    cfg = TrainConfig(**given)
    return cfg.validate(), ns


def _negative_values(argv: list[str]) -> list[str]:
    """`--key -1e-3` as `--key=-1e-3`: argparse takes a value like "-1e-3" for an unknown flag."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and a.startswith("-") and _is_number(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_config(
    path: str | Path | None = None, args: list[str] = (), preset: str | None = None
) -> TrainConfig:
    """A validated `TrainConfig` from a YAML file (or the defaults), a preset and command-line style flags."""
    argv = ([] if path is None else ["--config", str(path)]) + (
        [] if preset is None else ["--preset", preset]
    )
    return parse_args(argv + list(args))[0]
