"""Every command a user is told to run answers --help (argparse %-formats help text: one stray "10%" in a
config field's help made `python -m hybridlab.train --help` fail)."""

import subprocess
import sys

import pytest

COMMANDS = [
    "hybridlab.train",
    "hybridlab.integrations.trl",
    "hybridlab.serve_teacher",
    "hybridlab.bench",
    "hybridlab.scripts.make_tiny_models",
    "hybridlab.scripts.fetch_real_model",
    "experiments.real_study",
    "experiments.recipe_study",
    "experiments.teacher_sweep",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_runs(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout and "--" in r.stdout


def test_a_percent_sign_in_a_train_flag_help_is_shown_literally():
    from hybridlab.train.config import build_parser

    text = build_parser().format_help()
    assert "fall by > 10%" in text
