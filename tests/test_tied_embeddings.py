"""Tied embeddings (LM head == input embedding, as in SmolLM2) through the fused-linear hybrid loss.

The fused path feeds `base_model(...)` hidden states and `lm_head.weight` to `fused_hybrid_loss`; the same
Parameter is also the input embedding. One update must equal the materialised one (`hybrid_loss` on
`model(...).logits`), and the embedding's gradient must be the sum of its output-side (LM head) and input-side
(token lookup) parts, both non-zero. A tiny random tied Llama built from its config keeps this fast; the same
check on the real model is `python tests/test_tied_embeddings.py --real [--save]` (needs
`make real-model`; --save stores the numbers in data/results/real_model_probe.json).
"""

from __future__ import annotations

import copy

import pytest
import torch

from hybridlab.fused_hybrid import fused_hybrid_loss
from hybridlab.hybrid import hybrid_loss

transformers = pytest.importorskip("transformers")

V, P, T, B, G = 96, 5, 7, 4, 2  # vocabulary, prompt length, response length, sequences, group size


def tiny_tied_llama(seed: int, layers: int = 2) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def make_batch(seed: int, vocab: int = V, b: int = B, p: int = P, t: int = T):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, p + t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t - 2 :] = False  # one response ended early (EOS then padding)
    rewards = torch.randint(0, 2, (b,), generator=g).float()
    return ids, mask, rewards


def loss_of(student, teacher, ids, mask, rewards, p, *, fused, detach_head=False, detach_lookup=False, **kw):
    """The hybrid loss of one batch through the fused or the materialised path."""
    t = ids.shape[1] - p
    actions = ids[:, p:]
    kw = (
        dict(beta=0.5, lam=1.0, future="analytic", baseline="return_group", group_size=G, backend="torch")
        | kw
    )
    emb = student.get_input_embeddings()
    inputs = emb.weight.detach()[ids] if detach_lookup else emb(ids)
    with torch.no_grad():
        if fused:
            th = teacher.base_model(input_ids=ids).last_hidden_state[:, p - 1 : p + t - 1]
            t_in = (th, teacher.get_output_embeddings().weight)
        else:
            t_in = teacher(input_ids=ids).logits[:, p - 1 : p + t - 1]
    if fused:
        hidden = student.base_model(inputs_embeds=inputs).last_hidden_state[:, p - 1 : p + t - 1]
        w = student.get_output_embeddings().weight
        return fused_hybrid_loss(hidden, w.detach() if detach_head else w, t_in, actions, rewards, mask=mask,
                                 chunk_size=5, **kw).loss  # fmt: skip
    assert not detach_head, "the materialised reference is only needed whole"
    logits = student(inputs_embeds=inputs).logits[:, p - 1 : p + t - 1]
    return hybrid_loss(logits, t_in, actions, rewards, mask=mask, **kw).loss


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_tied_update(student, teacher, ids, mask, rewards, p, lr=1e-2, eps=1e-8, **kw) -> dict[str, float]:
    """Compare fused vs materialised gradients and one AdamW update (its `eps`); returns the largest relative
    differences and the norms of the embedding's output-side and input-side gradients."""
    emb_name = next(n for n, q in student.named_parameters() if q is student.get_input_embeddings().weight)
    g_ref = grads(student, loss_of(student, teacher, ids, mask, rewards, p, fused=False, **kw))
    g_fused = grads(student, loss_of(student, teacher, ids, mask, rewards, p, fused=True, **kw))
    g_out = grads(
        student, loss_of(student, teacher, ids, mask, rewards, p, fused=True, detach_lookup=True, **kw)
    )
    g_in = grads(
        student, loss_of(student, teacher, ids, mask, rewards, p, fused=True, detach_head=True, **kw)
    )
    assert set(g_ref) == set(g_fused) == {n for n, _ in student.named_parameters()}

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {
        "grad_rel_max": max(rel(g_fused[n], g_ref[n]) for n in g_ref),
        "embedding_grad_rel": rel(g_fused[emb_name], g_ref[emb_name]),
        "embedding_split_rel": rel(g_out[emb_name] + g_in[emb_name], g_ref[emb_name]),
        "embedding_out_norm": float(g_out[emb_name].norm()),
        "embedding_in_norm": float(g_in[emb_name].norm()),
    }
    # One AdamW step from identical states, on each path's gradients.
    updated = []
    for g in (g_ref, g_fused):
        model = copy.deepcopy(student)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=0.0)
        for n, q in model.named_parameters():
            q.grad = g[n].clone()
        opt.step()
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
        updated.append({n: q.detach() for n, q in model.named_parameters()})
    # in units of the learning rate (AdamW's first step moves every coordinate by at most about lr)
    diffs = [(updated[1][n] - updated[0][n]).abs() for n in g_ref]
    out["update_err_over_lr"] = max(float(d.max()) / lr for d in diffs)
    # coordinates whose two updates differ by more than 1% of a step (near-zero gradients, with a small eps)
    out["update_frac_over_1pct"] = sum(int((d > 1e-2 * lr).sum()) for d in diffs) / sum(
        d.numel() for d in diffs
    )
    return out


