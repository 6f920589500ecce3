"""The one-way layering of docs/architecture.md, checked on the source (AST of every module, lazy imports included):
which packages may import torchtune / lm_eval / fairseq2, that data/ and objectives/ stay below integrations/ and
training/, that no private name is imported across modules, and that kernels/ submodules do not import the package
``__init__`` (the old select.py ↔ __init__ cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "duo_plugin"

# Modules allowed to import a heavy framework (everything else is core).
FRAMEWORK_OK = {
    "torchtune": ("recipes/", "models/adapters.py", "models/builders.py", "models/hf_checkpoint.py",
                  "integrations/torchtune"),
    "lm_eval": ("integrations/lm_eval",),
    "fairseq2": ("integrations/fairseq2/",),
}
# package -> packages it must never import
FORBIDDEN = {
    "data/": ("duo_plugin.integrations", "duo_plugin.recipes", "duo_plugin.training", "duo_plugin.objectives"),
    "diffusion/": ("duo_plugin.integrations", "duo_plugin.recipes", "duo_plugin.training", "duo_plugin.objectives",
                   "duo_plugin.kernels", "duo_plugin.sampling", "duo_plugin.eval", "duo_plugin.models"),
    "objectives/": ("duo_plugin.integrations", "duo_plugin.recipes", "duo_plugin.training", "duo_plugin.sampling"),
    "kernels/": ("duo_plugin.integrations", "duo_plugin.recipes", "duo_plugin.training", "duo_plugin.objectives"),
    "training/": ("duo_plugin.integrations", "duo_plugin.recipes"),
}
# A file being reworked in parallel still uses the old private spelling (kept as an alias in diffusion/uniform.py).
PRIVATE_OK = {("kernels/sampler.py", "_per_token")}


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        yield rel, ast.parse(f.read_text(encoding="utf-8"))


def _imports(tree, rel):
    pkg_parts = ["duo_plugin", *rel.split("/")[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                yield mod, a.name


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_OK))
def test_frameworks_only_where_allowed(framework):
    bad = sorted({rel for rel, tree in _modules() for mod, _ in _imports(tree, rel)
                  if mod.split(".")[0] == framework and not rel.startswith(FRAMEWORK_OK[framework])})
    assert not bad, f"{framework} imported outside its layer: {bad}"


def test_lower_layers_never_import_upper_ones():
    bad = []
    for rel, tree in _modules():
        for prefix, forbidden in FORBIDDEN.items():
            if rel.startswith(prefix):
                bad += [(rel, mod) for mod, _ in _imports(tree, rel) if mod.startswith(forbidden)]
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = []
    for rel, tree in _modules():
        for mod, name in _imports(tree, rel):
            if mod.startswith("duo_plugin") and name and name.startswith("_") and not name.startswith("__"):
                if (rel, name) not in PRIVATE_OK:
                    bad.append((rel, mod, name))
    assert not bad, bad


def test_kernel_submodules_do_not_import_the_package_init():
    submodules = {p.stem for p in (PKG / "kernels").glob("*.py")}
    bad = []
    for rel, tree in _modules():
        if rel.startswith("kernels/") and rel != "kernels/__init__.py":
            for mod, name in _imports(tree, rel):
                if mod == "duo_plugin.kernels" and name not in submodules:
                    bad.append((rel, name))
    assert not bad, bad


def test_no_import_cycle_among_kernel_modules():
    """Module graph of kernels/ (lazy imports included, the package __init__ excluded): acyclic."""
    names = {p.stem for p in (PKG / "kernels").glob("*.py")} - {"__init__"}
    graph = {n: set() for n in names}
    for rel, tree in _modules():
        if rel.startswith("kernels/") and rel != "kernels/__init__.py":
            src = rel.split("/")[1][:-3]
            for mod, name in _imports(tree, rel):
                if mod.startswith("duo_plugin.kernels."):
                    graph[src].add(mod.split(".")[2])
                elif mod == "duo_plugin.kernels" and name in names:
                    graph[src].add(name)
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError(f"import cycle in kernels/: {' -> '.join(path + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in graph[n]:
            visit(m, path + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])
