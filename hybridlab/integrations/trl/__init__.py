"""hybridlab inside TRL: GRPO's data, generation and scale with the hybrid imitation + RL update.

    from hybridlab.integrations.trl import HybridGRPOConfig, HybridGRPOTrainer

    args = HybridGRPOConfig(output_dir="runs/hybrid", lam=1.0, teacher_beta=0.5, num_generations=4)
    HybridGRPOTrainer(model=student, teacher_model=teacher, reward_funcs=my_reward, args=args,
                      train_dataset=dataset, processing_class=tokenizer).train()

`HybridGRPOTrainer` is TRL's `GRPOTrainer` (supported range: trl>=1.16,<1.17) with the update replaced. Everything
else is GRPO's: datasets and chat templates, `reward_funcs` and `reward_weights`, `num_generations` groups,
generation with transformers or vLLM (`use_vllm`, colocate and server modes), logging, checkpoints and accelerate
(DDP / FSDP / DeepSpeed). The update maximises

    J(theta) = E_x E_{y ~ pi_theta} [ lam R(x, y) ] - teacher_beta KL(pi_theta || pi_teacher)

with R the weighted sum of the reward functions (GRPO's `reward_weights`), through `hybridlab.hybrid_loss` (or
`fused_hybrid_loss` with `fused_linear=True`): the dense full-vocabulary KL gradient at every visited state plus
the score-function term with return `lam R - teacher_beta * future KL - b(s_t)`. The student's softmax is taken at
GRPO's `temperature`, the one the completions were sampled at; the teacher is taken at temperature 1.

What changes against GRPO, and why:
- `_generate_and_score_completions` also stores the raw reward R (not GRPO's group-normalised advantage), the
  loss mask, the *global* numbers of sequences and tokens of the accumulation window, and, for the group
  baselines, the baseline b(s_t): groups are GRPO's `num_generations` completions of one prompt, which may sit on
  different processes, so the baseline is computed on the gathered batch ("return_group" needs the per-token
  future KL of every group member: one extra no-grad forward of student and teacher per generation batch).
- `compute_loss` runs the student and teacher forwards and the hybrid loss inside the DDP/FSDP wrapper's forward
  (as TRL's own `DistillationTrainer` does) and weights sequence b by c_b * P, with c_b from the global counts
  (normalize="sequences": 1 / B_global) and P processes, so that after DDP's average the gradient is the
  gradient of the global batch's loss, whatever the split into processes and accumulation steps. B_global and
  the token count are those of the *kept* sequences, as in `hybridlab.train`: completions no reward function
  scores, and with `mask_truncated_completions` those that hit `max_completion_length`, leave the loss and the
  counts (and the `hybrid/teacher_kl` metric, a mean over kept sequences).
- Sampling reads no defaults from the student's folder: transformers would fill GRPO's unset generation fields
  from the model's `generation_config.json` (`no_repeat_ngram_size`, `min_new_tokens`, `suppress_tokens`, ...);
  the adapter hands the model a bare config for the call, as `hybridlab.train` does.
- `teacher_prompt` (a template with {prompt} and dataset columns, e.g. worked examples or {answer}): the teacher
  scores the student's completion after its own prefix (context distillation); the student's prompt by default.
- The training forwards number positions from each row's first real token, as `generate` and vLLM do on
  left-padded prompts (GRPO's own forward counts the padding: harmless for rotary models up to rounding, a
  different distribution for absolute-position ones).
- On-policy only: one optimiser step per generation batch, no importance-sampling corrections. `num_iterations
  > 1`, `steps_per_generation != gradient_accumulation_steps` and `vllm_importance_sampling_correction=True` are
  refused. Sampling filters that change the distribution away from softmax(z / temperature) (top_p, top_k,
  min_p, repetition_penalty, and in `generation_kwargs` also penalties, banned or suppressed tokens, minimum
  lengths, forced tokens) are refused, naming the setting: the loss would differentiate a policy that did not
  sample the data.
- GRPO's `beta` (a KL to a frozen reference, estimated by k3) is not part of this update and must stay 0. A KL to
  a frozen reference is this objective with the reference as the teacher.
- GRPO's surrogate settings (`loss_type`, `epsilon`, `delta`, `scale_rewards`, `importance_sampling_level`) have
  no effect: on-policy with one iteration the clipped ratio is 1 and the update is hybridlab's. Entropy bonuses,
  entropy masks and off-policy masks change the objective and are refused. A mixture-of-experts router
  auxiliary loss is not added. The completions table's "advantage" column is still GRPO's normalised reward.

What stays GRPO's and differs from `hybridlab.train`: reward functions receive the completions decoded with
`skip_special_tokens=True` (a special token sampled inside a completion is invisible to them, though it is
trained on; `completion_ids` holds the exact tokens), and a batch whose rewards are all None / NaN trains
nothing, teacher term included (a RuntimeWarning says so).

Not run here (CPU only): vLLM generation, GPUs, FSDP and DeepSpeed. With vLLM the sampler's numerics differ
slightly from the training forward's (bf16 kernels); no correction is applied for that. vLLM is handed GRPO's
explicit sampling parameters; whether a vLLM version also applies the model folder's generation_config.json is
not checked here (vLLM's own `generation_config` engine setting decides it).
"""

from __future__ import annotations

from typing import Any

from .config import TRL_SUPPORTED, HybridGRPOConfig
from .trainer import HybridGRPOTrainer, model_inputs


def _demo(argv: list[str] | None = None) -> dict[str, Any]:
    """A few steps on tiny random models built here (no download); see examples/trl_tiny.py."""
    import argparse
    import runpy
    from pathlib import Path

    p = argparse.ArgumentParser(
        prog="python -m hybridlab.integrations.trl", description=__doc__.splitlines()[0]
    )
    p.add_argument("--demo", action="store_true", help="run examples/trl_tiny.py's tiny CPU example")
    p.parse_args(argv)
    script = Path(__file__).resolve().parents[3] / "examples" / "trl_tiny.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found (the demo lives in the repository's examples/ folder)")
    return runpy.run_path(str(script), run_name="__main__")


__all__ = ["HybridGRPOConfig", "HybridGRPOTrainer", "TRL_SUPPORTED", "model_inputs"]
