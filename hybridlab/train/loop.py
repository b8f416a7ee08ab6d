"""`Trainer`: one run, in a notebook or under `python -m hybridlab.train` / `accelerate launch` (see __init__)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..dense import dense_kl
from ..topk import dense_kl_topk
from . import loading
from .checkpoint import (
    CheckpointMixin,
    final_is_complete,
    format_summary,
    latest_checkpoint,
    read_summary,
    truncate_metrics,
    write_atomic,
)
from .config import TrainConfig
from .data import PromptOrder, as_row, load_prompts, rows_digest, step_seed
from .policy import PolicyModel
from .recipe import RecipeMixin, future_kl_in_return, shortcut_signal
from .rollout import (
    Rollout,
    eos_ids_of,
    generate,
    response_logits,
    reward_of,
    rollout,
    seeded,
    teacher_inputs,
    teacher_topk,
)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = cfg.cpu or not torch.cuda.is_available()
    # the scheduler steps once per update, whatever the number of processes
    return Accelerator(cpu=cpu, mixed_precision="bf16" if (cfg.bf16 and not cpu) else "no",
                       step_scheduler_with_optimizer=False)  # fmt: skip


def make_scheduler(optimizer, cfg: TrainConfig):
    warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(step: int) -> float:  # LR multiplier of update `step` (0-based)
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        prog = min(1.0, (step - warm) / max(1, total - warm))
        shape = 1.0 - prog if cfg.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * prog))
        return floor + (1.0 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def coefficients(
    normalize, mask: torch.Tensor, keep: torch.Tensor, n_seq: float, n_tok: float
) -> torch.Tensor:
    """[B] c_b of the *global* batch: each kept sequence's token-sum multiplier (0 for rows left out)."""
    w = keep.to(torch.float32)
    if not isinstance(normalize, str):
        return w / float(normalize)
    if normalize == "sequences":  # unbiased: sum over tokens / number of sequences
        return w / max(n_seq, 1.0)
    if normalize == "tokens":  # token mean over the batch: the random denominator biases it slightly
        return w / max(n_tok, 1.0)
    return w / (max(n_seq, 1.0) * mask.sum(1).clamp_min(1).float())  # per_sequence: changes the objective


