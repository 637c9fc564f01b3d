"""The test suite's own layout: shared helpers live in tests/helpers/ and shared fixtures in tests/conftest.py, so no
test module (nor a helper) imports a test module, and none imports conftest (pytest loads it; a second import of it
as a plain module runs its setup twice)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODULES = sorted([*TESTS.glob("test_*.py"), *TESTS.glob("helpers/*.py")])


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in `path`, imports inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` / `from .test_x import y`: name the module it reaches
                found += [(node.lineno, node.module or alias.name) for alias in node.names]
            else:
                found.append((node.lineno, node.module or ""))
    return found


def forbidden(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "tests":  # `tests.test_x`, `tests.conftest`
        parts = parts[1:]
    return bool(parts) and (parts[0].startswith("test_") or parts[0] == "conftest")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(TESTS).as_posix())
def test_no_test_module_imports_another(path: Path) -> None:
    bad = [f"{path.name}:{line}: imports {module}" for line, module in imported_modules(path) if forbidden(module)]
    assert not bad, "move shared helpers to tests/helpers/ and shared fixtures to tests/conftest.py:\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    path = tmp_path / "test_example.py"
    path.write_text(
        "import test_a\nfrom test_b import x\nfrom tests.test_c import y\nfrom conftest import z\n"
        "def f():\n    from test_d import w\nfrom . import test_e\n"
        "import helpers.vit\nfrom helpers.data import write_png\nimport pytest\n",
        encoding="utf-8",
    )
    names = [module for _, module in imported_modules(path) if forbidden(module)]
    assert sorted(names) == ["conftest", "test_a", "test_b", "test_d", "test_e", "tests.test_c"]
    assert len(MODULES) > 30 and TESTS / "test_suite_layout.py" in MODULES
