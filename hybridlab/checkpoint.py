"""Atomic checkpoints that resume to the same result: weights as safetensors, the rest loaded without unpickling code.

Layout of `<run_dir>/checkpoints/step-000100/`: `model.safetensors` (weights), `state.pt` (optimizer, scheduler,
RNG states, step and user metadata; read back with `torch.load(weights_only=True)`, which refuses arbitrary
objects). A checkpoint is written to a temporary folder, flushed, then renamed into place, and `latest` is
replaced atomically last: a crash at any moment leaves the previous checkpoint intact and `latest` valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically under `run_dir/checkpoints/`, keep the newest `keep`, return its path.

    `extra` holds plain values and tensors (e.g. histories, a generator's state) stored beside the step.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    aside = None
    if final.exists():  # re-saving a step (e.g. after a resume): swap, so a crash never leaves neither
        aside = root / f".step-{step:08d}.old-{os.getpid()}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", json.dumps({"step": step, "path": final.name}))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if keep > 0:  # rotate the others, never the checkpoint just written
        others = sorted(p for p in _complete(root) if p != final)
        for old in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    return [
        p
        for p in root.glob("step-*")
        if p.is_dir() and (p / "model.safetensors").exists() and (p / "state.pt").exists()
    ]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` points to, else the newest complete one, else None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        path = root / json.loads(pointer.read_text())["path"]
        if path in _complete(root):
            return path
    done = sorted(_complete(root))
    return done[-1] if done else None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` into the given objects; returns {"step", "extra"}.

    Never unpickles code: weights come from safetensors, the rest through `torch.load(weights_only=True)`.
    """
    path = Path(path)
    device = next(model.parameters()).device
    try:
        missing, unexpected = load_model(
            model, str(path / "model.safetensors"), strict=False, device=str(device)
        )
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not fit the model: {e}") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": int(state["step"]), "extra": state["extra"]}
