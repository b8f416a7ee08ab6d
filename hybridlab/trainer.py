"""`HybridTrainer`: on-policy training of a small causal LM with `hybrid_loss` (and the baselines it is compared to).

One step, for every method with the same sample budget (`batch_prompts * samples_per_prompt` responses):

    prompts -> rollouts with `generate(do_sample=True, temperature=tau, top_k=0, top_p=1)`
            -> student logits (with grad) and teacher logits (no grad), one forward each, shifted so that
               row t of the [B, T, V] logits produced response token t; mask = response tokens up to and
               including EOS
            -> task rewards R(x, y) -> loss -> AdamW with gradient clipping

Methods (`METHODS`):
    "sft"          offline distillation: cross-entropy on *teacher* samples (the teacher samples at tau = 1).
    "opd_sampled"  sampled-token on-policy distillation: advantage -k_t = -(log pi - log pi_T) at the sampled
                   token, discount 0 (the myopic rule; `sampled_opd_loss`).
    "dense_only"   `hybrid_loss` with lam = 0, future = "none": myopic full-vocabulary distillation.
    "rl_only"      `hybrid_loss` with beta = 0 and a leave-one-out group baseline on the reward.
    "hybrid"       `hybrid_loss` with dense + sparse, analytic future KL, "return_group" baseline.

The sampling temperature is recorded in the config and the *same* tau goes into the loss (a different one
would be the rollout/training mismatch pitfall of the brief).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .dense import dense_kl
from .hybrid import NORMALIZATIONS, hybrid_loss
from .models import decode_responses, encode_prompts
from .sparse import kl_estimate, selected_logprobs
from .tasks import Task, get_task, rewards

METHODS = ("sft", "opd_sampled", "dense_only", "rl_only", "hybrid")

#: Settings each method fixes (`TrainerConfig.for_method` applies them; `validate` checks them).
METHOD_PRESETS: dict[str, dict] = {
    "sft": {"future": "none", "baseline": "none"},
    "opd_sampled": {"lam": 0.0, "future": "none", "gamma": 0.0, "baseline": "none"},
    "dense_only": {"lam": 0.0, "future": "none", "baseline": "none"},
    "rl_only": {"beta": 0.0, "future": "none", "baseline": "reward_group"},
    "hybrid": {"future": "analytic", "baseline": "return_group"},
}


@dataclass
class TrainerConfig:
    """Everything one training run depends on (recorded in results)."""

    method: str = "hybrid"
    lam: float = 1.0  # weight of the task reward in J
    beta: float = 1.0  # weight of the reverse KL to the teacher in J
    future: str = "analytic"  # future-KL estimator in the sparse return (hybrid_loss `future`)
    gamma: float = 1.0
    baseline: str = "return_group"
    group_size: int | None = None  # default: samples_per_prompt
    temperature: float = 1.0  # rollout sampling temperature == the loss's temperature
    normalize: str = "sequences"
    reward_kind: str = "exact"
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 100
    batch_prompts: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int | None = None  # default: task.max_answer_len + 2
    grad_clip: float = 1.0
    eval_every: int = 10
    eval_prompts: int = 100
    seed: int = 0
    backend: str = "auto"
    progress: bool = True

    @classmethod
    def for_method(cls, method: str, **kwargs) -> TrainerConfig:
        """A config for `method`: the shared settings in `kwargs`, then the method's presets on top.

        The presets win (e.g. `lam` becomes 0 for "dense_only", `beta` 0 for "rl_only"), so one set of
        keyword arguments describes a whole comparison; the returned config holds the effective values.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        cfg = cls(method=method, **kwargs)
        return replace(cfg, **METHOD_PRESETS[method])

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for k, v in METHOD_PRESETS[self.method].items():
            if getattr(self, k) != v:
                raise ValueError(
                    f"method={self.method!r} needs {k}={v!r}, got {k}={getattr(self, k)!r} "
                    "(use TrainerConfig.for_method)"
                )
        if self.batch_prompts < 1 or self.samples_per_prompt < 1 or self.steps < 0:
            raise ValueError(
                f"batch_prompts={self.batch_prompts} and samples_per_prompt={self.samples_per_prompt} must be "
                f">= 1 and steps={self.steps} >= 0"
            )
        if self.baseline in ("reward_group", "return_group") and self.group_size_ < 2:
            raise ValueError(
                f"baseline={self.baseline!r} needs group_size >= 2 samples per prompt, got "
                f"group_size={self.group_size}, samples_per_prompt={self.samples_per_prompt}"
            )
        if self.group_size is not None and self.group_size != self.samples_per_prompt:
            raise ValueError(
                f"group_size={self.group_size} must equal samples_per_prompt={self.samples_per_prompt} "
                "(a group is the samples of one prompt)"
            )
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 (steps between evaluations), got {self.eval_every}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be positive and finite, got {self.temperature!r}")

    @property
    def group_size_(self) -> int:
        return self.samples_per_prompt if self.group_size is None else self.group_size


