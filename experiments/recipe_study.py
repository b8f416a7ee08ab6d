"""When does the hybrid win? Nine training rules x three teacher strengths x three seeds on the `reverse` toy.

    python -m experiments.recipe_study                      # -> runs/recipe_study/ and data/results/recipe_study.json
    python -m experiments.recipe_study --seeds 0 --steps 20 --out runs/recipe_smoke.json    # a quick look

Hypothesis (stated before the runs; the results file says whether it held):
  With lam = 3, beta = 1 and the sweep's budget (300 updates x 16 prompts x 4 samples = 19,200 student samples):
  1. the exact hybrid (dense + sparse with the analytic future KL) takes the short-answer shortcut with the medium
     and strong teachers: its evaluation responses shorten within ~60 updates (dense-only's do not) and it ends
     near RL-only, below dense-only with the strong teacher;
  2. the myopic hybrid (future KL dropped) keeps the length and beats dense-only with the strong teacher, but not
     RL-only with the weak one, where beta = 1 makes it imitate a teacher worse than what RL reaches;
  3. trusting the teacher as much as it is right (beta_x = beta p_T(x), p_T from 8 teacher samples per prompt
     drawn before training, myopic) ends above max(dense-only, RL-only) at every strength, by more than one
     standard deviation; the global version (beta x the mean rate) does about as well;
  4. no rule reaches RL-only's final reward with <= 1/4 of RL-only's samples with the strong teacher (the
     exploratory median was 40%);
  5. sequential (distil for 100 updates, then RL), a linear beta anneal and the reward-gated dense term (KDRL) do
     not beat the better part at every strength.

Setup. Student: the shipped `data/student_reverse`. Teachers: the three shipped early stops of one supervised run
in `data/teachers_reverse/{weak,medium,strong}` (loaded, not regenerated: regeneration is not bit-reproducible,
see the README there). Every run uses the one `Trainer` with the settings of `hybridlab.train.TrainConfig`
(method table `RULES` below), AdamW 3e-4 constant, one CPU thread, evaluation every 10 updates on 200 held-out
prompts (one sample each at temperature 1, plus greedy), and a final evaluation with 8 samples per prompt.
"final" = the mean of the last 5 evaluations (updates 260-300, the window the sweep's last 3 evaluations
covered). RL-only never reads the teacher: it runs once per seed; its KL is measured against each teacher on the
same evaluation samples. The teacher's success rates (teacher trust) cost 8 teacher samples per training prompt
(24,000 per teacher), drawn once per teacher and cached in the work folder; they are not counted in the budget.

Resumable: each run's JSON (`<work>/runs/`) is written when the run finishes and skipped when it exists; the
results file is rewritten atomically after every run, "partial": true until all runs are in. Runs are ordered so
the most informative finish first: every seed and teacher of dense-only, RL-only, trust per prompt, myopic and
exact hybrid, then the other rules.
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

from experiments._runs import add_objective_args, parser, progress, resumable_runs, write_json

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
TEACHERS = ("weak", "medium", "strong")
TASK = "reverse"
REWARD = "hybridlab.tasks.rewards:reverse"

#: rule -> (preset, settings on top of the shared ones). Myopic = future KL dropped, baseline on the reward.
MYOPIC = {"future": "none", "baseline": "reward_group"}
RULES: dict[str, tuple[str, dict]] = {
    "dense_only": ("dense_only", {}),
    "rl_only": ("rl_only", {}),
    "trust_per_prompt": ("hybrid_trust", {}),
    "myopic_hybrid": ("hybrid", MYOPIC),
    "exact_hybrid": ("hybrid", {}),
    # distil (lam 0, beta 1) for the first third of the run, then RL (lam 3, beta 0)
    "sequential": (
        "hybrid",
        {
            **MYOPIC,
            "lam_schedule": "switch",
            "lam_final": "LAM",
            "lam": 0.0,
            "beta_schedule": "switch",
            "beta_final": 0.0,
            "switch_step": "THIRD",
        },
    ),  # fmt: skip
    "beta_anneal": ("hybrid", {**MYOPIC, "beta_schedule": "linear", "beta_final": 0.0}),
    "dense_gate": ("hybrid", {**MYOPIC, "dense_gate": "incorrect"}),
    "trust_global": ("hybrid", {**MYOPIC, "teacher_trust": "global"}),
}
FIRST = ("dense_only", "rl_only", "trust_per_prompt", "myopic_hybrid", "exact_hybrid")
PARTS = ("dense_only", "rl_only")
EVAL_KEYS = ("eval_samples", "eval_reward", "eval_greedy_acc", "eval_kl", "eval_resp_len", "eval_eos_frac")
STEP_KEYS = (
    "reward",
    "kl",
    "resp_len",
    "eos_frac",
    "future_share",
    "beta_applied",
    "lam",
    "beta",
    "grad_norm",
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser("python -m experiments.recipe_study", __doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per teacher, rule, seed")
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES), help="rules to run")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--steps", type=int, default=300, help="optimizer updates per run")
    ap.add_argument("--eval-every", type=int, default=10, help="updates between evaluations")
    ap.add_argument("--final-window", type=int, default=5, help="evaluations averaged into 'final'")
    ap.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per evaluation")
    ap.add_argument("--final-samples", type=int, default=8, help="samples per prompt of the final evaluation")
    add_objective_args(ap)
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per update")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="responses per prompt")
    ap.add_argument(
        "--trust-samples", type=int, default=8, help="teacher samples per prompt for teacher trust"
    )
    ap.add_argument("--work", default=str(REPO / "runs" / "recipe_study"), help="per-run JSON files, caches")
    ap.add_argument("--out", default=str(DATA / "results" / "recipe_study.json"), help="results JSON")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    for n in args.teachers:
        if not (DATA / "teachers_reverse" / n / "model.safetensors").exists():
            ap.error(f"teacher {n!r}: {DATA / 'teachers_reverse' / n} holds no model.safetensors")
    return args


def rule_config(rule: str, seed: int, args: argparse.Namespace, trust_cache: str | None = None):
    """The `TrainConfig` of one (rule, seed): the shared settings, the rule's preset, then its own settings."""
    from hybridlab.tasks.toy import TASKS
    from hybridlab.train import TrainConfig

    preset, extra = RULES[rule]
    fill = {"LAM": args.lam, "THIRD": max(1, args.steps // 3)}
    extra = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    cfg = TrainConfig.preset(
        preset, reward=REWARD, lam=args.lam, beta=args.beta, lr=args.lr, scheduler="constant", steps=args.steps,
        prompts_per_step=args.batch_prompts, samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=TASKS[TASK].max_answer_len + 2, eval_every=args.eval_every, eval_count=args.eval_prompts,
        seed=seed, bf16=False, cpu=True, output_dir=None, progress=False, trust_samples=args.trust_samples,
        trust_cache=trust_cache,
    )  # fmt: skip
    return cfg.replace(**extra).validate(("student", "teacher", "prompts"))


def _trainer_class():
    import torch

    from hybridlab.train.rollout import seeded

    from .teacher_sweep import _kl_trainer_class

    class StudyTrainer(_kl_trainer_class()):
        """The sweep's trainer (evaluation also measures the KL to the other teachers) plus a final evaluation."""

        @torch.no_grad()
        def final_evaluation(self, samples: int) -> dict[str, float]:
            """`samples` responses per evaluation prompt (less noise than the one-sample curve)."""
            with seeded(30_000 + self.cfg.seed):
                ro = self.rollout(self.eval_rows, samples=samples)
            return {"final_reward_multi": float(ro.rewards.mean()),
                    "final_resp_len_multi": float(ro.mask.sum(1).float().mean()),
                    "final_eos_frac_multi": float((~ro.truncated).float().mean()), "final_samples_per_prompt": samples}  # fmt: skip

    return StudyTrainer


def run_path(args, teacher: str | None, rule: str, seed: int) -> Path:
    return Path(args.work) / "runs" / f"{teacher or 'any'}__{rule}__s{seed}.json"


def plan(args) -> list[tuple[str | None, str, int]]:
    """(teacher or None, rule, seed) in running order: the first five rules over every seed and teacher, then the
    rest; within a group seed by seed, so partial results stay balanced. RL-only has no teacher."""
    first = [r for r in args.rules if r in FIRST]
    rest = [r for r in args.rules if r not in FIRST]
    jobs = []
    for group in (first, rest):
        for seed in args.seeds:
            if "rl_only" in group:
                jobs.append((None, "rl_only", seed))
            for name in args.teachers:
                jobs += [(name, r, seed) for r in group if r != "rl_only"]
    return jobs


def run_one(args, splits, teachers: dict, name: str | None, rule: str, seed: int) -> dict:
    from dataclasses import asdict

    from hybridlab.tasks.models import load_model_dir

    student, tok = load_model_dir(DATA / f"student_{TASK}")
    cache = None if name is None else str(Path(args.work) / f"trust_{name}_n{args.trust_samples}.json")
    cfg = rule_config(rule, seed, args, cache)
    tr = _trainer_class()(cfg, student=student, teacher=teachers[name or args.teachers[0]], tokenizer=tok,
                          prompts=splits["train"], eval_prompts=splits["eval"])  # fmt: skip
    tr.kl_teachers = teachers if name is None else {}
    t0 = time.perf_counter()
    tr.train()
    final = tr.final_evaluation(args.final_samples)
    h = tr.history
    rec = {
        "teacher": name, "rule": rule, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("student", "teacher", "prompts")},
        "eval": {k: h[k] for k in EVAL_KEYS}, "steps": {k: h[k] for k in STEP_KEYS if k in h}, **final,
        "trust_mean": tr.trust_mean,
    }  # fmt: skip
    if name is None:
        rec["kl_by_teacher"] = {n: h[f"eval_kl_{n}"] for n in teachers}
    return rec


# -- results ---------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return {"mean": statistics.fmean(xs) if xs else math.nan,
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}  # fmt: skip


