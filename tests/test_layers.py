"""The layering rule of docs/architecture.md, checked on the source: each package imports only the packages below
it (both at module level and inside functions), and a package's tests import nothing above that package (they may set up any layer below it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("pipelines", "storage", "eval", "image_gen", "ui")
MAY_IMPORT = {
    "pipelines": {"pipelines"},
    "storage": {"storage"},
    "eval": {"eval", "pipelines"},
    "image_gen": {"image_gen", "pipelines", "storage", "eval"},
    "ui": {"ui", "image_gen"},
}


def below(package: str) -> set[str]:
    """The package and every package under it, directly or through another."""
    found, todo = set(), [package]
    while todo:
        if (current := todo.pop()) not in found:
            found.add(current)
            todo += MAY_IMPORT[current]
    return found


def imported_packages(path: Path) -> dict[str, int]:
    """Our top-level packages that `path` imports, with the first line that does."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in OURS:
                found.setdefault(top, node.lineno)
    return found


def violations(folder: Path, allowed: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {package}"
        for path in sorted(folder.rglob("*.py"))
        for package, line in imported_packages(path).items()
        if package not in allowed
    ]


@pytest.mark.parametrize("package", OURS)
def test_package_imports_only_the_layers_below(package: str) -> None:
    assert violations(ROOT / package, MAY_IMPORT[package]) == []


@pytest.mark.parametrize("package", OURS)
def test_tests_of_a_layer_import_nothing_above_it(package: str) -> None:
    if not (ROOT / "tests" / package).is_dir():
        pytest.fail(f"tests/{package} is missing")
    assert violations(ROOT / "tests" / package, below(package)) == []


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from storage.objects import open_store\n    import ui.app\n")
    assert imported_packages(module) == {"storage": 4, "ui": 5}
