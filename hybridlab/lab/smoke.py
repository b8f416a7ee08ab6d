"""Run-time switches read from the environment."""

from __future__ import annotations

import os

#: Smoke mode (``HYBRIDLAB_SMOKE=1``): notebooks and scripts run the same code on smaller sizes (CI, quick checks).
SMOKE: bool = os.environ.get("HYBRIDLAB_SMOKE", "0") not in ("", "0", "false", "False")


def smoke(full, small):
    """Return `small` in smoke mode and `full` otherwise (sizes, step counts, sample budgets)."""
    return small if SMOKE else full
