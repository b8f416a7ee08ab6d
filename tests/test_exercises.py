"""The notebooks' exercises: every untouched stub in a notebook fails its checker, every reference solution passes,
every listed wrong answer fails with its hint (so every checker can fail), and the HYBRIDLAB_SOLUTIONS switch
swaps in the reference solutions."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from hybridlab.lab import exercises as X
from hybridlab.lab.solutions import SOLUTIONS, WRONG

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
WITH_EXERCISES = ("00", "01", "02", "03", "04", "05", "06", "07", "08")
X._load()
KEYS = sorted(X.REGISTRY)


def _key_of(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def _is_x(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name)


def notebook_stubs(path: Path) -> tuple[dict[str, object], list[str]]:
    """(untouched answer of every exercise stub in the notebook, keys of its X.check calls).

    A `@X.exercise(KEY)` function is executed as written (decorator removed); an `X.predict(KEY, expr)` gives the
    literal `expr`."""
    stubs: dict[str, object] = {}
    checks: list[str] = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and _is_x(deco.func, "exercise"):
                        node.decorator_list = []
                        scope = {"torch": torch, "math": math}
                        exec(compile(ast.Module([node], []), str(path), "exec"), scope)
                        stubs[_key_of(deco)] = scope[node.name]
            elif isinstance(node, ast.Call) and _is_x(node.func, "predict"):
                stubs[_key_of(node)] = ast.literal_eval(node.args[1])
            elif isinstance(node, ast.Call) and _is_x(node.func, "check"):
                checks.append(_key_of(node))
    return stubs, checks


STUBS = {p.name[:2]: notebook_stubs(p) for p in NOTEBOOKS}
ALL_STUBS = {key: stub for stubs, _ in STUBS.values() for key, stub in stubs.items()}


@pytest.mark.parametrize("key", KEYS)
def test_reference_solution_passes(key):
    result = X.grade(key, SOLUTIONS[key])
    assert result.passed, result.message


@pytest.mark.parametrize("key", KEYS)
def test_untouched_notebook_stub_fails(key):
    assert key in ALL_STUBS, f"exercise {key} is registered but no notebook has its stub"
    result = X.grade(key, ALL_STUBS[key])
    assert not result.passed and "not answered yet" in result.message, result.message


@pytest.mark.parametrize("key", KEYS)
def test_typical_wrong_answers_fail_with_their_hint(key):
    assert WRONG.get(key), f"exercise {key} lists no wrong answer: nothing shows its checker can fail on one"
    for answer, fragment in WRONG[key]:
        result = X.grade(key, answer)
        assert not result.passed, f"{key}: a wrong answer passed"
        assert fragment in result.message, (fragment, result.message)


@pytest.mark.parametrize("number", WITH_EXERCISES)
def test_each_notebook_has_two_or_three_exercises_and_checks_each(number):
    stubs, checks = STUBS[number]
    assert 2 <= len(stubs) <= 3, (number, sorted(stubs))
    assert set(stubs) <= set(checks), f"notebook {number}: a stub without its X.check"
    assert all(key.startswith(f"{number}.") for key in stubs), sorted(stubs)
    assert set(checks) <= set(KEYS), f"notebook {number} checks an unregistered exercise"


def test_no_solution_is_stored_in_a_notebook():
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            hidden = cell.get("metadata", {}).get("jupyter", {}).get("source_hidden")
            assert not hidden, f"{path.name}: a hidden cell (solutions live in hybridlab.lab.solutions)"
            if cell["cell_type"] == "code":
                assert "solutions" not in "".join(cell["source"]), (
                    f"{path.name}: a cell imports the solutions"
                )


def test_switch_swaps_in_the_reference(monkeypatch):
    def stub(n, h): ...

    monkeypatch.delenv(X.SOLUTIONS_ENV, raising=False)
    assert X.exercise("00.count")(stub) is stub and X.predict("02.grpo_constant", ...) is Ellipsis
    assert not X.check("00.count", stub)  # prints, does not raise, while a learner works
    monkeypatch.setenv(X.SOLUTIONS_ENV, "1")
    assert X.exercise("00.count")(stub) is SOLUTIONS["00.count"]
    assert X.predict("02.grpo_constant", ...) == SOLUTIONS["02.grpo_constant"]
    with pytest.raises(AssertionError, match="00.count"):
        X.check("00.count", stub)  # with the switch on, a failing check stops the notebook (CI)


def test_kinds_and_keys_are_enforced():
    with pytest.raises(ValueError, match="predict"):
        X.exercise("02.grpo_constant")
    with pytest.raises(ValueError, match="exercise"):
        X.predict("00.count", 1)
    with pytest.raises(KeyError, match="known"):
        X.get("99.nothing")
    raising = X.grade("00.count", lambda v, h: 1 // 0)
    assert not raising and "ZeroDivisionError" in raising.message


def test_triton_guard_says_why(monkeypatch):
    import sys

    from hybridlab.lab.smoke import triton_usable

    monkeypatch.setattr(sys, "platform", "darwin")
    ok, why = triton_usable()
    assert not ok and "Linux" in why
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    ok, why = triton_usable()
    assert not ok and "not installed" in why


def test_a_result_as_a_cells_value_shows_nothing_more():
    """`X.check(...)` ends an exercise cell: its verdict is printed once, no raw Result(...) repr below it."""
    from IPython.core.interactiveshell import InteractiveShell

    from hybridlab.lab.exercises import Result

    data, _meta = InteractiveShell.instance().display_formatter.format(
        Result("00.x", False, "not answered yet")
    )
    assert data == {}
    plain, _ = InteractiveShell.instance().display_formatter.format(("00.x", False))  # control: a tuple shows
    assert "text/plain" in plain
