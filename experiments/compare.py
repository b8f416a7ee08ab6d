"""The method comparison: 5 methods x seeds, same sample budget, one JSON of histories and a summary.

    python -m experiments.compare --task reverse --seeds 0 1 2 --steps 600     # -> runs/compare_reverse.json
    python -m experiments.compare --task reverse --seeds 0 1 2 --steps 600 --shipped   # the file in data/

Every method is a preset of the one training config (`hybridlab.train.PRESETS`) run by the one `Trainer`.
Every run starts from the same student checkpoint (`data/student_<task>`), distils toward the same (imperfect)
teacher (`data/teacher_<task>`) and draws `steps * batch_prompts * samples_per_prompt` responses — from the
student for the on-policy methods, from the teacher for "sft". The seed changes the prompt order and the
sampling. The JSON is rewritten (atomically) after every run, so a partial comparison can be read while it
runs. The targets (hybrid above dense-only on reward, below RL-only on KL, RL-only's final reward in half its
samples) are *measured* in `summary["targets"]`, not assumed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from experiments._runs import add_objective_args, parser, resolve_out, write_json
from hybridlab.tasks.toy import DATA_DIR, TASKS, make_splits
from hybridlab.train.config import METHODS

REPO = DATA_DIR.parent

#: Reward used for thresholds and targets: the eval reward of the student's own samples at the training tau.
REWARD_KEY = "eval_reward"


def comparison_config(task: str, method: str, seed: int, args: argparse.Namespace):
    """The `TrainConfig` of one (method, seed): the shared settings, then the method's preset on top."""
    from hybridlab.train import TrainConfig

    return TrainConfig.preset(
        method, reward=f"hybridlab.tasks.rewards:{task}", lam=args.lam, beta=args.beta, temperature=args.temperature,
        lr=args.lr, scheduler="constant", steps=args.steps, prompts_per_step=args.batch_prompts,
        samples_per_prompt=args.samples_per_prompt, max_new_tokens=TASKS[task].max_answer_len + 2,
        eval_every=args.eval_every, eval_count=args.eval_prompts, seed=seed, bf16=False, output_dir=None,
        progress=not args.no_progress,
    )  # fmt: skip


def run_one(task: str, method: str, seed: int, args: argparse.Namespace, splits: dict) -> dict:
    """Train one (method, seed) from the shipped student toward the shipped teacher; returns its record."""
    from dataclasses import asdict

    from hybridlab.tasks.models import load_model_dir
    from hybridlab.train import Trainer

    teacher, tok = load_model_dir(args.teacher)
    student, _ = load_model_dir(args.student)
    cfg = comparison_config(task, method, seed, args)
    trainer = Trainer(cfg, student=student, teacher=teacher, tokenizer=tok, prompts=splits["train"],
                      eval_prompts=splits["eval"])  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    return {"method": method, "seed": seed, "config": asdict(cfg), "wall_s": time.perf_counter() - t0,
            "history": trainer.history}  # fmt: skip


