"""No function in src/ over 60 lines (the house's rule: a function fits on a screen)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cotune"
LIMIT = 60


def long_functions(root: Path = SRC, limit: int = LIMIT) -> dict[str, int]:
    """``{"path:qualified name": lines}`` of every function over ``limit`` lines (decorators and
    docstring included), nested functions and methods too."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                        lines = child.end_lineno - start + 1
                        if lines > limit:
                            out[f"{path.relative_to(root).as_posix()}:{name}"] = lines
                    stack.append((child, name + "."))
    return out


def test_no_function_over_60_lines():
    over = long_functions()
    assert not over, f"functions over {LIMIT} lines (split them): " + ", ".join(
        f"{k} ({v})" for k, v in over.items()
    )


def test_the_counter_counts_nested_functions_and_methods(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(61))
    (tmp_path / "m.py").write_text(
        f"class A:\n    def f(self):\n{body}\n\n\ndef g():\n    def h():\n{body}\n"
    )
    assert long_functions(tmp_path) == {"m.py:A.f": 62, "m.py:g": 63, "m.py:g.h": 62}
    assert long_functions(tmp_path, limit=62) == {"m.py:g": 63}
