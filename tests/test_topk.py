"""Top-k teachers: the tail-bucket KL by Triton kernel, torch closed form and autograd reference,
and its defining property: a lower bound on the full-vocabulary KL."""

import pytest
import torch
from tolerances import kl_tolerance

from hybridlab import dense_kl_reference
from hybridlab.topk import (
    TopKTeacher,
    dense_kl_topk,
    dense_kl_topk_reference,
    dense_kl_topk_renormalized,
    topk_from_logits,
)

pytest.importorskip("hybridlab.kernels.topk_triton")
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy noise of the interpreter on error paths
    # fp32 log-softmax top-k under "auto" (tested in test_review_estimators.py)
    pytest.mark.filterwarnings("ignore::hybridlab.topk.ResolutionWarning"),
]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(n, v, k, seed, dtype=torch.float32, scale=3.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).to(device)
    t = (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).to(device)
    w = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5).to(device)
    tk = topk_from_logits(t, k)  # float64 log-probs, as exact as the teacher allows
    return z.to(dtype), t, TopKTeacher(tk.logprobs.to(dtype), tk.ids), w


def _kl_and_grad(fn, z, w):
    z = z.detach().clone().requires_grad_(True)
    kl = fn(z)
    (kl * w.to(kl.dtype)).sum().backward()
    return kl.detach(), z.grad


def _run(backend, z, tk, w, tau=1.0, **kw):
    return _kl_and_grad(
        lambda a: dense_kl_topk(a, tk.logprobs, tk.ids, temperature=tau, backend=backend, **kw), z, w
    )


def _ref(z, tk, w, tau=1.0):
    """float64 reference (the same rounded inputs, the same tail-mass resolution) and the KL tolerance [N]."""
    prec = tk.logprobs.dtype
    kl_r, grad_r = _kl_and_grad(
        lambda a: dense_kl_topk_reference(a, tk.logprobs.double(), tk.ids, tau, logprob_precision=prec),
        z.double(),
        w,
    )
    return kl_r, grad_r, kl_tolerance(z.double(), kl_r, z.dtype, tau)


def assert_matches(kl, grad, kl_ref, grad_ref, kl_tol, grad_rtol=1e-4, grad_atol=1e-5):
    assert ((kl.double() - kl_ref).abs() <= kl_tol).all(), (kl, kl_ref, kl_tol)
    # grad_j = w p_j (r_j - KL) / tau: the KL's error enters as w p_j error / tau <= 4 error (|w| <= 1.5, tau >= 0.6)
    atol = max(grad_atol, 4 * float(kl_tol.max()))
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=grad_rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "n,v,k,tau",
    [
        (64, 1, 1, 1.0),
        (5, 7, 3, 0.7),
        (9, 1000, 20, 1.0),
        (2, 32003, 64, 1.3),
        (1, 131075, 20, 1.0),
        (4, 5, 5, 1.0),
    ],
)
def test_closed_form_matches_autograd_reference(backend, n, v, k, tau):
    z, _, tk, w = _case(n, v, k, seed=v + k)
    z = z.float()
    tk = TopKTeacher(tk.logprobs.float(), tk.ids)
    kl, grad = _run(backend, z, tk, w, tau)
    assert kl.dtype == torch.float32 and grad.dtype == torch.float32
    assert_matches(kl, grad, *_ref(z, tk, w, tau))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_student(dtype):
    z, _, tk, w = _case(4, 1000, 16, seed=3, dtype=dtype)
    kl, grad = _run("triton", z, tk, w, 0.8)
    assert grad.dtype == dtype
    assert_matches(kl, grad, *_ref(z, tk, w, 0.8), grad_rtol=2e-2, grad_atol=1e-4)
    kl_t, _ = _run("torch", z, tk, w, 0.8)
    torch.testing.assert_close(kl, kl_t, rtol=1e-5, atol=1e-5)


def test_is_a_lower_bound_of_the_full_kl():
    """Data-processing inequality: for any student and any teacher, coarsening both to top-k + tail can only
    lower the KL. Checked over many random rows, peaked and flat, several K, in float64."""
    for seed, scale in [(0, 0.5), (1, 3.0), (2, 8.0)]:
        for k in (1, 5, 50):
            z, t, tk, _ = _case(32, 200, k, seed=seed, dtype=torch.float64, scale=scale)
            full = dense_kl_reference(z, t)
            for backend in ("torch", "triton"):
                low = dense_kl_topk(z.float(), tk.logprobs, tk.ids, backend=backend).double()
                assert (low <= full + 1e-5).all(), (seed, k, backend)
            low64 = dense_kl_topk(z, tk.logprobs, tk.ids, backend="torch")
            assert (low64 <= full + 1e-12).all()
            assert (full - low64).max() > 1e-3  # and not trivially tight: a strict bound on these rows