def samples_to_threshold(
    history: dict[str, list], threshold: float, key: str = "eval_greedy_acc"
) -> int | None:
    """Samples seen at the first evaluation where history[key] >= threshold (None if never)."""
    for s, v in zip(history["eval_samples"], history[key]):
        if v >= threshold:
            return int(s)
    return None


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: list[dict], threshold: float, final_window: int = 3) -> dict:
    """Per-method final reward / greedy accuracy / KL (mean and std over seeds), samples-to-threshold, targets.

    "final" values average the last `final_window` evaluations of a run (less eval noise than the last one).
    `samples_to_rl_final`: samples a run needed to first reach RL-only's final reward (mean over its seeds).
    """
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)

    def final(h: dict, key: str) -> float:
        return statistics.fmean(h[key][-final_window:])

    methods: dict[str, dict] = {}
    for m, rs in by.items():
        methods[m] = {
            "seeds": [r["seed"] for r in rs],
            "samples": rs[0]["history"]["samples"][-1] if rs[0]["history"].get("samples") else 0,
            "final_reward": _mean_std([final(r["history"], REWARD_KEY) for r in rs]),
            "final_greedy_acc": _mean_std([final(r["history"], "eval_greedy_acc") for r in rs]),
            "final_kl": _mean_std([final(r["history"], "eval_kl") for r in rs]),
            "samples_to_threshold": [samples_to_threshold(r["history"], threshold, REWARD_KEY) for r in rs],
        }
    out: dict = {
        "threshold": threshold,
        "reward_key": REWARD_KEY,
        "final_window": final_window,
        "methods": methods,
    }
    if "rl_only" in methods:
        rl_final = methods["rl_only"]["final_reward"]["mean"]
        rl_samples = methods["rl_only"]["samples"]
        for m, rs in by.items():
            methods[m]["samples_to_rl_final"] = [
                samples_to_threshold(r["history"], rl_final, REWARD_KEY) for r in rs
            ]
        out["rl_final_reward"] = rl_final
        if "hybrid" in methods:
            h, rl = methods["hybrid"], methods["rl_only"]
            reached = [s for s in h["samples_to_rl_final"] if s is not None]
            med = statistics.median(reached) if len(reached) == len(h["samples_to_rl_final"]) else None
            targets = {
                "hybrid_reward_above_dense_only": None,
                "hybrid_kl_below_rl_only": h["final_kl"]["mean"] < rl["final_kl"]["mean"],
                "hybrid_reaches_rl_final_with_half_samples": med is not None and med <= rl_samples / 2,
                "hybrid_samples_to_rl_final_median": med,
                "rl_only_samples": rl_samples,
            }
            if "dense_only" in methods:
                targets["hybrid_reward_above_dense_only"] = (
                    h["final_reward"]["mean"] > methods["dense_only"]["final_reward"]["mean"]
                )
            out["targets"] = targets
    return out


def tilted_optimum(success: list[float], lam: float, beta: float) -> dict[str, float]:
    """Reward and KL of the optimum pi* ∝ pi_T exp(lam R / beta) for an exact-match (0/1) reward.

    For a prompt where the teacher succeeds with probability p, with w = exp(lam / beta) and Z = p w + 1 - p:
    E_pi*[R] = p w / Z and KL(pi* || pi_T) = (lam / beta) E_pi*[R] - log Z. Averaged over `success` (one p per
    prompt). Only the sequence-level KL counts, so this is what any method optimising J exactly aims at.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 for the tilted optimum, got {beta}")
    if not success:
        raise ValueError("success must list at least one per-prompt success probability")
    w = math.exp(lam / beta)
    rew, kl = [], []
    for p in success:
        z = p * w + 1.0 - p
        rew.append(p * w / z)
        kl.append(lam / beta * rew[-1] - math.log(z))
    return {
        "reward": statistics.fmean(rew),
        "kl": statistics.fmean(kl),
        "teacher_reward": statistics.fmean(success),
    }


def teacher_success(
    teacher, tokenizer, task: str, prompts: list[str], samples: int, seed: int = 0
) -> list[float]:
    """Per-prompt success probability of the teacher at temperature 1, estimated from `samples` samples each."""
    from hybridlab.train.rollout import sample, seeded

    with seeded(seed):
        ro = sample(teacher, tokenizer, prompts, reward=f"hybridlab.tasks.rewards:{task}", temperature=1.0,
                    max_new_tokens=TASKS[task].max_answer_len + 2, samples=samples)  # fmt: skip
    return ro.rewards.reshape(len(prompts), samples).mean(1).tolist()


def learning_curves(runs: list[dict], key: str = REWARD_KEY) -> dict[str, dict[str, list[float]]]:
    """{method: {"samples", "mean", "std"}} of history[key] over seeds, at the shared evaluation points."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r["history"])
    out = {}
    for m, hs in by.items():
        n = min(len(h[key]) for h in hs)
        cols = [[h[key][i] for h in hs] for i in range(n)]
        out[m] = {
            "samples": hs[0]["eval_samples"][:n],
            "mean": [statistics.fmean(c) for c in cols],
            "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols],
        }
    return out