@dataclass
class Rollout:
    """A batch of responses laid out as `generate` returns them.

    input_ids / attention_mask: [B, P + N] (left-padded prompt, then N response tokens, pad after EOS);
    actions: [B, N] response tokens; mask: [B, N] bool, response tokens up to and including EOS;
    rewards: [B] float; prompts / texts: B strings (prompts repeated `samples_per_prompt` times, contiguous).
    """

    prompts: list[str]
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    actions: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    temperature: float

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, P + N]: positions counted from the first real (non-padding) token, as `generate` uses them."""
        return (self.attention_mask.cumsum(1) - 1).clamp_min(0)


def make_rollout(
    tokenizer,
    task: str | Task,
    prompts: list[str],
    tokens: torch.Tensor,
    prompt_batch: dict[str, torch.Tensor],
    temperature: float,
    reward_kind: str = "exact",
) -> Rollout:
    """Assemble a `Rollout` from prompt encodings [B, P] and response tokens [B, N]."""
    ids, am = prompt_batch["input_ids"], prompt_batch["attention_mask"]
    if tokens.dim() != 2 or tokens.shape[0] != ids.shape[0]:
        raise ValueError(f"tokens must be [B, N] with B = {ids.shape[0]} prompts, got {list(tokens.shape)}")
    texts, mask = decode_responses(tokenizer, tokens)
    r = torch.tensor(rewards(task, prompts, texts, reward_kind), dtype=torch.float32, device=ids.device)
    full = torch.cat([ids, tokens], 1)
    full_am = torch.cat([am, torch.ones_like(tokens)], 1)
    return Rollout(prompts, texts, full, full_am, ids.shape[1], tokens, mask, r, float(temperature))


def teacher_forcing_rollout(
    tokenizer, task: str | Task, prompts: list[str], responses: list[str], reward_kind: str = "exact"
) -> Rollout:
    """A `Rollout` of given response texts (each followed by EOS), e.g. ground-truth answers for SFT."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) differ in length")
    enc = encode_prompts(tokenizer, prompts)
    n = max(len(r) for r in responses) + 1
    tokens = torch.full((len(prompts), n), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(responses):
        ids = tokenizer.convert_tokens_to_ids(list(r)) + [tokenizer.eos_token_id]
        tokens[i, : len(ids)] = torch.tensor(ids)
    return make_rollout(tokenizer, task, prompts, tokens, enc, 1.0, reward_kind)


def response_logits_of(model, inputs: dict, n: int) -> torch.Tensor:
    """[B, n, V] logits of the last n tokens' predictions: row t produced response token t.

    Logits at position L - n - 1 + t predict token L - n + t. The LM head runs only on those n positions
    (`logits_to_keep` as an index tensor, so no [B, L, V] tensor stays alive behind a view); models whose
    forward lacks that argument compute every position and are sliced.
    """
    length = inputs["input_ids"].shape[1]
    keep = torch.arange(length - n - 1, length - 1, device=inputs["input_ids"].device)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        out = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    else:
        out = model(**inputs, use_cache=False).logits
    return out if out.shape[1] == n else out[:, length - n - 1 : length - 1]


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """One forward over prompt + response; returns [B, N, V] where row t produced `rollout.actions[:, t]`.

    Explicit position ids (counted from the first non-padding token) match what `generate` used for
    left-padded prompts.
    """
    inputs = {
        "input_ids": rollout.input_ids,
        "attention_mask": rollout.attention_mask,
        "position_ids": rollout.position_ids,
    }
    logits = response_logits_of(model, inputs, rollout.actions.shape[1])
    if logits.shape[:2] != rollout.actions.shape:
        raise RuntimeError(
            f"logits {list(logits.shape)} do not line up with actions {list(rollout.actions.shape)}"
        )
    return logits


@torch.no_grad()
def sample(
    model,
    tokenizer,
    task: str | Task,
    prompts: list[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int,
    greedy: bool = False,
    reward_kind: str = "exact",
) -> Rollout:
    """Responses to `prompts` from `model.generate` (full-vocabulary sampling at `temperature`, or greedy)."""
    enc = encode_prompts(tokenizer, prompts, device=next(model.parameters()).device)
    # An explicit config, not the model's: its defaults (repetition penalty, suppressed tokens, top-k ...)
    # would make the sampling policy differ from the softmax(z / tau) the loss differentiates.
    kw = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **kw,
    )
    seq = model.generate(**enc, generation_config=gen)
    return make_rollout(
        tokenizer, task, prompts, seq[:, enc["input_ids"].shape[1] :], enc, temperature, reward_kind
    )


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under a fixed seed without disturbing the training streams (CPU and the current GPU)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def sft_loss(
    student_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
):
    """Cross-entropy on given tokens, summed over tokens / number of sequences: [B, T, V], [B, T], [B, T] -> []."""
    logp = selected_logprobs(student_logits, actions, temperature)
    return -torch.where(mask, logp, torch.zeros((), dtype=logp.dtype)).sum() / mask.shape[0]


def sampled_opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token on-policy distillation (discount 0): loss = -sum_t log pi(y_t) * stopgrad(-k_t) / B.

    k_t = log pi(y_t | s_t) - log pi_T(y_t | s_t) at the sampled token ("k1" of `kl_estimate`). Its expected
    gradient is the myopic sum_t grad KL_t(s_t) (a Monte Carlo version of the dense term, no future KL).
    Shapes: [B, T, V], [B, T, V], [B, T], [B, T] -> (scalar loss, k [B, T] detached, 0 on padding).
    """
    logp = selected_logprobs(student_logits, actions, temperature, mask)
    with torch.no_grad():
        teacher_logp = selected_logprobs(teacher_logits.detach(), actions, 1.0, mask).to(logp.dtype)
        k = torch.where(mask, kl_estimate(logp.detach(), teacher_logp, "k1"), torch.zeros(()))
    loss = -(torch.where(mask, logp, torch.zeros(())) * (-k)).sum() / mask.shape[0]
    return loss, k


class HybridTrainer:
    """Trains `student` toward J = E[lam R] - beta KL(student || teacher) (or a baseline method) on a task.

    Args:
        student, teacher: causal LMs sharing `tokenizer`'s vocabulary; the teacher is frozen.
        task: a task name or `Task`; train_prompts / eval_prompts: lists of prompt strings.
        config: a `TrainerConfig` (use `TrainerConfig.for_method`).
    Attributes:
        history: dict of lists; per step "step", "samples", "loss", "dense", "sparse", "reward", "kl",
            "grad_norm", "resp_len"; per evaluation "eval_step", "eval_samples", "eval_greedy_acc",
            "eval_reward", "eval_kl", "eval_resp_len".
    """

    def __init__(self, student, teacher, tokenizer, task, config: TrainerConfig, train_prompts, eval_prompts):
        config.validate()
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(
                f"student vocab_size={student.config.vocab_size} != teacher vocab_size="
                f"{teacher.config.vocab_size} (they must share the tokenizer)"
            )
        if not train_prompts or not eval_prompts:
            raise ValueError(f"need train and eval prompts, got {len(train_prompts)} and {len(eval_prompts)}")
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.task = get_task(task)
        self.config = config
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts)[: config.eval_prompts]
        self.max_new_tokens = config.max_new_tokens or self.task.max_answer_len + 2
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(config.seed)
        self._rng = random.Random(config.seed)
        self._order: list[int] = []
        self.optimizer = torch.optim.AdamW(
            student.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.step_count = 0
        self.samples_seen = 0
        self.history: dict[str, list] = {}

    # -- pieces ---------------------------------------------------------------------------------------------
    def next_prompts(self) -> list[str]:
        """`batch_prompts` prompts (shuffled epochs over the train split), each repeated `samples_per_prompt`."""
        out = []
        for _ in range(self.config.batch_prompts):
            if not self._order:
                self._order = list(range(len(self.train_prompts)))
                self._rng.shuffle(self._order)
            out.append(self.train_prompts[self._order.pop()])
        return [p for p in out for _ in range(self.config.samples_per_prompt)]

    def rollout(self, prompts: list[str]) -> Rollout:
        """Student samples at the configured temperature (teacher samples at tau = 1 for "sft")."""
        c = self.config
        if c.method == "sft":
            return sample(self.teacher, self.tokenizer, self.task, prompts, temperature=1.0,
                          max_new_tokens=self.max_new_tokens, reward_kind=c.reward_kind)  # fmt: skip
        self.student.eval()
        return sample(self.student, self.tokenizer, self.task, prompts, temperature=c.temperature,
                      max_new_tokens=self.max_new_tokens, reward_kind=c.reward_kind)  # fmt: skip

    def compute_loss(self, ro: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the configured method on a rollout, and scalar diagnostics."""
        c = self.config
        self.student.eval()  # score the policy that sampled: no dropout (gradients flow in eval mode too)
        s_logits = response_logits(self.student, ro)
        with torch.no_grad():
            t_logits = response_logits(self.teacher, ro)
        m = {}
        if c.method in ("sft", "opd_sampled"):
            if c.method == "sft":
                loss = sft_loss(s_logits, ro.actions, ro.mask, c.temperature)
            else:
                loss, _ = sampled_opd_loss(s_logits, t_logits, ro.actions, ro.mask, c.temperature)
            with torch.no_grad():
                kl = dense_kl(
                    s_logits.detach(), t_logits, temperature=c.temperature, mask=ro.mask, backend=c.backend
                )
            m.update(dense=float("nan"), sparse=float("nan"))
        else:
            out = hybrid_loss(
                s_logits, t_logits, ro.actions, ro.rewards, mask=ro.mask, beta=c.beta, lam=c.lam,
                future=c.future, gamma=c.gamma, baseline=c.baseline, group_size=c.group_size_,
                temperature=c.temperature, normalize=c.normalize, backend=c.backend,
            )  # fmt: skip
            loss, kl = out.loss, out.kl
            m.update(dense=float(out.dense.detach()), sparse=float(out.sparse.detach()))
        m.update(loss=float(loss.detach()), kl=float(kl.sum(1).mean()), reward=float(ro.rewards.mean()))
        m["resp_len"] = float(ro.mask.sum(1).float().mean())
        return loss, m

    def step(self) -> dict[str, float]:
        """One rollout + update; returns (and records) the step's metrics."""
        c = self.config
        ro = self.rollout(self.next_prompts())
        loss, m = self.compute_loss(ro)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip)
        if not torch.isfinite(gn):
            raise FloatingPointError(
                f"non-finite gradient norm ({float(gn)}) at step {self.step_count + 1}: the update was not "
                f"applied and the model is unchanged (loss {m['loss']}); check rewards and logits"
            )
        self.optimizer.step()
        self.step_count += 1
        self.samples_seen += len(ro.prompts)
        m.update(step=self.step_count, samples=self.samples_seen, grad_norm=float(gn))
        self._record(m)
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy exact-match accuracy, and sampled reward and sequence KL to the teacher on the student's own
        samples (one per eval prompt, at the training temperature, with a fixed eval seed)."""
        c = self.config
        self.student.eval()
        greedy = sample(self.student, self.tokenizer, self.task, self.eval_prompts, greedy=True,
                        max_new_tokens=self.max_new_tokens, reward_kind="exact")  # fmt: skip
        with seeded(10_000 + c.seed):
            ro = sample(self.student, self.tokenizer, self.task, self.eval_prompts, temperature=c.temperature,
                        max_new_tokens=self.max_new_tokens, reward_kind=c.reward_kind)  # fmt: skip
        kl = dense_kl(response_logits(self.student, ro), response_logits(self.teacher, ro),
                      temperature=c.temperature, mask=ro.mask, backend=c.backend)  # fmt: skip
        return {
            "eval_step": self.step_count,
            "eval_samples": self.samples_seen,
            "eval_greedy_acc": float(greedy.rewards.mean()),
            "eval_reward": float(ro.rewards.mean()),
            "eval_kl": float(kl.sum(1).mean()),
            "eval_resp_len": float(ro.mask.sum(1).float().mean()),
        }

    def train(
        self, steps: int | None = None, run_dir: str | Path | None = None, checkpoint_every: int | None = None
    ) -> dict[str, list]:
        """Run `steps` more steps (default: up to config.steps in total), evaluating at the start, every
        `eval_every` steps and at the end; with `run_dir`, checkpoint atomically every `checkpoint_every` steps
        and at the end (see `save` / `resume`)."""
        c = self.config
        n = max(0, c.steps - self.step_count) if steps is None else steps
        if not self.history.get("eval_step"):
            self._record(self.evaluate())
        bar = tqdm(range(n), desc=f"{c.method} seed {c.seed}", disable=not c.progress, leave=False)
        t0 = time.perf_counter()
        for i in bar:
            m = self.step()
            if self.step_count % c.eval_every == 0 or i + 1 == n:
                e = self.evaluate()
                self._record(e)
                bar.set_postfix(
                    reward=f"{m['reward']:.2f}", acc=f"{e['eval_greedy_acc']:.2f}", kl=f"{e['eval_kl']:.2f}"
                )
            if run_dir is not None and (
                i + 1 == n or (checkpoint_every and self.step_count % checkpoint_every == 0)
            ):
                self.save(run_dir)
        self.history.setdefault("wall_s", []).append(time.perf_counter() - t0)
        return self.history

    def save(self, run_dir: str | Path) -> Path:
        """Atomic checkpoint of the student, optimizer, RNGs, prompt order and history (`hybridlab.checkpoint`)."""
        from .checkpoint import save_checkpoint

        extra = {
            "history": self.history,
            "samples_seen": self.samples_seen,
            "order": list(self._order),
            "prompt_rng": self._rng.getstate(),
        }
        return save_checkpoint(run_dir, self.step_count, self.student, self.optimizer, extra=extra)

    def resume(self, run_dir: str | Path) -> bool:
        """Load the newest checkpoint under `run_dir` if there is one (True); training then continues exactly
        as the uninterrupted run would have."""
        from .checkpoint import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(run_dir)
        if path is None:
            return False
        info = load_checkpoint(path, self.student, self.optimizer)
        extra = info["extra"]
        self.step_count, self.samples_seen = info["step"], int(extra["samples_seen"])
        self.history = {k: list(v) for k, v in extra["history"].items()}
        self._order = list(extra["order"])
        st = extra["prompt_rng"]
        self._rng.setstate((st[0], tuple(st[1]), st[2]))
        return True

    def _record(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)

    def config_dict(self) -> dict:
        return {f.name: getattr(self.config, f.name) for f in fields(self.config)}


def samples_to_threshold(
    history: dict[str, list], threshold: float, key: str = "eval_greedy_acc"
) -> int | None:
    """Samples seen at the first evaluation where history[key] >= threshold (None if never)."""
    for s, v in zip(history["eval_samples"], history[key]):
        if v >= threshold:
            return int(s)
    return None


__all__ = [
    "METHODS",
    "METHOD_PRESETS",
    "HybridTrainer",
    "Rollout",
    "TrainerConfig",
    "make_rollout",
    "response_logits",
    "sample",
    "sampled_opd_loss",
    "samples_to_threshold",
    "sft_loss",
    "teacher_forcing_rollout",
]
