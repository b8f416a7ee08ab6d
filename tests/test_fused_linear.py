"""The fused linear path (hidden states + LM head -> KL, in token chunks) against the unfused path
dense_kl(hidden @ W.T + b, ...) by autograd, for every teacher kind, upstream gradient and mask."""

import pytest
import torch

import hybridlab.fused_linear as fl
from hybridlab import dense_kl
from hybridlab.dense import _torch_impl
from hybridlab.fused_linear import fused_linear_dense_kl
from hybridlab.topk import TopKTeacher, dense_kl_topk, topk_from_logits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def _problem(n, h, v, seed, dtype=torch.float32, device=DEV, ht=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    data = dict(
        hidden=r(n, h),
        weight=r(v, h) / h**0.5 * 3,
        bias=r(v) * 0.5,
        th=r(n, ht),
        tw=r(v, ht) / ht**0.5 * 3,
    )
    data = {k: x.to(device, dtype) for k, x in data.items()}
    data["upstream"] = (torch.rand(n, generator=g) * 2 - 0.5).to(device)  # non-uniform, signs included
    return data


def _teacher(d, kind, k=6):
    logits = d["th"] @ d["tw"].t()
    if kind == "logits":
        return logits, logits
    if kind == "hidden":
        return (d["th"], d["tw"]), logits
    tk = topk_from_logits(logits, k)
    return TopKTeacher(tk.logprobs.float(), tk.ids), tk


def _grads(fn, d, upstream, use_bias=True):
    hidden = d["hidden"].clone().requires_grad_(True)
    weight = d["weight"].clone().requires_grad_(True)
    bias = d["bias"].clone().requires_grad_(True) if use_bias else None
    kl = fn(hidden, weight, bias)
    (kl * upstream.to(kl.dtype)).sum().backward()
    return kl.detach(), hidden.grad, weight.grad, None if bias is None else bias.grad


def _unfused(d, kind, upstream, tau=1.0, mask=None, use_bias=True):
    """The materialised path: student logits [N, V], dense_kl (or dense_kl_topk), autograd through the matmul."""
    teacher, ref_t = _teacher(d, kind)

    def fn(h, w, b):
        logits = h @ w.t() + (b if b is not None else 0)
        if kind == "topk":
            return dense_kl_topk(
                logits, teacher.logprobs, teacher.ids, temperature=tau, mask=mask, backend="torch"
            )
        return dense_kl(logits, ref_t, temperature=tau, mask=mask, backend="torch")

    return _grads(fn, d, upstream, use_bias)


def _fused(d, kind, upstream, backend, tau=1.0, mask=None, use_bias=True, **kw):
    teacher, _ = _teacher(d, kind)
    fn = lambda h, w, b: fused_linear_dense_kl(
        h, w, teacher, temperature=tau, mask=mask, bias=b, backend=backend, **kw
    )
    return _grads(fn, d, upstream, use_bias)


def assert_grads_close(got, want, rel):
    """Each of (kl, dh, dW, db) within rel * max|want| (bf16 gradients are rounded, so relative-to-max)."""
    for name, a, b in zip(("kl", "hidden", "weight", "bias"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = (a.double() - b.double()).abs().max()
        assert err <= rel * b.double().abs().max().clamp_min(1e-12), (name, float(err), float(b.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["logits", "hidden", "topk"])
def test_matches_unfused_fp32_nonuniform_upstream_and_mask(backend, kind):
    d = _problem(37, 16, 1003, seed=1)
    mask = torch.rand(37, generator=torch.Generator().manual_seed(2)).to(DEV) > 0.3
    want = _unfused(d, kind, d["upstream"], tau=0.8, mask=mask)
    got = _fused(d, kind, d["upstream"], backend, tau=0.8, mask=mask, chunk_size=10)  # 10 does not divide 37
    # Two fp32 paths, compared with each other: against a float64 run of the same inputs each is within
    # ~1.6e-5 of the largest entry (the torch tail-bucket path on the hidden gradient, V = 1003), so 4e-5.
    assert_grads_close(got, want, 4e-5)
    assert (got[1][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_unfused_low_precision(backend, dtype):
    d = _problem(40, 32, 777, seed=3, dtype=dtype)
    for upstream in (torch.full((40,), 0.25, device=DEV), d["upstream"]):
        want = _unfused(d, "logits", upstream)
        got = _fused(d, "logits", upstream, backend, chunk_size=16)
        assert_grads_close(got, want, 2e-2)


def test_weight_gradient_accumulates_in_fp32():
    """Many small chunks in bf16: the fused weight gradient equals sum_i G_i^T h_i (G the bf16 logit
    gradients) rounded once; accumulating bf16-rounded per-chunk products (negative control) drifts."""
    d = _problem(256, 16, 64, seed=4, dtype=torch.bfloat16)
    up = torch.ones(256, device=DEV)
    teacher, _ = _teacher(d, "logits")
    logits = d["hidden"] @ d["weight"].t() + d["bias"]
    _, g = _torch_impl(logits, teacher, None, 1.0, True, None)
    truth = g.double().t() @ d["hidden"].double()  # exact sum of the same bf16 per-row products
    err = lambda gw: float((gw.double() - truth).abs().max() / truth.abs().max())
    fused = _fused(d, "logits", up, "torch", chunk_size=1)[2]
    assert err(fused) <= 2.0**-9  # one rounding to bf16 at the end (half an ulp of the largest entry)

    def rounded_accumulate(acc, a, b):  # what accumulating bf16 products chunk by chunk would do
        acc.copy_((acc.to(a.dtype) + (a @ b)).float())

    orig = fl._accumulate_mm
    fl._accumulate_mm = rounded_accumulate
    try:
        bad = _fused(d, "logits", up, "torch", chunk_size=1)[2]
    finally:
        fl._accumulate_mm = orig
    assert err(bad) > 4 * 2.0**-9


def test_upstream_gradient_paths(monkeypatch):
    """Loss weights known in forward (row_weights, or a scalar multiple of them) need one pass; any other
    upstream gradient recomputes in backward; both are exact."""
    d = _problem(24, 8, 300, seed=5)
    calls = []
    orig = fl._run_chunks
    monkeypatch.setattr(fl, "_run_chunks", lambda *a, **k: calls.append(1) or orig(*a, **k))
    rw = torch.rand(24, generator=torch.Generator().manual_seed(6)).to(DEV) + 0.1
    for upstream, kw, passes in [
        (torch.full((24,), 1 / 24, device=DEV), {}, 1),  # a mean: proportional to ones
        (rw / 7.0, dict(row_weights=rw), 1),  # the token weights the loss uses, over a denominator
        (d["upstream"], {}, 2),  # anything else: recompute
        (d["upstream"], dict(row_weights=rw), 2),
        (torch.full((24,), 1 / 24, device=DEV), dict(precompute_grads=False), 2),
    ]:
        calls.clear()
        got = _fused(d, "hidden", upstream, "torch", chunk_size=5, **kw)
        assert len(calls) == passes, kw
        assert_grads_close(got, _unfused(d, "hidden", upstream), 2e-5)


def test_backward_twice_recomputes():
    d = _problem(10, 8, 64, seed=11)
    teacher, _ = _teacher(d, "hidden")
    w = d["weight"].clone().requires_grad_(True)
    kl = fused_linear_dense_kl(d["hidden"], w, teacher, backend="torch", chunk_size=4)
    kl.sum().backward(retain_graph=True)
    first = w.grad.clone()
    kl.sum().backward()
    torch.testing.assert_close(w.grad, 2 * first)


def test_negative_control_forward_gradients_with_unknown_upstream_are_wrong():
    """Why the recompute exists: scaling forward-computed gradients by the mean upstream gradient is wrong
    when it differs by row, and the comparison used above catches it."""
    d = _problem(24, 8, 300, seed=7)
    want = _unfused(d, "logits", d["upstream"])
    got = _fused(d, "logits", torch.full((24,), float(d["upstream"].mean()), device=DEV), "torch")
    with pytest.raises(AssertionError):
        assert_grads_close(got, want, 2e-5)


def test_batch_shape_frozen_head_and_no_bias():
    d = _problem(12, 8, 100, seed=8)
    teacher, ref = _teacher(d, "logits")
    h = d["hidden"].reshape(3, 4, 8).clone().requires_grad_(True)
    kl = fused_linear_dense_kl(h, d["weight"], ref.reshape(3, 4, 100), backend="triton", chunk_size=5)
    assert kl.shape == (3, 4)
    (kl * d["upstream"].reshape(3, 4)).sum().backward()
    want = _unfused(d, "logits", d["upstream"], use_bias=False)
    torch.testing.assert_close(kl.reshape(-1), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.reshape(12, 8), want[1], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        kl2 = fused_linear_dense_kl(d["hidden"], d["weight"], ref, backend="torch")
    torch.testing.assert_close(kl2, want[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    d = _problem(4, 8, 50, seed=9)
    h, w, t = d["hidden"], d["weight"], d["th"] @ d["tw"].t()
    cases = [
        ((h, w[:, :7], t), {}, r"shape mismatch: hidden \[4, 8\] .* weight \[50, 7\]"),
        ((h, w.double(), t), {}, "dtype mismatch"),
        ((h, w, t[:, :49]), {}, r"teacher logits \[4, 49\]"),
        ((h, w, (d["th"], d["tw"][:10])), {}, "teacher_weight"),
        ((h, w, t), dict(bias=d["bias"][:3]), "bias"),
        ((h, w, t), dict(mask=torch.ones(3, dtype=torch.bool, device=DEV)), "mask shape"),
        ((h, w, t), dict(row_weights=torch.ones(5, device=DEV)), "row_weights"),
        (
            (h, w, TopKTeacher(t[:, :3].log_softmax(-1), torch.full((4, 3), 99, device=DEV))),
            {},
            "out of range",
        ),
        ((h, w, t), dict(chunk_size=0), "chunk_size"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_linear_dense_kl(*args, backend="torch", **kw)
    hn = h.clone()
    hn[2, 1] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="NaN"):
            fused_linear_dense_kl(hn.requires_grad_(), w, t, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["logits", "hidden", "topk"])
def test_gpu_bf16_matches_unfused(kind):
    d = _problem(2048, 512, 32000, seed=10, dtype=torch.bfloat16, device="cuda", ht=256)
    mask = (torch.rand(2048, generator=torch.Generator().manual_seed(0)) > 0.1).cuda()
    want = _unfused(d, kind, d["upstream"], tau=0.9, mask=mask)
    got = _fused(d, kind, d["upstream"], "triton", tau=0.9, mask=mask, chunk_size=512)
    assert_grads_close(got, want, 2e-2)
