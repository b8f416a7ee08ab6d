"""The recipe settings inside `HybridGRPOTrainer`: lam / teacher_beta schedules (incl. the plateau switch), teacher
trust (the teacher's success rate per prompt, read from a JSON file), the reward gate and the length-neutral future
term. The rules are hybridlab.train's own functions (`schedule_value`, `plateau_switch`, `recipe_beta`): one copy
of each, so the adapter and the engine weight a step and a completion the same way (what each optimises:
`hybridlab.train.config.SCHEDULES`)."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ...sparse import future_sum
from ...train.config import schedule_value
from ...train.recipe import plateau_switch, recipe_beta


class RewardHistory(TrainerCallback, ExportableState):
    """The mean training reward of each optimiser step so far, what a 'plateau' schedule reads. Saved in every
    checkpoint's trainer_state.json and read back when training resumes, so a resumed run switches at the step
    the uninterrupted one did (the switch is a function of this history only)."""

    def __init__(self):
        self.rewards: list[float] = []

    def state(self) -> dict:
        return {"args": {}, "attributes": {"rewards": list(self.rewards)}}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.rewards = []
            return
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) and saved else saved
        rewards = saved.get("attributes", {}).get("rewards") if isinstance(saved, dict) else None
        if rewards is None or len(rewards) < state.global_step:
            warnings.warn(
                f"resuming at step {state.global_step} without the training rewards of the earlier steps (a "
                "checkpoint from before the plateau schedule was set?): the plateau is looked for from here on",
                RuntimeWarning,
                stacklevel=2,
            )
            rewards = rewards or []
        self.rewards = [float(r) for r in rewards[: state.global_step]]


def prompt_text(prompt) -> str:
    """The text a teacher success rate is keyed by: the prompt itself, or a conversation's last message content."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        content = prompt[-1].get("content")
        if isinstance(content, str):
            return content
    raise ValueError(
        f"teacher_trust='per_prompt' needs text prompts (a string, or a last message with string content), got "
        f"{type(prompt).__name__} {str(prompt)[:80]!r}"
    )


def load_trust_rates(path: str, datasets: list, trust: str) -> tuple[dict[str, float], float]:
    """({prompt text: p_T(prompt)}, mean rate) from `path` (hybridlab.train's teacher_trust.json or a plain
    {prompt: rate} JSON). Every prompt of the given datasets (those with a 'prompt' column) must have a rate under
    'per_prompt' (a ValueError naming teacher_trust_rates and the first prompt without one, before training
    starts). The mean is the file's 'mean' when it has one (the engine's: over its training prompts), else the
    mean over the first dataset's rows (the training prompts, each counted as often as it occurs)."""
    where = f"teacher_trust_rates {path!r}"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot read a JSON file of success rates ({e})") from None
    rates = data.get("rates") if isinstance(data, dict) and isinstance(data.get("rates"), dict) else data
    if not isinstance(rates, dict) or not rates:
        raise ValueError(f"{where}: expected {{prompt: rate}} or {{'rates': {{prompt: rate}}, ...}}, got "
                         f"{type(rates).__name__}")  # fmt: skip
    bad = [(k, v) for k, v in rates.items() if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"{where}: a success rate must be a number in [0, 1], got {bad[0][1]!r} for prompt "
                         f"{bad[0][0]!r}")  # fmt: skip
    rates = {str(k): float(v) for k, v in rates.items()}
    texts = [[prompt_text(p) for p in d["prompt"]] for d in datasets if _has_prompts(d)]
    if trust == "per_prompt":
        for rows in texts:
            missing = [t for t in rows if t not in rates]
            if missing:
                raise ValueError(f"{where} has no success rate for the prompt {missing[0]!r} ({len(missing)} of "
                                 f"{len(rows)} dataset rows lack one): teacher_trust='per_prompt' needs a rate for "
                                 "every training and evaluation prompt")  # fmt: skip
    mean = data.get("mean") if isinstance(data, dict) and "rates" in data else None
    if mean is None:
        if not texts or any(t not in rates for t in texts[0]):
            raise ValueError(f"{where} has no 'mean' and the training dataset's prompts are not all in it: "
                             "teacher_trust='global' cannot form the mean success rate")  # fmt: skip
        mean = statistics.fmean(rates[t] for t in texts[0])
    if not (isinstance(mean, (int, float)) and 0.0 <= mean <= 1.0):
        raise ValueError(f"{where}: 'mean' must be a number in [0, 1], got {mean!r}")
    return rates, float(mean)


