"""The student inside one `forward` (so DDP / FSDP hooks see everything that touches its weights) and the losses
of the methods it is compared with."""

from __future__ import annotations

import torch

from ..dense import dense_kl
from ..fused_hybrid import fused_hybrid_loss
from ..hybrid import hybrid_loss
from ..sparse import selected_logprobs
from .rollout import generate, response_logits_of


def _weights(seq_weights: torch.Tensor | None, mask: torch.Tensor, dtype) -> torch.Tensor:
    if seq_weights is None:
        return torch.full((mask.shape[0],), 1.0 / mask.shape[0], dtype=dtype, device=mask.device)
    return seq_weights.to(dtype)


def sft_loss(student_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
             seq_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Cross-entropy on given tokens, sum_b c_b sum_t -log pi(y_t) with c_b = 1 / B by default: [B, T, V] -> []."""
    logp = selected_logprobs(student_logits, actions, temperature)
    c = _weights(seq_weights, mask, logp.dtype)
    return -(torch.where(mask, logp, torch.zeros((), dtype=logp.dtype)) * c[:, None]).sum()


def sampled_opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, actions: torch.Tensor,
                     mask: torch.Tensor, temperature: float = 1.0, seq_weights: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sampled-token on-policy distillation (discount 0): loss = -sum_b c_b sum_t log pi(y_t) * stopgrad(-k_t).

    k_t = log pi(y_t | s_t) - log pi_T(y_t | s_t) at the sampled token. Its expected gradient is the myopic
    sum_t grad KL_t(s_t) (a Monte Carlo version of the dense term, no future KL).
    Shapes: [B, T, V], [B, T, V], [B, T], [B, T] -> (scalar loss, k [B, T] detached, 0 on padding).
    """
    logp = selected_logprobs(student_logits, actions, temperature, mask)
    with torch.no_grad():
        t_logp = selected_logprobs(teacher_logits.detach(), actions, 1.0, mask).to(logp.dtype)
        k = torch.where(mask, logp.detach() - t_logp, torch.zeros((), dtype=logp.dtype))
    c = _weights(seq_weights, mask, logp.dtype)
    return -(torch.where(mask, logp, torch.zeros((), dtype=logp.dtype)) * (-k) * c[:, None]).sum(), k


class PolicyModel(torch.nn.Module):
    """The student wrapped so that everything touching its weights runs inside one `forward`: mode="generate"
    samples (through the clean `rollout.generate`), mode="loss" computes the loss of a rollout."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap policy

    def forward(self, mode: str, **kw):
        if mode == "generate":
            return generate(self.model, **kw)
        if mode == "loss":
            return self._loss(**kw)
        raise ValueError(f"mode must be 'generate' or 'loss', got {mode!r}")

    def _loss(self, input_ids, attention_mask, position_ids, prompt_len, actions, mask, rewards, seq_weights,
              teacher, loss_kw, fused, chunk, loss="hybrid"):  # fmt: skip
        p, n = prompt_len, actions.shape[1]
        dev = input_ids.device.type
        kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if fused:
            hidden = self.model.base_model(**kw, use_cache=False).last_hidden_state[:, p - 1 : p + n - 1]
            head = self.model.get_output_embeddings()
            cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else head.weight.dtype
            with torch.autocast(dev, enabled=False):
                bias = None if head.bias is None else head.bias.to(cdt)
                out = fused_hybrid_loss(hidden.to(cdt), head.weight.to(cdt), teacher, actions, rewards, mask=mask,
                                        bias=bias, seq_weights=seq_weights, normalize=1.0, chunk_size=chunk,
                                        **loss_kw)  # fmt: skip
            return {
                "loss": out.loss,
                "dense": out.dense.detach(),
                "sparse": out.sparse.detach(),
                "kl": out.kl,
            }
        logits = response_logits_of(self.model, kw, n)
        with torch.autocast(dev, enabled=False):
            if loss == "hybrid":
                out = hybrid_loss(logits, teacher, actions, rewards, mask=mask, seq_weights=seq_weights,
                                  normalize=1.0, **loss_kw)  # fmt: skip
                return {
                    "loss": out.loss,
                    "dense": out.dense.detach(),
                    "sparse": out.sparse.detach(),
                    "kl": out.kl,
                }
            tau = loss_kw["temperature"]
            if loss == "sft":
                value = sft_loss(logits, actions, mask, tau, seq_weights)
            else:
                value, _ = sampled_opd_loss(logits, teacher, actions, mask, tau, seq_weights)
            with torch.no_grad():
                kl = dense_kl(logits.detach().float(), teacher.float(), temperature=tau, mask=mask,
                              backend=loss_kw["backend"])  # fmt: skip
        nan = torch.tensor(float("nan"), device=logits.device)
        return {"loss": value, "dense": nan, "sparse": nan, "kl": kl}