@pytest.mark.parametrize("future", ["analytic", "k1"])
def test_fused_update_equals_materialised_with_tied_embeddings(future):
    torch.set_num_threads(1)
    student, teacher = tiny_tied_llama(0), tiny_tied_llama(1, layers=3)
    ids, mask, rewards = make_batch(2)
    # AdamW's first step is lr * g / (|g| + eps) per coordinate: a gradient error dg moves it by at most
    # lr * dg / eps. With the default eps a coordinate whose gradient is ~0 flips sign on fp32 rounding noise
    # (dg ~ 1e-6 here), so eps is set to 1e-2: the bound is then ~1e-4 lr.
    r = check_tied_update(student, teacher, ids, mask, rewards, P, eps=1e-2, future=future)
    assert r["grad_rel_max"] < 1e-4, r
    assert r["embedding_grad_rel"] < 1e-4, r
    assert r["update_err_over_lr"] < 1e-3 and r["update_frac_over_1pct"] == 0.0, r
    # Both sides of the tied weight carry gradient, and they add up to the whole.
    assert r["embedding_out_norm"] > 1e-3 and r["embedding_in_norm"] > 1e-3, r
    assert r["embedding_split_rel"] < 1e-4, r


def test_a_dropped_output_gradient_would_be_caught():
    """The comparison is sensitive: the fused loss with the LM head detached (the embedding gets only its
    input-side gradient, as an untied copy of the head would) differs from the materialised gradient."""
    torch.set_num_threads(1)
    student, teacher = tiny_tied_llama(0), tiny_tied_llama(1, layers=3)
    ids, mask, rewards = make_batch(2)
    emb = student.get_input_embeddings().weight
    g_ref = grads(student, loss_of(student, teacher, ids, mask, rewards, P, fused=False))[
        "model.embed_tokens.weight"
    ]
    student.zero_grad(set_to_none=True)
    loss_of(student, teacher, ids, mask, rewards, P, fused=True, detach_head=True).backward()
    err = (emb.grad - g_ref).abs().max() / g_ref.abs().max()
    assert err > 1e-2


def _real_model_check() -> dict[str, float]:  # pragma: no cover - manual, needs the converted model
    import time

    from transformers import AutoModelForCausalLM

    from hybridlab.scripts.fetch_real_model import real_model_path

    torch.set_num_threads(1)
    path = real_model_path()
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    teacher = copy.deepcopy(student)
    torch.manual_seed(0)
    with torch.no_grad():  # a teacher that differs: perturb its last layer
        for q in teacher.model.layers[-1].parameters():
            q.add_(0.02 * torch.randn_like(q))
    v = student.config.vocab_size
    ids, mask, rewards = make_batch(3, vocab=v, b=4, p=12, t=10)
    t0 = time.perf_counter()
    r = check_tied_update(student, teacher, ids, mask, rewards, 12, lr=1e-5)
    r["seconds"] = time.perf_counter() - t0
    return r


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--real" in sys.argv:
        import json

        from experiments.probe_real_task import RESULTS

        result = _real_model_check()
        print(result)
        if "--save" in sys.argv:
            data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            data["tied_embeddings_fused_vs_materialised"] = {k: float(f"{v:.4g}") for k, v in result.items()}
            RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