def _has_prompts(d) -> bool:
    return (
        d is not None and hasattr(d, "column_names") and hasattr(d, "__len__") and "prompt" in d.column_names
    )


class RecipeMixin:
    """`HybridGRPOTrainer` methods for the schedules, teacher trust and the gate (they read self.args, self.state)."""

    def _recipe_init(self) -> None:
        a = self.args
        self._trust: tuple[dict[str, float], float] | None = None
        if a.teacher_trust != "none":
            ev = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
            self._trust = load_trust_rates(a.teacher_trust_rates, [self.train_dataset, *ev], a.teacher_trust)
        if self._plateau() and self._history() is None:
            self.add_callback(RewardHistory())

    def _plateau(self) -> bool:
        return "plateau" in (self.args.lam_schedule, self.args.teacher_beta_schedule)

    def _history(self) -> list[float] | None:
        # looked up each time: resuming with restore_callback_states_from_checkpoint replaces the callback object
        return next(
            (c.rewards for c in self.callback_handler.callbacks if isinstance(c, RewardHistory)), None
        )

    def switched_at(self) -> int | None:
        """The step where a 'plateau' schedule switched (None: not yet, or no plateau schedule)."""
        if not self._plateau():
            return None
        return plateau_switch(self._history() or [], self.args.plateau_window, self.args.plateau_tol)

    def hybrid_weights(self) -> tuple[float, float]:
        """(lam, teacher_beta) of the current optimiser step (0-based `state.global_step` of `state.max_steps`,
        or of args.max_steps before training starts) under their schedules, before teacher trust and the gate."""
        a, at = self.args, self.switched_at()
        step, steps = self.state.global_step, self.state.max_steps or a.max_steps
        if steps <= 0 and {a.lam_schedule, a.teacher_beta_schedule} & {"linear", "cosine"}:
            raise ValueError("a linear / cosine schedule needs the number of steps: set max_steps")
        return (schedule_value(a.lam_schedule, a.lam, a.lam_final, step, steps, a.switch_step, at),
                schedule_value(a.teacher_beta_schedule, a.teacher_beta, a.teacher_beta_final, step, steps,
                               a.switch_step, at))  # fmt: skip

    def recipe_weights(self, inputs, r_all, r_local, unscorable, mode: str):
        """(lam as a 0-d float64 tensor, the step's teacher_beta as a number, the loss's teacher_beta: a 0-d
        tensor or [B_local] per completion under per-prompt trust or the gate), on r_local's device. In training
        the step's mean reward (over scorable completions, all processes) then joins the plateau history."""
        a, dev = self.args, r_local.device
        lam, beta_k = self.hybrid_weights()
        rates, mean = self._trust or (None, None)
        prompts = (
            [prompt_text(row["prompt"]) for row in inputs] if a.teacher_trust == "per_prompt" else inputs
        )
        beta = recipe_beta(beta_k, prompts, r_local.float(), a.teacher_trust, rates, mean, a.dense_gate,
                           a.gate_reward, source=f"teacher_trust_rates {a.teacher_trust_rates!r}")  # fmt: skip
        beta = torch.as_tensor(beta, dtype=torch.float64, device=dev)
        hist = self._history()
        if mode == "train" and hist is not None:
            ok = ~unscorable
            hist.append(float(r_all[ok].float().mean()) if bool(ok.any()) else (hist[-1] if hist else 0.0))
        self._metrics[mode]["hybrid/lam"].append(lam)
        self._metrics[mode]["hybrid/teacher_beta"].append(float(beta.mean()) if beta.numel() else beta_k)
        return torch.tensor(lam, dtype=torch.float64, device=dev), beta_k, beta

    @staticmethod
    def loss_weights(inputs) -> tuple[float, float | torch.Tensor]:
        """(lam, teacher_beta) for `hybrid_loss` from a micro-batch: beta a number, or a [B] tensor per completion."""
        beta = inputs["hybrid_beta"]
        return float(inputs["hybrid_lam"]), (float(beta) if beta.dim() == 0 else beta)

    def future_for_returns(self, fut: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The future KL sum [B, T] as the return uses it: per remaining (discounted) token under
        future_norm='mean', as `hybrid_loss` forms it."""
        if self.args.future_norm != "mean":
            return fut
        return fut / future_sum(mask.to(fut.dtype), mask, self.args.gamma).clamp_min(1e-30)


__all__ = ["RecipeMixin", "RewardHistory", "load_trust_rates", "prompt_text"]
