"""The recipe settings' moving parts inside `Trainer`: lam/beta schedules (incl. the plateau switch), teacher
trust (the teacher's success rate per training prompt, cached) and the reward gate, and the shortcut signal."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from .rollout import Rollout, generate, rollout, seeded


def plateau_switch(rewards: list[float], window: int, tol: float) -> int | None:
    """The update (0-based) from which a 'plateau' schedule uses its final weights, from the training rewards of
    the updates done so far (one per update): the first j + 1 such that the mean reward over a window of
    `window` updates ending at j has not risen by more than `tol` above its best for `window` updates. None: no
    plateau yet. A function of the history only, so a resumed run switches where the uninterrupted one did."""
    best, best_j = -math.inf, None
    for j in range(window - 1, len(rewards)):
        m = statistics.fmean(rewards[j - window + 1 : j + 1])
        if m > best + tol:
            best, best_j = m, j
        elif j - best_j >= window:
            return j + 1
    return None


def shortcut_signal(lengths: list[float], kls: list[float], window: int, drop: float = 0.1) -> bool:
    """True when the mean response length and the mean sequence KL of the last `window` updates are both more
    than `drop` (a fraction) below those of the `window` updates before: the policy may be lowering the
    sequence KL (a sum over tokens) by ending responses early, the short-answer shortcut of the exact objective."""
    if window <= 0 or len(lengths) < 2 * window:
        return False
    prev_len, last_len = statistics.fmean(lengths[-2 * window : -window]), statistics.fmean(lengths[-window:])
    prev_kl, last_kl = statistics.fmean(kls[-2 * window : -window]), statistics.fmean(kls[-window:])
    return last_len < (1 - drop) * prev_len and last_kl < (1 - drop) * prev_kl


def future_kl_in_return(loss: str, beta: float, future: str, future_norm: str) -> bool:
    """Whether the sparse return carries the summed future KL, the term whose exact gradient rewards ending early.
    Without it (RL-only: beta = 0; the myopic hybrid: future = "none"; future_norm = "mean"; SFT) shorter
    responses are no shortcut of the objective but ordinary learning, and the warning would mislead."""
    return loss == "hybrid" and beta > 0 and future != "none" and future_norm == "sum"


def _fingerprint(model) -> str:
    """A cheap digest of a model's weights (names, shapes, sums): tells a cached teacher table from another's."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().float()
            h.update(f"{name}{tuple(x.shape)}{float(x.sum()):.10e}{float(x.square().sum()):.10e}".encode())
    return h.hexdigest()[:16]