def test_bound_is_tight_when_tails_have_the_same_shape():
    """If the student's tail is the teacher's tail up to a constant factor, nothing is lost by coarsening."""
    z, t, tk, _ = _case(3, 100, 10, seed=4, dtype=torch.float64)
    tail = torch.ones_like(t, dtype=torch.bool).scatter(1, tk.ids, False)
    z = torch.where(tail, t + 1.7, z)
    full = dense_kl_reference(z, t)
    for backend in ("torch", "triton"):
        low = dense_kl_topk(z.float(), tk.logprobs, tk.ids, backend=backend).double()
        torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-6)
    # K = V: no tail at all, the full KL exactly
    z, t, tk, _ = _case(3, 6, 6, seed=5, dtype=torch.float64)
    torch.testing.assert_close(
        dense_kl_topk(z, tk.logprobs, tk.ids, backend="torch"), dense_kl_reference(z, t)
    )


def test_tiny_tail_keeps_relative_precision():
    """P_T is summed over the tail, not formed as 1 - P_top: a student tail of ~1e-9 is still exact in fp32."""
    z, t, tk, w = _case(3, 2000, 8, seed=6)
    top = torch.zeros_like(z, dtype=torch.bool).scatter(1, tk.ids, True)
    z = torch.where(top, z + 25.0, z)  # student tail mass ~ 1e-9 of the row
    tk = TopKTeacher(tk.logprobs.float(), tk.ids)
    for backend in ("torch", "triton"):
        kl, grad = _run(backend, z.float(), tk, w)
        kl_r, grad_r, tol = _ref(z, tk, w)
        assert_matches(kl, grad, kl_r, grad_r, tol, grad_atol=1e-7)
        tail_grad = torch.where(top, 0.0, grad.double())
        tail_ref = torch.where(top, 0.0, grad_r)
        torch.testing.assert_close(
            tail_grad, tail_ref, rtol=1e-4, atol=1e-14
        )  # tail gradients to full precision
    # negative control: the naive tail 1 - sum p_top in fp32 has no correct digit at this size
    p = torch.softmax(z.float(), -1)
    naive = 1 - p.gather(1, tk.ids).sum(-1)
    exact = torch.softmax(z.double(), -1).masked_fill(top, 0).sum(-1)
    assert ((naive.double() - exact).abs() / exact).max() > 0.1


def test_masks_and_temperature():
    z, _, tk, w = _case(6, 500, 7, seed=7)
    mask = torch.tensor([True, False, True, False, True, True], device=DEV)
    z[1] = float("nan")  # masked rows are never read
    for backend in ("torch", "triton"):
        kl, grad = _run(backend, z, tk, w, 0.6, mask=mask)
        keep = mask.nonzero().squeeze(1)
        sub = TopKTeacher(tk.logprobs[keep], tk.ids[keep])
        assert_matches(kl[keep], grad[keep], *_ref(z[keep], sub, w[keep], 0.6))
        assert (kl[~mask] == 0).all() and (grad[~mask] == 0).all()
        kl0, grad0 = _run(backend, z, tk, w, mask=torch.zeros(6, dtype=torch.bool, device=DEV))
        assert (kl0 == 0).all() and (grad0 == 0).all()


def test_neg_inf_student_logits_and_strides():
    z, _, tk, w = _case(3, 300, 5, seed=8)
    z[:, 250:] = float("-inf")
    z = z.t().contiguous().t()  # column stride 3
    for backend in ("torch", "triton"):
        kl, grad = _run(backend, z, tk, w)
        assert_matches(kl, grad, *_ref(z, tk, w))
        assert (grad[:, 250:] == 0).all()