def format_table(summary: dict) -> str:
    """A markdown table of the summary (mean +- std over seeds)."""
    lines = [
        f"| method | final reward | final greedy acc | final KL to teacher | samples to reward >= {summary['threshold']:.2f} "
        "| samples to RL-only's final reward |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]

    def ms(d):
        return f"{d['mean']:.3f} ± {d['std']:.3f}"

    def ss(xs):
        return ", ".join("—" if x is None else f"{x:,}" for x in xs) if xs is not None else "n/a"

    for m in METHODS:
        if m not in summary["methods"]:
            continue
        d = summary["methods"][m]
        lines.append(
            f"| {m} | {ms(d['final_reward'])} | {ms(d['final_greedy_acc'])} | {ms(d['final_kl'])} "
            f"| {ss(d['samples_to_threshold'])} | {ss(d.get('samples_to_rl_final'))} |"
        )
    return "\n".join(lines)


def _rel(path: str) -> str:
    """A path relative to the repository when it lies inside it (results files do not record the machine)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("python -m experiments.compare", __doc__)
    ap.add_argument("--task", default="reverse", choices=sorted(TASKS), help="toy task (hybridlab.tasks.toy)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per method and seed")
    ap.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run"
    )
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    add_objective_args(ap)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also the loss's")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="responses per prompt")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per evaluation")
    ap.add_argument("--threshold", type=float, default=None,
                    help="reward threshold for samples-to-threshold (default: the teacher's sampled eval reward)")  # fmt: skip
    ap.add_argument("--teacher", default=None, help="teacher folder (default: data/teacher_<task>)")
    ap.add_argument("--student", default=None, help="student folder (default: data/student_<task>)")
    ap.add_argument("--out", default=None, help="results JSON (default: runs/compare_<task>.json)")
    ap.add_argument("--shipped", action="store_true",
                    help="write the shipped results file data/results/compare_<task>.json (regenerates tracked data)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    resolve_out(ap, args, shipped=DATA_DIR / "results" / f"compare_{args.task}.json",
                shipped_text="data/results/compare_<task>.json",
                default=str(Path("runs") / f"compare_{args.task}.json"), data_dir=DATA_DIR,
                regenerate="regenerate shipped results")  # fmt: skip
    args.teacher = args.teacher or str(DATA_DIR / f"teacher_{args.task}")
    args.student = args.student or str(DATA_DIR / f"student_{args.task}")
    for name in ("teacher", "student"):
        if not (Path(getattr(args, name)) / "model.safetensors").exists():
            ap.error(f"--{name} {getattr(args, name)!r} holds no model.safetensors")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from hybridlab.tasks.models import load_meta

    torch.set_num_threads(args.threads)
    tmeta, smeta = load_meta(args.teacher), load_meta(args.student)
    threshold = args.threshold if args.threshold is not None else tmeta.get("eval_sampled_reward", math.nan)
    splits = make_splits(
        args.task, tmeta.get("n_train", 3000), args.eval_prompts, seed=tmeta.get("data_seed", 0)
    )
    cmd = "python -m experiments.compare " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {
        "command": cmd,
        "task": args.task,
        "teacher": {
            k: tmeta.get(k) for k in ("eval_greedy_acc", "eval_sampled_reward", "arch", "size", "steps")
        },
        "student_init": {
            k: smeta.get(k) for k in ("eval_greedy_acc", "eval_sampled_reward", "arch", "size", "steps")
        },
        "args": {
            **vars(args),
            "teacher": _rel(args.teacher),
            "student": _rel(args.student),
            "out": _rel(args.out),
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "runs": [],
        "summary": None,
    }
    out = Path(args.out)
    t0 = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            rec = run_one(args.task, method, seed, args, splits)
            result["runs"].append(rec)
            result["summary"] = summarize(result["runs"], threshold)
            result["wall_s"] = time.perf_counter() - t0
            write_json(out, result)
            h = rec["history"]
            print(f"[{time.perf_counter() - t0:6.0f}s] {method:12s} seed {seed}: reward {h[REWARD_KEY][-1]:.3f} "
                  f"greedy {h['eval_greedy_acc'][-1]:.3f} kl {h['eval_kl'][-1]:.3f} ({rec['wall_s']:.0f}s)",
                  flush=True)  # fmt: skip
    print(format_table(result["summary"]))
    if result["summary"].get("targets"):
        print("targets:", json.dumps(result["summary"]["targets"], indent=1))
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
