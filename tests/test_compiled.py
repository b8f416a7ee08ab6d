"""backend="compiled": the one-pass rows by torch.compile (Inductor), beside the eager and Triton paths.

Its values and gradients are checked against the float64 truth with the arithmetic bounds of
tests/test_hybrid_onepass.py (where "compiled" is one of the parametrised backends); here: the bytes its
generated kernels move by Inductor's own count (2U forward, 3U backward) with a control that adds a pass, the
per-call fallback to the eager path for rows that need care, dense_kl and the top-k bound under the same name,
and the error when compilation fails."""

import pytest
import torch

from hybridlab import _compiled
from hybridlab._onepass import OFFSET_LIMIT, rows_forward
from hybridlab.dense import dense_kl
from tests.tolerances import kl_tolerance

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(
        not _compiled.cpu_compiler_available(), reason="no C++ compiler: Inductor cannot build"
    ),
]


def _inputs(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, v, generator=g)
    t = scale * torch.randn(n, v, generator=g)
    return z, t, torch.randint(0, v, (n,), generator=g)


def test_generated_kernels_move_five_tensors_and_a_control_that_adds_a_pass_is_seen(monkeypatch):
    n, v = 16, 512
    got = _compiled.generated_bytes(n, v)
    # z and t read once in forward (2U); z and t read, the gradient written in backward (3U); the [N] row
    # scalars add (a few N) / (N V) of a U.
    assert 2.0 <= got["forward"] <= 2.05 and 3.0 <= got["backward"] <= 3.05, got
    original = _compiled._rows_backward

    def also_probabilities(z, t, y, active, lse_x, lse_t, kl, a, b, inv_tau):  # writes p as well: +1U
        g = original(z, t, y, active, lse_x, lse_t, kl, a, b, inv_tau)
        return g, torch.exp(z.float() * inv_tau - lse_x[:, None])

    monkeypatch.setattr(_compiled, "_rows_backward", also_probabilities)
    worse = _compiled.generated_bytes(n, v)
    assert worse["backward"] >= got["backward"] + 0.95, (worse, got)


def test_rows_that_need_care_run_the_eager_path_and_ordinary_rows_the_compiled_one():
    z, t, y = _inputs(6, 40, seed=1)
    assert rows_forward(z, t, y, None, 1.0, None, "compiled")[3][0] == "compiled"
    # an offset beyond OFFSET_LIMIT on one active row: the whole call takes the eager path (which centres)
    z2 = z.clone()
    z2[2] += 4 * OFFSET_LIMIT
    assert rows_forward(z2, t, y, None, 1.0, None, "compiled")[3][0] == "torch"
    # ... unless that row is masked out: padding decides nothing
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False
    z2[2] = float("nan")
    assert rows_forward(z2, t, y, mask, 1.0, None, "compiled")[3][0] == "compiled"
    # a teacher floor and fp64 inputs always take the eager path
    assert rows_forward(z, t, y, None, 1.0, -30.0, "compiled")[3][0] == "torch"
    assert rows_forward(z.double(), t.double(), y, None, 1.0, None, "compiled")[3][0] == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_kl_compiled_matches_float64(dtype):
    z, t, _ = _inputs(12, 1001, seed=2)
    z, t = z.to(dtype), t.to(dtype)
    mask = torch.arange(12) % 4 != 3
    tau = 0.8
    zz = z.detach().requires_grad_(True)
    w = torch.rand(12, generator=torch.Generator().manual_seed(3))
    kl = dense_kl(zz, t, temperature=tau, mask=mask, backend="compiled")
    (w * kl).sum().backward()
    z64 = z.double().detach().requires_grad_(True)
    lp = torch.log_softmax(z64 / tau, -1)
    lq = torch.log_softmax(t.double(), -1)
    kl64 = torch.where(mask, (lp.exp() * (lp - lq)).sum(-1), 0.0)
    (w.double() * kl64).sum().backward()
    assert (kl[~mask] == 0).all() and (zz.grad[~mask] == 0).all()
    tol = kl_tolerance(z.double(), kl64, dtype, tau)
    assert ((kl.double() - kl64).abs() <= tol).all()
    # the gradient entries p_j (r_j - KL) w / tau inherit p_j times the KL's error plus their own rounding
    # into the student's dtype
    eps = torch.finfo(dtype).eps
    p = lp.exp().detach()
    bound = p * (w.double()[:, None] * tol[:, None] * 4 / tau) + eps * z64.grad.abs() + 1e-12
    assert ((zz.grad.double() - z64.grad).abs() <= bound).all()
    # control: the gradient at the wrong temperature is caught by the same bound
    zw = z.detach().requires_grad_(True)
    (w * dense_kl(zw, t, temperature=1.0, mask=mask, backend="compiled")).sum().backward()
    assert not ((zw.grad.double() - z64.grad).abs() <= bound).all()


def test_the_top_k_bound_accepts_the_setting_and_runs_torch():
    from hybridlab.topk import dense_kl_topk

    z, t, _ = _inputs(5, 60, seed=4)
    lq, ids = torch.log_softmax(t, -1).topk(8, -1)
    a = dense_kl_topk(z, lq, ids, backend="compiled", logprob_precision=torch.float32)
    b = dense_kl_topk(z, lq, ids, backend="torch", logprob_precision=torch.float32)
    assert torch.equal(a, b)


def test_an_unknown_backend_names_the_choices():
    z, t, _ = _inputs(2, 10, seed=5)
    with pytest.raises(ValueError, match="compiled"):
        dense_kl(z, t, backend="inductor")


def test_a_compilation_failure_says_what_to_do(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise OSError("no C++ compiler found")

        return run

    monkeypatch.setattr(_compiled, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    z, t, _ = _inputs(3, 20, seed=6)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler.*backend='torch'"):
        dense_kl(z.requires_grad_(), t, backend="compiled")
