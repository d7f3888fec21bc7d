"""Imports point one way: every llmlab module imports only its own layer or lower ones, and no modules import
each other in a cycle. Checked on the source with ast, so an import inside a function counts as much as one
at the top of the file (lazy imports do not excuse an upward or circular dependency); only cli/ may import
lazily, and it is the top layer anyway.

Layers, low to high:
    0  config, errors, fsutil, device (and the TOML preset packages)
    1  tokenizer, data
    2  model
    3  train
    4  infer
    5  evals, align, scaling
    6  speedrun, experiments
    7  cli, __main__, the package root (llmlab/__init__.py re-exports the public surface); its
       __version__ is metadata any module may read
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmlab

PACKAGE = Path(llmlab.__file__).parent

LAYERS = {
    "config": 0, "errors": 0, "fsutil": 0, "device": 0, "configs": 0, "presets": 0,
    "tokenizer": 1, "data": 1,
    "model": 2,
    "train": 3,
    "infer": 4,
    "evals": 5, "align": 5, "scaling": 5,
    "speedrun": 6, "speedrun_chat": 6, "experiments": 6,
    "cli": 7, "__main__": 7, "": 7,
}


def module_names() -> dict[str, Path]:
    """Dotted name -> file for every module of the package (a package is named by its __init__.py)."""
    names = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = ("llmlab",) + file.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


MODULES = module_names()


def layer(module: str) -> int:
    """The layer of a dotted llmlab module name (KeyError for a top-level name given no layer here)."""
    top = module.split(".")[1] if "." in module else ""
    return LAYERS[top]


def imported_modules(module: str, file: Path) -> set[str]:
    """The llmlab modules `module` imports anywhere in its source. `from P import x` counts as importing the
    module P.x when there is one, and P otherwise; `from llmlab import __version__` counts as nothing."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
                         if (base, a.name) != ("llmlab", "__version__"))
    return {name for name in found if name == "llmlab" or name.startswith("llmlab.")}


GRAPH = {module: imported_modules(module, file) for module, file in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black marking)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    missing = sorted({m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] not in LAYERS})
    assert not missing, f"give these top-level modules a layer in LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    upward = sorted(f"{name} (layer {layer(name)})" for name in GRAPH[module]
                    if name in MODULES and layer(name) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports a higher layer: {', '.join(upward)}"


def test_imports_name_real_modules():
    unknown = sorted(f"{m} -> {name}" for m, names in GRAPH.items() for name in names if name not in MODULES)
    assert not unknown, f"imports of llmlab modules that do not exist: {unknown}"


def test_no_import_cycle():
    graph = {m: {n for n in names if n != m} for m, names in GRAPH.items() if layer(m) < LAYERS["cli"]}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert layer("llmlab.model.transformer") < layer("llmlab.infer.quant") < layer("llmlab.cli.quant")
    source = tmp_path / "mod.py"  # read as if it were llmlab/model/mod.py
    source.write_text("import torch\nfrom .kv_cache import KVCache\nfrom ..infer import quant\n\n"
                      "def f():\n    from llmlab.train.trainer import Trainer\n")
    assert imported_modules("llmlab.model.mod", source) == {
        "llmlab.model.kv_cache", "llmlab.infer.quant", "llmlab.train.trainer"}
