"""`HybridGRPOTrainer`: TRL's `GRPOTrainer` with hybridlab's update (generation, rewards and groups stay GRPO's;
the loss is `hybrid_loss` / `fused_hybrid_loss`). See `hybridlab.integrations.trl` for what changes and why."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from trl import GRPOTrainer

from ...dense import dense_kl
from ...fused_hybrid import fused_hybrid_loss
from ...hybrid import hybrid_loss
from ...sparse import combined_returns, future_sum, group_loo_mean, kl_estimate, selected_logprobs
from .config import HybridGRPOConfig, _check_hybrid_args
from .recipe import RecipeMixin


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(input_ids, attention_mask, position_ids: bool) -> dict[str, Any]:
    """Forward inputs for left-padded prompt + completion rows; positions start at 0 on each row's first real
    token, as `generate` and vLLM number them (so the training forward scores the states that were sampled)."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids:
        kw["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    return kw


def _config_vocab(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


def _logit_postprocessing(model) -> list[str]:
    cfg = model.config.get_text_config()
    found = []
    for key in (
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "lm_head_multiplier",
        "logits_scaling",
    ):
        v = getattr(cfg, key, None)
        if v is not None and v != 1.0:
            found.append(f"{key}={v}")
    return found


class HybridGRPOTrainer(RecipeMixin, GRPOTrainer):
    """`GRPOTrainer` with hybridlab's update: J = E[lam R] - teacher_beta KL(student || teacher).

    Args (besides GRPOTrainer's, all passed through):
        teacher_model: a local model folder (loaded with `args.teacher_model_init_kwargs`) or a causal LM object
            sharing the student's tokenizer and vocabulary. Frozen; never trained. None when `args.teacher_url`
            names a served teacher (`python -m hybridlab.serve_teacher`).
        args: a `HybridGRPOConfig`.
    """

    _tag_names = ["trl", "grpo", "hybridlab"]
    _name = "HybridGRPO"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: HybridGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        *,
        teacher_model=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = HybridGRPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-HybridGRPO")
        if not isinstance(args, HybridGRPOConfig):
            raise TypeError(
                f"args must be a HybridGRPOConfig (GRPOConfig plus lam, teacher_beta, future, ...), got "
                f"{type(args).__name__}"
            )
        _check_hybrid_args(args)  # again: fields may have been changed after construction
        if teacher_model is None and args.teacher_url is None:
            raise ValueError(
                "teacher_model must be given: a local model folder or a causal LM object (or set args.teacher_url "
                "to a served teacher)"
            )
        if teacher_model is not None and args.teacher_url is not None:
            raise ValueError(
                f"teacher_model and args.teacher_url={args.teacher_url!r} are both given: give one teacher"
            )
        teacher_kwargs = dict(args.teacher_model_init_kwargs or {})
        if args.teacher_url is not None:
            teacher_path = args.teacher_url
        elif isinstance(teacher_model, str):
            from trl.trainer.utils import create_model_from_path

            if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                teacher_kwargs["device_map"] = None
            teacher_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            teacher_path = teacher_model
            teacher_model = create_model_from_path(teacher_model, **teacher_kwargs)
        else:
            if teacher_kwargs:
                raise ValueError(
                    "teacher_model_init_kwargs were given but teacher_model is already a model object; pass a path "
                    "or drop teacher_model_init_kwargs"
                )
            teacher_path = getattr(teacher_model.config, "_name_or_path", "") or type(teacher_model).__name__
        if args.teacher_url is None and (not hasattr(teacher_model, "config") or not callable(teacher_model)):
            raise TypeError(
                f"teacher_model must be a causal LM or a path, got {type(teacher_model).__name__}"
            )

        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class,
            reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
            quantization_config=quantization_config, peft_config=peft_config, tools=tools,
            rollout_func=rollout_func, environment_factory=environment_factory,
        )  # fmt: skip
        self._recipe_init()  # schedules, teacher trust (its rates file is read and checked here), gate

        student = self.accelerator.unwrap_model(self.model)
        self.teacher_client = None
        if args.teacher_url is not None:
            return self._connect_teacher(student)
        self.vocab_size = self._check_vocab(student, teacher_model, teacher_path)
        if args.fused_linear:
            for who, m in (("student", student), ("teacher", teacher_model)):
                post = _logit_postprocessing(m.get_base_model() if hasattr(m, "get_base_model") else m)
                if post:
                    raise ValueError(
                        f"fused_linear=True: the {who} post-processes its logits ({', '.join(post)}), so its logits "
                        "are not lm_head(hidden); set fused_linear=False"
                    )
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        teacher_model.eval()
        if args.disable_dropout:
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(teacher_model)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        elif self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            self.teacher_model = prepare_fsdp(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        from trl.models.utils import _ForwardRedirection

        self._forward_redirection = _ForwardRedirection()
        # forward options each model takes: fewer logits rows, and positions counted from the first real token
        # (as `generate` and vLLM number them on left-padded prompts; absolute-position models depend on it)
        t_unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        self._student_opts = {k: _accepts(student, k) and not (k == "position_ids" and self._is_vlm)
                              for k in ("logits_to_keep", "position_ids")}  # fmt: skip
        self._teacher_opts = {k: _accepts(t_unwrapped, k) and not (k == "position_ids" and self._is_vlm)
                              for k in ("logits_to_keep", "position_ids")}  # fmt: skip
        self._hybrid_rewards_per_func = None

    def _connect_teacher(self, student) -> None:
        """A served teacher (`args.teacher_url`): connect, check the tokenizer fingerprint and the vocabulary, fetch
        the LM head once; every failure is an error here, before the first step."""
        from trl.models.utils import _ForwardRedirection

        from ...teacher_service.client import TeacherClient

        a = self.args
        if a.fused_linear and _logit_postprocessing(
            student.get_base_model() if hasattr(student, "get_base_model") else student
        ):
            raise ValueError(
                "fused_linear=True: the student post-processes its logits; set fused_linear=False"
            )
        self.teacher_client = c = TeacherClient.for_trainer(a, self._tokenizer)
        name = getattr(student.config, "_name_or_path", "") or type(student).__name__
        self.vocab_size = c.check_student(_config_vocab(student), self._tokenizer, name)
        self.teacher_model = None
        self._forward_redirection = _ForwardRedirection()
        self._student_opts = {k: _accepts(student, k) and not (k == "position_ids" and self._is_vlm)
                              for k in ("logits_to_keep", "position_ids")}  # fmt: skip
        self._hybrid_rewards_per_func = None

    def _served(self, ids, att, n: int, mask, fused: bool):
        """The served teacher's inputs at the last n positions' states: (hidden [B, n, H], head [V, H][, bias])
        or logits [B, n, V]; only the positions in `mask` [B, n] travel (the others are zeros, never used)."""
        from ...teacher_service.client import Sequences

        seqs = Sequences(ids, att, ids.shape[1] - n, mask.bool())
        return self.teacher_client.teacher_inputs(seqs, self.vocab_size, fused, None, ids.device)

    def train(self, *args, **kwargs):
        """GRPO's `train`. When a served teacher fails (unreachable after its retries, or a damaged answer), the
        state after the last finished step is saved as a checkpoint first (one process: a collective save could
        hang on others mid-step), so `train(resume_from_checkpoint=True)` continues; the error says where."""
        from ...teacher_service.client import TeacherServiceError, TeacherUnavailable
        from ...teacher_service.protocol import ProtocolError

        try:
            return super().train(*args, **kwargs)
        except (TeacherUnavailable, TeacherServiceError, ProtocolError) as e:
            step = self.state.global_step
            if self.teacher_client is None or step == 0:
                raise
            if self.accelerator.num_processes > 1:
                e.add_note(f"[hybridlab] multi-process run: nothing saved after step {step}")
                raise
            self._save_checkpoint(self.model, trial=None)
            e.add_note(f"[hybridlab] saved the state after step {step} to {self.args.output_dir}/checkpoint-{step}; "
                       "continue with train(resume_from_checkpoint=True)")  # fmt: skip
            raise

    def _send_telemetry(self):
        """No network at run time: TRL's usage ping is not sent."""

    def _generate_single_turn(self, *args, **kwargs):
        """GRPO's generation with the student folder's own generation defaults swapped out for the call.

        transformers fills every field GRPO's generation config leaves at its default from
        `model.generation_config` (the folder's `generation_config.json`): `no_repeat_ngram_size`, `min_new_tokens`,
        `suppress_tokens`, `bad_words_ids`, `begin_suppress_tokens`, penalties... would reshape the sampling
        distribution away from softmax(z / temperature), the one the loss differentiates. For the call the model
        carries a bare config (pad, BOS, EOS only), as hybridlab.train's `rollout.generate` does."""
        if self.use_vllm:  # vLLM takes GRPO's explicit sampling parameters, not this config
            return super()._generate_single_turn(*args, **kwargs)
        from transformers import GenerationConfig

        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        held = [m for m in {id(model): model, id(base): base}.values() if hasattr(m, "generation_config")]
        saved = [m.generation_config for m in held]
        g = self.generation_config
        bare = GenerationConfig(
            pad_token_id=g.pad_token_id, bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id
        )
        try:
            for m in held:
                m.generation_config = bare
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            for m, c in zip(held, saved):
                m.generation_config = c

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_vocab(self, student, teacher, teacher_path: str) -> int:
        """The student's vocabulary size V. The teacher must cover it (a larger, padded teacher head is sliced to
        the first V ids, with a warning); the tokenizer must fit in it."""
        from ...train.loading import check_vocab_sizes

        student_path = getattr(student.config, "_name_or_path", "") or type(student).__name__
        vs, vt = _config_vocab(student), _config_vocab(teacher)
        return check_vocab_sizes(vs, vt, len(self._tokenizer), student_path, teacher_path)

    # -- generation: keep GRPO's, add what the hybrid loss needs ---------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._hybrid_rewards_per_func = out  # gathered over processes: [N_global, n_funcs]
        return out

    def _generate_and_score_completions(self, inputs):
        self._hybrid_rewards_per_func = None
        out = super()._generate_and_score_completions(inputs)
        rpf = self._hybrid_rewards_per_func
        if rpf is None:
            raise RuntimeError(
                "GRPOTrainer did not compute rewards through _calculate_rewards (TRL version drift?)"
            )
        self._hybrid_rewards_per_func = None
        device = out["completion_ids"].device
        b = out["completion_ids"].shape[0]
        rank = self.accelerator.process_index
        weights = self.reward_weights.to(rpf.device)
        unscorable = torch.isnan(rpf).all(dim=1)
        r_all = torch.where(unscorable, 0.0, (rpf * weights[None]).nansum(dim=1)).float()  # [N_global]
        local = slice(rank * b, (rank + 1) * b)
        r_local = r_all[local].to(device)
        mask = out["completion_mask"].bool()
        if "tool_mask" in out:
            mask = mask & out["tool_mask"].bool()
        mask = mask & ~unscorable[local].to(device)[:, None]
        # sequences the update keeps (not unscorable, not left out by mask_truncated_completions) and their
        # tokens, over all processes: the divisors of normalize="sequences" / "tokens", as in hybridlab.train
        kept = float(mask.any(1).sum())
        counts = self.accelerator.reduce(
            torch.tensor([kept, float(mask.sum())], dtype=torch.float64, device=device), reduction="sum"
        )
        out["hybrid_rewards"] = r_local
        out["hybrid_mask"] = mask
        if self.args.teacher_prompt is not None:
            out["hybrid_teacher_prompt_ids"], out["hybrid_teacher_prompt_mask"] = self._teacher_prompts(
                inputs, device
            )
        out["hybrid_n_seq"] = counts[0].clone()
        out["hybrid_n_tok"] = counts[1].clone()
        mode = "train" if self.model.training else "eval"
        if unscorable.any():
            self._metrics[mode]["hybrid/unscorable_frac"].append(unscorable.float().mean().item())
        if bool(unscorable.all()):
            warnings.warn(
                f"every reward of this {mode} batch ({unscorable.numel()} completions) is None / NaN: the batch "
                "trains nothing, the teacher term included (check the reward functions)",
                RuntimeWarning,
                stacklevel=2,
            )
        g = self.num_generations if mode == "train" else self.num_generations_eval
        out["hybrid_lam"], beta_k, out["hybrid_beta"] = self.recipe_weights(
            inputs, r_all, r_local, unscorable, mode
        )
        base = self._group_baseline(out, mask, r_all, r_local, g, beta_k)
        if base is not None:
            out["hybrid_baseline"] = base
        return out

    @staticmethod
    def _sequences(batch, teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of prompt + completion; the teacher's own prompt when one is set."""
        key = "hybrid_teacher_prompt" if teacher and "hybrid_teacher_prompt_ids" in batch else "prompt"
        ids = torch.cat([batch[f"{key}_ids"], batch["completion_ids"]], dim=1)
        att = torch.cat([batch[f"{key}_mask"], batch["completion_mask"]], dim=1)
        return ids, att

    def _teacher_prompts(self, inputs, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's prompts (the template filled from each row), tokenised as GRPO tokenises the student's
        (chat template for conversational prompts), left-padded: ids and mask [B, P_teacher]."""
        from trl.data_utils import is_conversational
        from trl.trainer.utils import pad

        template = self.args.teacher_prompt
        texts = []
        for row in inputs:
            prompt = row["prompt"]
            conv = is_conversational({"prompt": prompt})
            content = prompt[-1]["content"] if conv else prompt
            if not isinstance(content, str):
                raise ValueError(
                    "teacher_prompt needs text prompts (a string, or a last message with string content)"
                )
            try:
                filled = template.format(
                    **{**{k: v for k, v in row.items() if isinstance(v, str)}, "prompt": content}
                )
            except KeyError as e:
                raise ValueError(
                    f"teacher_prompt {template!r} names {e.args[0]!r}, which is not a text column of the dataset "
                    f"(columns: {sorted(row)})"
                ) from None
            texts.append(prompt[:-1] + [{**prompt[-1], "content": filled}] if conv else filled)
        ids = self._tokenize_prompts(texts)[0]
        t_ids = pad(
            [torch.tensor(x) for x in ids], padding_value=self._tokenizer.pad_token_id, padding_side="left"
        )
        t_mask = pad(
            [torch.ones(len(x), dtype=torch.long) for x in ids], padding_value=0, padding_side="left"
        )
        return t_ids.to(device), t_mask.to(device)

    @torch.no_grad()
    def _group_baseline(self, out, mask, r_all, r_local, g, beta_k: float) -> torch.Tensor | None:
        """b(s_t) [B_local, T] of the whole gathered batch's groups (hybridlab's leave-one-out baselines), with this
        step's weights (`beta_k`: the step's teacher_beta, the same on every process; per completion in out)."""
        a, (lam, beta) = self.args, self.loss_weights(out)
        if a.baseline == "none":
            return None
        t = mask.shape[1]
        if g < 2:  # evaluation with num_generations_eval = 1: no group to leave one out of
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        if a.baseline == "reward_group" or a.future == "none" or beta_k == 0.0:  # one branch on every process
            # returns are lam R at every position: the two group baselines coincide
            loo = group_loo_mean(lam * r_all, g)[self._local_slice(mask.shape[0])].to(mask.device)
            return loo[:, None].expand(-1, t).clone()
        k = self._future_kl_terms(out, mask)  # [B, T] per-token KL estimates under the current policy
        fut = self.future_for_returns(future_sum(k, mask, a.gamma), mask)
        ret = combined_returns(r_local, fut, mask, lam=lam, beta=beta)
        padded = torch.where(mask, ret, lam * r_local[:, None])
        ret_all = self.accelerator.gather(
            self.accelerator.pad_across_processes(padded, dim=1, pad_index=math.nan)
        )
        # positions past a process's longest completion count lam R, as a finished sample does in hybridlab
        ret_all = torch.where(torch.isnan(ret_all), lam * r_all[:, None].to(ret_all), ret_all)
        return group_loo_mean(ret_all, g)[self._local_slice(mask.shape[0]), :t].contiguous()

    def _local_slice(self, b: int) -> slice:
        i = self.accelerator.process_index
        return slice(i * b, (i + 1) * b)

    def _future_kl_terms(self, out, mask) -> torch.Tensor:
        """The per-token estimates k_t that enter the future-KL sum, by no-grad forwards of student and teacher."""
        a = self.args
        ids, att = self._sequences(out)
        t_ids, t_att = self._sequences(out, teacher=True)
        n = out["completion_ids"].shape[1]
        rows = []
        bs = a.per_device_train_batch_size if self.model.training else a.per_device_eval_batch_size
        for s in range(0, ids.shape[0], bs):
            sl = slice(s, s + bs)
            with self.accelerator.autocast():
                z = self._logits(self.model, ids[sl], att[sl], n, self._student_opts)
                q = (self._served(t_ids[sl], t_att[sl], n, mask[sl], False) if self.teacher_client is not None
                     else self._logits(self.teacher_model, t_ids[sl], t_att[sl], n, self._teacher_opts))  # fmt: skip
            q = q[..., : self.vocab_size]
            acts, m = out["completion_ids"][sl], mask[sl]
            if a.future == "analytic":
                k = dense_kl(z, q, temperature=a.temperature, mask=m, backend=a.dense_backend,
                             teacher_floor=a.teacher_floor)  # fmt: skip
            else:
                logp = selected_logprobs(z, acts, a.temperature, m)
                logq = selected_logprobs(q, acts, 1.0, m)
                if a.teacher_floor is not None:
                    logq = logq.clamp_min(a.teacher_floor)
                # float64: k3 = r - 1 - log r overflows fp32 once log r > ~88 (a token the student finds unlikely)
                k = kl_estimate(logp.double(), logq.double(), a.future)
            rows.append(torch.where(m, k.double(), 0.0))
        return torch.cat(rows)

    @staticmethod
    def _logits(model, input_ids, attention_mask, n: int, opts: dict) -> torch.Tensor:
        """Logits [B, n, V] at the states that produced the last n tokens."""
        kw = model_inputs(input_ids, attention_mask, opts["position_ids"])
        if opts["logits_to_keep"]:
            kw["logits_to_keep"] = n + 1
        return model(**kw).logits[:, -(n + 1) : -1]

    # -- the update -----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("HybridGRPOTrainer does not support returning outputs")
        unwrapped = self.accelerator.unwrap_model(model)
        # Run both forwards and the loss inside the DDP/FSDP wrapper's forward (gradient hooks, sharded params).
        loss, stats = self._forward_redirection(model, unwrapped, self._hybrid_loss, unwrapped, inputs)
        mode = "train" if self.model.training else "eval"
        world = self.accelerator.num_processes
        stats = self.accelerator.reduce(stats, reduction="sum")
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        steps = steps if mode == "train" else 1
        n_seq, n_tok = float(stats[3]), float(stats[4])
        # dense / sparse: this micro-batch's share of the window's loss, times the window's micro-batches
        self._metrics[mode]["hybrid/dense"].append(float(stats[0]) / world * steps)
        self._metrics[mode]["hybrid/sparse"].append(float(stats[1]) / world * steps)
        if n_seq > 0:
            self._metrics[mode]["hybrid/teacher_kl"].append(
                float(stats[2]) / n_seq
            )  # sum_t KL_t per sequence
        if n_tok > 0:
            self._metrics[mode]["hybrid/teacher_kl_per_token"].append(float(stats[2]) / n_tok)
            self._metrics[mode]["hybrid/return_mean"].append(float(stats[5]) / n_tok)
        return loss

    def hybrid_coefficients(self, inputs) -> torch.Tensor:
        """c_b * P [B]: sequence b's weight in the global batch's loss, times the P processes DDP averages over."""
        mask = inputs["hybrid_mask"]
        n_seq, n_tok = float(inputs["hybrid_n_seq"]), float(inputs["hybrid_n_tok"])
        norm = self.args.normalize
        b = mask.shape[0]
        ones = torch.ones(b, dtype=torch.float32, device=mask.device)
        if norm == "sequences":
            c = ones / max(n_seq, 1.0)
        elif norm == "tokens":
            c = ones / max(n_tok, 1.0)
        elif norm == "per_sequence":
            c = ones / (max(n_seq, 1.0) * mask.sum(1).clamp_min(1).float())
        else:
            c = ones / float(norm)
        return c * self.accelerator.num_processes

    def _hybrid_loss(self, unwrapped, inputs):
        a = self.args
        ids, att = self._sequences(inputs)
        t_ids, t_att = self._sequences(inputs, teacher=True)
        actions, mask = inputs["completion_ids"], inputs["hybrid_mask"].bool()
        n, v = actions.shape[1], self.vocab_size
        c = self.hybrid_coefficients(inputs)
        baseline = inputs.get("hybrid_baseline")
        lam, beta = self.loss_weights(inputs)  # this step's, after schedules, teacher trust and the gate
        kw = dict(
            mask=mask, beta=beta, lam=lam, future=a.future, gamma=a.gamma, future_norm=a.future_norm,
            baseline="none" if baseline is None else baseline, temperature=a.temperature, normalize=1.0,
            seq_weights=c, backend=a.dense_backend, teacher_floor=a.teacher_floor,
        )  # fmt: skip
        dev = ids.device.type
        if a.fused_linear:
            student = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            with self.accelerator.autocast():
                kw_in = model_inputs(ids, att, self._student_opts["position_ids"])
                hidden = student.base_model(**kw_in).last_hidden_state
            hidden = hidden[:, -(n + 1) : -1]
            head = student.get_output_embeddings()
            teacher = (self._served(t_ids, t_att, n, mask, True) if self.teacher_client is not None
                       else self._teacher_hidden_and_head(t_ids, t_att, n))  # fmt: skip
            cdt = hidden.dtype
            with torch.autocast(dev, enabled=False):
                out = fused_hybrid_loss(
                    hidden, head.weight.to(cdt), teacher, actions, inputs["hybrid_rewards"],
                    bias=None if head.bias is None else head.bias.to(cdt), chunk_size=a.fused_chunk, **kw,
                )  # fmt: skip
        else:
            with torch.no_grad(), self.accelerator.autocast():
                q = (self._served(t_ids, t_att, n, mask, False) if self.teacher_client is not None
                     else self._logits(self.teacher_model, t_ids, t_att, n, self._teacher_opts)[..., :v])  # fmt: skip
            with self.accelerator.autocast():
                z = self._logits(unwrapped, ids, att, n, self._student_opts)
            with torch.autocast(dev, enabled=False):
                out = hybrid_loss(z, q, actions, inputs["hybrid_rewards"], **kw)
        m = mask.float()
        stats = torch.stack([
            out.dense.detach().double(), out.sparse.detach().double(), (out.kl * m).sum().double(),
            mask.any(1).sum().double(), m.sum().double(),  # kept sequences: the teacher_kl metric's divisor
            (out.returns * m).sum().double(),
        ])  # fmt: skip
        return out.loss, stats

    @torch.no_grad()
    def _teacher_hidden_and_head(self, ids, att, n):
        teacher = self.accelerator.unwrap_model(self.teacher_model)

        def hidden_of(t):
            base = t.get_base_model() if hasattr(t, "get_base_model") else t
            with self.accelerator.autocast():
                kw_in = model_inputs(ids, att, self._teacher_opts["position_ids"])
                return base.base_model(**kw_in).last_hidden_state

        h = self._forward_redirection(self.teacher_model, teacher, hidden_of, teacher)[:, -(n + 1) : -1]
        head = teacher.get_output_embeddings()
        w = head.weight[: self.vocab_size].to(h.dtype)
        return (h, w) if head.bias is None else (h, w, head.bias[: self.vocab_size].to(h.dtype))
