"""The package's layers, enforced: estimators <- training <- teaching <- experiments, each importing only its
own layer and the ones below it; no module over ~500 lines; a short top level (see ARCHITECTURE.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hybridlab"

# Layer of a module, by its dotted name (the longest matching prefix wins). A new module must be placed here.
LAYERS = {
    "hybridlab": 0,  # the public API: estimators only (loaded lazily)
    "hybridlab._checks": 0,
    "hybridlab._logits": 0,
    "hybridlab._torch_ref": 0,
    "hybridlab.dense": 0,
    "hybridlab.sparse": 0,
    "hybridlab.hybrid": 0,
    "hybridlab.topk": 0,
    "hybridlab.fused_linear": 0,
    "hybridlab.fused_hybrid": 0,
    "hybridlab.kernels": 0,
    "hybridlab.bench": 0,
    "hybridlab._onepass": 0,
    "hybridlab.tasks": 1,
    "hybridlab.train": 1,
    "hybridlab.integrations": 1,
    "hybridlab.scripts": 1,
    "hybridlab.teacher_service": 1,
    "hybridlab.serve_teacher": 1,
    "hybridlab.lab": 2,
    "experiments": 3,
}
NAMES = {0: "estimators", 1: "training", 2: "teaching", 3: "experiments"}
MAX_LINES = 560  # "about 500": one concept per module (train/loop.py, the Trainer, is the largest)


def layer_of(module: str) -> int | None:
    best = None
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else LAYERS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py"))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import submodule` imports the submodule: judge it by its own layer
            found += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
    return found


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        own = layer_of(module_name(path))
        if own is None:
            bad.append(f"{path.relative_to(ROOT)}: not placed in a layer (add it to LAYERS)")
            continue
        for line, mod in imports_of(path):
            if not (mod.startswith("hybridlab") or mod.startswith("experiments")):
                continue
            target = layer_of(mod)
            if target is not None and target > own:
                bad.append(
                    f"{path.relative_to(ROOT)}:{line} ({NAMES[own]}) imports {mod} ({NAMES[target]}): "
                    "an import running up the layers"
                )
    return bad


def test_no_import_runs_up_the_layers():
    assert violations(sources()) == []


def test_an_upward_import_is_caught(tmp_path):
    """Negative control: a fake estimator module importing the teaching layer must be reported."""
    fake = PACKAGE / "_layer_probe_tmp.py"
    fake.write_text("from .lab import exact\n")
    try:
        LAYERS["hybridlab._layer_probe_tmp"] = 0
        bad = violations([fake])
    finally:
        LAYERS.pop("hybridlab._layer_probe_tmp", None)
        fake.unlink()
    assert len(bad) == 1 and "teaching" in bad[0], bad


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (split it by responsibility)"


def test_short_top_level():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 13, f"{len(top)} modules at the top of hybridlab/: {sorted(top)}"


def test_lower_layers_stay_light():
    """The estimators and the lab's models need only torch: importing them must not pull transformers,
    matplotlib or ipywidgets (the widget view and the figures are separate modules)."""
    code = (
        "import sys, hybridlab, hybridlab.sparse, hybridlab.dense, hybridlab.hybrid, hybridlab.topk\n"
        "import hybridlab.lab.exact, hybridlab.lab.controls, hybridlab.lab.mixing, hybridlab.lab.method_map\n"
        "bad = [m for m in ('transformers', 'matplotlib', 'ipywidgets', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
