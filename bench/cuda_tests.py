"""List the pytest node ids of the CUDA-only tests: those skipped with `skipif(not torch.cuda.is_available(), ...)`.

    python -m pytest -q -rs $(python -m bench.cuda_tests)        # run just them

A test counts when that mark decorates it or its class, or is the module's `pytestmark`. Found by reading the
source (no import, no collection), so listing them costs nothing on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
_CUDA_ONLY = re.compile(r"skipif\(\s*not\s+(torch\.)?cuda\.is_available\(\)")


def _cuda_only(decorators: list[ast.expr]) -> bool:
    return any(_CUDA_ONLY.search(ast.unparse(d)) for d in decorators)


def _module_marked(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            if _cuda_only(marks):
                return True
    return False


def cuda_only_tests(test_dir: str | Path = TESTS) -> list[str]:
    """Node ids (`tests/test_x.py::test_name`, `...::Class::test_name`) of the CUDA-only tests in `test_dir`."""
    test_dir = Path(test_dir)
    found = []
    for path in sorted(test_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        whole_module = _module_marked(tree)
        prefix = f"{test_dir.name}/{path.name}"
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                if whole_module or _cuda_only(node.decorator_list):
                    found.append(f"{prefix}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                marked = whole_module or _cuda_only(node.decorator_list)
                for item in node.body:
                    if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test")
                            and (marked or _cuda_only(item.decorator_list))):
                        found.append(f"{prefix}::{node.name}::{item.name}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, default=TESTS, help="the folder of test_*.py files")
    args = parser.parse_args(argv)
    found = cuda_only_tests(args.tests)
    if not found:
        print(f"error: no test in {args.tests} is marked skipif(not torch.cuda.is_available())", file=sys.stderr)
        return 1
    print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
