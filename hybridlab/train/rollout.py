"""The one rollout path: prompts -> sampled responses, masks, reward texts, rewards and the teacher's inputs.

Four rules hold here for every caller (the trainer, the scripts, the notebooks):
- sampler = scorer: generation runs with a clean generation config (full-vocabulary sampling at temperature tau,
  no top-k/top-p, no repetition penalty, no banned or suppressed tokens, no minimum length), whatever the model
  folder's `generation_config.json` says, so the responses are drawn from exactly softmax(z / tau), the policy
  the loss differentiates;
- the reward sees exactly what was sampled up to the first EOS: special tokens inside a response stay in its text
  (decoded with `skip_special_tokens=False`), since they stay in the trained tokens too;
- a response that hits `max_new_tokens` without EOS is marked `truncated` (and, with
  `mask_truncated_completions`, left out of the update: `keep` is False);
- the teacher may read its own prompt (`teacher_prompt`, a template around the student's prompt, or a row's own
  "teacher_messages", a whole chat rendered with the chat template): it scores the student's response tokens after
  its own prefix, with row t of its logits at response token t as for the student.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from .data import Row, as_row


@dataclass
class Rollout:
    """A batch of responses laid out as `generate` returns them.

    input_ids / attention_mask: [B, P + N] (left-padded prompt, then N response tokens, padding after EOS);
    actions: [B, N] response tokens; mask: [B, N] bool, response tokens up to and including the first EOS;
    rewards: [B]; truncated: [B] bool (no EOS within N tokens); keep: [B] bool (rows the update uses);
    teacher_input_ids / teacher_attention_mask / teacher_prompt_len: the teacher's own prompt + the same response
    tokens (None: the teacher reads the student's); sampler_logprobs: [B, N] log-probabilities the sampler drew
    the actions with (only when asked for; a check that sampler = scorer).
    """

    prompts: list[str]
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    actions: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    temperature: float
    truncated: torch.Tensor
    keep: torch.Tensor
    teacher_input_ids: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_prompt_len: int | None = None
    sampler_logprobs: torch.Tensor | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, P + N]: positions counted from the first real (non-padding) token, as `generate` uses them."""
        return positions(self.attention_mask)

    def teacher_view(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_ids, attention_mask, prompt length) of the teacher's sequences."""
        if self.teacher_input_ids is None:
            return self.input_ids, self.attention_mask, self.prompt_len
        return self.teacher_input_ids, self.teacher_attention_mask, self.teacher_prompt_len

    def to(self, device) -> Rollout:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}  # fmt: skip
        return replace(self, **moved)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - 1).clamp_min(0)


def response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[B, N] bool: response tokens up to and including the first EOS (all N when there is none)."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    return (torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0