def _final(curve: list[float], window: int) -> float:
    return statistics.fmean(curve[-window:])


def first_reach(samples: list[int], values: list[float], threshold: float) -> int | None:
    """Samples at the first evaluation whose value reaches `threshold` (None: never)."""
    for s, v in zip(samples, values):
        if v >= threshold:
            return int(s)
    return None


def runs_of(records: list[dict], name: str) -> dict[str, list[dict]]:
    """{rule: [run]} for one teacher, RL-only's shared runs carrying this teacher's KL."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if r["teacher"] not in (None, name):
            continue
        r = dict(r, eval=dict(r["eval"]))
        if r["teacher"] is None:
            r["eval"]["eval_kl"] = r["kl_by_teacher"][name]
        by.setdefault(r["rule"], []).append(r)
    return by


def summarize(records: list[dict], teachers_meta: dict, window: int) -> dict:
    """Per teacher and rule: final reward (curve and multi-sample), KL, length; samples to RL-only's final reward;
    length curves (mean over seeds)."""
    out = {}
    for name, meta in teachers_meta.items():
        by = runs_of(records, name)
        if not by:
            continue
        rl_final = None
        if "rl_only" in by:
            rl_final = statistics.fmean(_final(r["eval"]["eval_reward"], window) for r in by["rl_only"])
        rules = {}
        for rule, rs in by.items():
            ev = [r["eval"] for r in rs]
            n = min(len(e["eval_samples"]) for e in ev)
            d = {
                "seeds": [r["seed"] for r in rs],
                "samples": rs[0]["eval"]["eval_samples"][-1],
                "final_reward": _ms([_final(e["eval_reward"], window) for e in ev]),
                "final_reward_multi": _ms([r["final_reward_multi"] for r in rs]),
                "final_greedy_acc": _ms([_final(e["eval_greedy_acc"], window) for e in ev]),
                "final_kl": _ms([_final(e["eval_kl"], window) for e in ev]),
                "final_resp_len": _ms([_final(e["eval_resp_len"], window) for e in ev]),
                "min_resp_len": _ms([min(e["eval_resp_len"]) for e in ev]),
                "initial_resp_len": _ms([e["eval_resp_len"][0] for e in ev]),
                "samples_to_rl_final": None if rl_final is None else
                [first_reach(e["eval_samples"], e["eval_reward"], rl_final) for e in ev],
                "curves": {"eval_samples": ev[0]["eval_samples"][:n], **{
                    k: [statistics.fmean(e[k][i] for e in ev) for i in range(n)]
                    for k in ("eval_reward", "eval_resp_len", "eval_kl", "eval_eos_frac")}},
                "wall_s": _ms([r["wall_s"] for r in rs]),
            }  # fmt: skip
            fs = [x for r in rs for x in r["steps"].get("future_share", []) if not math.isnan(x)]
            d["future_share_mean"] = statistics.fmean(fs) if fs else None  # None: no sparse return at all
            rules[rule] = d
        out[name] = {"teacher_sampled_reward": meta["eval_sampled_reward"], "teacher_steps": meta["steps"],
                     "rl_final_reward": rl_final, "rules": rules}  # fmt: skip
    return out


def targets(summary: dict, teachers: list[str]) -> dict:
    """The issue's two targets, measured honestly for every rule that is not a part:
    beats_parts: at every teacher, mean final reward > max(dense-only, RL-only) mean by more than one standard
    deviation (the larger of the rule's and that part's std over seeds), on the curve's final reward and on the
    multi-sample final evaluation; quarter: strong teacher, median over seeds of the samples to reach RL-only's
    final reward <= 1/4 of RL-only's samples (a seed that never reaches it counts as never)."""
    out: dict = {"rules": {}}
    complete = all(n in summary and all(p in summary[n]["rules"] for p in PARTS) for n in teachers)
    out["complete_parts"] = complete
    rules = sorted({r for s in summary.values() for r in s["rules"]} - set(PARTS))
    for rule in rules:
        t: dict = {"per_teacher": {}}
        for key in ("final_reward", "final_reward_multi"):
            ok_all = True
            for n in teachers:
                s = summary.get(n, {}).get("rules", {})
                if rule not in s or not all(p in s for p in PARTS):
                    ok_all = None if ok_all is not False else False
                    continue
                best = max(PARTS, key=lambda p: s[p][key]["mean"])
                margin = s[rule][key]["mean"] - s[best][key]["mean"]
                sd = max(s[rule][key]["std"], s[best][key]["std"])
                # one seed has no spread to compare with: no verdict
                ok = None if min(s[rule][key]["n"], s[best][key]["n"]) < 2 else margin > sd
                t["per_teacher"].setdefault(n, {})[key] = {
                    "rule": s[rule][key]["mean"], "best_part": best, "best_part_mean": s[best][key]["mean"],
                    "margin": margin, "std_used": sd, "n_rule": s[rule][key]["n"], "beats_by_1std": ok}  # fmt: skip
                if ok is False:
                    ok_all = False
                elif ok is None and ok_all is not False:
                    ok_all = None
            t[f"beats_parts_every_teacher_{key}"] = ok_all
        s = summary.get("strong", {}).get("rules", {})
        if rule in s and "rl_only" in s and s[rule]["samples_to_rl_final"] is not None:
            reach = s[rule]["samples_to_rl_final"]
            med = statistics.median([math.inf if x is None else x for x in reach])
            total = s["rl_only"]["samples"]
            t["strong_samples_to_rl_final"] = reach
            t["strong_median_fraction_of_rl_samples"] = None if math.isinf(med) else med / total
            t["strong_within_quarter"] = med <= total / 4
        out["rules"][rule] = t
    out["winners"] = [r for r, t in out["rules"].items() if t.get("beats_parts_every_teacher_final_reward")]
    return out


