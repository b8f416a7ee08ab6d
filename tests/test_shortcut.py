"""The short-answer shortcut on the enumerable toy: the exact future-KL term shortens responses, the myopic rule
does not; the exact one still follows grad J (it reaches a higher J), at the cost of the task reward."""

import pytest
import torch

from hybridlab.lab import controls as C
from hybridlab.lab import exact as E
from hybridlab.lab import shortcut as S


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    return S.shortcut_runs(steps=120)


def test_exact_future_kl_shortens_responses_and_myopic_keeps_them(runs):
    exact, myopic = runs["exact (future='analytic')"], runs["myopic (future='none')"]
    assert exact["length"][0] == pytest.approx(myopic["length"][0], abs=1e-12)  # the same start
    assert exact["length"][-1] < 0.6 * exact["length"][0]  # measured: 3.65 -> ~1.7
    assert exact["eos_rate"][-1] > 5 * exact["eos_rate"][0]
    assert myopic["length"][-1] > 0.95 * myopic["length"][0]
    assert exact["reward"][-1] < 0.25 * myopic["reward"][-1]  # the task pays for the shortcut
    # ... and yet the exact rule optimises J better: the shortcut is in J's landscape, not in the estimator
    assert exact["objective"][-1] > myopic["objective"][-1] + 0.1
    assert exact["kl"][-1] < myopic["kl"][-1]


def test_the_dense_and_future_parts_oppose_once_it_settles(runs):
    exact, myopic = runs["exact (future='analytic')"], runs["myopic (future='none')"]
    assert exact["cosine"][-1] < -0.9  # at the short fixed point the two parts cancel
    assert exact["future_norm"][0] > 0.5 * exact["dense_norm"][0]  # the future term is not small
    assert all(x != x for x in myopic["cosine"])  # nan: no future term at all
    assert max(myopic["future_norm"]) == 0.0


def test_the_toy_pieces():
    space = E.enumerate_sequences(3, 4, eos=True)
    teacher = S.alternating_teacher(space)
    probs = E.sequence_probs(teacher, space)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    best = int(probs.argmax())
    assert space.actions[best].tolist() == [0, 1, 0, 1]  # the teacher's answer is a b a b
    student = S.OneStatePolicy(4)
    logits = student(space.actions)
    assert torch.equal(logits[:, 0], logits[:, 3])  # one distribution for every state
    reward = S.full_length_reward(4)
    r = reward(space.actions, space.mask)
    assert float(r[best]) == 1.0 and float(r[space.mask.sum(1) < 4].abs().max()) == 0.0
    # the expected estimate of the default setting is grad J (the toy uses the library's estimator unchanged)
    grad_j = E.exact_gradient(student, teacher, space, reward, lam=1.0, beta=1.0)
    est = E.expected_estimate(student, teacher, space, reward, lam=1.0, beta=1.0)["total"]
    assert C.relative_error(est, grad_j) < 1e-10
    with pytest.raises(ValueError, match="p_eos"):
        S.alternating_teacher(space, p=0.99, p_eos=0.02)
    with pytest.raises(ValueError, match="horizon"):
        S.shortcut_runs(steps=3, horizon=1)


def test_the_student_cannot_match_the_teacher():
    """The floor is a real floor: no one-state distribution gets below it, and it is far above 0."""
    floor = S.per_token_floor()
    assert 1.1 < floor < 1.3  # measured 1.214
    assert S.per_token_floor(grid=800) <= floor + 1e-12 and S.per_token_floor(grid=800) > floor - 0.01
    # the floor comes from the alternation: a teacher that barely alternates is nearly matchable by one distribution
    assert S.per_token_floor(p=0.49, p_eos=0.02) < 0.05
