"""Loading student, teacher and tokenizer from local folders, and the checks a pair must pass before training."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("hybridlab.train")


def _check_path(path: str, what: str) -> None:
    """A missing local folder is an error here; a hub name ("org/name", one slash) is left to transformers."""
    if Path(path).expanduser().exists():
        return
    first = path.split("/")[0]
    hub_like = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(first).is_dir()
    if not hub_like:
        raise FileNotFoundError(
            f"{what} path {path!r} does not exist (give a local folder; a hub name 'org/name' needs network)"
        )


def load_model(path: str, what: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """`AutoModelForCausalLM` from a local folder (safetensors only); errors name the config key `what`."""
    from transformers import AutoModelForCausalLM

    from ..tasks.models import _quiet_progress

    _check_path(path, what)
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{what} {path!r} is not a model folder: it has no config.json (a tokenizer-only "
                             f"folder? give that one as `tokenizer` and point `{what}` at the model)")  # fmt: skip
        if not any(p.glob("*.safetensors")):
            raise ValueError(f"{what} {path!r} has no *.safetensors weights (pickled weights are not loaded)")
    try:
        with _quiet_progress():
            return AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
            )
    except OSError as e:  # a hub name without network, a missing repository, an unreadable file
        where = "folder" if p.is_dir() else "hub name (not a local folder)"
        raise ValueError(f"{what} {path!r}: no model could be loaded from this {where} ({type(e).__name__}: "
                         f"{str(e)[:300]}); give a local model folder (no network is used at run time)") from None  # fmt: skip


def load_tokenizer(path: str, trust_remote_code: bool = False, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    _check_path(path, what)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{what} {path!r}: no tokenizer could be loaded from it ({type(e).__name__}: "
                         f"{str(e)[:200]}); point `tokenizer` at the tokenizer's folder") from None  # fmt: skip
    return prepare_tokenizer(tok, path)


def prepare_tokenizer(tok, name: str = "tokenizer"):
    """Left padding and truncation (generation continues the prompt's right end); pad = EOS when there is none."""
    tok.padding_side = "left"
    tok.truncation_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(student, teacher, tokenizer, student_path: str, teacher_path: str) -> int:
    """The student's vocabulary size V after checking the pair; raises ValueError naming both sizes and paths.

    The teacher must cover the student's vocabulary. A teacher whose LM head is padded *larger* (rows rounded up
    past the tokenizer) is accepted when the student covers the tokenizer; its logits are sliced to the student's
    V, which renormalises the teacher over the first V ids (padding rows are never produced by the tokenizer).
    """
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    return check_vocab_sizes(vs, vt, len(tokenizer), student_path, teacher_path)


def check_vocab_sizes(vs: int, vt: int, nt: int, student_path: str, teacher_path: str) -> int:
    """The rule of `check_vocab` on sizes: student V `vs`, teacher V `vt`, `nt` tokenizer tokens; returns vs."""
    if vs < nt:
        raise ValueError(
            f"vocabulary mismatch: student {student_path!r} has vocab_size={vs} but the tokenizer has {nt} tokens"
        )
    if vt < vs:
        raise ValueError(
            f"vocabulary mismatch: student {student_path!r} has vocab_size={vs}, teacher {teacher_path!r} has "
            f"vocab_size={vt}; they must share the tokenizer ({nt} tokens) and the teacher must cover every "
            "student id"
        )
    if vt > vs:
        log.warning("teacher %r has vocab_size=%d > student's %d (tokenizer: %d tokens): slicing the teacher's "
                    "logits to the first %d ids", teacher_path, vt, vs, nt, vs)  # fmt: skip
    return vs


def check_tokenizers_agree(
    tokenizer, teacher_path: str, student_tok_path: str, trust_remote_code: bool
) -> None:
    """If the teacher's folder has its own tokenizer, it must map the same strings to the same ids."""
    p = Path(teacher_path)
    if not any(
        (p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=trust_remote_code)
    a, b = tokenizer.get_vocab(), other.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(
            f"tokenizer mismatch: {student_tok_path!r} ({len(a)} tokens) and teacher {teacher_path!r} ({len(b)} "
            f"tokens) differ, e.g. {diff}; student and teacher must share a tokenizer"
        )


def _probe(model, vocab: int) -> torch.Tensor:
    return (torch.arange(2, 8, device=model.get_output_embeddings().weight.device) % vocab)[None]


def check_fused_compatible(model, name: str, path: str, vocab: int) -> None:
    """fused_linear needs logits == lm_head(last hidden state); refuse models that post-process logits."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise ValueError(
            f"fused_linear: {name} {path!r} has no separate base model and LM head; set fused_linear=false"
        )
    ids = _probe(model, vocab)
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        got = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
    model.train(was)
    tol = (1e-3 if head.weight.dtype == torch.float32 else 3e-2) * (1 + ref.abs().max())
    if got.shape != ref.shape or (got - ref).abs().max() > tol:
        raise ValueError(
            f"fused_linear: {name} {path!r} ({type(model).__name__}) does not compute its logits as "
            "lm_head(last hidden state) (e.g. logit soft-capping or scaling); set fused_linear=false"
        )


_STOCHASTIC = ("dropout", "layerdrop")


def _zero_stochastic_attrs(obj) -> int:
    n = 0
    for k, v in list(vars(obj).items()):
        if (
            any(s in k.lower() for s in _STOCHASTIC)
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        ):
            if v > 0:
                setattr(obj, k, 0.0 if isinstance(v, float) else 0)
                n += 1
    return n


def make_deterministic(model: torch.nn.Module, name: str = "student", vocab: int | None = None) -> int:
    """Switch off every training-time randomness, then verify: two train-mode forwards must agree exactly.

    Zeroes every `nn.Dropout`, every numeric attribute whose name contains "dropout" or "layerdrop" on every
    module and on the model's config (and its sub-configs), whatever the architecture calls it (`hidden_dropout`,
    `attention_dropout`, `layerdrop`, ...). Dropout would make the policy the loss scores differ from the one that
    sampled. Returns how many settings were changed; ValueError if the model is still random in train mode.
    """
    from transformers import PretrainedConfig

    n = 0
    top = getattr(model, "config", None)
    configs = [top] + [
        v for v in (vars(top).values() if top is not None else ()) if isinstance(v, PretrainedConfig)
    ]
    for c in configs:
        if isinstance(c, PretrainedConfig):
            n += _zero_stochastic_attrs(c)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p:
            m.p, n = 0.0, n + 1
        n += _zero_stochastic_attrs(m)
    v = vocab or model.get_output_embeddings().weight.shape[0]
    ids = _probe(model, v).repeat(2, 1)
    was = model.training
    model.train()
    with torch.no_grad():
        a, b = (model(input_ids=ids, use_cache=False).logits.float() for _ in range(2))
    model.train(was)
    diff = float((a - b).abs().max())
    if diff > 1e-5 * (
        1.0 + float(a.abs().max())
    ):  # dropout moves logits by O(0.1); kernels' noise is far below
        raise ValueError(
            f"{name} ({type(model).__name__}) is random in train mode after zeroing every dropout and layerdrop "
            f"setting: two forwards on the same input differ by {diff:.3g}. The scored policy would not be the "
            "sampled one; remove the randomness from the model (or set disable_dropout=false to train anyway)"
        )
    return n