class RecipeMixin:
    """`Trainer` methods for schedules, teacher trust and the gate (they read the trainer's cfg, rows, teacher)."""

    def teacher_success_rates(self, chunk: int | None = None) -> tuple[dict[str, float], float]:
        """({prompt: p_T(prompt)}, mean over the training rows): the teacher's reward at temperature 1 from
        `trust_samples` samples per training prompt, drawn under fixed seeds (the same for every run seed), read
        from / written to the cache file when its key (prompts, teacher weights, sampling) matches. `chunk`:
        prompts per generate call (default: about four training micro-batches of sequences, which fit)."""
        cfg = self.cfg
        if getattr(self, "remote", False):
            raise ValueError(
                "teacher_trust samples from the teacher: it needs a local teacher, not teacher_url"
            )
        if chunk is None:
            chunk = max(1, 4 * self.micro_prompts * cfg.samples_per_prompt // cfg.trust_samples)
        path = (
            Path(cfg.trust_cache)
            if cfg.trust_cache
            else (None if self.out is None else self.out / "teacher_trust.json")
        )
        key = {"prompts_sha": self.prompts_sha, "samples": cfg.trust_samples, "teacher": _fingerprint(self.teacher),
               "max_new_tokens": cfg.max_new_tokens, "reward": self.reward_name, "teacher_prompt": cfg.teacher_prompt,
               "chat_template": cfg.chat_template, "max_prompt_tokens": cfg.max_prompt_tokens}  # fmt: skip
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return data["rates"], data["mean"]
            self._log(
                f"teacher_trust: the cache {str(path)!r} is for other prompts, teacher or settings: redrawn"
            )
        uniq = list({(r["prompt"], r.get("answer")): r for r in self.rows}.values())
        gen = lambda **a: generate(self.teacher, **a)  # noqa: E731
        sums: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for i in range(0, len(uniq), chunk):
            with seeded(20_000 + i // chunk), torch.no_grad():
                ro = rollout(gen, self.tokenizer, uniq[i : i + chunk], reward_fn=self.reward_fn, eos_ids=self.eos_ids,
                             temperature=1.0, max_new_tokens=cfg.max_new_tokens, samples=cfg.trust_samples,
                             chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
                             teacher_prompt=cfg.teacher_prompt, from_teacher=True, device=self.device,
                             reward_name=self.reward_name,
                             max_teacher_prompt_tokens=cfg.max_teacher_prompt_tokens)  # fmt: skip
            per = ro.rewards.float().reshape(-1, cfg.trust_samples).mean(1).tolist()
            for row, p in zip(uniq[i : i + chunk], per):
                sums.setdefault(row["prompt"], []).append(p)
        rates = {k: statistics.fmean(v) for k, v in sums.items()}
        mean = statistics.fmean(rates[r["prompt"]] for r in self.rows)
        self._log(f"teacher_trust: teacher success rate {mean:.3f} (mean over {len(self.rows)} prompts, "
                  f"{cfg.trust_samples} samples each, {time.perf_counter() - t0:.0f}s)")  # fmt: skip
        if path is not None and self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "mean": mean, "rates": rates}) + "\n")
            os.replace(tmp, path)
        return rates, mean

    def switched_at(self) -> int | None:
        """The update where a 'plateau' schedule switched (None: not yet, or no plateau schedule)."""
        cfg = self.cfg
        if "plateau" not in (cfg.lam_schedule, cfg.beta_schedule):
            return None
        return plateau_switch(self.history.get("reward", []), cfg.plateau_window, cfg.plateau_tol)

    def weights_now(self) -> tuple[float, float]:
        """(lam, beta) of the next update under their schedules (before teacher trust and the gate)."""
        at = self.switched_at()
        return self.cfg.weight_at("lam", self.step, at), self.cfg.weight_at("beta", self.step, at)

    def beta_of(self, ro: Rollout, beta: float) -> float | torch.Tensor:
        """The loss's beta for a rollout: a number, or [B] per response under per-prompt trust or the gate."""
        cfg = self.cfg
        return recipe_beta(beta, ro.prompts, ro.rewards.to(self.device), cfg.teacher_trust, self.trust,
                           self.trust_mean, cfg.dense_gate, cfg.gate_reward, source="teacher_trust")  # fmt: skip


def recipe_beta(beta: float, prompts: list[str], rewards: torch.Tensor, trust: str, rates: dict[str, float] | None,
                mean: float | None, gate: str, gate_reward: float, source: str) -> float | torch.Tensor:  # fmt: skip
    """The teacher weight of each response after teacher trust and the reward gate (see `config.SCHEDULES`).

    beta: the step's weight (after its schedule); prompts: the B responses' prompt texts; rewards: [B] their
    rewards (float, on the loss's device). trust 'global': beta x `mean`; 'per_prompt': beta x rates[prompt]
    (a prompt without a rate is a KeyError naming `source`, where the rates come from); gate 'incorrect': 0 on
    responses with reward >= gate_reward. Returns the number beta when neither per-response rule is on, else a
    [B] float64 tensor."""
    if trust == "global":
        beta = beta * mean
    if trust != "per_prompt" and gate == "none":
        return beta
    b = torch.full((len(prompts),), float(beta), dtype=torch.float64, device=rewards.device)
    if trust == "per_prompt":
        missing = [p for p in prompts if p not in rates]
        if missing:
            raise KeyError(f"{source}: no success rate for prompt {missing[0]!r} (not a training prompt)")
        b = b * torch.tensor([rates[p] for p in prompts], dtype=torch.float64, device=b.device)
    if gate == "incorrect":
        b = b * (rewards < gate_reward).to(torch.float64)
    return b