def eos_ids_of(model, tokenizer) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer (a chat model may stop on several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
    if not ids:
        raise ValueError("no EOS token: neither the model's generation config nor its tokenizer names one")
    return ids


def generation_config(
    tokenizer, eos_ids: list[int], temperature: float, max_new_tokens: int, greedy: bool = False
):
    """Full-vocabulary sampling at `temperature` (or greedy), every logits processor explicitly off."""
    from transformers import GenerationConfig

    # greedy: argmax, which the sampling-only warpers (top-k, top-p ...) would not change anyway
    mode = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0, "min_p": None,
        "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    }  # fmt: skip
    return GenerationConfig(
        **mode, repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
        min_new_tokens=0, max_new_tokens=max_new_tokens, bad_words_ids=None, suppress_tokens=None,
        begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
        renormalize_logits=False, use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip


def generate(model, input_ids, attention_mask, generation_config, **kw):
    """`model.generate` with the model's own generation defaults swapped out for the call (transformers fills
    every unset field of the config it is given from `model.generation_config`: penalties, banned tokens...)."""
    from transformers import GenerationConfig

    g = generation_config
    saved = model.generation_config
    model.generation_config = GenerationConfig(pad_token_id=g.pad_token_id, eos_token_id=g.eos_token_id,
                                               bos_token_id=g.bos_token_id)  # fmt: skip
    try:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=g, **kw)
    finally:
        model.generation_config = saved


def prompt_texts(rows: list[Row], template: str | None = None) -> list[str]:
    """Each row's prompt, or the teacher's template filled with it ({prompt}, {answer})."""
    if template is None:
        return [r["prompt"] for r in rows]
    return [
        template.format(prompt=r["prompt"], answer="" if r["answer"] is None else r["answer"]) for r in rows
    ]


def encode(tokenizer, texts: list[str], chat_template: bool = False, max_prompt_tokens: int | None = None,
           device=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Left-padded {"input_ids", "attention_mask"} [B, P] (chat template and truncation applied)."""
    kw = {}
    if chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]  # fmt: skip
        kw["add_special_tokens"] = False
    if max_prompt_tokens is not None:
        kw.update(truncation=True, max_length=max_prompt_tokens)
    enc = tokenizer(texts, padding=True, return_tensors="pt", **kw)
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def teacher_encode(tokenizer, rows: list[Row], template: str | None = None, chat_template: bool = False,
                   max_prompt_tokens: int | None = None, device=None) -> dict[str, torch.Tensor] | None:  # fmt: skip
    """The teacher's left-padded prompt encodings [B, P_T], or None when it reads the student's prompts.

    Rows with "teacher_messages" use that chat (chat template, generation prompt added); the others the
    `template` filled with their prompt (or their prompt itself), as a single user turn under `chat_template`."""
    own = [r.get("teacher_messages") is not None for r in rows]
    if not any(own):
        if template is None:
            return None
        return encode(tokenizer, prompt_texts(rows, template), chat_template, max_prompt_tokens, device)
    if template is not None:
        raise ValueError(
            "teacher_prompt is set and the prompt rows carry teacher_messages: give one or the other"
        )
    if not chat_template:
        raise ValueError(
            "prompt rows with teacher_messages need chat_template=true (the messages are a chat)"
        )
    chats = [
        r["teacher_messages"] if o else [{"role": "user", "content": r["prompt"]}] for r, o in zip(rows, own)
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    kw = {"add_special_tokens": False}
    if max_prompt_tokens is not None:
        kw.update(truncation=True, max_length=max_prompt_tokens)
    enc = tokenizer(texts, padding=True, return_tensors="pt", **kw)
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def assemble(tokenizer, rows: list[Row], enc: dict, tokens: torch.Tensor, reward_fn: Callable, eos_ids: list[int],
             temperature: float, teacher_enc: dict | None = None, mask_truncated: bool = False,
             sampler_logprobs: torch.Tensor | None = None, reward_name: str = "reward") -> Rollout:  # fmt: skip
    """A `Rollout` from prompt encodings [B, P] and response tokens [B, N]: masks, reward texts, rewards."""
    from ..tasks.rewards import call_reward

    ids, am = enc["input_ids"], enc["attention_mask"]
    if tokens.dim() != 2 or tokens.shape[0] != ids.shape[0]:
        raise ValueError(f"tokens must be [B, N] with B = {ids.shape[0]} prompts, got {list(tokens.shape)}")
    tokens = tokens.to(ids.device)
    mask = response_mask(tokens, eos_ids)
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    truncated = ~(is_eos & mask).any(1)
    kept = [[t for t, m, e in zip(r, mr, er) if m and not e]
            for r, mr, er in zip(tokens.tolist(), mask.tolist(), is_eos.tolist())]  # fmt: skip
    texts = [tokenizer.decode(k, skip_special_tokens=False, clean_up_tokenization_spaces=False) for k in kept]
    prompts = [r["prompt"] for r in rows]
    r = call_reward(reward_fn, prompts, texts, [row["answer"] for row in rows], name=reward_name)
    ones = torch.ones_like(tokens)
    t_ids = t_am = t_len = None
    if teacher_enc is not None:
        t_ids = torch.cat([teacher_enc["input_ids"], tokens], 1)
        t_am = torch.cat([teacher_enc["attention_mask"], ones], 1)
        t_len = teacher_enc["input_ids"].shape[1]
    return Rollout(
        prompts=prompts, texts=texts, input_ids=torch.cat([ids, tokens], 1), attention_mask=torch.cat([am, ones], 1),
        prompt_len=ids.shape[1], actions=tokens, mask=mask,
        rewards=torch.tensor(r, dtype=torch.float32, device=ids.device), temperature=float(temperature),
        truncated=truncated, keep=~truncated if mask_truncated else torch.ones_like(truncated),
        teacher_input_ids=t_ids, teacher_attention_mask=t_am, teacher_prompt_len=t_len,
        sampler_logprobs=sampler_logprobs,
    )  # fmt: skip


@torch.no_grad()
def rollout(gen: Callable, tokenizer, rows: list[Row], *, reward_fn: Callable, eos_ids: list[int],
            temperature: float, max_new_tokens: int, samples: int = 1, greedy: bool = False,
            chat_template: bool = False, max_prompt_tokens: int | None = None, teacher_prompt: str | None = None,
            from_teacher: bool = False, mask_truncated: bool = False, sampler_logprobs: bool = False,
            device=None, reward_name: str = "reward", max_teacher_prompt_tokens: int | None = None) -> Rollout:  # fmt: skip
    """Sample `samples` responses per row (contiguous groups) with `gen(input_ids=, attention_mask=,
    generation_config=, **kw)` (e.g. `functools.partial(generate, model)`) and assemble the `Rollout`.

    from_teacher: `gen` is the teacher's and samples after the teacher's prompt (offline distillation data).
    """
    rows = [as_row(r) for r in rows for _ in range(samples)]
    enc = encode(tokenizer, prompt_texts(rows), chat_template, max_prompt_tokens, device)
    # the teacher's own prefix has its own limit: max_prompt_tokens would cut its worked examples silently
    t_enc = teacher_encode(tokenizer, rows, teacher_prompt, chat_template, max_teacher_prompt_tokens, device)
    src = t_enc if (from_teacher and t_enc is not None) else enc
    cfg = generation_config(tokenizer, eos_ids, temperature, max_new_tokens, greedy)
    kw = {"output_scores": True, "return_dict_in_generate": True} if sampler_logprobs else {}
    out = gen(input_ids=src["input_ids"], attention_mask=src["attention_mask"], generation_config=cfg, **kw)
    seq = out.sequences if sampler_logprobs else out
    tokens = seq[:, src["input_ids"].shape[1] :]
    lp = None
    if sampler_logprobs:  # the scores after every logits processor: what the sampler really drew from
        scores = torch.stack(out.scores, 1).float()
        lp = torch.log_softmax(scores, -1).gather(-1, tokens[..., None])[..., 0]
    return assemble(tokenizer, rows, enc, tokens, reward_fn, eos_ids, temperature, t_enc, mask_truncated, lp,
                    reward_name)  # fmt: skip


def reward_of(reward: str | Callable) -> Callable:
    from ..tasks.rewards import load_reward

    return load_reward(reward) if isinstance(reward, str) else reward


def sample(model, tokenizer, prompts: list[str | Row], *, reward: str | Callable = "hybridlab.tasks.rewards:exact_match",
           temperature: float = 1.0, max_new_tokens: int, greedy: bool = False, **kw) -> Rollout:  # fmt: skip
    """Responses of `model` to `prompts` (strings or rows) through `rollout`, e.g. for an evaluation."""
    dev = next(model.parameters()).device
    return rollout(lambda **a: generate(model, **a), tokenizer, prompts, reward_fn=reward_of(reward),
                   eos_ids=eos_ids_of(model, tokenizer), temperature=temperature, max_new_tokens=max_new_tokens,
                   greedy=greedy, device=dev, reward_name=repr(reward), **kw)  # fmt: skip


def teacher_forcing_rollout(tokenizer, prompts: list[str | Row], responses: list[str],
                            reward: str | Callable = "hybridlab.tasks.rewards:exact_match") -> Rollout:  # fmt: skip
    """A `Rollout` of given response texts (each followed by EOS), e.g. ground-truth answers for SFT."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) differ in length")
    rows = [as_row(p) for p in prompts]
    enc = encode(tokenizer, prompt_texts(rows))
    ids = [x + [tokenizer.eos_token_id] for x in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    tokens = torch.full((len(rows), max(map(len, ids))), tokenizer.pad_token_id, dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = torch.tensor(x)
    return assemble(tokenizer, rows, enc, tokens, reward_of(reward), [tokenizer.eos_token_id], 1.0)


def response_logits_of(model, inputs: dict, n: int) -> torch.Tensor:
    """[B, n, V] logits of the last n tokens' predictions: row t produced response token t.

    Logits at position L - n - 1 + t predict token L - n + t. The LM head runs only on those n positions
    (`logits_to_keep` as an index tensor); models whose forward lacks that argument compute all and are sliced.
    """
    length = inputs["input_ids"].shape[1]
    keep = torch.arange(length - n - 1, length - 1, device=inputs["input_ids"].device)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        out = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    else:
        out = model(**inputs, use_cache=False).logits
    return out if out.shape[1] == n else out[:, length - n - 1 : length - 1]


def response_logits(model, ro: Rollout, teacher: bool = False) -> torch.Tensor:
    """[B, N, V] logits over the rollout (the teacher's view with `teacher=True`); row t produced actions[:, t]."""
    ids, am, _ = ro.teacher_view() if teacher else (ro.input_ids, ro.attention_mask, ro.prompt_len)
    kw = {"input_ids": ids, "attention_mask": am, "position_ids": positions(am)}
    return response_logits_of(model, kw, ro.actions.shape[1])


@torch.no_grad()
def teacher_inputs(teacher, ro: Rollout, vocab: int, fused: bool = False, topk: int | None = None):
    """Teacher logits [B, N, V] at the rollout's states (after the teacher's own prompt), or for the fused path
    (hidden [B, N, H], LM head [V, H][, bias]); sliced to the student's vocabulary V. `topk`: only the top-k
    log-probs of those logits, `TopKTeacher(logprobs [B, N, K], ids [B, N, K])` (what a served teacher sends)."""
    ids, am, p = ro.teacher_view()
    n = ro.actions.shape[1]
    kw = {"input_ids": ids, "attention_mask": am, "position_ids": positions(am)}
    if topk is not None:
        return teacher_topk(teacher, ro, vocab, topk)[0]
    if fused:
        h = teacher.base_model(**kw, use_cache=False).last_hidden_state[:, p - 1 : p + n - 1]
        head = teacher.get_output_embeddings()
        w = head.weight[:vocab]
        return (h.to(w.dtype), w) if head.bias is None else (h.to(w.dtype), w, head.bias[:vocab])
    return response_logits_of(teacher, kw, n)[..., :vocab]


@torch.no_grad()
def teacher_topk(teacher, ro: Rollout, vocab: int, k: int):
    """(TopKTeacher(logprobs [B, N, K], ids [B, N, K]), logprob_precision): the teacher's top-k log-probs at the
    rollout's states, and the rounding bound of their fp32 log-softmax (what a served teacher sends along)."""
    from ..teacher_service.protocol import log_softmax_precision
    from ..topk import topk_from_logits

    ids, am, _ = ro.teacher_view()
    kw = {"input_ids": ids, "attention_mask": am, "position_ids": positions(am)}
    logits = response_logits_of(teacher, kw, ro.actions.shape[1])[..., :vocab].float()
    t = topk_from_logits(logits, k)
    sel = ro.mask.to(logits.device)
    return t, log_softmax_precision(logits[sel], t.logprobs[sel])


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under a fixed seed without disturbing the global streams (CPU and the current GPU)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
