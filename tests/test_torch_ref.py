"""`hybridlab._torch_ref` sits below the dense / top-k modules and their Triton launchers: the kernels import
no module that imports them, and the reference rows agree with the public functions' torch path."""

import ast
from pathlib import Path

import torch

import hybridlab
from hybridlab._torch_ref import dense_kl_torch, topk_kl_torch

KERNELS = Path(hybridlab.__file__).parent / "kernels"


def test_kernels_import_nothing_that_imports_them():
    for f in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module not in ("dense", "topk", "fused_linear", "hybrid"), (f.name, node.module)


def test_reference_rows_match_the_public_functions():
    from hybridlab import dense_kl, dense_kl_topk, topk_from_logits

    torch.manual_seed(0)
    z, t = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    active = torch.tensor([True, False, True, True, False, True])
    kl, grad = dense_kl_torch(z, t, active, 0.7, True, None)
    torch.testing.assert_close(kl[active], dense_kl(z[active], t[active], temperature=0.7, backend="torch"))
    assert float(kl[~active].abs().sum()) == 0.0 and float(grad[~active].abs().sum()) == 0.0
    zz = z.clone().requires_grad_(True)
    dense_kl(zz, t, temperature=0.7, backend="torch").sum().backward()
    torch.testing.assert_close(grad[active], zz.grad[active])
    tk = topk_from_logits(t, 3)
    from hybridlab.topk import teacher_log_tail

    lq, ids = tk.logprobs, tk.ids
    kl_k, _ = topk_kl_torch(z, lq, ids, teacher_log_tail(lq), None, 1.0, False)
    torch.testing.assert_close(kl_k, dense_kl_topk(z, lq, ids, backend="torch"))
