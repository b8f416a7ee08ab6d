"""Real-browser tests run only when asked for with `-m browser` (`make test-browser`), not in the unit suite."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "browser" in (config.getoption("markexpr") or "") and "not browser" not in config.getoption(
        "markexpr"
    ):
        return
    skip = pytest.mark.skip(
        reason="real-browser test: run it with `make test-browser` (pytest -m browser tests/browser)"
    )
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)
