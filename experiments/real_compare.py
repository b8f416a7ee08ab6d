"""Dense-only (on-policy distillation), RL-only and hybrid on SmolLM2-135M-Instruct at equal samples.

    make real-model
    python -m experiments.real_compare                         # all three, in parallel, resumable
    python -m experiments.real_compare --collect               # only (re)write the results JSON

Each method is one training run of `configs/real_cpu.yaml` with the method's preset on top (it overrides the YAML's
hybrid settings), in its own process, in `runs/real_compare/<method>`, resumed: a finished run is skipped, an
interrupted one continues from its last checkpoint. Every run appends its metrics to
`metrics.jsonl` after each step; the results JSON (curves, final table, sizes, seed, wall time, machine; never
weights) is rewritten from those files every minute while the runs go on, and once more when they end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hybridlab.train.config import PRESETS, load_config

METHODS = ("dense_only", "rl_only", "hybrid")
ROOT = Path(__file__).resolve().parents[1]
CURVE_KEYS = ("step", "samples", "reward", "kl", "eos_frac", "resp_len", "grad_norm", "step_s")
EVAL_KEYS = ("eval_step", "eval_samples", "eval_greedy_acc", "eval_reward", "eval_kl", "eval_resp_len")


def method_config(config: str, method: str, runs_dir: Path, **changes):
    """The YAML's config with the method's preset on top, in runs_dir/method."""
    if method not in PRESETS:
        raise ValueError(f"method must be one of {list(PRESETS)}, got {method!r}")
    cfg = load_config(config)
    return cfg.replace(**{**changes, **PRESETS[method], "output_dir": str(runs_dir / method)}).validate()


def train_one(config: str, method: str, runs_dir: Path, **changes) -> dict:
    """One method's run (resumed when it has a checkpoint, skipped when complete); the evaluation before the
    first step goes to initial_eval.json (metrics.jsonl has one row per step)."""
    from hybridlab.train import Trainer

    cfg = method_config(config, method, runs_dir, **changes)
    tr = Trainer(cfg)
    tr.resume()
    if tr.step >= cfg.steps:
        return {"steps": tr.step, "complete": True}
    first = runs_dir / method / "initial_eval.json"
    if tr.step == 0 and cfg.eval_every > 0 and tr.eval_rows:
        if tr.history.get("eval_step"):
            tr.history = {}
        e = tr.evaluate()
        tr._record(e)
        first.parent.mkdir(parents=True, exist_ok=True)
        first.write_text(json.dumps(e) + "\n")
    return tr.train()


def run_command(config: str, method: str, runs_dir: Path, changes: dict | None = None) -> list[str]:
    extra = [x for k, v in (changes or {}).items() for x in (f"--{k}", str(v))]
    return [sys.executable, "-m", "experiments.real_compare", "--config", config,
            "--runs-dir", str(runs_dir), "--one", method, *extra]  # fmt: skip


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return rows


def wilson(k: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a proportion k / n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def summarise(rows: list[dict], initial_eval: dict | None, responses_per_step: int, n_eval: int,
              last: int = 5) -> dict:  # fmt: skip
    """Curves and the final row of one method from its metrics rows."""
    curves = {k: [r.get(k) for r in rows] for k in CURVE_KEYS}
    evals = ([initial_eval] if initial_eval else []) + [r for r in rows if "eval_step" in r]
    ev = {k: [e[k] for e in evals] for k in EVAL_KEYS}
    out = {"curves": curves, "eval": ev, "steps_done": len(rows)}
    if rows:
        tail = rows[-last:]
        n = responses_per_step * len(tail)
        k = sum(r["reward"] for r in tail) * responses_per_step
        out["final"] = {
            f"reward_last{last}": k / n, f"reward_last{last}_ci95": wilson(k, n),
            f"kl_last{last}": sum(r["kl"] for r in tail) / len(tail),
        }  # fmt: skip
    if evals:
        e = evals[-1]
        out.setdefault("final", {}).update(
            eval_step=e["eval_step"], eval_greedy_acc=e["eval_greedy_acc"],
            eval_greedy_acc_ci95=wilson(e["eval_greedy_acc"] * n_eval, n_eval), eval_reward=e["eval_reward"],
            eval_reward_ci95=wilson(e["eval_reward"] * n_eval, n_eval), eval_kl=e["eval_kl"],
        )  # fmt: skip
    return out


def initial_eval_of(run_dir: Path) -> dict | None:
    """The evaluation before the first step (kept in the run's history, not in metrics.jsonl)."""
    p = run_dir / "initial_eval.json"
    return json.loads(p.read_text()) if p.is_file() else None


def collect(config: str, runs_dir: Path, out: Path | None, methods=METHODS, wall: dict | None = None,
            started: float | None = None, changes: dict | None = None,
            other_seeds: dict[int, tuple[Path, dict]] | None = None) -> dict:  # fmt: skip
    """Rewrite the results JSON from the runs' metrics files (`out` None: only return it); `started` (a Unix
    time): the runs' launch, so each run's wall time is its last metrics write minus it; `changes`: the config
    overrides the runs were started with (seed, steps); `other_seeds`: {seed: (runs_dir, changes)} of shorter
    repeats, summarised under "other_seeds"."""
    cfg = load_config(config).replace(**(changes or {}))
    ev = Path(cfg.eval_prompts)
    n_eval = sum(
        1 for line in (ev if ev.is_absolute() else ROOT / ev).read_text().splitlines() if line.strip()
    )
    if cfg.eval_count:
        n_eval = min(n_eval, cfg.eval_count)
    per_step = cfg.prompts_per_step * cfg.samples_per_prompt
    probe = json.loads((ROOT / "data/results/real_model_probe.json").read_text())["add1_equation_2shot"]
    res = {
        "_about": "SmolLM2-135M-Instruct, single-digit addition answered as an equation in the chat template; "
        "teacher = the same weights with 2 worked examples as earlier chat turns. Written by "
        "experiments.real_compare from runs/real_compare/<method>/metrics.jsonl. reward: exact match of "
        "the training samples (T=1); kl: sequence KL(student || teacher) of the training samples (analytic, "
        "summed over tokens); eval_greedy_acc / eval_reward / eval_kl: greedy accuracy, sampled (T=1) accuracy "
        f"and sequence KL on the {n_eval} eval prompts; *_ci95: 95% Wilson intervals over the samples behind "
        "them (one seed: they do not cover seed-to-seed variation).",
        "config": config, "seed": cfg.seed, "steps": cfg.steps, "prompts_per_step": cfg.prompts_per_step,
        "samples_per_prompt": cfg.samples_per_prompt, "responses_per_step": per_step,
        "max_new_tokens": cfg.max_new_tokens, "lr": cfg.lr, "beta": cfg.beta, "lam": cfg.lam,
        "eval_every": cfg.eval_every, "n_eval": n_eval, "cpu_threads": cfg.cpu_threads,
        "methods": {m: dict(PRESETS[m]) for m in methods},
        "teacher_before": {"sampled_exact": probe["teacher"]["sampled_exact"],
                           "greedy_exact": probe["teacher"]["greedy_exact"]},
        "student_before": {"sampled_exact": probe["student"]["sampled_exact"],
                           "greedy_exact": probe["student"]["greedy_exact"]},
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "note": "shared 2-core machine, other jobs running; "
                    "the three runs in parallel, one thread each"},
        "results": {},
    }  # fmt: skip
    metrics = {m: read_metrics(runs_dir / m / "metrics.jsonl") for m in methods}
    # equal samples: while the runs go on (or after an interruption), compare them at the step all have reached
    common = min(len(rows) for rows in metrics.values())
    res["compared_at_step"] = common
    for m, rows in metrics.items():
        r = summarise(rows[:common], initial_eval_of(runs_dir / m), per_step, n_eval)
        r["steps_run"] = len(rows)
        r["complete"] = len(rows) >= cfg.steps
        r["train_s"] = sum(x.get("step_s", 0.0) for x in rows)
        mfile = runs_dir / m / "metrics.jsonl"
        if started is not None and mfile.is_file():
            r["wall_s"] = round(mfile.stat().st_mtime - started, 1)
        res["results"][m] = r
    if wall:
        res["wall_s"] = wall
    res["complete"] = all(r["complete"] for r in res["results"].values())
    for seed, (d, ch) in (other_seeds or {}).items():
        if all((d / m / "metrics.jsonl").is_file() for m in methods):
            o = collect(config, d, None, methods, changes=ch)
            res.setdefault("other_seeds", {})[str(seed)] = {
                k: o[k] for k in ("seed", "steps", "compared_at_step", "complete", "results")
            }
    if out is None:
        return res
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.real_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", default="configs/real_cpu.yaml")
    ap.add_argument("--runs-dir", default="runs/real_compare")
    ap.add_argument("--out", default="data/results/real_model_compare.json")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(PRESETS))
    ap.add_argument(
        "--sequential", action="store_true", help="one run after the other (default: in parallel)"
    )
    ap.add_argument("--collect", action="store_true", help="only rewrite the results JSON from the runs")
    ap.add_argument("--one", choices=list(PRESETS), help="run one method in this process")
    ap.add_argument(
        "--started", type=float, default=None, help="with --collect: the runs' launch (Unix time)"
    )
    ap.add_argument("--seed", type=int, default=None, help="another seed than the config's")
    ap.add_argument(
        "--steps", type=int, default=None, help="other steps than the config's (a shorter repeat)"
    )
    ap.add_argument("--other-seed", nargs=3, action="append", default=[], metavar=("SEED", "STEPS", "RUNS_DIR"),
                    help="with --collect: add a shorter repeat's runs to the results JSON")  # fmt: skip
    a = ap.parse_args(argv)
    runs, out = Path(a.runs_dir), Path(a.out)
    changes = {k: v for k, v in (("seed", a.seed), ("steps", a.steps)) if v is not None}
    others = {int(sd): (Path(d), {"seed": int(sd), "steps": int(st)}) for sd, st, d in a.other_seed}
    if a.one:
        import logging

        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        return train_one(a.config, a.one, runs, **changes)
    if a.collect:
        return collect(a.config, runs, out, a.methods, started=a.started, changes=changes, other_seeds=others)
    if not Path(load_config(a.config).student).is_dir():
        raise SystemExit(f"no model folder {load_config(a.config).student!r}: run `make real-model` first")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0, wall, procs = time.time(), {}, {}
    groups = [[m] for m in a.methods] if a.sequential else [list(a.methods)]
    for group in groups:
        for m in group:
            (runs / m).mkdir(parents=True, exist_ok=True)
            log = open(runs / m / "train.log", "a")
            procs[m] = (subprocess.Popen(run_command(a.config, m, runs, changes), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT), time.time())  # fmt: skip
        while any(procs[m][0].poll() is None for m in group):
            time.sleep(60)
            collect(a.config, runs, out, a.methods, wall, t0, changes)
            for m in group:
                if procs[m][0].poll() is not None and m not in wall:
                    wall[m] = round(time.time() - procs[m][1], 1)
        for m in group:
            wall.setdefault(m, round(time.time() - procs[m][1], 1))
            if procs[m][0].returncode:
                print(
                    f"{m}: exit code {procs[m][0].returncode}, see {runs / m / 'train.log'}", file=sys.stderr
                )
    wall["total"] = round(time.time() - t0, 1)
    res = collect(a.config, runs, out, a.methods, wall, t0, changes)
    print(json.dumps({m: r.get("final") for m, r in res["results"].items()}, indent=1))
    return res


if __name__ == "__main__":
    main()
