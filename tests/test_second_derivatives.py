"""The estimators' backwards are closed forms: a second derivative through them must be refused, loudly.

`once_differentiable` alone only refuses when an incoming gradient requires grad; a Hessian-vector product of
KL + 1/2 |z|^2 (constant upstream gradient) used to return v, silently dropping the KL's Hessian.
"""

import pytest
import torch

from hybridlab import dense_kl, dense_kl_reference, dense_kl_topk, fused_linear_dense_kl, hybrid_loss
from hybridlab.fused_hybrid import fused_hybrid_loss
from hybridlab.topk import topk_from_logits

G = torch.Generator().manual_seed(0)
N, V, H = 4, 7, 5
TEACHER = torch.randn(N, V, generator=G)
HIDDEN = torch.randn(N, H, generator=G)
VEC = torch.randn(N, V, generator=G)


def _hvp(kl_of_z, z, v):
    loss = kl_of_z(z).sum() + 0.5 * (z**2).sum()
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), z)
    return hv


CASES = {
    "dense_kl": lambda z: dense_kl(z, TEACHER, backend="torch"),
    "dense_kl_topk": lambda z: dense_kl_topk(z, *topk_from_logits(TEACHER, 3), backend="torch"),
    # the LM head as the variable: logits = HIDDEN @ W.T
    "fused_linear_dense_kl": lambda w: fused_linear_dense_kl(HIDDEN, w, TEACHER, backend="torch"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_vector_product_is_refused_naming_the_function(name):
    x = torch.randn(V, H, generator=G) if name == "fused_linear_dense_kl" else torch.randn(N, V, generator=G)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match=f"{name} does not support second derivatives"):
        _hvp(CASES[name], x, torch.randn_like(x))


def test_the_reference_gives_the_true_hvp_and_identity_is_wrong():
    """Negative control: the answer the old code returned (v, the Hessian of 1/2|z|^2 alone) is wrong by a
    visible margin against the autograd reference, so refusing is the only correct option."""
    z = torch.randn(N, V, generator=G, dtype=torch.float64, requires_grad=True)
    v = VEC.double()
    hv = _hvp(lambda a: dense_kl_reference(a, TEACHER.double()), z, v)
    assert (hv - v).norm() / hv.norm() > 0.05


def test_first_order_gradients_still_work():
    z = torch.randn(N, V, generator=G, requires_grad=True)
    dense_kl(z, TEACHER, backend="torch").sum().backward()
    zr = z.detach().clone().requires_grad_(True)
    dense_kl_reference(zr, TEACHER).sum().backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)


def test_hybrid_losses_refuse_create_graph_with_the_same_message():
    b, t = 2, 3
    z = torch.randn(b, t, V, generator=G, requires_grad=True)
    actions = torch.randint(0, V, (b, t), generator=G)
    rewards = torch.randn(b, generator=G)
    out = hybrid_loss(z, torch.randn(b, t, V, generator=G), actions, rewards, backend="torch")
    with pytest.raises(RuntimeError, match="does not support second derivatives"):
        torch.autograd.grad(out.loss, z, create_graph=True)
    h = torch.randn(b, t, H, generator=G, requires_grad=True)
    w = torch.randn(V, H, generator=G, requires_grad=True)
    out = fused_hybrid_loss(h, w, torch.randn(b, t, V, generator=G), actions, rewards, backend="torch")
    with pytest.raises(RuntimeError, match="does not support second derivatives"):
        torch.autograd.grad(out.loss, [h, w], create_graph=True)
