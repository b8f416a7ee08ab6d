"""Checkers of the exercises of notebooks 03, 04, 05 and 07 (the framework: `hybridlab.lab.exercises`)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from . import exact as E
from .exercise_checks import F64, _booleans, _number, _rel, _tensor
from .exercises import Wrong, register, result_of

# ---------------------------------------------------------------------------------------------------------------
# 03 dense gradient


def _logits(seed: int, n: int = 4, v: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, v, generator=g, dtype=F64), 2 * torch.randn(n, v, generator=g, dtype=F64)


@register("03.reverse_grad", "function", "the closed-form gradient of KL(p || q) at the logits")
def _reverse_grad(fn, **_):
    for tau in (1.0, 0.7):
        z, t = _logits(int(10 * tau))
        z[:, -1] = t[:, -1] = -math.inf  # a token both sides give probability 0
        z[0, 2] = -math.inf  # a token only the student gives probability 0
        got = _tensor(result_of(fn, z.clone(), t.clone(), tau), tuple(z.shape), f"the gradient at tau={tau}")
        # reference: autograd through the KL written out, on the finite logits only
        ref = torch.zeros_like(z)
        for i in range(z.shape[0]):
            keep = torch.isfinite(z[i])
            zi = z[i, keep].clone().requires_grad_(True)
            logp = torch.log_softmax(zi / tau, 0)
            logq = torch.log_softmax(t[i], 0)[keep]
            (gi,) = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), zi)
            ref[i, keep] = gi
        if torch.allclose(got, ref, atol=1e-12):
            continue
        if tau != 1.0 and torch.allclose(got, tau * ref, atol=1e-12):
            raise Wrong("right at tau = 1; at tau = 0.7 the chain rule through z / tau adds a factor.")
        if torch.allclose(got, -ref, atol=1e-12):
            raise Wrong("the sign is flipped: return dKL/dz (the descent step is its negative).")
        if got.sum(-1).abs().max() > 1e-9:
            raise Wrong(
                "your gradient does not sum to zero over the vocabulary: the -KL term inside is missing?"
            )
        raise Wrong(
            f"does not match autograd at tau={tau} (max difference {float((got - ref).abs().max()):.2e})."
        )
    return "matches autograd, with a temperature and -inf logits (exact zeros, no NaN)."


@register("03.forward_grad", "function", "the gradient of the forward KL(q || p) at the logits")
def _forward_grad(fn, **_):
    z, t = _logits(3)
    q = torch.softmax(t, -1)
    got = _tensor(result_of(fn, z.clone(), q.clone()), tuple(z.shape), "the gradient")
    zz = z.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((q * (q.log() - torch.log_softmax(zz, -1))).sum(), zz)
    if torch.allclose(got, ref, atol=1e-12):
        return "p - q: a token the teacher likes gets pushed up even where p is ~0 (mode covering)."
    if torch.allclose(got, -ref, atol=1e-12):
        raise Wrong("the sign is flipped: return dKL/dz, the gradient of the KL itself.")
    raise Wrong("write KL(q || p) = const - sum_i q_i log p_i and use d log p_i / d z_j = delta_ij - p_j.")


# ---------------------------------------------------------------------------------------------------------------
# 04 sparse gradient


def sparse_toy() -> dict[str, Any]:
    """Notebook 04's stated toy: `a b $`, at most 3 tokens, far teacher, reward sigmoid(N(0, 1)), lam = beta = 1."""
    space = E.enumerate_sequences(3, 3, eos=True)
    xi = E.reward_table(space, "random", seed=0)
    return {
        "space": space,
        "student": E.TinyPolicy(3, 3, seed=0),
        "teacher": E.TinyPolicy(3, 3, seed=100, scale=3.0),
        "reward": lambda actions, mask: torch.sigmoid(xi(actions, mask)),
        "lam": 1.0,
        "beta": 1.0,
    }


UNBIASED_KEYS = [
    "leave-one-out mean reward of the other responses of the group",
    "a constant, lam E[R]",
    "the response's own reward, lam R(y)",
    "beta times the current step's log-ratio k_t",
]


def _group_bias(toy, baseline: str) -> float:
    """Relative bias of the per-group estimate with a group baseline, exact over every ordered pair."""
    space, student, teacher, reward = toy["space"], toy["student"], toy["teacher"], toy["reward"]
    kw = dict(lam=toy["lam"], beta=toy["beta"])
    probs = E.sequence_probs(student, space).detach()
    total = None
    for i in range(space.size):
        for j in range(space.size):
            sel = torch.tensor([i, j])
            g = E.group_estimate(
                student, teacher, space.actions[sel], space.mask[sel], reward, baseline=baseline, **kw
            )
            w = float(probs[i] * probs[j])
            total = w * g if total is None else total + w * g
    return _rel(total, E.exact_gradient(student, teacher, space, reward, **kw))


