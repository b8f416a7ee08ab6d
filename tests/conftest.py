"""Test wiring: Triton's CPU interpreter when there is no GPU, the `gpu` marker, float64 defaults off."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels then run on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run `make test` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
