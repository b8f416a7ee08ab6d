"""hybridlab: hybrid online imitation + reinforcement learning for language models.

The gradient of  J = E[lam R] - beta KL(pi_theta || pi_T)  splits exactly into a dense part (analytic,
full-vocabulary, `dense_kl`) and a sparse part (Monte Carlo, reward plus future KL); `hybrid_loss` is their sum.
"""

from .dense import dense_kl, dense_kl_and_logprobs, dense_kl_reference
from .fused_linear import fused_linear_dense_kl
from .hybrid import HybridLossOutput, hybrid_loss
from .sparse import future_sum, group_loo_mean, kl_estimate, selected_logprobs
from .topk import TopKTeacher, dense_kl_topk, dense_kl_topk_renormalized, topk_from_logits

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
