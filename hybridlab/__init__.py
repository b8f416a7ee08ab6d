"""hybridlab: hybrid online imitation + reinforcement learning for language models.

The gradient of  J = E[lam R] - beta KL(pi_theta || pi_T)  splits exactly into a dense part (analytic,
full-vocabulary, `dense_kl`) and a sparse part (Monte Carlo, reward plus future KL); `hybrid_loss` is their sum.
"""

_EXPORTS = {
    "dense_kl": "dense", "dense_kl_and_logprobs": "dense", "dense_kl_reference": "dense",
    "fused_linear_dense_kl": "fused_linear", "HybridLossOutput": "hybrid", "hybrid_loss": "hybrid",
    "future_sum": "sparse", "group_loo_mean": "sparse", "kl_estimate": "sparse", "selected_logprobs": "sparse",
    "TopKTeacher": "topk", "dense_kl_topk": "topk", "dense_kl_topk_renormalized": "topk", "topk_from_logits": "topk",
}  # fmt: skip


def __getattr__(name: str):  # torch loads on first use: `python -m hybridlab.train --help` answers at once
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "TopKTeacher",
    "dense_kl_topk",
    "dense_kl_topk_renormalized",
    "fused_linear_dense_kl",
    "topk_from_logits",
    "HybridLossOutput",
    "dense_kl",
    "dense_kl_and_logprobs",
    "dense_kl_reference",
    "future_sum",
    "group_loo_mean",
    "hybrid_loss",
    "kl_estimate",
    "selected_logprobs",
]
