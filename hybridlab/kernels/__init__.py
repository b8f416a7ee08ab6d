"""Triton kernels for the dense gradient (imported lazily: the package works without triton).

- `dense_kl_triton`: full-vocabulary KL(softmax(z / tau) || softmax(t)) and its closed-form logit gradient,
  one program per row, loss and gradient in one launch.
- `topk_triton`: the same for a top-k teacher with a tail bucket.
"""