@register("04.unbiased", "value", "which baselines keep the estimate unbiased")
def _unbiased(answer, **context):
    mine = _booleans(answer, UNBIASED_KEYS)
    toy = {**sparse_toy(), **context}
    space, student, teacher, reward = toy["space"], toy["student"], toy["teacher"], toy["reward"]
    kw = dict(lam=toy["lam"], beta=toy["beta"])
    grad_j = E.exact_gradient(student, teacher, space, reward, **kw)
    with torch.no_grad():
        r = reward(space.actions, space.mask)
        k = E.token_logprobs(student, space.actions, space.mask) - E.token_logprobs(
            teacher, space.actions, space.mask
        )
        mean_r = float(E.sequence_probs(student, space) @ r)
    tensors = {
        UNBIASED_KEYS[1]: torch.full_like(k, toy["lam"] * mean_r),
        UNBIASED_KEYS[2]: toy["lam"] * r[:, None].expand_as(k).clone(),
        UNBIASED_KEYS[3]: toy["beta"] * k,
    }
    truth = {UNBIASED_KEYS[0]: _group_bias(toy, "reward_group") < 1e-9}
    for key, b in tensors.items():
        out = E.enumerated_loss(student, teacher, space, reward, baseline=b, **kw)
        truth[key] = _rel(-space.size * E.flat_grad(out.loss, student), grad_j) < 1e-9
    wrong = [k for k in UNBIASED_KEYS if mine[k] != truth[k]]
    if wrong:
        raise Wrong(f"not right for {wrong}. The condition: is b independent of y_t once s_t is given? Then "
                    "E[score(y_t) * b | s_t] = b * E[score | s_t] = 0.")  # fmt: skip
    return "unbiased exactly when b is independent of y_t given s_t (checked by exact enumeration)."


def _scalar_variances(lam_er: float, beta_ef: float) -> tuple[float, float]:
    """Var of g (G - b) with b = 0 and b = lam E[R], by enumerating a scalar model: g = +-1 (mean 0) independent
    of R in {lam E R - 1, lam E R + 1} and F in {beta E F - 0.5, beta E F + 0.5}, G = R - F (weights folded in)."""
    cases = [
        (g, r, f)
        for g in (-1.0, 1.0)
        for r in (lam_er - 1, lam_er + 1)
        for f in (beta_ef - 0.5, beta_ef + 0.5)
    ]
    out = []
    for b in (0.0, lam_er):
        mean = sum(g * (r - f - b) for g, r, f in cases) / len(cases)
        out.append(sum((g * (r - f - b) - mean) ** 2 for g, r, f in cases) / len(cases))
    return out[0], out[1]


@register("04.scalar", "function", "when a reward-only baseline raises the variance (scalar model)")
def _scalar(fn, **_):
    for beta_ef in (0.5, 1.0, 2.0):
        for lam_er in [x / 4 for x in range(-8, 21)]:
            v_none, v_reward = _scalar_variances(lam_er, beta_ef)
            if abs(v_reward - v_none) < 1e-9:
                continue  # a tie: either answer is fine
            got = result_of(fn, lam_er, beta_ef)
            if bool(got) != (v_reward > v_none):
                raise Wrong(f"wrong at lam E[R] = {lam_er}, beta E[F] = {beta_ef}: write Var(g (G - b)) = "
                            "E[g^2] (Var G + (E G - b)^2) for a score g independent of G, with E G = lam E R - beta E F.")  # fmt: skip
    return "matches the enumerated scalar model: raises it exactly when 0 < lam E R < 2 beta E F."


# ---------------------------------------------------------------------------------------------------------------
# 05 mixing lab


@functools.lru_cache(maxsize=1)
def _loophole_world():
    from .mixing_lab import MixingLab  # (its import is the slow part: once)

    lab = MixingLab(seed=0, reward="loophole")
    return lab.teacher_distribution().double(), lab.reward_values().double(), lab.loophole_index


def _loophole_lab():
    """pi_T [15], the loophole reward [15] and the index of `bbb` in notebook 05's lab (fresh copies)."""
    q, r, k = _loophole_world()
    return q.clone(), r.clone(), k


