"""The checkers of the notebooks' exercises (see `hybridlab.lab.exercises` for the framework and the cell pattern).

Each checker builds its own independent reference — exact enumeration, autograd through a formula written out
here, an explicit loop — and raises `Wrong(hint)` when the learner's answer misses it. Tolerances follow the
arithmetic: float64 rounding (~1e-12 relative after a few hundred operations) for code, a looser one for a
number a learner types in by hand.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hybrid import hybrid_loss
from . import exact as E
from .exercises import Wrong, register, result_of

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _number(answer: Any, what: str) -> float:
    try:
        return float(answer)
    except (TypeError, ValueError):
        raise Wrong(f"expected a number ({what}), got {answer!r}") from None


def _tensor(out: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if not torch.is_tensor(out):
        raise Wrong(f"{what} should be a tensor of shape {list(shape)}, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise Wrong(f"{what} should have shape {list(shape)}, got {list(out.shape)}")
    if not torch.isfinite(out).all():
        raise Wrong(f"{what} has NaN or inf entries (at {int((~torch.isfinite(out)).sum())} places)")
    return out.detach().to(F64)


def _booleans(answer: Any, keys: list[str]) -> dict[str, bool]:
    if not isinstance(answer, dict) or set(answer) != set(keys):
        raise Wrong(f"answer with a dict of True/False for exactly these keys: {keys}")
    bad = [k for k, v in answer.items() if not isinstance(v, bool)]
    if bad:
        raise Wrong(f"each value must be True or False; not for {bad}")
    return answer


# ---------------------------------------------------------------------------------------------------------------
# 00 quickstart


@register("00.count", "function", "count the possible responses")
def _count(fn, **_):
    for vocab in (2, 3, 4):
        for horizon in (1, 2, 3, 4):
            ref = E.enumerate_sequences(vocab, horizon, eos=True).size  # the list itself, counted
            got = result_of(fn, vocab, horizon)
            if got != ref:
                hint = ""
                if got == vocab**horizon:
                    hint = " vocab**horizon counts every string of `horizon` tokens, but nothing follows the end token."
                raise Wrong(
                    f"count_responses({vocab}, {horizon}) = {got}; list the responses for vocab=2, horizon=2 by "
                    f"hand (a response stops at its end token, or after `horizon` tokens) and count again.{hint}"
                )
    return "matches the enumeration for every vocab 2-4 and horizon 1-4."


def _loop_returns(rewards, k, mask, lam, beta, *, first):
    """G_t = lam R - beta sum_{t' >= t + first} k_t', by explicit loops (the reference)."""
    b, t = k.shape
    out = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        for s in range(t):
            if mask[i, s]:
                out[i, s] = lam * rewards[i] - beta * sum(
                    float(k[i, u]) for u in range(s + first, t) if mask[i, u]
                )
    return out


@register("00.return", "function", "the sparse part's return: reward minus beta times the future KL")
def _return(fn, **_):
    g = torch.Generator().manual_seed(5)
    b, t = 5, 4
    k = torch.randn(b, t, generator=g, dtype=F64)
    lengths = torch.tensor([4, 3, 1, 2, 4])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    k = torch.where(mask, k, 0.0)
    rewards = torch.rand(b, generator=g, dtype=F64)
    lam, beta = 1.5, 0.7
    got = _tensor(result_of(fn, rewards, k, mask, lam, beta), (b, t), "the return")
    ref = _loop_returns(rewards, k, mask, lam, beta, first=1)
    if torch.allclose(got[mask], ref[mask], atol=1e-12):
        return "G_t = lam R - beta * (sum of the log-ratios strictly after t), on every response token."
    if torch.allclose(got[mask], _loop_returns(rewards, k, mask, lam, beta, first=0)[mask], atol=1e-12):
        raise Wrong(
            "your return includes the current step t: the future starts at t + 1 (step t is the dense part)."
        )
    if torch.allclose(got[mask], (2 * lam * rewards[:, None] - ref)[mask], atol=1e-12):
        raise Wrong("check the sign: the future KL is subtracted (J = lam E[R] - beta KL).")
    raise Wrong(
        "compare with a small case by hand: one response, three tokens, k = (1, 2, 3), lam = beta = 1."
    )


# ---------------------------------------------------------------------------------------------------------------
# 01 objective


def _random_distribution(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, generator=g, dtype=F64), 0)


def _objective(pi: torch.Tensor, q: torch.Tensor, r: torch.Tensor, lam: float, beta: float) -> torch.Tensor:
    """J(pi) = sum_y pi(y) [lam R(y) - beta log(pi(y) / q(y))], written out (0 log 0 = 0)."""
    log_ratio = torch.where(pi > 0, pi.clamp_min(1e-300).log() - q.log(), 0.0)
    return (pi * (lam * r - beta * log_ratio)).sum()


@register("01.optimum", "function", "the optimum pi* from the teacher and the reward")
def _optimum(fn, **_):
    for seed, (lam, beta) in enumerate([(1.0, 0.5), (0.0, 1.0), (3.0, 1.0), (1000.0, 1.0)]):
        q = _random_distribution(15, seed)
        r = torch.randn(15, generator=torch.Generator().manual_seed(10 + seed), dtype=F64)
        pi = _tensor(result_of(fn, q, r, lam, beta), (15,), f"optimum(q, r, lam={lam}, beta={beta})")
        if (pi < 0).any() or abs(float(pi.sum()) - 1) > 1e-9:
            raise Wrong(
                f"at lam={lam}, beta={beta} the result is not a distribution (sum {float(pi.sum()):.6g})."
            )
        # stationarity on the simplex: lam R(y) - beta log(pi(y)/q(y)) is the same for every y with pi(y) > 0
        live = pi > 1e-250
        score = lam * r[live] - beta * (pi[live].log() - q[live].log())
        if float(score.max() - score.min()) > 1e-7 * max(1.0, lam * float(r.max() - r.min())):
            raise Wrong(
                f"at lam={lam}, beta={beta}: the derivative of J along the simplex is not zero, so J can still be "
                "raised. Complete the KL in J = beta log Z - beta KL(pi || pi*)."
            )
        if live.sum() < 15 and float(pi[~live].sum()) > 1e-12 or (lam == 1000.0 and float(pi.max()) < 0.99):
            raise Wrong("at lam/beta = 1000 the optimum should concentrate on the best-rewarded response.")
    return "stationary, normalised, and stable at lam/beta = 1000 (log space)."


def _maximise(q, r, lam, beta, steps: int = 400) -> float:
    """max_pi J(pi) by mirror ascent on the simplex (pi <- pi exp(eta grad J), renormalised): no closed form used."""
    pi, eta = torch.full_like(q, 1.0 / len(q)), 0.3 / beta
    for _ in range(steps):
        grad = lam * r - beta * (pi.log() - q.log() + 1)
        pi = torch.softmax(pi.log() + eta * grad, 0)
    return float(_objective(pi, q, r, lam, beta))


@register("01.doubling", "value", "how J(pi*) changes when both weights double")
def _doubling(answer, **_):
    factor = _number(answer, "J(pi*) at (2 lam, 2 beta) divided by J(pi*) at (lam, beta)")
    q, r = _random_distribution(15, 3), torch.rand(15, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = _maximise(q, r, 2.0, 1.0) / _maximise(q, r, 1.0, 0.5)
    if abs(factor - ref) > 1e-3 * abs(ref):
        raise Wrong("J is linear in (lam, beta) for a fixed pi; does pi* itself move when both double?")
    return (
        f"J(pi*) scales by {ref:.6f} (maximised numerically): pi* is unchanged, J is linear in the weights."
    )


# ---------------------------------------------------------------------------------------------------------------
# 02 gradient decomposition


def surrogate_toy() -> dict[str, Any]:
    """The enumerable toy of notebook 02's surrogate exercise: vocabulary 3 (the last one ends), at most 3 tokens."""
    space = E.enumerate_sequences(3, 3, eos=True)
    return {
        "space": space,
        "student": E.TinyPolicy(3, 3, seed=0),
        "teacher": E.TinyPolicy(3, 3, seed=1, scale=2.0),
        "reward": E.reward_table(space, "random", seed=0),
        "lam": 1.0,
        "beta": 0.5,
    }


def expected_surrogate_gradient(fn, toy: dict[str, Any]) -> torch.Tensor:
    """sum_y pi(y) * (-grad fn(one response y)): the exact expectation of the estimate a surrogate gives. [P]"""
    space, student, teacher = toy["space"], toy["student"], toy["teacher"]
    with torch.no_grad():
        probs = E.sequence_probs(student, space)
        teacher_logits = teacher(space.actions)
        rewards = toy["reward"](space.actions, space.mask)
    total = torch.zeros(sum(p.numel() for p in student.parameters()), dtype=F64)
    for i in range(space.size):
        sl = slice(i, i + 1)
        loss = result_of(fn, student(space.actions[sl]), teacher_logits[sl], space.actions[sl], rewards[sl],
                         space.mask[sl], toy["lam"], toy["beta"])  # fmt: skip
        if not (torch.is_tensor(loss) and loss.ndim == 0 and loss.requires_grad):
            raise Wrong("the surrogate must be a scalar tensor that depends on the student's logits.")
        total -= float(probs[i]) * E.flat_grad(loss, student)
    return total


@register("02.surrogate", "function", "the hybrid surrogate in plain torch")
def _surrogate(fn, **context):
    toy = {**surrogate_toy(), **context}
    grad_j = E.exact_gradient(toy["student"], toy["teacher"], toy["space"], toy["reward"], lam=toy["lam"],
                              beta=toy["beta"])  # fmt: skip
    est = expected_surrogate_gradient(fn, toy)
    err = _rel(est, grad_j)
    if err > 1e-9:
        from .solutions import WRONG_SURROGATES  # diagnosis only: the verdict is against the exact grad J

        for name, wrong in WRONG_SURROGATES.items():
            if _rel(est, expected_surrogate_gradient(wrong, toy)) < 1e-9:
                raise Wrong(f"E[-grad] misses grad J by {err:.2f} (relative): {name}.")
        raise Wrong(
            f"E[-grad] misses the exact grad J by {err:.2e} (relative). Check the three parts one at a time."
        )
    # the same numbers as hybrid_loss on a sampled batch (its default: batch mean over responses)
    actions, mask = E.sample(toy["student"], 8, torch.Generator().manual_seed(7), eos=toy["space"].eos)
    logits = toy["student"](actions)
    with torch.no_grad():
        t_logits = toy["teacher"](actions)
    rewards = toy["reward"](actions, mask)
    mine = result_of(fn, logits, t_logits, actions, rewards, mask, toy["lam"], toy["beta"])
    ref = hybrid_loss(logits, t_logits, actions, rewards, mask=mask, lam=toy["lam"], beta=toy["beta"],
                      backend="torch").loss  # fmt: skip
    g_mine, g_ref = (torch.autograd.grad(x, logits, retain_graph=True)[0] for x in (mine, ref))
    if _rel(g_mine, g_ref) > 1e-9:
        raise Wrong("right in expectation, but on a batch of 8 the gradient differs from hybrid_loss's: "
                    "average over the responses of the batch (sum over tokens, divide by B).")  # fmt: skip
    return f"E[-grad] = grad J to {err:.1e} (exact enumeration), and the batch gradient equals hybrid_loss's."


@register("02.past_and_current", "value", "which 'baselines' change the expected gradient")
def _past_and_current(answer, **context):
    keys = ["past only", "past and current"]
    mine = _booleans(answer, keys)
    toy = {**surrogate_toy(), **context}
    space, student, teacher = toy["space"], toy["student"], toy["teacher"]
    kw = dict(lam=toy["lam"], beta=toy["beta"])
    grad_j = E.exact_gradient(student, teacher, space, toy["reward"], **kw)
    with torch.no_grad():
        k = E.token_logprobs(student, space.actions, space.mask) - E.token_logprobs(
            teacher, space.actions, space.mask
        )
    truth = {}
    for key, b in (("past only", torch.cumsum(k, 1) - k), ("past and current", torch.cumsum(k, 1))):
        out = E.enumerated_loss(student, teacher, space, toy["reward"], baseline=toy["beta"] * b, **kw)
        truth[key] = _rel(-space.size * E.flat_grad(out.loss, student), grad_j) > 1e-6
    wrong = [k for k in keys if mine[k] != truth[k]]
    if wrong:
        raise Wrong(f"not right for {wrong}: ask whether the term is fixed once s_t is (then E[score | s_t] = 0 "
                    "kills it) or depends on y_t.")  # fmt: skip
    return "the past is fixed by s_t (no change); the current k_t depends on y_t (a double count)."


@register("02.grpo_constant", "value", "GRPO's group-mean advantage vs the leave-one-out one")
def _grpo(answer, **_):
    c = _number(answer, "the constant c for G = 4")
    r = torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=F64)
    ratios = []
    for i in range(4):
        loo = sum(float(r[j]) for j in range(4) if j != i) / 3
        ratios.append((float(r[i]) - float(r.mean())) / (float(r[i]) - loo))
    if max(abs(c - x) for x in ratios) > 1e-3:
        raise Wrong("write the group mean as (R_i + (G - 1) * loo_i) / G and subtract it from R_i.")
    return f"R_i - mean = {ratios[0]:.4f} (R_i - loo_i) for every member: c = (G - 1) / G."


# the checkers of notebooks 03-07 and of 06 and 08 register on import
from . import exercise_checks_03_07, exercise_checks_06_08  # noqa: E402,F401
