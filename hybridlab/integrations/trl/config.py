"""`HybridGRPOConfig`: GRPO's config plus the hybrid objective's settings, and the checks that refuse what the
on-policy hybrid update cannot honour (each error names the setting). See `hybridlab.integrations.trl`.

Recipe settings: hybridlab.train's, with its defaults, help and rules (`lam_schedule`, `teacher_beta_schedule` = its
`beta_schedule`, `lam_final`, `teacher_beta_final`, `switch_step`, `plateau_window`, `plateau_tol`, `teacher_trust`,
`dense_gate`, `gate_reward`, `future_norm`). A step is an optimiser step (`state.global_step` of `max_steps`); a
plateau is read from each step's mean training reward, which the checkpoints keep. A constant schedule, teacher
trust and `future_norm="sum"` keep the update the gradient of one fixed objective (with trust, the future KL kept:
E_x[lam E_y R - teacher_beta p_T(x) KL_x]); a schedule follows the objective of each step; the gate and
`future_norm="mean"` are biased heuristics. The teacher's success rates are not sampled here: `teacher_trust_rates`
names a JSON file, e.g. the `teacher_trust.json` that a hybridlab.train run with the same teacher, prompts and
reward writes (into its output_dir, or its `trust_cache`).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field, fields
from typing import get_args

try:
    import trl
    from trl import GRPOConfig
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        'hybridlab.integrations.trl needs TRL: pip install "hybridlab[trl]" (trl>=1.16,<1.17)'
    ) from e

from packaging.version import Version

from ...hybrid import FUTURE_NORMS, NORMALIZATIONS
from ...sparse import FUTURE_ESTIMATORS
from ...train.config import SCHEDULES, Gate, TrainConfig, Trust, WeightSchedule

TRL_SUPPORTED = (">=1.16", "<1.17")
if not Version("1.16") <= Version(Version(trl.__version__).base_version) < Version("1.17"):
    raise ImportError(
        f"hybridlab.integrations.trl supports trl>=1.16,<1.17 (it overrides GRPOTrainer internals that change "
        f"between releases); found trl {trl.__version__}"
    )

BASELINES = ("none", "reward_group", "return_group")
DENSE_BACKENDS = ("auto", "torch", "triton", "compiled")
#: generation settings that sample from something other than softmax(logits / temperature), with their neutral
#: values: refused in generation_kwargs unless neutral (the student folder's generation_config is not read at all,
#: see HybridGRPOTrainer._generate_single_turn)
_FILTER_KWARGS = {
    "top_p": (1.0, None), "top_k": (0, None, -1), "min_p": (None, 0.0), "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None), "top_h": (None,), "repetition_penalty": (1.0, None),
    "encoder_repetition_penalty": (1.0, None), "presence_penalty": (0.0, None), "frequency_penalty": (0.0, None),
    "no_repeat_ngram_size": (0, None), "encoder_no_repeat_ngram_size": (0, None), "bad_words_ids": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
    "min_new_tokens": (0, None), "min_length": (0, None), "min_tokens": (0, None),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "logits_processor": (None,),
    "stop_strings": (None,), "do_sample": (True,), "num_beams": (1, None), "temperature": None,
}  # fmt: skip


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


def _objectives(text: str) -> dict[str, str]:
    """hybridlab.train.config.SCHEDULES as {setting: what it optimises} (one paragraph per 'a / b:' heading)."""
    out, keys = {}, []
    for line in text.strip().splitlines():
        if not line.startswith(" "):
            head, _, line = line.partition(": ")
            keys = head.split(" / ")
        for k in keys:
            out[k] = f"{out.get(k, '')} {line.strip()}".strip()
    return out


_ENGINE_FIELDS, _OBJECTIVE = {f.name: f for f in fields(TrainConfig)}, _objectives(SCHEDULES)


def _engine(name: str, prefix: str = "", suffix: str = ""):
    """A field with hybridlab.train's default and help for `name`, followed by what the setting optimises."""
    f = _ENGINE_FIELDS[name]
    objective = _OBJECTIVE.get(name)
    help = prefix + f.metadata["help"] + (f". Objective: {objective}" if objective else "") + suffix
    return _f(f.default, help)


