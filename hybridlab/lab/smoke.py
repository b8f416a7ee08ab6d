"""Run-time switches read from the environment."""

from __future__ import annotations

import os

#: Smoke mode (``HYBRIDLAB_SMOKE=1``): notebooks and scripts run the same code on smaller sizes (CI, quick checks).
SMOKE: bool = os.environ.get("HYBRIDLAB_SMOKE", "0") not in ("", "0", "false", "False")


def smoke(full, small):
    """Return `small` in smoke mode and `full` otherwise (sizes, step counts, sample budgets)."""
    return small if SMOKE else full


def triton_usable() -> tuple[bool, str]:
    """(whether `backend="triton"` can run here, why not). Triton is Linux-only; without a GPU its kernels run
    through the CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    import importlib.util
    import sys

    if not sys.platform.startswith("linux"):
        return False, f"Triton runs on Linux only (this machine: {sys.platform})"
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    return True, ""