def format_table(summary: dict) -> str:
    lines = ["| teacher (sampled) | rule | final reward | 8-sample final | final KL | eval length: start -> min -> "
             "final | samples to RL-only's final |", "| --- | --- | ---: | ---: | ---: | --- | --- |"]  # fmt: skip
    for name, s in summary.items():
        for rule in RULES:
            if rule not in s["rules"]:
                continue
            d = s["rules"][rule]
            reach = d["samples_to_rl_final"]
            reach = "n/a" if reach is None else ", ".join("—" if x is None else f"{x:,}" for x in reach)
            lines.append(
                f"| {name} ({s['teacher_sampled_reward']:.2f}) | {rule} | {d['final_reward']['mean']:.3f} ± "
                f"{d['final_reward']['std']:.3f} | {d['final_reward_multi']['mean']:.3f} ± "
                f"{d['final_reward_multi']['std']:.3f} | {d['final_kl']['mean']:.2f} | "
                f"{d['initial_resp_len']['mean']:.1f} -> {d['min_resp_len']['mean']:.1f} -> "
                f"{d['final_resp_len']['mean']:.1f} | {reach} |"
            )
    return "\n".join(lines)


def _rel(p: str | Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from hybridlab.tasks.models import load_meta, load_model_dir
    from hybridlab.tasks.toy import make_splits

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits = make_splits(TASK, 3000, args.eval_prompts, seed=0, root=DATA / "tasks", write=False)
    tdir = DATA / "teachers_reverse"
    teachers = {n: load_model_dir(tdir / n)[0] for n in args.teachers}
    metas = {n: load_meta(tdir / n) for n in args.teachers}
    cmd = "python -m experiments.recipe_study " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    sizes = {k: getattr(args, k) for k in ("steps", "eval_every", "final_window", "eval_prompts", "final_samples",
                                           "batch_prompts", "samples_per_prompt", "lam", "beta", "lr",
                                           "trust_samples", "seeds")}  # fmt: skip
    result = {
        "command": cmd, "task": TASK, "reward": REWARD, "sizes": sizes, "hypothesis": __doc__.split("Setup.")[0],
        "rules": {r: {"preset": p, "settings": e} for r, p, e in ((r, *RULES[r]) for r in args.rules)},
        "teachers": {n: {k: m.get(k) for k in ("steps", "eval_sampled_reward", "eval_greedy_acc", "parameters")}
                     | {"path": _rel(tdir / n)} for n, m in metas.items()},
        "student_init": {k: load_meta(DATA / f"student_{TASK}").get(k)
                         for k in ("eval_greedy_acc", "eval_sampled_reward", "size", "parameters")},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
    }  # fmt: skip
    jobs = plan(args)
    records, new_walls = [], []
    runs = resumable_runs(
        jobs, lambda *job: run_path(args, *job), lambda *job: run_one(args, splits, teachers, *job)
    )
    for (name, rule, seed), rec, new in runs:
        if new:
            new_walls.append(rec["wall_s"])
            left = sum(1 for j in jobs if not run_path(args, *j).exists())
            eta = statistics.fmean(new_walls) * left / 3600
            print(f"[{time.perf_counter() - t0:6.0f}s] {name or 'any':6s} {rule:16s} seed {seed}: reward "
                  f"{rec['eval']['eval_reward'][-1]:.3f} (8-sample {rec['final_reward_multi']:.3f}), length "
                  f"{rec['eval']['eval_resp_len'][0]:.1f} -> {rec['eval']['eval_resp_len'][-1]:.1f} "
                  f"({rec['wall_s']:.0f}s; {left} runs left, ~{eta:.1f} h)", flush=True)  # fmt: skip
        records.append(rec)
        result["runs"] = [{k: v for k, v in r.items() if k not in ("config", "steps")}
                          | {"steps_every5": {k: v[4::5] for k, v in r["steps"].items()}} for r in records]  # fmt: skip
        result["config"] = {k: v for k, v in records[0]["config"].items() if k in (
            "temperature", "normalize", "grad_clip", "max_new_tokens", "scheduler", "adam_beta1", "adam_beta2",
            "weight_decay", "eval_count", "samples_per_prompt", "prompts_per_step", "steps")}  # fmt: skip
        result["summary"] = summarize(records, metas, args.final_window)
        result["targets"] = targets(result["summary"], args.teachers)
        result.update(progress(records, jobs))
        write_json(Path(args.out), result)
    print(format_table(result["summary"]))
    print(json.dumps({r: {k: v for k, v in t.items() if k != "per_teacher"} for r, t in result["targets"]["rules"].items()},
                     indent=1))  # fmt: skip
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
