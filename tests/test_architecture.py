"""The import rules of docs/ARCHITECTURE.md: which package may import which, no cycles, every module importable
alone; the page's table is `ALLOWED` (a test compares them).

Imports are read from the source (function-level ones too: a lazy import is still an arrow), so a cycle hidden
inside a function is caught as well as one at module level.
"""
import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("simclr", "data_aug", "models", "loss", "knn", "feature_eval", "pretrained_models")
TOP_MODULES = ("run", "startup")

# Who may import whom (besides itself). bench/ and tests/ may import anything and are not listed.
ALLOWED = {
    "run": {"startup", "simclr", "data_aug", "models", "loss", "feature_eval"},
    "startup": set(),
    "simclr": {"startup", "data_aug", "models", "loss", "knn"},  # startup: for its command, simclr.preview
    "feature_eval": {"startup", "simclr.config", "data_aug", "models", "knn"},
    "pretrained_models": {"startup", "simclr.config", "models", "feature_eval.results"},  # the results format
    "models": set(),
    "loss": set(),
    "knn": set(),  # the neighbour search both the trainer's monitor and feature_eval use: torch only
    "data_aug": set(),
}


@functools.cache
def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every project module (packages and the top-level scripts)."""
    found = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported_modules(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (`from pkg import name` counts as `pkg.name` when that
    is a module, else as `pkg`)."""
    modules = project_modules()
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    roots = set(PACKAGES) | set(TOP_MODULES)
    return {name for name in names if name.split(".")[0] in roots}


def owner(module: str) -> str:
    return module.split(".")[0]


def allowed(importer: str, imported: str) -> bool:
    if owner(importer) == owner(imported):
        return True
    rules = ALLOWED[owner(importer)]
    return owner(imported) in rules or any(imported == r or imported.startswith(r + ".") for r in rules)


def test_every_arrow_is_allowed():
    wrong = []
    for module, path in project_modules().items():
        for imported in sorted(imported_modules(path)):
            if not allowed(module, imported):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports against docs/ARCHITECTURE.md's rules:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {module: imported_modules(path) for module, path in project_modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if nxt not in graph or nxt == module:
                continue
            if state.get(nxt) == 1:
                return path + [module, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_the_rule_itself_catches_a_wrong_way_import(tmp_path):
    """The checker is not vacuous: a models/ file importing simclr/ is flagged, a sibling import is not."""
    assert not allowed("models.loading", "simclr.config")
    assert not allowed("data_aug.views", "feature_eval.features")
    assert not allowed("feature_eval.evaluate", "simclr.trainer")
    assert not allowed("knn.neighbours", "feature_eval.classifiers")
    assert allowed("simclr.monitor", "knn.neighbours") and allowed("feature_eval.classifiers", "knn.neighbours")
    assert allowed("feature_eval.evaluate", "simclr.config")
    assert allowed("models.loading", "models.resnet_simclr")
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from simclr.trainer import Trainer\n    import models.loading\n")
    assert imported_modules(probe) == {"simclr.trainer", "models.loading"}


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other project module is loaded yet (an import cycle
    that only works in one order fails here)."""
    script = (
        "import importlib, sys\n"
        "roots = %r\n"
        "failed = []\n"
        "for name in %r:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in roots]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    ) % (set(PACKAGES) | set(TOP_MODULES), sorted(project_modules()))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def documented_rules() -> dict[str, set[str]]:
    """The table of docs/ARCHITECTURE.md's "The rules": package -> the names in backticks of its "may import" cell."""
    section = DOC.read_text().split("\n## The rules\n", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `"):  # | `package` | may import | holds |
            rules[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[1]))
    return rules


def test_this_page_states_the_rules_the_test_enforces():
    """docs/ARCHITECTURE.md's table is `ALLOWED`, and the page names every test of this file (each one a rule)."""
    assert documented_rules() == ALLOWED
    tests = [name for name in globals() if name.startswith("test_")]
    assert len(tests) >= 5 and not [name for name in tests if f"`{name}`" not in DOC.read_text()]
