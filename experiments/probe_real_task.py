"""Measure the chat addition task on the real model before training on it: student (zero-shot) and teacher
(k worked examples before the question), greedy and sampled at temperature 1.

    python -m experiments.probe_real_task [--digits 2] [--n-eval 40] [--samples 4] [--shots 2]

Needs the converted model (`make real-model`). Results are merged into data/results/real_model_probe.json
under the key "add<digits>_<fmt>_<k>shot" (one entry per setting, with the exact prompts, a few responses and the
wall time). Runs on one CPU thread by default (`--threads`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hybridlab.scripts.fetch_real_model import REPO_ROOT, real_model_path
from hybridlab.tasks import chat as tc

RESULTS = REPO_ROOT / "data" / "results" / "real_model_probe.json"


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


@torch.inference_mode()
def generate(tok, model, texts: list[str], max_new_tokens: int, sample: bool, batch: int) -> list[str]:
    """Responses (text before EOS, special tokens skipped) to the rendered prompts `texts`."""
    out: list[str] = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kw,
        )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def probe(tok, model, rows, prefix_fn, samples: int, max_new_tokens: int, batch: int, seed: int) -> dict:
    questions = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    texts = [tc.render(tok, prefix_fn(q)) for q in questions]
    n_tokens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    t0 = time.perf_counter()
    greedy = generate(tok, model, texts, max_new_tokens, sample=False, batch=batch)
    t_greedy = time.perf_counter() - t0
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    sampled = generate(tok, model, [t for t in texts for _ in range(samples)], max_new_tokens, True, batch)
    t_sampled = time.perf_counter() - t0
    rep = [a for a in answers for _ in range(samples)]
    qrep = [q for q in questions for _ in range(samples)]
    g_exact = tc.exact_reward(questions, greedy, answers)
    s_exact = tc.exact_reward(qrep, sampled, rep)
    per_prompt = [sum(s_exact[i * samples : (i + 1) * samples]) / samples for i in range(len(rows))]
    return {
        "prompt_example": texts[0],
        "prompt_tokens_mean": sum(n_tokens) / len(n_tokens),
        "greedy_exact": sum(g_exact) / len(g_exact),
        "greedy_exact_count": f"{int(sum(g_exact))}/{len(g_exact)}",
        "greedy_last_int_is_sum": sum(tc.loose_reward(questions, greedy, answers)) / len(greedy),
        "sampled_exact": sum(s_exact) / len(s_exact),
        "sampled_exact_count": f"{int(sum(s_exact))}/{len(s_exact)}",
        "sampled_last_int_is_sum": sum(tc.loose_reward(qrep, sampled, rep)) / len(sampled),
        "prompts_with_any_sampled_exact": sum(p > 0 for p in per_prompt) / len(per_prompt),
        "greedy_examples": [
            {"q": q, "answer": a, "response": r} for q, a, r in list(zip(questions, answers, greedy))[:6]
        ],
        "sampled_examples": [
            {"q": q, "answer": a, "response": r} for q, a, r in list(zip(qrep, rep, sampled))[:8]
        ],
        "seconds_greedy": round(t_greedy, 1),
        "seconds_sampled": round(t_sampled, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits", type=int, default=2, choices=tc.DIGITS)
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument(
        "--samples", type=int, default=4, help="sampled responses per eval prompt (temperature 1)"
    )
    ap.add_argument("--shots", type=int, default=2, help="worked examples in the teacher's prefix")
    ap.add_argument("--fmt", default="number", choices=sorted(tc.FORMATS), help="answer format")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    path = real_model_path(args.models)
    t0 = time.perf_counter()
    tok, model = load(path)
    t_load = time.perf_counter() - t0
    rows = tc.make_splits(0, args.n_eval, args.digits, args.seed, k_demos=args.shots, fmt=args.fmt)
    demos = tc.demonstrations(args.shots, args.digits, args.seed, fmt=args.fmt)
    common = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed)
    result = {
        "model": path.name,
        "digits": args.digits,
        "fmt": args.fmt,
        "shots": args.shots,
        "n_eval": args.n_eval,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "demonstrations": demos,
        "seconds_load": round(t_load, 1),
        "student": probe(tok, model, rows["eval"], tc.student_messages, **common),
        "teacher": probe(tok, model, rows["eval"], lambda q: tc.teacher_messages(q, demos), **common),
    }
    result["seconds_total"] = round(time.perf_counter() - t_all, 1)
    key = f"add{args.digits}_{args.fmt}_{args.shots}shot"
    for who in ("student", "teacher"):
        r = result[who]
        print(
            f"{key} {who}: greedy {r['greedy_exact_count']} exact ({r['greedy_last_int_is_sum']:.0%} end in the "
            f"sum), sampled {r['sampled_exact_count']} exact ({r['sampled_last_int_is_sum']:.0%} end in the sum), "
            f"{r['seconds_greedy']} s + {r['seconds_sampled']} s"
        )
    print(f"total {result['seconds_total']} s on {args.threads} thread(s)")
    if not args.no_save:
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else {}
        data[key] = result
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"saved {out} [{key}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
