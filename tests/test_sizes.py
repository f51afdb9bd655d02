"""Small files and functions (docs/contributing.md, "Sizes"): no module of the package over
400 lines, no function over 60 lines except the bodies of Triton kernels."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("train", "parallel", "data", "launch", "kernels")
MODULE_LINES, FUNCTION_LINES = 400, 60


def _modules():
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def test_no_module_is_over_400_lines():
    over = [f"{p.relative_to(ROOT)}: {n}" for p in _modules()
            if (n := len(p.read_text().splitlines())) > MODULE_LINES]  # fmt: skip
    assert over == [], f"modules over {MODULE_LINES} lines: split them by idea"


def test_no_function_is_over_60_lines():
    over = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not _triton_kernel(
                node
            ):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LINES:
                    over.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n}")
    assert over == [], f"functions over {FUNCTION_LINES} lines outside Triton kernels"