def test_bad_inputs_raise_naming_arguments():
    z, _, tk, _ = _case(2, 50, 4, seed=9)
    lq, ids = tk.logprobs, tk.ids
    bad = [
        ((z, lq, ids.clone().fill_(50)), "teacher_topk_ids .* out of range"),
        ((z, lq, ids.clone().fill_(-1)), "out of range"),
        ((z, lq, torch.cat([ids[:, :1], ids[:, :3]], 1)), "repeated id"),
        ((z, lq[:, :3], ids), "shape mismatch: teacher_topk_logprobs"),
        ((z, lq[:1], ids[:1]), r"must be \[2, K\]"),
        ((z, lq, ids.float()), "integer tensor"),
        ((z, torch.where(lq < -1, float("nan"), lq), ids), "teacher_topk_logprobs .* NaN"),
        ((z, lq + 5.0, ids), "not logits"),
        ((z, lq.clamp_max(-0.01) * 0 - 0.01, ids), "sum to"),
        ((z[:, :3], lq, ids.clamp_max(2)), "1 <= K <= V"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            dense_kl_topk(*args, backend="torch")
    zn = z.clone()
    zn[1, 3] = float("nan")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="student_logits .* NaN"):
            dense_kl_topk(zn.requires_grad_(), lq, ids, backend=backend)
        lq_inf = lq.clone()
        lq_inf[0, 0] = float("-inf")
        with pytest.raises(ValueError, match="infinite KL"):
            dense_kl_topk(z, lq_inf, ids, backend=backend)


def test_renormalized_variant_is_not_a_bound_and_ignores_the_tail():
    # it ignores the student's mass outside the top-k ids ...
    _, t, tk, _ = _case(1, 100, 5, seed=10, dtype=torch.float64)
    top = torch.zeros_like(t, dtype=torch.bool).scatter(1, tk.ids, True)
    z = t.clone()  # the student is the teacher: every KL is 0
    z2 = torch.where(top, t, t + 10.0)  # move almost all student mass to the tail
    r1 = dense_kl_topk_renormalized(z, tk.logprobs, tk.ids)
    r2 = dense_kl_topk_renormalized(z2, tk.logprobs, tk.ids)
    torch.testing.assert_close(r1, r2)  # the renormalised KL does not see it ...
    assert dense_kl_topk(z, tk.logprobs, tk.ids).abs() < 1e-12
    assert dense_kl_topk(z2, tk.logprobs, tk.ids) > 1.0  # ... the tail bucket does
    # ... and exceeds the full KL on some rows (so it is no lower bound)
    z, t, tk, _ = _case(256, 30, 3, seed=11, dtype=torch.float64, scale=2.0)
    ren = dense_kl_topk_renormalized(z, tk.logprobs, tk.ids)
    assert (ren > dense_kl_reference(z, t) + 1e-6).any()


def test_negative_control_fine_grained_tail_gradient_is_caught():
    """Using each tail token's own (unknown to an API teacher) log-ratio instead of the bucket's is caught."""
    z, t, tk, w = _case(4, 300, 10, seed=12)
    kl, grad = _run("triton", z, tk, w)
    kl_r, grad_r, tol = _ref(z, tk, w)
    logp, logq = torch.log_softmax(z.double(), -1), torch.log_softmax(t, -1)
    wrong = logp.exp() * (logp - logq - kl_r[:, None]) * w[:, None]
    with pytest.raises(AssertionError):
        assert_matches(kl, wrong, kl_r, grad_r, tol)
    with pytest.raises(AssertionError):  # and an ignored upstream gradient
        assert_matches(kl, grad, *_ref(z, tk, torch.ones_like(w)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,k", [(512, 32000, 20), (64, 152064, 100), (4, 262144, 1)])
def test_gpu_triton_matches_torch(dtype, n, v, k):
    z, _, tk, w = _case(n, v, k, seed=13, dtype=dtype, device="cuda")
    tk = TopKTeacher(tk.logprobs.float(), tk.ids)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(0)) > 0.2).cuda()
    kl, grad = _run("triton", z, tk, w, 0.7, mask=mask)
    kl_t, grad_t = _run("torch", z, tk, w, 0.7, mask=mask)
    torch.testing.assert_close(kl, kl_t, rtol=1e-4, atol=1e-4)
    tol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 1e-4)
    torch.testing.assert_close(grad.float(), grad_t.float(), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_placeholders_on_masked_rows_are_ignored(backend):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 50, generator=g, requires_grad=True)
    lq = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    lq_k, ids = lq.topk(5, dim=-1)
    lq_k, ids = lq_k.clone(), ids.clone()
    ids[1] = torch.tensor([0, 0, 999, -1, 3])  # padding placeholders: repeated, out of range
    lq_k[1] = float("nan")
    mask = torch.tensor([True, False, True])
    kl = dense_kl_topk(z, lq_k, ids, mask=mask, backend=backend)
    assert torch.isfinite(kl).all() and kl[1] == 0
    kl.sum().backward()
    assert z.grad[1].eq(0).all() and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="out of range"):
        dense_kl_topk(z, lq_k.nan_to_num(-5.0), ids)


# --- Rounded teacher log-probabilities (what bf16 teachers and APIs send) ---------------------------------


