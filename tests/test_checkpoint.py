"""Atomic checkpoints: interrupted training resumes to bit-identical parameters."""

import random

import numpy as np
import pytest
import torch

from hybridlab.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def _step(model, opt, sched):
    # Randomness from every generator the checkpoint restores: python, numpy and torch.
    x = torch.randn(16, 4) + random.random() + float(np.random.rand())
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    random.seed(1)
    np.random.seed(1)
    model, opt, sched = _make()
    for _ in range(10):
        _step(model, opt, sched)
    want = [p.detach().clone() for p in model.parameters()]

    random.seed(1)
    np.random.seed(1)
    model, opt, sched = _make()
    for _ in range(4):
        _step(model, opt, sched)
    save_checkpoint(tmp_path, 4, model, opt, sched, extra={"history": [1.0, 2.0]})
    for _ in range(3):  # work after the checkpoint that the "crash" loses
        _step(model, opt, sched)

    model2, opt2, sched2 = _make()
    ck = latest_checkpoint(tmp_path)
    info = load_checkpoint(ck, model2, opt2, sched2)
    assert info["step"] == 4 and info["extra"]["history"] == [1.0, 2.0]
    for _ in range(6):
        _step(model2, opt2, sched2)
    for a, b in zip(model2.parameters(), want):
        assert torch.equal(a.detach(), b)


def test_without_rng_restore_the_run_differs(tmp_path):
    """Negative control for the test above: skipping the RNG restore breaks reproducibility."""
    random.seed(1)
    np.random.seed(1)
    model, opt, sched = _make()
    for _ in range(4):
        _step(model, opt, sched)
    save_checkpoint(tmp_path, 4, model, opt, sched)
    ref = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, sched)
    after = [p.detach().clone() for p in model.parameters()]
    model2, opt2, sched2 = _make()
    load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2, restore_rng=False)
    for a, b in zip(model2.parameters(), ref):
        assert torch.equal(a.detach(), b)
    _step(model2, opt2, sched2)
    assert any(not torch.equal(a.detach(), b) for a, b in zip(model2.parameters(), after))


def test_keeps_newest_and_leaves_no_temporaries(tmp_path):
    model, opt, sched = _make()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _make()
    save_checkpoint(tmp_path, 1, model, opt, sched)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    load_checkpoint(latest_checkpoint(tmp_path), model, opt, sched)


def test_wrong_model_is_a_clear_error(tmp_path):
    model, opt, sched = _make()
    save_checkpoint(tmp_path, 1, model)
    other = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="does not fit the model: missing"):
        load_checkpoint(latest_checkpoint(tmp_path), other)


def test_saving_an_older_step_keeps_it_and_latest_stays_valid(tmp_path):
    model, opt, sched = _make()
    for step in (200, 300, 150):
        save_checkpoint(tmp_path, step, model, opt, sched, keep=2)
    assert latest_checkpoint(tmp_path).name == "step-00000150"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000150", "step-00000300"]


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    model, opt, sched = _make()
    save_checkpoint(tmp_path, 1, model, opt, sched)
    save_checkpoint(tmp_path, 2, model, opt, sched)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step-00000002")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
