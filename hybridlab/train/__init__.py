"""Hybrid imitation + RL fine-tuning of any Hugging Face causal LM: one `Trainer`, one `TrainConfig`.

    python -m hybridlab.train --config configs/tiny_cpu.yaml [--key value ...] [--resume]
    accelerate launch --config_file configs/accelerate_ddp.yaml -m hybridlab.train --config configs/NAME.yaml

In a notebook: `Trainer(TrainConfig.preset("hybrid", ...), student=..., teacher=..., tokenizer=..., prompts=...)`.

One step:

    prompts (this process's share of `prompts_per_step`, shuffled epochs from `seed`)
      -> rollouts (`rollout.rollout`): full-vocabulary samples at temperature tau from the student, each prompt
         `samples_per_prompt` times (contiguous groups); mask = response tokens up to and including EOS; the
         reward sees the exact text sampled before EOS
      -> student (with grad) and teacher (no grad) forwards on prompt + response (the teacher after its own
         prompt if `teacher_prompt` is set), row t <-> response token t
      -> `hybrid_loss` on materialised logits, or `fused_hybrid_loss` on hidden states + LM heads (fused_linear)
         (loss="sft" / "opd_sampled": the compared methods' losses)
      -> backward per micro-batch (gradient sync on the last), clip, AdamW, LR schedule
      -> metrics JSONL / history / progress bar / TensorBoard; atomic checkpoints every `checkpoint_every` steps,
         at the end, and on an error or Ctrl-C (the finished steps, the data order rewound before the failed one)

Normalisation across processes and micro-batches. The loss of the global batch is L = sum_b c_b l_b with c_b
from the *global* batch (normalize="sequences": c_b = 1 / B_global; "tokens": 1 / tokens_global;
"per_sequence": 1 / (B_global |y_b|); a number K: 1 / K; c_b = 0 for responses left out by
mask_truncated_completions, which then also leave the counts). Each process backpropagates P * sum_{b in its
share} c_b l_b (P processes); DDP averages gradients over processes, so the update is the gradient of L, exactly
the single-process one (tests/test_distributed.py checks it with 2 gloo processes).

Sampling randomness is a pure function of (seed, step, process index), and the data order of (seed, prompts
consumed), so `--resume` reproduces an uninterrupted run exactly (tests/test_train.py).

Precision: on CUDA with bf16=true the student keeps fp32 master weights under bf16 autocast (accelerate's mixed
precision) and the teacher is loaded in bf16; on CPU everything runs in fp32.

Modules: `config` (TrainConfig, presets, parsing), `data` (prompts, order), `loading` (models and their checks),
`rollout` (sampling, masks, rewards, teacher inputs), `policy` (the student's forward and the losses), `loop`
(Trainer, run), `checkpoint` (atomic checkpoints, resume, summary). Only `config` loads without torch.
"""

from __future__ import annotations

from .config import METHODS, PRESETS, TrainConfig, load_config, parse_args

_LAZY = {
    "Trainer": "loop", "run": "loop", "make_scheduler": "loop", "make_accelerator": "loop",
    "Rollout": "rollout", "rollout": "rollout", "sample": "rollout", "response_logits": "rollout",
    "response_mask": "rollout", "teacher_forcing_rollout": "rollout", "seeded": "rollout",
    "sft_loss": "policy", "sampled_opd_loss": "policy", "PolicyModel": "policy",
    "load_prompts": "data", "PromptOrder": "data", "step_seed": "data",
    "format_summary": "checkpoint", "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint", "make_deterministic": "loading",
}  # fmt: skip


def __getattr__(name: str):  # torch and transformers load on first use, not at `import hybridlab.train`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> dict:
    """The command line: parse and validate first (fast), then load and train; returns the summary."""
    import logging
    import warnings

    cfg, ns = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    from .loop import run

    return run(cfg, resume=ns.resume)[1]


def cli(argv: list[str] | None = None) -> int:
    """`main` with the errors a user can fix (bad config, paths, vocabularies, a full disk) as one line on
    stderr instead of a traceback; returns the exit status (0, 2 for such an error, 130 for Ctrl-C)."""
    import sys

    try:
        main(argv)
    except (ValueError, OSError) as e:
        kind = "" if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: "
        print(f"hybridlab.train: error: {kind}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer has said where it saved
        print("hybridlab.train: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["METHODS", "PRESETS", "TrainConfig", "cli", "load_config", "main", "parse_args", *_LAZY]