class Trainer(RecipeMixin, CheckpointMixin):
    """Trains a student toward J = E[lam R] - beta KL(student || teacher) (or a compared method, `cfg.loss`).

    Models, tokenizer and prompts come from the config's paths, or are handed over directly (a notebook):
    `Trainer(cfg, student=model, teacher=model, tokenizer=tok, prompts=rows, eval_prompts=rows)`, rows being
    prompt strings or {"prompt", "answer"} mappings. `reward` may be a callable instead of `cfg.reward`.

    Attributes: `history` (dict of lists: per step "step", "samples", "loss", "dense", "sparse", "kl", "reward",
    "grad_norm", "resp_len", ...; per evaluation "eval_step", "eval_samples", "eval_greedy_acc" (reward of the
    greedy responses), "eval_reward", "eval_kl", "eval_resp_len"), `step`, `samples_seen`, `model` (the student).
    """

    def __init__(self, cfg: TrainConfig, *, student=None, teacher=None, tokenizer=None, prompts=None,
                 eval_prompts=None, reward=None, accelerator=None):  # fmt: skip
        from accelerate.utils import DistributedType

        given = tuple(
            n for n, x in (("student", student), ("teacher", teacher), ("prompts", prompts)) if x is not None
        )
        self.cfg = cfg.validate(given)
        self.acc = acc = accelerator if accelerator is not None else make_accelerator(cfg)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if acc.gradient_accumulation_steps != 1:  # acc.backward would divide the loss by it on top of ours
            raise ValueError(f"accelerate's gradient_accumulation_steps={acc.gradient_accumulation_steps}: use the "
                             "config key grad_accum instead (the loss is normalised over the whole batch)")  # fmt: skip
        per_proc = cfg.prompts_per_step // self.world
        if cfg.prompts_per_step % self.world or per_proc % cfg.grad_accum:
            raise ValueError(
                f"prompts_per_step={cfg.prompts_per_step} must be divisible by processes x grad_accum = "
                f"{self.world} x {cfg.grad_accum} (each process gets whole prompts, each micro-batch whole groups)"
            )
        self.micro_prompts = per_proc // cfg.grad_accum
        self.device = acc.device
        if self.device.type == "cpu" and cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        use_bf16 = cfg.bf16 and self.device.type == "cuda"
        if cfg.bf16 and not use_bf16 and student is None:
            self._log("bf16=true needs CUDA: running in fp32 on CPU")

        # prompts and reward first (cheap to check), then tokenizer, models, checks
        self.rows = [as_row(r) for r in prompts] if prompts is not None else load_prompts(cfg.prompts)
        if not self.rows:
            raise ValueError("prompts: need at least one training prompt, got none")
        self.prompts_sha = rows_digest(self.rows)
        ev = (
            eval_prompts
            if eval_prompts is not None
            else (load_prompts(cfg.eval_prompts) if cfg.eval_prompts else [])
        )
        self.eval_rows = [as_row(r) for r in ev][: cfg.eval_count]
        self.order = PromptOrder(len(self.rows), cfg.seed)
        self.reward_fn = reward_of(reward if reward is not None else cfg.reward)
        self.reward_name = repr(cfg.reward if reward is None else getattr(reward, "__name__", "reward"))
        tok_path = cfg.tokenizer or cfg.student
        if tokenizer is None:
            tokenizer = loading.load_tokenizer(
                tok_path, cfg.trust_remote_code, "tokenizer" if cfg.tokenizer else "student"
            )
        self.tokenizer = loading.prepare_tokenizer(tokenizer)
        self.remote = bool(cfg.teacher_url)
        # a served teacher: connect, check the tokenizer, fetch the head, all before loading the student
        if self.remote:
            from ..teacher_service.client import TeacherClient

            teacher = TeacherClient.for_trainer(cfg, self.tokenizer)
        if student is None:
            student = loading.load_model(cfg.student, "student", torch.float32, cfg.trust_remote_code)
        if teacher is None and not self.remote:
            t_dtype = torch.bfloat16 if use_bf16 else torch.float32
            teacher = loading.load_model(cfg.teacher, "teacher", t_dtype, cfg.trust_remote_code)
            loading.check_tokenizers_agree(self.tokenizer, cfg.teacher, tok_path, cfg.trust_remote_code)
        s_name, t_name = cfg.student or "student", cfg.teacher or cfg.teacher_url or "teacher"
        if self.remote:
            vs = student.get_output_embeddings().weight.shape[0]
            self.vocab = teacher.check_student(vs, self.tokenizer, s_name)
        else:
            self.vocab = loading.check_vocab(student, teacher, self.tokenizer, s_name, t_name)
        if cfg.disable_dropout:
            loading.make_deterministic(student, f"student {s_name!r}", self.vocab)
        if cfg.fused_linear:
            loading.check_fused_compatible(student, "student", s_name, self.vocab)
        self.eos_ids = eos_ids_of(student, self.tokenizer)
        if cfg.gradient_checkpointing:
            ckpt = {"use_reentrant": False}  # transformers >= 5 names it activation checkpointing
            if hasattr(student, "activation_checkpointing_enable"):
                student.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        policy = PolicyModel(student)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2))  # fmt: skip
        self.policy, self.optimizer, self.scheduler = acc.prepare(policy, opt, make_scheduler(opt, cfg))
        if not self.remote:
            teacher.to(self.device).eval()
            teacher.requires_grad_(False)
            if cfg.fused_linear:
                loading.check_fused_compatible(teacher, "teacher", t_name, self.vocab)
        self.teacher = teacher
        self.loss_kw = {
            "beta": cfg.beta, "lam": cfg.lam, "future": cfg.future, "gamma": cfg.gamma, "baseline": cfg.baseline,
            "group_size": cfg.samples_per_prompt, "temperature": cfg.temperature, "backend": cfg.dense_backend,
            "teacher_floor": cfg.teacher_floor,
        }  # fmt: skip
        if cfg.future_norm != "sum":  # only the hybrid loss takes it (validated in TrainConfig)
            self.loss_kw["future_norm"] = cfg.future_norm
        self.step = self.samples_seen = self.tokens_seen = 0
        self.history: dict[str, list] = {}
        self.rows_log: list[dict] = []
        self.out = None if cfg.output_dir is None else Path(cfg.output_dir)
        self._tb = None
        if cfg.grad_diagnostics and self.world > 1:
            raise ValueError(
                "grad_diagnostics=true runs in one process only (it differentiates each part apart)"
            )
        self._shortcut = False
        self.trust: dict[str, float] | None = None  # teacher success rate per training prompt
        self.trust_mean: float | None = None
        if cfg.teacher_trust != "none":
            self.trust, self.trust_mean = self.teacher_success_rates()

    # -- small helpers ------------------------------------------------------------------------------
    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def _log(self, msg: str) -> None:
        if self.acc.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"[hybridlab.train] {msg}", file=sys.stderr)

    @property
    def model(self):
        """The unwrapped Hugging Face student."""
        return self.acc.unwrap_model(self.policy).model

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a no-op with one)."""
        x = x.to(self.device)
        return self.acc.reduce(x, "sum") if self.world > 1 else x

    def _record(self, m: dict[str, Any]) -> None:
        for k, v in m.items():
            self.history.setdefault(k, []).append(v)

    # -- data and rollouts --------------------------------------------------------------------------
    def next_rows(self) -> list[list[dict]]:
        """This process's share of the step's prompts, as `grad_accum` micro-batches of rows."""
        idx = self.order.take(self.cfg.prompts_per_step)  # the same global order on every process
        per = len(idx) // self.world
        mine = idx[self.rank * per : (self.rank + 1) * per]
        m = self.micro_prompts
        return [[self.rows[i] for i in mine[j : j + m]] for j in range(0, len(mine), m)]

    def rollout(self, rows: list[dict], greedy: bool = False, samples: int | None = None, **kw) -> Rollout:
        """Responses to `rows` (each `samples_per_prompt` times, contiguous) with rewards and teacher inputs; for
        loss="sft" the teacher samples them (at temperature 1), otherwise the student."""
        cfg = self.cfg
        sft = cfg.loss == "sft" and not greedy and samples is None
        if sft:
            gen = lambda **a: generate(self.teacher, **a)  # noqa: E731
        else:
            self.policy.eval()
            gen = lambda **a: self.policy(mode="generate", synced_gpus=self.fsdp, **a)  # noqa: E731
        return rollout(gen, self.tokenizer, rows, reward_fn=self.reward_fn, eos_ids=self.eos_ids,
                       temperature=1.0 if sft else cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                       samples=cfg.samples_per_prompt if samples is None else samples, greedy=greedy,
                       chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
                       teacher_prompt=cfg.teacher_prompt, from_teacher=sft,
                       mask_truncated=cfg.mask_truncated_completions, device=self.device,
                       reward_name=self.reward_name, max_teacher_prompt_tokens=cfg.max_teacher_prompt_tokens,
                       **kw)  # fmt: skip

    def generate(self, **kw) -> list[Rollout]:
        """This step's rollouts on this process, sampled under the seed (seed, step, process index)."""
        with seeded(step_seed(self.cfg.seed, self.step, self.rank)):
            return [self.rollout(mb, **kw) for mb in self.next_rows()]

    def teacher_term(self, ro: Rollout, fetched=None) -> tuple[Any, dict[str, Any]]:
        """(teacher inputs of the loss, extra loss keywords): for a top-k teacher, its logprob_precision.
        `fetched`: a served teacher's answer for `ro` (`TeacherClient.fetch`), already received."""
        cfg = self.cfg
        if self.remote:
            f = self.teacher.fetch(ro, self.vocab, cfg.teacher_topk) if fetched is None else fetched
            prec = self.teacher.precision_of(f)
            t_in = self.teacher.build(f, self.vocab, cfg.fused_linear, self.device)
        elif cfg.teacher_topk is not None:
            t_in, prec = teacher_topk(self.teacher, ro, self.vocab, cfg.teacher_topk)
        else:
            return self.teacher_inputs(ro), {}
        return t_in, ({} if prec is None else {"logprob_precision": prec})

    def teacher_inputs(self, ro: Rollout):
        if self.remote:
            return self.teacher.teacher_inputs(
                ro, self.vocab, self.cfg.fused_linear, self.cfg.teacher_topk, self.device
            )
        return teacher_inputs(self.teacher, ro, self.vocab, self.cfg.fused_linear, self.cfg.teacher_topk)

    # -- weights: schedules, trust in the teacher, gate ----------------------------------------------
    # -- one update ---------------------------------------------------------------------------------
    def train_step(self, rollouts: list[Rollout] | None = None, keep_grads: bool = False) -> dict[str, float]:
        """Generate (unless `rollouts`, this process's micro-batches, are given), then one optimizer update.
        Gradients are freed after the update unless `keep_grads` (tests read them)."""
        cfg, acc = self.cfg, self.acc
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        rollouts = self.generate() if rollouts is None else [r.to(self.device) for r in rollouts]
        t_gen = time.perf_counter() - t0
        if cuda:  # the rollout phase's peak (KV cache), then the update's (activations, loss buffers)
            gen_peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        local = torch.tensor([[float(r.actions.shape[0]), float(r.mask.sum()), float(r.keep.sum()),
                               float(r.mask[r.keep].sum())] for r in rollouts], dtype=torch.float64).sum(0)  # fmt: skip
        n_all, n_tok, n_seq, n_tok_kept = (float(x) for x in self._sum(local))
        lr = float(self.scheduler.get_last_lr()[0])
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        lam_k, beta_k = self.weights_now()
        # sums over this process's micro-batches: loss, dense, sparse, KL, reward, responses ending in EOS,
        # |beta F| and |lam R| over response tokens, the applied beta summed over responses
        stats = torch.zeros(9, dtype=torch.float64, device=self.device)
        parts: dict[str, torch.Tensor] = {}
        # A served teacher answers for every micro-batch before the first backward: a request that fails leaves
        # no half-accumulated update (the step either trains with all its teacher terms or not at all).
        fetched = (
            [self.teacher.fetch(ro, self.vocab, cfg.teacher_topk) for ro in rollouts] if self.remote else None
        )
        for i, ro in enumerate(rollouts):
            beta_b = self.beta_of(ro, beta_k)
            loss_kw = {**self.loss_kw, "lam": lam_k, "beta": beta_b}
            c = (
                coefficients(cfg.normalize_value, ro.mask, ro.keep, n_seq, n_tok_kept) * self.world
            )  # DDP averages
            t_in, extra = self.teacher_term(ro, None if fetched is None else fetched[i])
            loss_kw.update(extra)
            if fetched is not None:
                fetched[i] = None
            with nullcontext() if i == len(rollouts) - 1 else acc.no_sync(self.policy):
                out = self.policy(
                    mode="loss", input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                    position_ids=ro.position_ids, prompt_len=ro.prompt_len, actions=ro.actions, mask=ro.mask,
                    rewards=ro.rewards, seq_weights=c.to(self.device), teacher=t_in, loss_kw=loss_kw,
                    fused=cfg.fused_linear, chunk=cfg.fused_chunk, loss=cfg.loss, diagnostics=cfg.grad_diagnostics,
                )  # fmt: skip
                acc.backward(out["loss"])
            for k, g in out.get("grad_parts", {}).items():
                parts[k] = g if k not in parts else parts[k] + g
            n_b = float(ro.actions.shape[0])
            beta_sum = (
                beta_b.sum().double() if isinstance(beta_b, torch.Tensor) else torch.tensor(beta_b * n_b)
            )
            stats += torch.stack([
                out["loss"].detach().double() / self.world, out["dense"].double() / self.world,
                out["sparse"].double() / self.world, out["kl"].detach().sum().double(), ro.rewards.sum().double(),
                (~ro.truncated).sum().double(), *out["return_parts"].to(self.device).unbind(),
                beta_sum.to(self.device, torch.float64),
            ])  # fmt: skip
            del out, t_in
        norm = acc.clip_grad_norm_(
            self.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        if not torch.isfinite(torch.as_tensor(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm ({float(norm)}) at step {self.step + 1}: the update was not applied "
                "(lower lr, check rewards and logits, then --resume)"
            )
        self._updating = True  # from here to the counters, an interruption leaves no consistent state to save
        self.optimizer.step()
        self.scheduler.step()
        if not keep_grads:
            self.optimizer.zero_grad(set_to_none=True)
        stats = self._sum(stats)
        self.step += 1
        self.samples_seen += int(n_all)
        self.tokens_seen += int(n_tok)
        self._updating = False
        dt = time.perf_counter() - t0
        m = {
            "step": self.step, "samples": self.samples_seen, "loss": float(stats[0]), "dense": float(stats[1]),
            "sparse": float(stats[2]), "kl": float(stats[3]) / n_all, "reward": float(stats[4]) / n_all,
            "eos_frac": float(stats[5]) / n_all, "kept_frac": n_seq / n_all, "resp_len": n_tok / n_all,
            "grad_norm": float(norm), "lr": lr, "tokens": int(n_tok), "tokens_seen": self.tokens_seen,
            "gen_s": t_gen, "step_s": dt, "tokens_per_s": n_tok / dt if dt > 0 else 0.0,
            "train_tokens_per_s": n_tok / (dt - t_gen) if dt > t_gen else 0.0,
            "lam": lam_k, "beta": beta_k, "beta_applied": float(stats[8]) / n_all,
            # the share of the sparse return's magnitude carried by the future KL (0 without any return)
            "future_share": float(stats[6] / (stats[6] + stats[7])) if float(stats[6] + stats[7]) > 0 else 0.0,
        }  # fmt: skip
        if parts:  # pre-clip gradients of the three parts, summed over micro-batches
            norms = {k: float(g.norm()) for k, g in parts.items()}
            m.update({f"grad_{k}": v for k, v in norms.items()})
            for a, b in (("dense", "reward"), ("dense", "future"), ("reward", "future")):
                den = norms[a] * norms[b]
                m[f"cos_{a}_{b}"] = float(parts[a] @ parts[b]) / den if den > 0 else math.nan
        lens = self.history.get("resp_len", []) + [m["resp_len"]]
        kls = self.history.get("kl", []) + [m["kl"]]
        short = shortcut_signal(lens, kls, cfg.shortcut_window) and future_kl_in_return(
            cfg.loss, beta_k, cfg.future, cfg.future_norm)  # fmt: skip
        m["shortcut"] = float(short)
        if short and not self._shortcut:
            self._log(f"step {self.step}: responses are getting shorter while the KL falls (mean length "
                      f"{statistics.fmean(lens[-2 * cfg.shortcut_window:-cfg.shortcut_window]):.2f} -> "
                      f"{statistics.fmean(lens[-cfg.shortcut_window:]):.2f}): the sequence KL, a sum over tokens, "
                      "may be lowered by ending early (the short-answer shortcut). Try future='none' or "
                      "future_norm='mean', a smaller beta or teacher_trust.")  # fmt: skip
        self._shortcut = short
        if cuda:
            m["gen_peak_mem_gib"] = gen_peak
            m["train_peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return m

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """On the evaluation prompts: the reward of greedy responses ("eval_greedy_acc": the accuracy for an
        exact-match reward), and the reward and sequence KL to the teacher of one sample per prompt at the
        training temperature, under a fixed evaluation seed."""
        cfg = self.cfg
        greedy = self.rollout(self.eval_rows, greedy=True, samples=1)
        with seeded(10_000 + cfg.seed):
            ro = self.rollout(self.eval_rows, samples=1)
        self.policy.eval()
        s = response_logits(self.model, ro)[..., : self.vocab]
        if cfg.teacher_topk is not None:  # the tail-bucket lower bound, the KL this run trains on
            t, extra = self.teacher_term(ro)
            kl = dense_kl_topk(s.float(), t.logprobs, t.ids, temperature=cfg.temperature, mask=ro.mask,
                               backend=cfg.dense_backend, **extra)  # fmt: skip
        else:
            t = (self.teacher.teacher_inputs(ro, self.vocab, device=self.device) if self.remote
                 else teacher_inputs(self.teacher, ro, self.vocab))  # materialised logits, also under fused_linear  # fmt: skip
            kl = dense_kl(
                s.float(), t.float(), temperature=cfg.temperature, mask=ro.mask, backend=cfg.dense_backend
            )
        return {"eval_step": self.step, "eval_samples": self.samples_seen,
                "eval_greedy_acc": float(greedy.rewards.mean()), "eval_reward": float(ro.rewards.mean()),
                "eval_kl": float(kl.sum(1).mean()), "eval_resp_len": float(ro.mask.sum(1).float().mean()),
                "eval_eos_frac": float((~ro.truncated).float().mean())}  # fmt: skip

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to `steps` (or `stop_after` more steps): log, evaluate, checkpoint; returns the summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = self.step
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
        out = self.out
        metrics = None if out is None else out / "metrics.jsonl"
        if self.main and out is not None:
            import yaml

            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
            self.rows_log = truncate_metrics(metrics, start)
            self._open_tensorboard()
        evaluating = cfg.eval_every > 0 and bool(self.eval_rows)
        if evaluating and not self.history.get("eval_step"):
            e = self.evaluate()
            self._record(e)
            self._write_row({"step": self.step, **e}, metrics)  # the start-of-run evaluation (no "loss" key)
        desc = "hybridlab.train" if cfg.loss == "hybrid" else cfg.loss
        bar = tqdm(total=end - start, desc=desc, disable=not (self.main and cfg.progress), dynamic_ncols=True,
                   leave=out is not None)  # fmt: skip
        t0, saved = time.perf_counter(), []
        # the last step whose metrics row is written, and a finished step not yet logged
        logged, pending = self.step, None
        before = (self.step, self.order.state_dict())  # the data order's position before the step in flight
        try:
            while self.step < end:
                before = (self.step, self.order.state_dict())
                m = pending = self.train_step()
                self._record(m)
                if evaluating and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    e = self.evaluate()
                    self._record(e)
                    m = {**m, **e}
                self._write_row(m, metrics)
                logged, pending = self.step, None
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3g}", kl=f"{m['kl']:.3g}", reward=f"{m['reward']:.2f}",
                                tok_s=f"{m['tokens_per_s']:.0f}")  # fmt: skip
                if out is not None and (
                    self.step == end or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                ):
                    p = self.save()
                    if p is not None:
                        saved.append(str(p))
        except BaseException as e:  # an error or Ctrl-C: keep every finished step
            if logged < self.step and pending is not None:
                # it finished its update and failed after (e.g. in its evaluation)
                self._write_row(pending, metrics)
            self.save_after_error(e, before[1] if self.step == before[0] else None)
            raise
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        wall = time.perf_counter() - t0
        self.history.setdefault("wall_s", []).append(wall)
        final = self.save_final() if (out is not None and cfg.save_final and self.step == cfg.steps) else None
        summary = self.summary(start, wall, saved, final)
        if self.main and out is not None:
            write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            self._log(format_summary(summary))
        return summary

    def _write_row(self, m: dict[str, Any], metrics: Path | None) -> None:
        """One metrics row: the in-memory log, metrics.jsonl and TensorBoard."""
        self.rows_log.append(m)
        if self.main and metrics is not None:
            with open(metrics, "a") as f:
                f.write(json.dumps(m) + "\n")
            if self._tb is not None:
                for k, v in m.items():
                    if k != "step":
                        self._tb.add_scalar(f"train/{k}", v, m["step"])

    def _open_tensorboard(self) -> None:
        if not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._log("tensorboard=true but the tensorboard package is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only")  # fmt: skip
            return
        self._tb = SummaryWriter(str(self.out / "tensorboard"))


def run(cfg: TrainConfig, resume: bool = False, accelerator=None) -> tuple[Trainer, dict[str, Any]]:
    """Build a `Trainer`, resume if asked (and a checkpoint exists), train; returns (trainer, summary)."""
    if cfg.output_dir is None:
        raise ValueError(
            "output_dir must be set for a run (checkpoints, metrics and the final model go there)"
        )
    out = Path(cfg.output_dir)
    if not resume and not cfg.overwrite and latest_checkpoint(out) is not None:
        raise ValueError(
            f"output_dir {str(out)!r} already has checkpoints (step {latest_checkpoint(out).name}); pass --resume to "
            "continue that run, or --overwrite true / another --output_dir to start fresh"
        )
    tr = Trainer(cfg, accelerator=accelerator)
    if resume and not tr.resume():
        tr._log(f"--resume: no checkpoint in {str(out)!r}, starting at step 0")
    if resume and tr.step >= cfg.steps:
        summary = read_summary(out / "summary.json")
        final_ok = not cfg.save_final or final_is_complete(out / "final")
        if summary is not None and summary.get("complete") and summary.get("steps") == tr.step and final_ok:
            tr._log(
                f"the run in {str(out)!r} is complete (step {tr.step} of {cfg.steps}): nothing to do (training "
                "longer is a new run: another --output_dir, or --overwrite true)"
            )
            return tr, summary
        # killed after its last checkpoint: write what the end of the run writes (final/, summary.json)
        what = "summary.json" if final_ok else "final model folder"
        tr._log(f"the run in {str(out)!r} reached step {tr.step} of {cfg.steps} but its {what} is missing or "
                "partial: writing it now")  # fmt: skip
        tr.acc.wait_for_everyone()
        return tr, tr.train()
    if not resume and tr.main:  # a fresh run (overwrite=true): no stale checkpoints, metrics or final model
        for stale in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(out / stale, ignore_errors=True)
        for stale in ("metrics.jsonl", "summary.json"):
            (out / stale).unlink(missing_ok=True)
    tr.acc.wait_for_everyone()
    return tr, tr.train()
