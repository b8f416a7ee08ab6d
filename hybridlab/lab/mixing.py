"""The mixing-weights lab's model: an enumerable toy, its teacher and rewards, and one training step.

    J(theta) = E_y[ lam R(y) ] - beta KL(pi_theta || pi_T),      pi* ∝ pi_T exp(lam R / beta)

A student `TinyPolicy` learns on an enumerable toy (vocabulary {a, b, EOS}, at most 3 tokens: 15 responses)
from a fixed teacher. Every metric is exact (the space is enumerated); only the *gradient* depends on the mode:

- ``mode="exact"``: the expected estimator (`enumerated_loss`, every response weighted by pi_theta(y));
- ``mode="sampled"``: Monte Carlo batches of `samples` responses through `hybrid_loss`, with the per-sample
  spread giving the variance of the step's gradient estimate.

Exact mode computes an expectation, which no valid baseline changes, so it ignores `baseline`; and
``normalize="tokens"`` has no random denominator there (it acts as a constant normaliser: its small bias only
exists in sampled mode). Gradient norms are reported on the scale of grad J in both modes.

`MixingModel` holds no widget and draws nothing; `hybridlab.lab.mixing_lab.MixingLab` is the same model with
its dashboard and ipywidgets controls::

    model = MixingModel(seed=0)
    model.set(lam=1.0, beta=0.5, mode="sampled").run(steps=200)
    model.history["reward"], model.history["kl"]    # one entry per optimiser step
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..hybrid import FUTURE_NORMS, NORMALIZATIONS, hybrid_loss
from ..sparse import FUTURE_ESTIMATORS
from ..train.config import schedule_value
from ..train.recipe import plateau_switch, recipe_beta
from .exact import (
    DTYPE,
    TinyPolicy,
    enumerate_sequences,
    enumerated_loss,
    prefix_codes,
    reward_table,
    sample,
    sequence_codes,
    sequence_probs,
    tilted_distribution,
    token_logprobs,
    total_variation,
)

VOCAB, HORIZON = 3, 3
TOKENS = ("a", "b", ".")  # "." is EOS (token id 2)
LOOPHOLE = (1, 1, 1)  # "bbb": the response the loophole reward over-values and the teacher almost never says
LOOPHOLE_REWARD = 2.0
MODES = ("exact", "sampled")
BASELINES = ("none", "reward_group", "return_group")
REWARDS = ("count0", "loophole", "random")
# The engine's weight schedules (TrainConfig's lam_schedule / beta_schedule): the same `schedule_value`.
SCHEDULES = ("constant", "linear", "cosine", "switch", "plateau")
TRUSTS = ("none", "global")  # one prompt: per-prompt trust is global trust here (`_validate` says so)
GATES = ("none", "incorrect")
GATE_REWARD = 1.0  # dense_gate="incorrect": the teacher's terms only where R < 1 (count0: not all 'a')
METRICS = (
    "step",
    "reward",
    "kl",
    "objective",
    "dist_to_opt",
    "hack",
    "dense_norm",
    "sparse_norm",
    "cosine",
    "grad_var",
)
DEFAULTS = {
    "lam": 1.0,
    "beta": 0.5,
    "gamma": 1.0,
    "lr": 0.1,
    "samples": 32,
    "steps": 100,
    "future": "analytic",
    "baseline": "none",
    "normalize": "sequences",
    "mode": "exact",
    "reward": "count0",
    # the recipe settings (TrainConfig's of the same names; their objectives and biases: `MixingModel`)
    "lam_schedule": "constant",
    "lam_final": 1.0,
    "beta_schedule": "constant",
    "beta_final": 0.0,
    "switch_step": 50,
    "plateau_window": 20,
    "plateau_tol": 0.01,
    "teacher_trust": "none",
    "dense_gate": "none",
    "future_norm": "sum",
}
_CHOICES = {
    "future": FUTURE_ESTIMATORS,
    "baseline": BASELINES,
    "normalize": NORMALIZATIONS,
    "mode": MODES,
    "reward": REWARDS,
    "lam_schedule": SCHEDULES,
    "beta_schedule": SCHEDULES,
    "teacher_trust": TRUSTS,
    "dense_gate": GATES,
    "future_norm": FUTURE_NORMS,
}


# ----------------------------------------------------------------------------------------------- the toy world


def response_label(actions: Sequence[int], mask: Sequence[bool]) -> str:
    """'ab.' for the response a, b, EOS."""
    return "".join(TOKENS[int(a)] for a, m in zip(actions, mask) if m)


def make_teacher(space) -> TinyPolicy:
    """A fixed tabular teacher: likes 'a', sometimes 'b', rarely says a third 'b' after 'bb' (pi_T(bbb) ≈ 0.2%)."""
    teacher = TinyPolicy(space.vocab, space.horizon, kind="tabular", seed=0)
    usual = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE).log()
    after_bb = torch.tensor([0.6, 0.02, 0.38], dtype=DTYPE).log()
    codes = prefix_codes(space.actions, space.vocab)
    with torch.no_grad():
        teacher.table.copy_(usual.expand_as(teacher.table))
        for s in range(space.size):
            for t in range(2, space.horizon):
                if space.mask[s, t] and tuple(space.actions[s, t - 2 : t].tolist()) == (1, 1):
                    teacher.table[codes[s, t]] = after_bb
    teacher.requires_grad_(False)
    return teacher


def table_reward(space, values: torch.Tensor) -> Callable:
    """R(actions, mask) -> [B] from one value per response of `space` (a reward table over the enumeration)."""
    codes = sequence_codes(space.actions, space.mask, space.vocab)
    table = torch.zeros((space.vocab + 1) ** space.horizon + 1, dtype=DTYPE)
    table[codes] = values.to(DTYPE)
    return lambda actions, mask: table[sequence_codes(actions, mask, space.vocab)]


def make_reward(space, kind: str, seed: int = 0) -> Callable:
    """ "count0": fraction of the 3 slots that say 'a' (the honest task); "random": N(0, 1) per response;
    "loophole": count0, except that the reward model scores the degenerate 'bbb' at 2 (above any honest answer)."""
    if kind in ("count0", "random"):
        return reward_table(space, kind, seed=seed)
    if kind == "loophole":
        values = reward_table(space, "count0")(space.actions, space.mask).clone()
        values[_response_index(space, LOOPHOLE)] = LOOPHOLE_REWARD
        return table_reward(space, values)
    raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")


def _response_index(space, response: Sequence[int]) -> int:
    for s in range(space.size):
        if tuple(space.actions[s][space.mask[s]].tolist()) == tuple(response):
            return s
    raise ValueError(f"response {response} is not in the space")


def optimal_policy(logq: torch.Tensor, rewards: torch.Tensor, lam: float, beta: float) -> torch.Tensor | None:
    """pi* ∝ pi_T exp(lam R / beta) over the enumeration; beta = 0: the teacher restricted to argmax R (the
    limit); None when lam = beta = 0 (J is constant)."""
    if lam == 0 and beta == 0:
        return None
    return tilted_distribution(logq, rewards, lam=lam, beta=beta)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread (restored afterwards): the lab's tensors are tiny, and on a busy CPU extra threads
    only spin (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trace_variance(per: torch.Tensor) -> float:
    """per [n, P]: per-sample gradients summing to the batch gradient. The trace of the covariance of the batch
    estimate, sum_b ||u_b - mean u||^2 / ((n - 1) n), with single-sample estimates u_b = n per_b."""
    n = per.shape[0]
    u = n * per
    return float((u - u.mean(0)).pow(2).sum() / ((n - 1) * n))


# --------------------------------------------------------------------------------------------------- plotting


class MixingModel:
    """Hybrid imitation + RL training on an enumerable toy, exact metrics, no display (`MixingLab` draws it).

    Args:
        seed: initialises the student and the sampler (a reset restores both).
        kind: the student's `TinyPolicy` kind, "tabular" (any policy; exact fixed points) or "shared" (an MLP).
        init_scale: scale of the student's random initial logits (small: close to uniform).
        redraw_interval: seconds between figure redraws while a run is in progress (0: only at the end).
        **settings: initial values for `set` (lam, beta, gamma, lr, samples, steps, future, baseline,
            normalize, mode, reward, and the recipe settings below).

    The recipe settings, as in `TrainConfig` (each step follows the gradient of the objective named here):

    - lam_schedule / beta_schedule ("constant" | "linear" | "cosine" | "switch") with lam_final / beta_final and
      switch_step: update k (0-based, counted from the last reset) uses lam_k, beta_k of the engine's
      `schedule_value` over a run of `steps` updates: the gradient of J_k = lam_k E[R] - beta_k KL, that step's
      objective; the run as a whole follows no single J. "switch" with lam 0 -> lam_final and beta -> 0 is
      "distil, then RL"; "plateau" switches at the engine's `plateau_switch` of the exact expected reward
      recorded after each update (plateau_window, plateau_tol), at switch_step at latest (0: no latest). The
      metrics (objective, TV to pi*) stay those of J at lam, beta.
    - teacher_trust="global": beta x p_T, p_T = E_{pi_T}[R] clipped to [0, 1], the teacher's success rate computed
      exactly by enumeration (in sampled mode too: no teacher samples, so no estimation noise in beta): J with a
      smaller beta. The toy has one prompt, so "per_prompt" would equal "global"; it is refused with that advice.
    - dense_gate="incorrect": the teacher's terms only on responses with R < 1. The gate depends on the response:
      not the gradient of a fixed objective (biased).
    - future_norm="mean": the future KL divided by the remaining token count: length-neutral, biased for J.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        kind: str = "tabular",
        init_scale: float = 0.3,
        redraw_interval: float = 0.5,
        **settings,
    ):
        if kind not in ("tabular", "shared"):
            raise ValueError(f"kind must be 'tabular' or 'shared', got {kind!r}")
        self.seed, self.kind, self.redraw_interval = int(seed), kind, float(redraw_interval)
        self.space = enumerate_sequences(VOCAB, HORIZON, eos=True)
        self.labels = [
            response_label(a, m) for a, m in zip(self.space.actions.tolist(), self.space.mask.tolist())
        ]
        self.loophole_index = _response_index(self.space, LOOPHOLE)
        self.teacher = make_teacher(self.space)
        with torch.no_grad():
            self.teacher_logq = token_logprobs(self.teacher, self.space.actions, self.space.mask).sum(1)
        self.rewards = {name: make_reward(self.space, name, seed=self.seed) for name in REWARDS}
        self.policy = TinyPolicy(VOCAB, HORIZON, kind=kind, seed=self.seed, scale=init_scale)
        self._init_state = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        self.settings = dict(DEFAULTS)
        self.history: dict[str, list[float]] = {k: [] for k in METRICS}
        self.previous: dict[str, list[float]] = {k: [] for k in METRICS}  # the history before the last reset
        self.marks: list[tuple[int, str]] = []  # (step, "lam=0.3") where settings changed mid-training
        self.timings = {"train_s": 0.0, "draw_s": 0.0, "draws": 0}
        self.reset()
        if settings:
            self.set(**settings)

    # -------------------------------------------------------------------------------------------- settings

    def set(self, **settings) -> MixingModel:
        """Change settings (validated all together before any is applied); the widgets follow."""
        clean = {name: self._validate(name, value) for name, value in settings.items()}
        changed = {k: v for k, v in clean.items() if self.settings[k] != v}
        if not changed:
            return self
        self.settings.update(changed)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings["lr"]
        n = len(self.history["step"])
        training = {k: v for k, v in changed.items() if k != "steps"}
        if n and training:
            label = ", ".join(f"{k}={v}" for k, v in training.items())
            if self.marks and self.marks[-1][0] == n:
                label = self.marks[-1][1] + ", " + label
                self.marks.pop()
            self.marks.append((n, label))
        self._settings_changed(changed)
        return self

    def _validate(self, name: str, value):
        if name not in DEFAULTS:
            raise TypeError(f"unknown setting {name!r}; valid settings: {', '.join(DEFAULTS)}")
        if name in _CHOICES:
            if name == "teacher_trust" and value == "per_prompt":
                raise ValueError("teacher_trust='per_prompt' is the same as 'global' here (the toy has one "
                                 "prompt): use teacher_trust='global'")  # fmt: skip
            if value not in _CHOICES[name]:
                raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
            return value
        if name in ("samples", "steps", "switch_step", "plateau_window"):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            low = {"samples": 2, "steps": 1, "switch_step": 0, "plateau_window": 1}[name]
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number, got {type(value).__name__} {value!r}")
        value = float(value)
        if name == "gamma" and not 0.0 <= value <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {value}")
        if name == "lr" and not value > 0:
            raise ValueError(f"lr must be > 0, got {value}")
        if name in ("lam", "beta", "lam_final", "beta_final", "plateau_tol") and value < 0:
            why = "" if name == "plateau_tol" else " (it weighs a term of J)"
            raise ValueError(f"{name} must be >= 0{why}, got {value}")
        return value

    # ---------------------------------------------------------------------------------------------- training

    def reset(self) -> MixingModel:
        """Restore the student's initial parameters and the sampler's seed; start a new, empty history (the
        old one becomes `previous` and is drawn faintly)."""
        self.policy.load_state_dict(self._init_state)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.settings["lr"])
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.history["step"]:
            self.previous = self.history  # a reference to the old history stays valid: it is not cleared
        self.history = {k: [] for k in METRICS}
        self.marks.clear()
        self.redraw()
        return self

    def run(self, steps: int | None = None, *, live: bool = False) -> MixingModel:
        """`steps` optimiser steps (default: the `steps` setting), then redraw; `live` also redraws during."""
        if steps is None:
            steps = self.settings["steps"]
        elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(
                f"steps must be a non-negative int (or None for the `steps` setting), got {steps!r}"
            )
        start = last_draw = time.perf_counter()
        with _one_thread():
            for _ in range(steps):
                self._train_step()
                if (
                    live
                    and self.redraw_interval > 0
                    and time.perf_counter() - last_draw > self.redraw_interval
                ):
                    self.redraw()
                    last_draw = time.perf_counter()
        self.timings["train_s"] = time.perf_counter() - start
        self.redraw()
        return self

    def step(self) -> MixingModel:
        """One optimiser step, then redraw."""
        return self.run(1)

    def _train_step(self) -> None:
        s = self.settings
        params = list(self.policy.parameters())
        self.optimizer.zero_grad()
        if s["mode"] == "exact":
            # The expectation over every response: no baseline changes it, so none is used.
            out = enumerated_loss(
                self.policy,
                self.teacher,
                self.space,
                self.rewards[s["reward"]],
                parameters=params,
                **self._loss_kwargs(self.reward_values()),
            )
            scale = float(self.space.size)  # enumerated_loss's gradient is grad J / S
            (scale * out.loss).backward()
            grad_var = math.nan
        else:
            out, per = self._sampled_gradient(self.generator, params)
            scale = 1.0
            total = per.sum(0)  # the batch gradient of the loss
            offset = 0
            for p in params:
                p.grad = total[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            grad_var = _trace_variance(per)
        self.optimizer.step()
        gn = out.grad_norms
        self._record(
            dense=scale * gn["dense"], sparse=scale * gn["sparse"], cosine=gn["cosine"], grad_var=grad_var
        )

    def weights_now(self, trusted: bool = False) -> tuple[float, float]:
        """(lam_k, beta_k) of the next update k (0-based since the last reset) under the schedules; `trusted`:
        beta_k x p_T under teacher_trust="global" (the reward gate, per response, is not in this number)."""
        s, k, at = self.settings, len(self.history["step"]), self.switched_at()
        lam, beta = (schedule_value(s[f"{w}_schedule"], s[w], s[f"{w}_final"], k, s["steps"], s["switch_step"], at)
                     for w in ("lam", "beta"))  # fmt: skip
        if trusted and s["teacher_trust"] == "global":
            beta *= self.teacher_success()
        return lam, beta

    def switched_at(self) -> int | None:
        """The update where a 'plateau' schedule switches (the engine's `plateau_switch` of the exact expected
        reward after each update so far); None: not yet, or no plateau schedule (switch_step still applies)."""
        s = self.settings
        if "plateau" not in (s["lam_schedule"], s["beta_schedule"]):
            return None
        return plateau_switch(self.history["reward"], s["plateau_window"], s["plateau_tol"])

    def teacher_success(self) -> float:
        """p_T = E_{pi_T}[R] over the enumeration, clipped to [0, 1]: the teacher's success rate (exact)."""
        return min(1.0, max(0.0, float((self.teacher_distribution() * self.reward_values()).sum())))

    def _loss_kwargs(self, rewards: torch.Tensor) -> dict:
        """hybrid_loss's weights for a batch with rewards [B]: the scheduled lam and beta, beta after teacher
        trust and the reward gate (the engine's `recipe_beta`: a number, or [B] under the gate)."""
        s = self.settings
        lam, beta = self.weights_now()
        beta = recipe_beta(beta, [""] * rewards.shape[0], rewards, s["teacher_trust"], None, self.teacher_success(),
                           s["dense_gate"], GATE_REWARD, source="teacher_trust")  # fmt: skip
        return dict(lam=lam, beta=beta, future=s["future"], gamma=s["gamma"], normalize=s["normalize"],
                    future_norm=s["future_norm"])  # fmt: skip

    def _sampled_gradient(self, generator: torch.Generator, params: list):
        """One Monte Carlo batch through `hybrid_loss`: (its output, per-sample gradients of the loss [n, P]).

        The loss is a sum over samples of terms that each depend on that sample's logits only (baselines are
        detached), so its gradient at the logits splits by row; pulling each row back through the policy gives
        per-sample gradients that sum to the batch gradient.
        """
        s = self.settings
        n = s["samples"]
        actions, mask = sample(self.policy, n, generator, eos=self.space.eos)
        logits = self.policy(actions)
        with torch.no_grad():
            teacher_logits = self.teacher(actions)
        grouped = s["baseline"] != "none"
        rewards = self.rewards[s["reward"]](actions, mask)
        out = hybrid_loss(
            logits, teacher_logits, actions, rewards, mask=mask,
            baseline=s["baseline"], group_size=n if grouped else None, backend="torch", parameters=params,
            **self._loss_kwargs(rewards),
        )  # fmt: skip
        (g_logits,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
        rows = []
        for b in range(n):
            piece = torch.zeros_like(g_logits)
            piece[b] = g_logits[b]
            grads = torch.autograd.grad(logits, params, grad_outputs=piece, retain_graph=b < n - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return out, torch.stack(rows)

    def gradient_variance(self, batches: int = 20, seed: int = 1234, **settings) -> float:
        """Trace variance of the sampled gradient estimate at the *current* policy (no update), averaged over
        `batches` batches of `samples` responses; `settings` override the lab's for this measurement only."""
        saved = dict(self.settings)
        clean = {name: self._validate(name, value) for name, value in settings.items()}
        generator = torch.Generator().manual_seed(seed)
        try:
            self.settings.update(clean)
            params = list(self.policy.parameters())
            with _one_thread():
                values = [
                    _trace_variance(self._sampled_gradient(generator, params)[1]) for _ in range(batches)
                ]
            return float(np.mean(values))
        finally:
            self.settings = saved

    def metrics(self) -> dict[str, float]:
        """Exact metrics of the current student: reward, kl, objective, dist_to_opt, hack."""
        s = self.settings
        with torch.no_grad():
            p = sequence_probs(self.policy, self.space)
            r = self.reward_values()
            logp = p.clamp_min(1e-300).log()
            kl = float((p * (logp - self.teacher_logq)).sum())
            reward = float((p * r).sum())
            target = self.optimum()
        return {
            "reward": reward,
            "kl": kl,
            "objective": s["lam"] * reward - s["beta"] * kl,
            "dist_to_opt": math.nan if target is None else total_variation(p, target),
            "hack": float(p[self.loophole_index]),
        }

    def _record(self, dense: float, sparse: float, cosine: float, grad_var: float) -> None:
        h = self.history
        h["step"].append(len(h["step"]) + 1)
        for key, value in self.metrics().items():
            h[key].append(value)
        h["dense_norm"].append(dense)
        h["sparse_norm"].append(sparse)
        h["cosine"].append(cosine)
        h["grad_var"].append(grad_var)

    # -------------------------------------------------------------------------------------------- the world

    def reward_values(self, name: str | None = None) -> torch.Tensor:
        """R(y) for every response (order of `labels`): [15]."""
        return self.rewards[name or self.settings["reward"]](self.space.actions, self.space.mask)

    def distribution(self) -> torch.Tensor:
        """pi_theta(y) for every response: [15]."""
        with torch.no_grad():
            return sequence_probs(self.policy, self.space)

    def teacher_distribution(self) -> torch.Tensor:
        return self.teacher_logq.exp()

    def optimum(self) -> torch.Tensor | None:
        """pi* for the current lam, beta and reward (None when lam = beta = 0)."""
        return optimal_policy(
            self.teacher_logq, self.reward_values(), self.settings["lam"], self.settings["beta"]
        )

    # ---------------------------------------------------------------------------------------- hooks for a view

    def redraw(self) -> None:
        """Nothing to draw: the model has no display (`MixingLab` draws its dashboard here)."""

    def _settings_changed(self, changed: Mapping) -> None:
        """Called by `set` with the settings that changed (a view updates its widgets here)."""
