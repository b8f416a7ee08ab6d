"""Atomic checkpoints that resume to the same result: weights as safetensors, the rest loaded without unpickling code.

Layout of `<run_dir>/checkpoints/step-000100/`: `model.safetensors` (weights), `state.pt` (optimizer, scheduler,
RNG states, step and user metadata; read back with `torch.load(weights_only=True)`, which refuses arbitrary
objects). A checkpoint is written to a temporary folder, flushed, then renamed into place, and `latest` is
replaced atomically last: a crash at any moment leaves the previous checkpoint intact and `latest` valid.
`clean_stale` removes the temporary folders such a crash leaves behind (a resume calls it). The final model folder
is written the same way (temp folder, rename), and a resume loads the newest checkpoint that reads back.

`CheckpointMixin` gives the `Trainer` its run-level side: save / resume (FSDP included), the final model folder,
the refusal to resume under changed settings, and the run summary.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
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


def write_atomic(path: Path, text: str) -> None:
    """Replace the file `path` by `text` atomically (temp file, fsync, rename)."""
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
    write_atomic(root / "latest", json.dumps({"step": step, "path": final.name}))
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


def checkpoints_newest_first(run_dir: str | os.PathLike) -> list[Path]:
    """Every complete-looking checkpoint, the one `latest` points to first, then by step, newest first."""
    first = latest_checkpoint(run_dir)
    rest = sorted(_complete(Path(run_dir) / "checkpoints"), reverse=True)
    return ([first] if first is not None else []) + [p for p in rest if p != first]


def final_is_complete(path: str | os.PathLike) -> bool:
    """A final model folder as `save_final` leaves it: config, every safetensors shard, tokenizer."""
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file() and (p / "tokenizer_config.json").is_file()):
        return False
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return False
        return all((p / s).is_file() for s in shards)
    return (p / "model.safetensors").is_file()


def clean_stale(run_dir: str | os.PathLike) -> list[str]:
    """Remove the `.step-*.tmp-*` folders (in `run_dir/checkpoints/`) and `.final.tmp-*` / `.final.old-*` folders
    (in `run_dir`) that an interrupted write left behind; returns their names."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.glob(".step-*.tmp-*") if p.is_dir()) if root.is_dir() else []
    run = Path(run_dir)
    stale += sorted(p for p in (*run.glob(".final.tmp-*"), *run.glob(".final.old-*")) if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


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


# ------------------------------------------------------------------------------------------ run level
#: Config keys that may change between a run and its --resume without changing what it computes.
RESUME_MAY_CHANGE = frozenset(
    {"stop_after", "output_dir", "progress", "tensorboard", "checkpoint_every", "keep_checkpoints", "save_final",
     "overwrite", "cpu_threads", "resume",
     # where the served teacher lives and how patiently it is asked (a restarted server may move); the
     # vocabulary and tokenizer checks at connect still refuse another teacher
     "teacher_url", "teacher_token_file", "teacher_timeout", "teacher_retries"}
)  # fmt: skip


def check_same_run(saved: dict, now: dict, path) -> None:
    """--resume continues the *same* run: refuse a checkpoint written under different settings."""
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]  # fmt: skip
    if saved and diff:
        raise ValueError(
            f"checkpoint {path} was written with other settings ({'; '.join(diff)}); resume with the same "
            "config, or start a new output_dir"
        )


def _holder(sd) -> SimpleNamespace:
    """What `save_checkpoint` needs of a model or optimizer, for state dicts gathered from FSDP shards."""
    return SimpleNamespace(state_dict=lambda *a, **k: sd)


