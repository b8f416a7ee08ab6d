"""Train a small task model by supervised learning and save it as a safetensors checkpoint with TRAINING.md.

    python -m experiments.train_teacher --task reverse --target-acc 0.6        # -> runs/teacher_reverse
    python -m experiments.train_teacher --task reverse --target-acc 0.6 --shipped   # data/teacher_reverse

Imperfect teachers, on purpose (so that the task reward carries information the teacher lacks):
    --target-acc A   stop at the first evaluation whose greedy eval accuracy reaches A (early stopping);
    --corrupt P      train on answers where a fraction P has one character replaced by a wrong digit
                     (fixed per example from the seed): the teacher learns a noisy task.
The same script with a small target also makes a weak *student* initialisation.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

from experiments._runs import parser, resolve_out
from hybridlab.tasks.toy import DATA_DIR, TASKS, make_splits


def corrupt_answers(rows: list[dict[str, str]], fraction: float, seed: int) -> list[dict[str, str]]:
    """Copy of `rows` where a `fraction` of answers has one character replaced by a different digit."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corrupt fraction must lie in [0, 1], got {fraction}")
    rng = random.Random(f"corrupt:{seed}")
    out = []
    for r in rows:
        a = r["answer"]
        if rng.random() < fraction:
            i = rng.randrange(len(a))
            a = a[:i] + rng.choice([d for d in "0123456789" if d != a[i]]) + a[i + 1 :]
        out.append({"prompt": r["prompt"], "answer": a})
    return out


def evaluate(model, tokenizer, task: str, rows, max_new_tokens: int, seed: int) -> dict[str, float]:
    """Greedy exact-match accuracy and sampled (tau = 1) exact-match reward on `rows`."""
    from hybridlab.train.rollout import sample, seeded

    model.eval()
    kw = {"reward": f"hybridlab.tasks.rewards:{task}", "max_new_tokens": max_new_tokens}
    greedy = sample(model, tokenizer, rows, greedy=True, **kw)
    with seeded(seed):
        sampled = sample(model, tokenizer, rows, temperature=1.0, **kw)
    return {"greedy_acc": float(greedy.rewards.mean()), "sampled_reward": float(sampled.rewards.mean())}


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("python -m experiments.train_teacher", __doc__)
    ap.add_argument("--task", default="reverse", choices=sorted(TASKS), help="toy task (hybridlab.tasks.toy)")
    ap.add_argument("--out", default=None, help="checkpoint folder (default: runs/<role>_<task>)")
    ap.add_argument("--shipped", action="store_true",
                    help="write the shipped checkpoint data/<role>_<task> (regenerates tracked data)")  # fmt: skip
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2"], help="model architecture")
    ap.add_argument(
        "--size",
        default="small",
        choices=["tiny", "small", "base"],
        help="model size (hybridlab.tasks.models.SIZES)",
    )
    ap.add_argument("--steps", type=int, default=3000, help="maximum optimiser steps")
    ap.add_argument("--batch", type=int, default=64, help="examples per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    ap.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and corruption")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the task splits in data/tasks")
    ap.add_argument("--n-train", type=int, default=3000, help="training examples")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out evaluation prompts")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    ap.add_argument("--target-acc", type=float, default=None, help="early stop at this greedy eval accuracy")
    ap.add_argument("--corrupt", type=float, default=0.0, help="fraction of training answers corrupted")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--role", default="teacher", help="what the checkpoint is for (written to TRAINING.md)")
    args = ap.parse_args(argv)
    name = f"{args.role}_{args.task}"
    resolve_out(ap, args, shipped=DATA_DIR / name, shipped_text="data/<role>_<task>",
                default=str(Path("runs") / name), data_dir=DATA_DIR)  # fmt: skip
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from hybridlab.tasks.models import build_model, build_tokenizer, count_parameters, save_model_dir
    from hybridlab.train.policy import sft_loss
    from hybridlab.train.rollout import response_logits, teacher_forcing_rollout

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    splits = make_splits(args.task, args.n_train, args.n_eval, seed=args.data_seed)
    train = corrupt_answers(splits["train"], args.corrupt, args.seed) if args.corrupt else splits["train"]
    tok = build_tokenizer()
    model = build_model(args.arch, args.size, vocab_size=len(tok), seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    max_new = TASKS[args.task].max_answer_len + 2
    rng = random.Random(args.seed)
    curve = []
    step = 0
    stopped = "max steps"
    while step < args.steps:
        batch = rng.sample(train, args.batch)
        ro = teacher_forcing_rollout(
            tok, batch, [r["answer"] for r in batch], reward=f"hybridlab.tasks.rewards:{args.task}"
        )
        model.train()
        logits = response_logits(model, ro)
        loss = sft_loss(logits, ro.actions, ro.mask) / ro.mask.sum(1).float().mean()  # per-token mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, tok, args.task, splits["eval"], max_new, seed=args.seed)
            curve.append({"step": step, "loss": float(loss.detach()), **ev})
            print(f"step {step:5d}  loss {float(loss.detach()):.4f}  greedy_acc {ev['greedy_acc']:.3f}  "
                  f"sampled {ev['sampled_reward']:.3f}  {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
            if args.target_acc is not None and ev["greedy_acc"] >= args.target_acc:
                stopped = (
                    f"early stop: greedy eval accuracy {ev['greedy_acc']:.3f} >= target {args.target_acc}"
                )
                break
    wall = time.perf_counter() - t0
    final = curve[-1]
    cmd = "python -m experiments.train_teacher " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    meta = {
        "role": args.role,
        "task": args.task,
        "arch": args.arch,
        "size": args.size,
        "parameters": count_parameters(model),
        "seed": args.seed,
        "data_seed": args.data_seed,
        "n_train": args.n_train,
        "steps": step,
        "stopped": stopped,
        "corrupt": args.corrupt,
        "target_acc": args.target_acc,
        "eval_prompts": len(splits["eval"]),
        "eval_greedy_acc": final["greedy_acc"],
        "eval_sampled_reward": final["sampled_reward"],
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "command": cmd,
        "curve": curve,
    }
    out = save_model_dir(model, tok, args.out, meta)
    write_training_md(Path(out), meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "curve"}, indent=1))
    return meta


