"""The student inside one `forward` (so DDP / FSDP hooks see everything that touches its weights) and the losses
of the methods it is compared with."""

from __future__ import annotations

import torch

from ..dense import dense_kl
from ..fused_hybrid import fused_hybrid_loss
from ..hybrid import flat_grad, hybrid_loss
from ..sparse import group_loo_mean, selected_logprobs
from .rollout import generate, response_logits_of


def return_parts(out, rewards: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """[2] sums over response tokens of |beta F_t| (the future KL in the sparse return) and |lam R|: the share
    of the return the future KL carries is parts[0] / parts.sum() (from `returns` = lam R - beta F)."""
    with torch.no_grad():
        lam_r = lam * rewards.to(out.returns.dtype)[:, None].expand_as(out.returns)
        zero = torch.zeros((), dtype=out.returns.dtype, device=mask.device)
        fut = torch.where(mask, lam_r - out.returns, zero).abs().sum()
        rew = torch.where(mask, lam_r, zero).abs().sum()
        return torch.stack([fut, rew]).double()


def part_gradients(out, logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                   lam: float, temperature: float, params: list, baseline="none",
                   group_size: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Flat gradients [P] of the loss's three parts: "dense"; "reward", the score term with lam R - b_R(s_t); and
    "future", the score term with -beta F_t - b_F(s_t) (reward + future = the sparse term). A group baseline on
    the combined return splits the same way (b_R: the leave-one-out mean of lam R, b_F: the rest); a baseline
    tensor counts in "reward". `out` must come from hybrid_loss(..., parameters=...) on `logits` (so its dense
    graph can be differentiated more than once)."""
    logp = selected_logprobs(logits, actions, temperature, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    c = out.token_weights.to(logp.dtype)[:, None]
    with torch.no_grad():
        lam_r = lam * rewards.to(logp.dtype)[:, None]
        neg_beta_f = torch.where(mask, out.returns.to(logp.dtype) - lam_r, zero)  # returns = lam R - beta F
        b_r = torch.zeros_like(neg_beta_f)
        if isinstance(baseline, torch.Tensor):  # the caller's b(s_t): all of it in "reward", as documented
            b_r = out.baseline.to(logp.dtype)
        elif baseline != "none":
            b_r = group_loo_mean(lam_r.expand_as(neg_beta_f), group_size)
        # lam R - b_R; the rest of the advantage is the future's
        rew_adv = torch.where(mask, lam_r - b_r, zero)
        fut_adv = torch.where(mask, out.advantages.to(logp.dtype), zero) - rew_adv
    lp = torch.where(mask, logp, zero)
    return {
        "dense": flat_grad(out.dense, params, retain_graph=True),
        "reward": flat_grad(-(c * lp * rew_adv).sum(), params, retain_graph=True),
        "future": flat_grad(-(c * lp * fut_adv).sum(), params, retain_graph=True),
    }


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
              teacher, loss_kw, fused, chunk, loss="hybrid", diagnostics=False):  # fmt: skip
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
                "return_parts": return_parts(out, rewards, mask, loss_kw["lam"]),
            }
        logits = response_logits_of(self.model, kw, n)
        with torch.autocast(dev, enabled=False):
            if loss == "hybrid":
                params = [p for p in self.model.parameters() if p.requires_grad] if diagnostics else None
                out = hybrid_loss(logits, teacher, actions, rewards, mask=mask, seq_weights=seq_weights,
                                  normalize=1.0, parameters=params, **loss_kw)  # fmt: skip
                res = {
                    "loss": out.loss,
                    "dense": out.dense.detach(),
                    "sparse": out.sparse.detach(),
                    "kl": out.kl,
                    "return_parts": return_parts(out, rewards, mask, loss_kw["lam"]),
                }
                if diagnostics:
                    res["grad_parts"] = part_gradients(out, logits, actions, mask, rewards, loss_kw["lam"],
                                                       loss_kw["temperature"], params, loss_kw["baseline"],
                                                       loss_kw["group_size"])  # fmt: skip
                return res
            tau = loss_kw["temperature"]
            if loss == "sft":
                value = sft_loss(logits, actions, mask, tau, seq_weights)
            else:
                value, _ = sampled_opd_loss(logits, teacher, actions, mask, tau, seq_weights)
            with torch.no_grad():
                kl = dense_kl(logits.detach().float(), teacher.float(), temperature=tau, mask=mask,
                              backend=loss_kw["backend"])  # fmt: skip
        nan = torch.tensor(float("nan"), device=logits.device)
        return {"loss": value, "dense": nan, "sparse": nan, "kl": kl,
                "return_parts": torch.zeros(2, dtype=torch.float64, device=logits.device)}  # fmt: skip