@dataclass
class HybridGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the hybrid objective's settings (see `hybridlab.hybrid_loss`).

    The update is on-policy: `num_iterations` must be 1, `steps_per_generation` must equal
    `gradient_accumulation_steps` (the default) and `vllm_importance_sampling_correction` must be False (the
    default here). GRPO's `beta` must be 0: the teacher's weight is `teacher_beta`.
    """

    lam: float = field(
        default=1.0, metadata={"help": "Weight of the task reward R in J (R = weighted sum of reward_funcs)."}
    )
    teacher_beta: float = field(
        default=1.0,
        metadata={"help": "Weight of the reverse KL to the teacher in J (GRPO's `beta` stays 0)."},
    )
    future: str = field(
        default="analytic",
        metadata={
            "help": "Estimator of the future KL in the return: analytic | k1 | k3 | none (myopic; biased with a reward)."
        },
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "Discount of the future KL; 1 is exact, < 1 optimises another objective."},
    )
    baseline: str = field(
        default="return_group",
        metadata={
            "help": "none | reward_group | return_group: leave-one-out over a prompt's num_generations completions."
        },
    )
    normalize: str = field(
        default="sequences",
        metadata={
            "help": "sequences (unbiased) | tokens | per_sequence | a positive number: the loss's divisor."
        },
    )
    teacher_url: str | None = field(
        default=None,
        metadata={"help": "A teacher served by `python -m hybridlab.serve_teacher` (e.g. http://127.0.0.1:8000) "
                  "instead of teacher_model: its hidden states come over HTTP (README, 'Teacher on a server')."},
    )  # fmt: skip
    teacher_token_file: str | None = field(
        default=None, metadata={"help": "File holding the teacher server's bearer token (its --token-file)."}
    )
    teacher_timeout: float = field(
        default=60.0, metadata={"help": "Seconds per answer of the teacher server."}
    )
    teacher_retries: int = field(
        default=3, metadata={"help": "Retries (backoff 0.5 s, 1 s, 2 s, ...) before a teacher request fails."}
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when teacher_model is a path."}
    )
    teacher_floor: float | None = field(
        default=None,
        metadata={"help": "Clamp of the teacher's log-probs (None: an infinite KL is an error)."},
    )
    dense_backend: str = field(
        default="auto",
        metadata={
            "help": "auto | torch | triton | compiled (the dense KL kernel; compiled: torch.compile, "
            "compiles on its first call)."
        },
    )
    fused_linear: bool = field(
        default=False,
        metadata={"help": "Loss from hidden states and LM heads, no [B, T, V] logits on either side."},
    )
    fused_chunk: int = field(default=1024, metadata={"help": "Rows per chunk of the fused path."})
    teacher_prompt: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's own prompt: a template with {prompt} (and any dataset column, e.g. {answer}); "
            "the teacher scores the student's completion after it (context distillation). None: the student's."
        },
    )
    # -- weights over training, trust in the teacher, gating: hybridlab.train's recipe settings, with its defaults
    # and its help, what each optimises included (hybridlab.train.config.SCHEDULES); its beta is teacher_beta here
    lam_schedule: str = _engine("lam_schedule")
    lam_final: float | None = _engine("lam_final")
    teacher_beta_schedule: str = _engine(
        "beta_schedule", "hybridlab.train's beta_schedule, for teacher_beta: "
    )
    teacher_beta_final: float | None = _engine(
        "beta_final", "for teacher_beta (hybridlab.train's beta_final): "
    )
    switch_step: int = _engine("switch_step")
    plateau_window: int = _engine("plateau_window")
    plateau_tol: float = _engine("plateau_tol")
    teacher_trust: str = _engine(
        "teacher_trust", suffix=" Here the rates are not sampled: they are read from teacher_trust_rates."
    )
    teacher_trust_rates: str | None = _f(
        None, "JSON file of the teacher's success rates, estimated before training: hybridlab.train's "
        "teacher_trust.json ({'key', 'mean', 'rates': {prompt: rate}}) or a plain {prompt: rate}; the prompt is "
        "the dataset's prompt text (a conversational prompt: its last message's content); per_prompt needs every "
        "training and evaluation prompt. 'global' uses the file's 'mean', else the mean over the training rows.",
    )  # fmt: skip
    dense_gate: str = _engine("dense_gate")
    gate_reward: float = _engine("gate_reward")
    future_norm: str = _engine("future_norm")
    # GRPO defaults changed for an on-policy update
    disable_dropout: bool = field(
        default=True, metadata={"help": "Dropout makes the trained policy differ from the sampling policy."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=False, metadata={"help": "Must stay False: the hybrid update applies no importance weights."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.normalize = _parse_normalize(self.normalize)
        _check_hybrid_args(self)


def _parse_normalize(value):
    if isinstance(value, bool):
        raise ValueError(f"normalize must be one of {NORMALIZATIONS} or a positive number, got {value!r}")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str) and value in NORMALIZATIONS:
        return value
    else:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"normalize must be one of {NORMALIZATIONS} or a positive number, got {value!r}"
            ) from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"normalize as a number must be positive and finite, got {value!r}")
    return x


def _check_recipe_args(a: HybridGRPOConfig) -> None:
    """The recipe settings: names from hybridlab.train's lists, weights finite and >= 0, a schedule's needs."""
    for name, allowed in (("lam_schedule", get_args(WeightSchedule)), ("teacher_beta_schedule", get_args(WeightSchedule)),
                          ("teacher_trust", get_args(Trust)), ("dense_gate", get_args(Gate)),
                          ("future_norm", FUTURE_NORMS)):  # fmt: skip
        if getattr(a, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(a, name)!r}")
    for name in ("lam_final", "teacher_beta_final", "plateau_tol", "gate_reward"):
        v = getattr(a, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    for name in ("lam_final", "teacher_beta_final", "plateau_tol"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(a, name)!r}")
    if not (isinstance(a.switch_step, int) and a.switch_step >= 0):
        raise ValueError(f"switch_step must be an integer >= 0, got {a.switch_step!r}")
    if not (isinstance(a.plateau_window, int) and a.plateau_window > 0):
        raise ValueError(f"plateau_window must be a positive integer, got {a.plateau_window!r}")
    for w in ("lam", "teacher_beta"):
        kind = getattr(a, f"{w}_schedule")
        if kind == "switch" and not a.switch_step > 0:
            raise ValueError(f"{w}_schedule='switch' needs switch_step > 0 (the first step with {w}_final), got "
                             f"switch_step={a.switch_step}")  # fmt: skip
        if kind != "constant" and getattr(a, f"{w}_final") is None:
            raise ValueError(f"{w}_schedule={kind!r} needs {w}_final (the weight it goes to)")
    if a.teacher_trust != "none" and not a.teacher_trust_rates:
        raise ValueError(f"teacher_trust={a.teacher_trust!r} needs teacher_trust_rates (a JSON file of the "
                         "teacher's success rate per prompt, e.g. hybridlab.train's teacher_trust.json)")  # fmt: skip
    if a.teacher_trust == "none" and a.teacher_trust_rates:
        raise ValueError(f"teacher_trust_rates={a.teacher_trust_rates!r} is set but teacher_trust='none'")


def _check_hybrid_args(a: HybridGRPOConfig) -> None:
    """Raise ValueError naming the setting for anything the hybrid update cannot honour."""
    for name in ("lam", "teacher_beta"):
        v = getattr(a, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if a.beta != 0.0:
        if a.teacher_beta != 0.0:
            raise ValueError(
                f"beta={a.beta} and teacher_beta={a.teacher_beta} are both nonzero: GRPO's beta (a k3 KL to a frozen "
                "reference) is not part of the hybrid update, whose KL weight is teacher_beta. Set beta=0."
            )
        raise ValueError(
            f"beta={a.beta}: GRPO's reference KL is not part of the hybrid update. For a KL to a frozen reference, "
            "pass the reference model as teacher_model and set teacher_beta (and beta=0)."
        )
    _check_recipe_args(a)
    if a.future not in FUTURE_ESTIMATORS:
        raise ValueError(f"future must be one of {FUTURE_ESTIMATORS}, got {a.future!r}")
    if not (isinstance(a.gamma, (int, float)) and 0.0 <= a.gamma <= 1.0):
        raise ValueError(f"gamma must lie in [0, 1], got {a.gamma!r}")
    if a.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {a.baseline!r}")
    if a.dense_backend not in DENSE_BACKENDS:
        raise ValueError(f"dense_backend must be one of {DENSE_BACKENDS}, got {a.dense_backend!r}")
    if a.teacher_floor is not None and not (math.isfinite(a.teacher_floor) and a.teacher_floor < 0):
        raise ValueError(
            f"teacher_floor must be a finite negative log-probability or None, got {a.teacher_floor!r}"
        )
    if a.teacher_prompt is not None:
        fields = {f for _, f, _, _ in string.Formatter().parse(a.teacher_prompt) if f is not None}
        if "prompt" not in fields:
            raise ValueError(
                f"teacher_prompt must be a template containing {{prompt}} (and optionally dataset columns such as "
                f"{{answer}}), got {a.teacher_prompt!r}"
            )
    if a.teacher_url is not None and not str(a.teacher_url).startswith(("http://", "https://")):
        raise ValueError(f"teacher_url must be an http:// or https:// URL, got {a.teacher_url!r}")
    if a.teacher_token_file is not None and a.teacher_url is None:
        raise ValueError("teacher_token_file is set without teacher_url")
    if not (
        isinstance(a.teacher_timeout, (int, float))
        and math.isfinite(a.teacher_timeout)
        and a.teacher_timeout > 0
    ):
        raise ValueError(f"teacher_timeout must be a positive number of seconds, got {a.teacher_timeout!r}")
    if not (isinstance(a.teacher_retries, int) and a.teacher_retries >= 0):
        raise ValueError(f"teacher_retries must be an integer >= 0, got {a.teacher_retries!r}")
    if not (isinstance(a.fused_chunk, int) and a.fused_chunk > 0):
        raise ValueError(f"fused_chunk must be a positive integer, got {a.fused_chunk!r}")
    if not (a.temperature > 0 and math.isfinite(a.temperature)):
        raise ValueError(f"temperature must be positive and finite, got {a.temperature!r}")
    # on-policy: each generation batch is used for exactly one optimiser step, by the policy that sampled it
    if a.num_iterations != 1:
        raise ValueError(
            f"num_iterations={a.num_iterations}: the hybrid update is on-policy (its gradient is exact only for "
            "completions sampled from the current policy) and applies no importance correction; set num_iterations=1"
        )
    if a.steps_per_generation != a.gradient_accumulation_steps:
        raise ValueError(
            f"steps_per_generation={a.steps_per_generation} differs from gradient_accumulation_steps="
            f"{a.gradient_accumulation_steps} (generation_batch_size={a.generation_batch_size}): part of each "
            "generation batch would be trained on after an optimiser step, off-policy. Leave steps_per_generation "
            "and generation_batch_size unset"
        )
    if a.vllm_importance_sampling_correction:
        raise ValueError(
            "vllm_importance_sampling_correction=True: the hybrid update applies no importance-sampling weights; "
            "set it to False"
        )
    if a.off_policy_mask_threshold is not None:
        raise ValueError(
            f"off_policy_mask_threshold={a.off_policy_mask_threshold}: dropping sequences biases the hybrid "
            "gradient (and the update is on-policy); set it to None"
        )
    if a.top_entropy_quantile != 1.0:
        raise ValueError(
            f"top_entropy_quantile={a.top_entropy_quantile}: training only high-entropy tokens biases the hybrid "
            "gradient; set it to 1.0"
        )
    if a.entropy_coef != 0.0 or a.use_adaptive_entropy:
        raise ValueError(
            f"entropy_coef={a.entropy_coef}, use_adaptive_entropy={a.use_adaptive_entropy}: an entropy bonus "
            "changes the objective J; set entropy_coef=0 and use_adaptive_entropy=False"
        )
    if a.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation={a.multi_objective_aggregation!r}: the hybrid reward R is the weighted "
            "sum of the reward functions' raw values; use 'sum_then_normalize' (its normalisation is not used)"
        )
    sampling = {
        "top_p": a.top_p,
        "top_k": a.top_k,
        "min_p": a.min_p,
        "repetition_penalty": a.repetition_penalty,
    }
    extra = a.generation_kwargs if isinstance(a.generation_kwargs, dict) else {}
    sampling.update({k: v for k, v in extra.items() if k in _FILTER_KWARGS})
    for k, v in sampling.items():
        ok = _FILTER_KWARGS[k]
        if k == "temperature":
            if v != a.temperature:
                raise ValueError(
                    f"generation_kwargs temperature={v!r} differs from temperature={a.temperature!r}, the loss's; "
                    "set temperature only"
                )
        elif not any(v is x or (x is not None and v == x) for x in ok):
            raise ValueError(
                f"{k}={v!r}: completions must be sampled from softmax(logits / temperature), the distribution the "
                f"hybrid loss differentiates; a sampling filter, penalty, banned token or minimum length makes "
                f"them off-policy. Use the default ({ok[0]!r})"
            )