def _tilted(q, r, lam, beta):
    w = q.log() + lam * r / beta
    return (w - w.max()).exp() / (w - w.max()).exp().sum()


@register("05.same_end", "value", "where a run at (lam, beta) = (2, 1) ends, next to (1, 0.5)")
def _same_end(answer, **_):
    choices = ("same", "more rewarded", "closer to the teacher")
    if answer not in choices:
        raise Wrong(f"answer with one of {choices}")
    q, r, _ = _loophole_lab()
    tv = 0.5 * float((_tilted(q, r, 2.0, 1.0) - _tilted(q, r, 1.0, 0.5)).abs().sum())
    truth = "same" if tv < 1e-12 else ("more rewarded" if float(_tilted(q, r, 2.0, 1.0) @ r) > float(_tilted(q, r, 1.0, 0.5) @ r) else "closer to the teacher")  # fmt: skip
    if answer != truth:
        raise Wrong("write pi* for both settings: which combination of lam and beta does it depend on?")
    return f"the two optima are {tv:.0e} apart in TV: pi* depends on lam / beta only."


@register("05.beta_half", "function", "the teacher weight at which pi* puts half its mass on the loophole")
def _beta_half(fn, **context):
    cases = [(*_loophole_lab(), 1.0)]
    q = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=F64), 0)
    r = torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=F64)
    r[5] = 2.0
    cases.append((q, r, 5, 0.5))
    for q, r, k, lam in cases:
        b = _number(result_of(fn, q, r, k, lam), "beta*")
        if not b > 0:
            raise Wrong(f"beta* must be > 0, got {b}")
        mass = float(_tilted(q, r, lam, b)[k])
        if abs(mass - 0.5) > 1e-6:
            raise Wrong(f"at your beta* = {b:.4g}, pi*(loophole) = {mass:.4f}, not 1/2. Solve "
                        "pi_T(k) e^{lam R_k / beta} = sum_{y != k} pi_T(y) e^{lam R(y) / beta} for beta (bisection).")  # fmt: skip
    return "pi*(loophole) = 1/2 at your beta* (on the lab's world and on a random one)."


# ---------------------------------------------------------------------------------------------------------------
# 07 scaling up


@register("07.gib", "value", "GiB held by the materialised loss at N = 32,768 tokens")
def _gib(answer, **_):
    got = _number(answer, "GiB")
    n, v, bf16 = 32768, 152064, torch.tensor([], dtype=torch.bfloat16).element_size()
    ref = 3 * n * v * bf16 / 2**30
    if abs(got - ref) <= 0.02 * ref:
        return f"{ref:.2f} GiB: student logits, their gradient and the teacher's logits, bf16 each."
    if abs(got - ref / 3) <= 0.02 * ref / 3:
        raise Wrong("that is one [N, V] tensor; the materialised loss holds three (which?).")
    if abs(got - 2 * ref) <= 0.04 * ref:
        raise Wrong("bf16 is 2 bytes per number, not 4.")
    raise Wrong("count the [N, V] tensors the loss holds at once and multiply by N * V * bytes / 2**30.")


def _kept_reference(steps: int, every: int, keep: int) -> list[int]:
    """Simulate the rotation: save at every multiple of `every` and at the last step, keep the newest `keep`."""
    on_disk: list[int] = []
    for step in range(1, steps + 1):
        if step == steps or (every and step % every == 0):
            on_disk.append(step)
            on_disk = on_disk[-keep:]
    return on_disk


@register("07.checkpoints", "function", "which checkpoints a run keeps on disk")
def _checkpoints(fn, run_dir_steps: list[int] | None = None, steps: int | None = None, every=None, keep=None):
    for s, e, k in [(10, 3, 2), (12, 4, 2), (7, 0, 2), (20, 5, 1), (9, 2, 5), (1, 1, 3)]:
        got = result_of(fn, s, e, k)
        if list(got) != _kept_reference(s, e, k):
            raise Wrong(f"kept_checkpoints({s}, {e}, {k}) = {list(got)}: a checkpoint is also written at the last "
                        "step, even when it is not a multiple of checkpoint_every; then only the newest are kept.")  # fmt: skip
    if run_dir_steps is not None:  # the notebook's own run, as listed on disk
        got = list(result_of(fn, steps, every, keep))
        if got != list(run_dir_steps):
            raise Wrong(f"your rule gives {got}, the run directory holds {list(run_dir_steps)}.")
        return f"matches the simulation and the run's directory ({list(run_dir_steps)})."
    return "matches the simulated rotation."
