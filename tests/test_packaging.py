"""pyproject.toml and environment.yml list the same dependencies; the package imports without heavy extras."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0].lower()


def _pyproject_specs() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(data["dependencies"]) + list(data["optional-dependencies"]["dev"])
    return {_name(s): s.replace(" ", "").replace('"', "'") for s in specs}


def _environment_specs() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    specs = [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]
    return {_name(s): s.replace(" ", "").replace('"', "'") for s in specs}


def test_environment_yml_matches_pyproject():
    assert _environment_specs() == _pyproject_specs()


def test_drift_would_be_caught(tmp_path):
    specs = _pyproject_specs()
    specs["torch"] = "torch>=1.0"
    assert specs != _environment_specs()


def test_notebooks_are_numbered_and_stored_without_outputs():
    import json

    books = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert books, "no notebooks"
    for path in books:
        assert re.match(r"^0\d_[a-z0-9_]+\.ipynb$", path.name), path.name
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{path.name} is stored with outputs (strip them)"


def test_a_new_torch_spec_reinstalls_torch(tmp_path):
    """`make test TORCH_SPEC=...` on an existing environment must install that torch, not keep the old one."""
    venv = tmp_path / "venv"
    venv.mkdir()

    def dry_run(spec):
        out = subprocess.run(
            ["make", "-n", "install", f"VENV={venv}", f"TORCH_SPEC={spec}"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout

    first = dry_run("torch==2.13.0")
    assert "pip install --progress-bar on torch==2.13.0" in first
    stamp = re.search(r"touch (\S+\.torch-spec-\d+)", first).group(1)
    Path(stamp).touch()  # as if that spec were installed
    (venv / ".hybridlab-installed").touch()
    assert "pip install" not in dry_run("torch==2.13.0")  # same spec: nothing to do
    assert "pip install --progress-bar on torch==2.14.1" in dry_run(
        "torch==2.14.1"
    )  # another spec: reinstall