def _round_decimals(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.round(x * 10.0**d) / 10.0**d


def _rounded(lq64: torch.Tensor, how: str) -> torch.Tensor:
    if how == "bf16":
        return lq64.to(torch.bfloat16)
    if how == "bf16-in-fp32":  # a bf16 teacher's values, stored in fp32 (precision inferred from the values)
        return lq64.to(torch.bfloat16).float()
    if how == "fp16":
        return lq64.to(torch.float16)
    if how == "4-decimals":
        return _round_decimals(lq64, 4).float()
    if how == "fp32":
        return lq64.float()
    raise AssertionError(how)


def _slack(z64, lq_given, ids, precision="auto"):
    """sum_k p_k delta_k: the bound's documented slack (the size of the input's own rounding)."""
    from hybridlab.topk import logprob_resolution

    p_k = torch.softmax(z64, -1).gather(-1, ids)
    return (p_k * logprob_resolution(lq_given, precision)).sum(-1)


def test_rounded_topk_minimal_case_stays_below_the_full_kl():
    """q = [0.509849, 0.489151, 0.001], uniform student, K = 2: exact log-probs give the full KL; rounded to bf16
    they sum to mass 1.000019, and a tail clamped at 1e-9 made the 'bound' 6.27 > 1.667."""
    q = torch.tensor([[0.509849, 0.489151, 0.001]], dtype=torch.float64)
    z = torch.zeros(1, 3, dtype=torch.float64)
    full = dense_kl_reference(z, q.log())
    assert abs(float(full) - 1.6669) < 1e-3
    ids = torch.tensor([[0, 1]])
    for how in ("bf16", "bf16-in-fp32", "fp16", "4-decimals", "fp32"):
        lq = _rounded(q.log()[:, :2], how)
        for backend in ("torch", "triton"):
            low = dense_kl_topk(z.float(), lq, ids, backend=backend).double()
            assert (low <= full + _slack(z, lq, ids) + 1e-6).all(), (how, backend, float(low))
    exact = dense_kl_topk(z, q.log()[:, :2], ids, backend="torch")
    torch.testing.assert_close(exact, full, rtol=1e-9, atol=1e-12)  # exact input: the bound is tight here


@pytest.mark.parametrize("how", ["bf16", "bf16-in-fp32", "fp16", "4-decimals", "fp32"])
def test_rounded_topk_is_a_lower_bound_up_to_its_rounding(how):
    """2000 rows, V = 50, K = 20, a broad student and a peaked teacher with a tail down to 1e-9: every row stays
    below the full KL plus sum_k p_k delta_k, in every precision, and no input is refused."""
    g = torch.Generator().manual_seed(0)
    n, v, k = 2000, 50, 20
    z = 0.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t = 4.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t[:, k:] -= 20.0 * torch.rand(n, 1, generator=g, dtype=torch.float64)  # tails from ~1e-1 down to ~1e-9
    logq = torch.log_softmax(t, -1)
    lq64, ids = logq.topk(k, -1)
    lq = _rounded(lq64, how)
    full = dense_kl_reference(z, logq)
    low = dense_kl_topk(z.float(), lq, ids, backend="torch").double()
    slack = _slack(z, lq, ids)
    fp32 = 1e-5 * full.clamp_min(1.0)  # the fp32 evaluation itself
    assert (low <= full + slack + fp32).all(), (how, float((low - full - slack).max()))
    assert float(slack.max()) < 0.05  # the slack is the input's rounding, not a fudge factor


def test_rounded_topk_negative_control_claiming_exact_values_breaks_the_bound():
    """Telling the estimator that bf16-rounded log-probs are exact (float64 precision) brings the failure back:
    the test above can fail."""
    g = torch.Generator().manual_seed(0)
    z = 0.5 * torch.randn(2000, 50, generator=g, dtype=torch.float64)
    t = 4.0 * torch.randn(2000, 50, generator=g, dtype=torch.float64)
    t[:, 20:] -= 20.0
    logq = torch.log_softmax(t, -1)
    lq64, ids = logq.topk(20, -1)
    lq = lq64.to(torch.bfloat16).double()
    low = dense_kl_topk(z, lq, ids, backend="torch", logprob_precision=torch.float64)
    assert (low - dense_kl_reference(z, logq)).max() > 1.0


def test_logprob_resolution_inference():
    from hybridlab.topk import logprob_resolution

    g = torch.Generator().manual_seed(1)
    lq = torch.log_softmax(torch.randn(8, 30, generator=g, dtype=torch.float64), -1)[:, :5]
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
    for dt, rel in u.items():
        for stored in (lq.to(dt), lq.to(dt).double()):  # the dtype itself, or its values stored wider
            delta = logprob_resolution(stored)
            ratio = delta / stored.double().abs()
            assert ((ratio >= rel) & (ratio <= 1.01 * rel)).all(), (dt, stored.dtype)
    for d, dt in ((2, torch.float32), (4, torch.float32), (6, torch.float64)):
        delta = logprob_resolution(_round_decimals(lq, d).to(dt))
        torch.testing.assert_close(delta, torch.full_like(delta, 0.5 * 10.0**-d))
    torch.testing.assert_close(logprob_resolution(lq, 1e-3), torch.full_like(lq, 1e-3))
    with pytest.raises(ValueError, match="logprob_precision"):
        logprob_resolution(lq, "bf16")
