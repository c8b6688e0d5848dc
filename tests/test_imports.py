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


# The layers of the README's picture, lowest first. A module may import from its own package and from
# packages of lower layers, never from a higher one: verbs build on the core, the core on neutral helpers.
# Among the verbs, a later one may use an earlier one (eval generates with infer and scores with the
# training loss; the demo trains and evaluates), never the reverse.
LAYERS = [
    ("neutral helpers", ("cotune.files", "cotune.runtime")),
    ("core: options", ("cotune.options", "cotune.config")),
    ("core: embedded default", ("cotune.demo",)),
    ("core: models", ("cotune.models",)),
    ("core: data", ("cotune.data",)),
    ("verb: train", ("cotune.train",)),
    ("verb: infer", ("cotune.infer",)),
    ("verb: eval", ("cotune.eval",)),
    ("verb: serve", ("cotune.serve",)),
    ("verb: plan", ("cotune.plan",)),
    ("verb: studio", ("cotune.studio",)),
    ("verb: demo", ("cotune.run_demo",)),
    ("command line", ("cotune.cli", "cotune.__main__")),
]


def layer_of(module: str) -> int:
    for index, (_, packages) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def module_files() -> dict[str, Path]:
    """Every module of the package and its file (a package's module is its ``__init__.py``)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("cotune", *parts))] = path
    return out


def imports_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cotune"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cotune")}
    return found


def test_every_import_flows_down_the_layers():
    upward = []
    for module, path in module_files().items():
        if module == "cotune":
            continue
        own = layer_of(module)
        for target in imports_in(path):
            if target == "cotune" or package_of(target) == package_of(module):
                continue
            if layer_of(target) > own:
                upward.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that flow up:\n" + "\n".join(sorted(set(upward)))


def _module_graph() -> dict[str, set[str]]:
    """cotune module -> the cotune modules it imports (at the top or inside a function)."""
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts) for p in SRC.rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in modules}
    graph = {}
    for m in modules:
        path = m.replace(".", "/")
        file = SRC / (path + ".py") if (SRC / (path + ".py")).is_file() else SRC / path / "__init__.py"
        tree = ast.parse(file.read_text())
        found = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cotune."):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("cotune.")]
            found |= {n.removeprefix("cotune.") for n in names} & modules
        graph[m] = found - {m}
    return graph


def test_no_module_imports_itself_through_others():
    """No import circle (issue 21: models/load <-> models/quant was one): the module graph has no cycle."""
    graph, state, circles = _module_graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                circles.append(" -> ".join([*path[path.index(n) :], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
