"""Two processes (gloo, through accelerate) take the same update as one process on the same global batch."""

import pytest

from hybridlab.scripts.check_distributed import compare_single_vs_ddp
from hybridlab.scripts.make_tiny_models import make_tiny_models
from hybridlab.train import TrainConfig


@pytest.mark.parametrize("fused", [False, True])
def test_two_process_update_equals_single_process_update(tmp_path, fused):
    tiny = make_tiny_models(tmp_path / "tiny", ("llama",), hidden=32, layers=1, n_prompts=16)
    cfg = TrainConfig(
        student=str(tiny["llama"]["student"]), teacher=str(tiny["llama"]["teacher"]),
        tokenizer=str(tiny["tokenizer"]["path"]), prompts=str(tiny["prompts"]["path"]),
        reward="hybridlab.tasks.rewards:reverse", lr=1e-2, steps=1, prompts_per_step=4, samples_per_prompt=2,
        max_new_tokens=6, normalize="tokens", bf16=False, dense_backend="torch", fused_linear=fused,
        output_dir=str(tmp_path / "run"), progress=False, cpu=True, cpu_threads=1, seed=1,
    ).validate()  # fmt: skip
    res = compare_single_vs_ddp(cfg, nprocs=2)
    print(res)
    assert res["grad_scale"] > 0
    assert res["grad_max_rel"] < 1e-6 and res["param_max_abs"] < 1e-6
    assert res["loss_ddp"] == pytest.approx(res["loss_single"], rel=1e-6)
    # Negative control: normalising each process's loss by its own token count is visibly wrong.
    assert res["tokens_per_process"][0] != res["tokens_per_process"][1]
    assert res["naive_grad_max_rel"] > 1e-3
