"""`HybridGRPOConfig`: GRPO's config plus the hybrid objective's settings, and the checks that refuse what the
on-policy hybrid update cannot honour (each error names the setting). See `hybridlab.integrations.trl`."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

try:
    import trl
    from trl import GRPOConfig
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        'hybridlab.integrations.trl needs TRL: pip install "hybridlab[trl]" (trl>=1.16,<1.17)'
    ) from e

from packaging.version import Version

from ...hybrid import NORMALIZATIONS
from ...sparse import FUTURE_ESTIMATORS

TRL_SUPPORTED = (">=1.16", "<1.17")
if not Version("1.16") <= Version(Version(trl.__version__).base_version) < Version("1.17"):
    raise ImportError(
        f"hybridlab.integrations.trl supports trl>=1.16,<1.17 (it overrides GRPOTrainer internals that change "
        f"between releases); found trl {trl.__version__}"
    )

BASELINES = ("none", "reward_group", "return_group")
DENSE_BACKENDS = ("auto", "torch", "triton")
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
        default="auto", metadata={"help": "auto | torch | triton (the dense KL kernel)."}
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