def write_training_md(out: Path, meta: dict) -> None:
    imperfect = []
    if meta["target_acc"] is not None:
        imperfect.append(f"early stopping at greedy eval accuracy >= {meta['target_acc']}")
    if meta["corrupt"]:
        imperfect.append(f"{meta['corrupt']:.0%} of training answers corrupted (one wrong digit)")
    rows = "\n".join(
        f"| {c['step']} | {c['loss']:.4f} | {c['greedy_acc']:.3f} | {c['sampled_reward']:.3f} |"
        for c in meta["curve"]
    )
    text = f"""# {meta["role"]} for `{meta["task"]}`

Trained by the repository's script (CPU, {meta["threads"]} thread, torch {meta["torch"]}):

```
{meta["command"]}
```

- model: `{meta["arch"]}` size `{meta["size"]}`, {meta["parameters"]:,} parameters, fp32 safetensors
- seed {meta["seed"]}; task splits `data/tasks/{meta["task"]}_s{meta["data_seed"]}_{{train,eval}}.jsonl`
- steps: {meta["steps"]} ({meta["stopped"]}); wall time {meta["wall_s"]} s
- imperfect on purpose: {"; ".join(imperfect) if imperfect else "no (trained to the step budget)"}
- **eval accuracy** on the {meta["eval_prompts"]} held-out prompts: greedy exact match
  **{meta["eval_greedy_acc"]:.3f}**, sampled at temperature 1: {meta["eval_sampled_reward"]:.3f}

`meta.json` beside this file holds the same numbers (tests and the notebook check them).

| step | loss | greedy acc | sampled reward |
| ---: | ---: | ---: | ---: |
{rows}
"""
    (out / "TRAINING.md").write_text(text)


if __name__ == "__main__":
    main()
