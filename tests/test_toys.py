"""The exposure-bias toy and the sequence-level helpers of notebook 01."""

import math

import pytest
import torch

from hybridlab.lab import exact as ex
from hybridlab.lab import toys


def test_copy_teacher_is_a_distribution_with_the_stated_rule():
    teacher, space = toys.copy_task(vocab=3, horizon=4, delta=0.1)
    assert space.size == 3**4
    probs = ex.sequence_probs(teacher, space)
    assert abs(float(probs.sum()) - 1) < 1e-12
    constant = (space.actions == space.actions[:, :1]).all(1)
    assert float(probs[constant].sum()) == pytest.approx(0.9**3, rel=1e-12)
    logits = teacher(torch.tensor([[2, 2, 0, 0]]))
    p = logits.exp()[0]
    assert torch.allclose(p[0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert p[2, 2] == pytest.approx(0.9) and p[3, 0] == pytest.approx(0.9) and p[3, 1] == pytest.approx(0.05)
    assert toys.switch_rate(teacher, space).tolist() == pytest.approx([0.1] * 3)


def test_bounded_student_caps_its_confidence():
    st = toys.tabular_student(3, 4, max_logit=1.5)
    with torch.no_grad():
        st.table.fill_(100.0)
        st.table[:, 1:] = -100.0
    p = torch.softmax(st(torch.zeros(2, 4, dtype=torch.long)).detach(), -1)
    assert float(p.max()) == pytest.approx(st.max_prob(), rel=1e-9)
    assert st.max_prob() == pytest.approx(math.exp(1.5) / (math.exp(1.5) + 2 * math.exp(-1.5)))
    free = toys.tabular_student(3, 4, max_logit=None)
    assert isinstance(free, ex.TinyPolicy) and float(free.table.detach().abs().max()) == 0.0


def test_per_position_kl_sums_to_the_sequence_kl():
    teacher, space = toys.copy_task(3, 4, 0.05)
    st = toys.tabular_student(3, 4)
    with torch.no_grad():
        st.table.normal_(generator=torch.Generator().manual_seed(0))
    per_t = toys.per_position_kl(st, teacher, space, "student")
    logp = ex.token_logprobs(st, space.actions, space.mask).sum(1)
    logq = ex.token_logprobs(teacher, space.actions, space.mask).sum(1)
    seq_kl = float((logp.exp() * (logp - logq)).sum())
    assert float(per_t.sum()) == pytest.approx(seq_kl, rel=1e-10)
    assert float(toys.per_position_kl(st, teacher, space, "teacher")[0]) >= 0


def test_offline_imitation_compounds_and_on_policy_does_not():
    """The notebook-01 claim at small budget: errors grow along the response only for the offline student."""
    teacher, space = toys.copy_task(3, 6, 0.01)
    curves = {}
    for mode in toys.IMITATION_MODES:
        st = toys.tabular_student(3, 6, max_logit=1.5)
        losses = toys.train_imitation(st, teacher, mode=mode, steps=150, batch=32, lr=5.0, seed=0)
        assert losses[-1] < losses[0]
        curves[mode] = toys.per_position_kl(st, teacher, space, "student")
    off, on = curves["offline"], curves["on_policy"]
    assert off[-1] / off[1] > 2.0 and on[-1] / on[1] < 1.7
    assert off.sum() > 1.3 * on.sum()


def test_gibbs_optimum_maximises_the_sequence_objective():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    star = toys.gibbs_optimum(q, r, lam=1.0, beta=0.5)
    j_star = toys.sequence_objective(star, q, r, lam=1.0, beta=0.5)
    assert j_star == pytest.approx(toys.log_partition(q, r, lam=1.0, beta=0.5), abs=1e-12)
    for _ in range(50):
        p = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
        assert toys.sequence_objective(p, q, r, lam=1.0, beta=0.5) < j_star
    assert torch.allclose(toys.gibbs_optimum(q, r, lam=0.0, beta=1.0), q)
    with pytest.raises(ValueError, match="beta"):
        toys.gibbs_optimum(q, r, lam=1.0, beta=0.0)


def test_decode_and_argument_errors():
    a = torch.tensor([[0, 1, 2], [2, 0, 0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    assert toys.decode(a, m, eos=2) == ["ab$", "$"]
    with pytest.raises(ValueError, match="delta"):
        toys.CopyTeacher(3, 4, delta=0.0)
    with pytest.raises(ValueError, match="mode"):
        toys.train_imitation(toys.tabular_student(3, 4), toys.CopyTeacher(3, 4), mode="dagger", steps=1)
    with pytest.raises(ValueError, match="states"):
        toys.per_position_kl(toys.tabular_student(3, 2), *toys.copy_task(3, 2), states="both")
