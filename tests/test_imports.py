"""Imports that must flow one way: the neutral file helpers, merge apart from training, records over formats."""

from __future__ import annotations

import ast
from pathlib import Path

import cotune

SRC = Path(cotune.__file__).parent


def cotune_imports(module: str) -> set[str]:
    """Every cotune module ``module`` imports, at the top or inside a function."""
    tree = ast.parse((SRC / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cotune"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cotune")}
    return found


def test_atomic_files_are_a_neutral_helper_that_merge_and_training_share():
    assert cotune_imports("files") == set()
    assert "cotune.files" in cotune_imports("infer.merge") and "cotune.files" in cotune_imports(
        "train.checkpoint"
    )
    assert not any(m.startswith("cotune.train") for m in cotune_imports("infer.merge")), (
        "a verb imports a verb"
    )


def test_records_and_formats_import_one_way():
    assert any(m.startswith("cotune.data.formats") for m in cotune_imports("data.records"))
    assert not any(m.startswith("cotune.data.records") for m in cotune_imports("data.formats"))
    assert not any(
        m.startswith(("cotune.data.records", "cotune.data.formats")) for m in cotune_imports("data.sample")
    )
