"""Time the pieces of one hybrid training step on the real model (CPU), to size a run before starting it.

    python -m experiments.time_real_step [--prompts 4] [--group 4] [--max-new-tokens 8] [--shots 2]

One step = sample `prompts x group` responses from the student (chat addition questions, temperature 1),
a teacher forward on its own prefix (k worked examples) + the responses, a student forward + backward of the
hybrid loss (materialised logits, and the fused-linear path), one AdamW update. Nothing here depends on the
trainer: it calls `hybrid_loss` / `fused_hybrid_loss` directly. Results are merged into
data/results/real_model_probe.json under "timing_p<prompts>_g<group>_m<max_new_tokens>_t<threads>".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from experiments.probe_real_task import RESULTS, load
from hybridlab.fused_hybrid import fused_hybrid_loss
from hybridlab.hybrid import hybrid_loss
from hybridlab.scripts.fetch_real_model import real_model_path
from hybridlab.tasks import chat as tc


def _left_batch(tok, prompts: list[str], responses: torch.Tensor, pad: int):
    """input_ids / attention_mask / position_ids for left-padded prompts followed by `responses` [B, T]."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = torch.cat([enc["input_ids"], responses], 1)
    resp_mask = torch.ones_like(responses)
    att = torch.cat([enc["attention_mask"], resp_mask], 1)
    pos = (att.cumsum(1) - 1).clamp_min(0)
    return ids, att, pos, enc["input_ids"].shape[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--digits", type=int, default=2, choices=tc.DIGITS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (the first call warms up)")
    ap.add_argument("--models", default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, student = load(real_model_path(args.models))
    _, teacher = load(real_model_path(args.models))
    teacher.requires_grad_(False)
    student.train()
    for m in student.modules():  # no dropout in this model, but be explicit
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0)
    rows = tc.make_splits(n_train=args.prompts, n_eval=0, digits=args.digits, k_demos=args.shots)["train"]
    demos = tc.demonstrations(args.shots, args.digits)
    qs = [r["prompt"] for r in rows for _ in range(args.group)]
    s_text = [tc.render(tok, tc.student_messages(q)) for q in qs]
    t_text = [tc.render(tok, tc.teacher_messages(q, demos)) for q in qs]
    pad, eos = tok.pad_token_id, tok.eos_token_id
    times: dict[str, list[float]] = {}

    def tick(name, t0):
        times.setdefault(name, []).append(time.perf_counter() - t0)

    torch.manual_seed(0)
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        enc = tok(s_text, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = student.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=args.max_new_tokens, pad_token_id=pad, eos_token_id=eos)  # fmt: skip
        resp = gen[:, enc["input_ids"].shape[1] :]
        tick("generate", t0)
        n = resp.shape[1]
        mask = torch.cumsum((resp == eos).long(), 1) - (resp == eos).long() == 0  # up to and including EOS
        rewards = torch.tensor(tc.exact_reward(qs, tok.batch_decode(resp, skip_special_tokens=True)))
        kw = dict(beta=1.0, lam=1.0, future="analytic", baseline="return_group", group_size=args.group,
                  normalize="sequences", backend="torch")  # fmt: skip

        t0 = time.perf_counter()
        t_ids, t_att, t_pos, t_p = _left_batch(tok, t_text, resp, pad)
        with torch.no_grad():
            t_out = teacher.model(input_ids=t_ids, attention_mask=t_att, position_ids=t_pos, use_cache=False)
            t_hidden = t_out.last_hidden_state[:, t_p - 1 : t_p + n - 1]
            t_logits = teacher.lm_head(t_hidden)
        tick("teacher_forward", t0)

        s_ids, s_att, s_pos, s_p = _left_batch(tok, s_text, resp, pad)
        for fused in (False, True):
            t0 = time.perf_counter()
            hidden = student.model(
                input_ids=s_ids, attention_mask=s_att, position_ids=s_pos, use_cache=False
            ).last_hidden_state[:, s_p - 1 : s_p + n - 1]
            if fused:
                loss = fused_hybrid_loss(hidden, student.lm_head.weight, (t_hidden, teacher.lm_head.weight),
                                         resp, rewards, mask=mask, **kw).loss  # fmt: skip
            else:
                loss = hybrid_loss(student.lm_head(hidden), t_logits, resp, rewards, mask=mask, **kw).loss
            loss.backward()
            tick("student_fwd_bwd_fused" if fused else "student_fwd_bwd", t0)
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tick("adamw_step", t0)

    res = {k: round(sum(v[1:]) / len(v[1:]), 2) for k, v in times.items()}  # drop the warm-up call
    res |= {
        "sequences": len(qs),
        "prompt_tokens_student": s_p,
        "prompt_tokens_teacher": t_p,
        "response_tokens": n,
        "threads": args.threads,
        "step_s_materialised": round(
            res["generate"] + res["teacher_forward"] + res["student_fwd_bwd"] + res["adamw_step"], 2
        ),
        "step_s_fused": round(
            res["generate"] + res["teacher_forward"] + res["student_fwd_bwd_fused"] + res["adamw_step"], 2
        ),
    }
    key = f"timing_p{args.prompts}_g{args.group}_m{args.max_new_tokens}_t{args.threads}"
    print(key, json.dumps(res))
    if not args.no_save:
        out = Path(RESULTS)
        data = json.loads(out.read_text()) if out.exists() else {}
        data[key] = res
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