class CheckpointMixin:
    """Checkpoint, resume and summary methods of `Trainer` (which holds acc, cfg, policy, optimizer, ...)."""

    def _extra(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "data_order": self.order.state_dict(), "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
            "prompts_sha256": self.prompts_sha, "world_size": self.world, "config": asdict(self.cfg),
            "optimizer_format": "fqn" if self.fsdp else "torch", "history": self.history,
        }  # fmt: skip

    def save(self) -> Path | None:
        """Atomic checkpoint of step `self.step` (model, optimizer, scheduler, RNG, data order, history)."""
        acc, cfg = self.acc, self.cfg
        acc.wait_for_everyone()
        path = None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.policy, options=opts)  # collective: every process takes part
            osd = get_optimizer_state_dict(self.policy, self.optimizer.optimizer, options=opts)
            if self.main:
                sd = {k.removeprefix("model."): v for k, v in msd.items()}
                path = save_checkpoint(self.out, self.step, _holder(sd), _holder(osd),
                                       self.scheduler, self._extra(), cfg.keep_checkpoints)  # fmt: skip
        elif self.main:
            path = save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler, self._extra(),
                                   cfg.keep_checkpoints)  # fmt: skip
        acc.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Load the newest checkpoint in output_dir (True), or leave the fresh state (False)."""
        from dataclasses import asdict

        if self.out is None:
            raise ValueError("resume needs an output_dir")
        if self.main:
            for name in clean_stale(self.out):
                self._log(f"removed {name}, left by an interrupted checkpoint write")
        candidates = checkpoints_newest_first(self.out)
        if not candidates:
            return False
        # a corrupt newest checkpoint (disk error, foreign write) falls back to an older one
        for path in candidates:
            try:
                info = (
                    self._load_fsdp(path)
                    if self.fsdp
                    else load_checkpoint(path, self.model, self.optimizer, self.scheduler)
                )
                break
            except ValueError:  # a checkpoint that reads fine but does not fit this run: not a corruption
                raise
            except Exception as e:  # every state is loaded again from the older checkpoint
                self._log(f"warning: checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                          "trying the next older one")  # fmt: skip
        else:
            raise ValueError(
                f"no checkpoint in {str(self.out / 'checkpoints')!r} can be read ({len(candidates)} tried); start "
                "a new output_dir or --overwrite true"
            )
        ex = info["extra"]
        if ex.get("optimizer_format", "torch") != ("fqn" if self.fsdp else "torch"):
            raise ValueError(f"checkpoint {path} was written {'with' if ex.get('optimizer_format') == 'fqn' else 'without'} "
                             "FSDP; resume it with the same kind of launch")  # fmt: skip
        saved = ex.get("config", {})  # keys a checkpoint predates count as their defaults
        check_same_run({**asdict(type(self.cfg)()), **saved} if saved else {}, asdict(self.cfg), path)
        self.order.load_state_dict(ex["data_order"])
        self.step, self.samples_seen, self.tokens_seen = (
            info["step"],
            int(ex["samples_seen"]),
            int(ex["tokens_seen"]),
        )
        self.history = {k: list(v) for k, v in ex.get("history", {}).items()}
        if ex.get("prompts_sha256") != self.prompts_sha:
            self._log(f"warning: the prompts changed since the checkpoint was written ({self.cfg.prompts})")
        if int(ex.get("world_size", self.world)) != self.world:
            self._log(f"note: checkpoint from {ex['world_size']} processes, resuming on {self.world}: "
                      "the samples drawn from here on differ from an uninterrupted run")  # fmt: skip
        self._log(f"resumed from {path} at step {self.step}")
        return True

    def save_after_error(self, error: BaseException, order_before: dict | None) -> Path | None:
        """After an exception or Ctrl-C in `train`: checkpoint the last consistent state (the finished steps, the
        data order rewound to `order_before` when a step was in flight) and say where, in the log and as a note
        on the exception. Returns the checkpoint, or None when nothing could be saved."""
        what = f"{type(error).__name__} during step {self.step + 1}"
        last = None if self.out is None else latest_checkpoint(self.out)
        if self.out is None:
            msg = f"{what}: nothing saved (output_dir is None)"
        elif getattr(self, "_updating", False):
            msg = f"{what}, in the middle of the optimizer update: no consistent state to save; last checkpoint {last}"
        elif self.world > 1:  # the other processes may be mid-step: a collective save could hang
            msg = f"{what} on a multi-process run: not saved; last checkpoint {last}"
        elif last is not None and last.name == f"step-{self.step:08d}":
            msg = f"{what}: the finished steps are already saved in {last}; continue with --resume"
        else:
            if order_before is not None:
                self.order.load_state_dict(order_before)
            try:
                path = self.save()
            except Exception as e:  # e.g. the disk is full
                msg = f"{what}: saving step {self.step} failed too ({type(e).__name__}: {e}); last checkpoint {last}"
            else:
                msg = f"{what}: saved the state after step {self.step} to {path}; continue with --resume"
                last = path
        self._log(msg)
        error.add_note(f"[hybridlab.train] {msg}")
        return last

    def _load_fsdp(self, path: Path) -> dict:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        sd = {f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.policy, sd, options=opts)
        set_optimizer_state_dict(self.policy, self.optimizer.optimizer, state["optimizer"], options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return {"step": int(state["step"]), "extra": state["extra"]}

    def save_final(self) -> Path | None:
        """A Hugging Face model folder (safetensors + config + tokenizer) at <output_dir>/final."""
        from ..tasks.models import _quiet_progress

        sd = self.acc.get_state_dict(self.policy) if self.fsdp else None
        dst = self.out / "final"
        if self.main:
            kw = {} if sd is None else {"state_dict": {k.removeprefix("model."): v for k, v in sd.items()}}
            # written beside, then renamed into place (as the checkpoints): a kill leaves the old final/ or none,
            # never a partial one
            tmp = self.out / f".final.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            with _quiet_progress():
                self.model.save_pretrained(tmp, safe_serialization=True, **kw)
            self.tokenizer.save_pretrained(tmp)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            aside = self.out / f".final.old-{os.getpid()}"
            if dst.exists():
                os.replace(dst, aside)
            os.replace(tmp, dst)
            _fsync_dir(self.out)
            shutil.rmtree(aside, ignore_errors=True)
        self.acc.wait_for_everyone()
        return dst

    def summary(self, start: int, wall: float, saved: list[str], final) -> dict[str, Any]:
        """Steps, speed, reward and KL at the start and the end, the checkpoints that still exist."""
        import statistics

        rows = [r for r in self.rows_log if "loss" in r]
        this = [r for r in rows if r["step"] > start]
        k = max(1, len(rows) // 10)

        def mean(key, rs):
            return statistics.fmean(r[key] for r in rs) if rs else float("nan")

        out = {
            "steps": self.step, "steps_this_run": self.step - start, "total_steps": self.cfg.steps,
            "complete": self.step == self.cfg.steps and (final is not None or self.out is None
                                                         or not self.cfg.save_final), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in this) / max(1e-9, sum(r["step_s"] for r in this)) if this else None,
            "reward_first": mean("reward", rows[:k]), "reward_last": mean("reward", rows[-k:]),
            "kl_first": mean("kl", rows[:k]), "kl_last": mean("kl", rows[-k:]),
            "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen, "world_size": self.world,
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "fused_linear": self.cfg.fused_linear, "checkpoints": [p for p in saved if Path(p).exists()],
            "final_model": None if final is None else str(final),
            "metrics": None if self.out is None else str(self.out / "metrics.jsonl"),
        }  # fmt: skip
        if this and "train_peak_mem_gib" in this[0]:
            out["peak_mem_gib"] = max(max(r["train_peak_mem_gib"], r["gen_peak_mem_gib"]) for r in this)
            out["train_peak_mem_gib"] = max(r["train_peak_mem_gib"] for r in this)
        return out


def format_summary(s: dict[str, Any]) -> str:
    speed = "" if s["tokens_per_s"] is None else f", {s['tokens_per_s']:.1f} response tokens/s"
    return "\n".join([
        f"summary: step {s['steps']}/{s['total_steps']} ({s['steps_this_run']} this run, "
        f"{'complete' if s['complete'] else 'stopped early: continue with --resume'}) on {s['world_size']} x {s['device']}",
        f"  wall {s['wall_s']:.1f} s{speed}" + (f", peak memory {s['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in s else ""),
        f"  reward {s['reward_first']:.3f} -> {s['reward_last']:.3f}, KL/sequence {s['kl_first']:.3f} -> "
        f"{s['kl_last']:.3f} (first / last 10% of steps)",
        f"  metrics {s['metrics']}; checkpoints kept {len(s['checkpoints'])}"
        + (f"; final model {s['final_model']}" if s["final_model"] else ""),
    ])  # fmt: skip


def read_summary(path: Path) -> dict | None:
    """summary.json as a dict, or None when it is missing or unreadable (a run killed while writing it)."""
    try:
        s = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop metrics lines after `step` (work a crash lost and a resume redoes), atomically; returns the rest."""
    if not path.exists():
        return []
    keep = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    keep = [r for r in keep if r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return keep
