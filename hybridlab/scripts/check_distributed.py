"""Check that a multi-process update equals the single-process update on the same global batch (CPU, gloo).

    python -m hybridlab.scripts.check_distributed --config configs/tiny_cpu.yaml [--nprocs 2] [--key value ...]

1. In this process (one process, no DDP): a `Trainer` generates one step's global batch as `nprocs` micro-batches
   and takes one update on it with grad_accum = nprocs: the reference gradients and parameters.
2. `nprocs` spawned processes (torch.distributed over gloo, through accelerate) each take the *same* rollouts'
   share (micro-batch p on process p, grad_accum = 1) and take one DDP update.
3. Compare every parameter's gradient and new value, and a negative control: the average of per-process
   updates that normalise by their *local* batch (what a naive data-parallel loss does). With normalize="tokens"
   (the default here) the local token counts differ, so the control must miss by a visible margin.

tests/test_distributed.py runs it with 2 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        out[f"param/{name}"] = p.detach().clone().contiguous()
        if p.grad is not None:
            out[f"grad/{name}"] = p.grad.detach().clone().contiguous()
    return out


def _worker(rank: int, world: int, port: int, cfg_dict: dict, shares, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from hybridlab.train import TrainConfig, Trainer

    tr = Trainer(TrainConfig(**cfg_dict))
    if tr.world != world:
        raise RuntimeError(f"expected {world} processes, accelerate sees {tr.world}")
    metrics = tr.train_step(rollouts=[shares[rank]], keep_grads=True)
    if rank == 0:
        save_file(_state(tr), str(Path(out_dir) / "ddp.safetensors"))
        (Path(out_dir) / "ddp_metrics.json").write_text(json.dumps(metrics))
    tr.acc.wait_for_everyone()
    # Leave without tearing the gloo process group down: destroying it while DDP's reducer still holds it can
    # deadlock (the destructor joins gloo's worker thread while holding the GIL that thread waits for). The
    # results are on disk and every collective has completed (the barrier above).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compare_single_vs_ddp(cfg, nprocs: int = 2, out_dir: str | None = None) -> dict:
    """Run steps 1-3 of the module docstring for `cfg` (a `TrainConfig`); returns the measured differences:
    {"grad_max_abs", "grad_max_rel", "param_max_abs", "naive_grad_max_rel", "grad_scale", "tokens_per_process",
    "loss_single", "loss_ddp"}."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from hybridlab.train import Trainer

    if cfg.prompts_per_step % nprocs:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must divide by nprocs={nprocs}")
    single_cfg = cfg.replace(grad_accum=nprocs, cpu=True).validate()
    ref = Trainer(single_cfg)
    shares = [r.to("cpu") for r in ref.generate()]  # micro-batch p == process p's share
    m_single = ref.train_step(rollouts=shares, keep_grads=True)
    want = _state(ref)

    # Negative control: each process normalising by its own batch, gradients averaged.
    naive = None
    local_cfg = cfg.replace(
        prompts_per_step=cfg.prompts_per_step // nprocs, grad_accum=1, cpu=True
    ).validate()
    for share in shares:
        t = Trainer(local_cfg)
        t.train_step(rollouts=[share], keep_grads=True)
        g = {k: v / nprocs for k, v in _state(t).items() if k.startswith("grad/")}
        naive = g if naive is None else {k: naive[k] + g[k] for k in g}

    with tempfile.TemporaryDirectory() as tmp:
        out = out_dir or tmp
        ddp_cfg = asdict(cfg.replace(grad_accum=1, cpu=True).validate())
        mp.start_processes(
            _worker, args=(nprocs, _free_port(), ddp_cfg, shares, out), nprocs=nprocs, join=True,
            start_method="spawn",
        )  # fmt: skip
        got = load_file(str(Path(out) / "ddp.safetensors"))
        m_ddp = json.loads((Path(out) / "ddp_metrics.json").read_text())

    grads = [k for k in want if k.startswith("grad/")]
    if set(grads) != {k for k in got if k.startswith("grad/")} or not grads:
        raise RuntimeError("single-process and DDP runs have different parameters with gradients")
    scale = max(float(want[k].abs().max()) for k in grads)
    g_abs = max(float((want[k] - got[k]).abs().max()) for k in grads)
    n_abs = max(float((want[k] - naive[k]).abs().max()) for k in grads)
    p_abs = max(float((want[k] - got[k]).abs().max()) for k in want if k.startswith("param/"))
    return {
        "grad_max_abs": g_abs, "grad_max_rel": g_abs / scale, "param_max_abs": p_abs,
        "naive_grad_max_rel": n_abs / scale, "grad_scale": scale,
        "tokens_per_process": [int(s.mask.sum()) for s in shares],
        "loss_single": m_single["loss"], "loss_ddp": m_ddp["loss"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from hybridlab.train import load_config

    ap = argparse.ArgumentParser(
        prog="python -m hybridlab.scripts.check_distributed",
        description="single-process vs multi-process (gloo) update on one global batch; any other --key value "
        "overrides the training config",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    ap.add_argument("--nprocs", type=int, default=2, help="processes of the multi-process run")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, ["--normalize", "tokens", "--progress", "false", *overrides])
    res = compare_single_vs_ddp(cfg, args.nprocs)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
