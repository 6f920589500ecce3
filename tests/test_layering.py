"""The one-way layering of docs/architecture.md, checked on the source (AST of every module, lazy imports included):
which packages may import torchtune / lm_eval / fairseq2, that data/ and objectives/ stay below integrations/ and
training/, that no private name is used across modules (neither imported nor read as ``module._name``), and that
kernels/ submodules do not import the package ``__init__`` (the old select.py ↔ __init__ cycle)."""

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
    "sampling/": ("duo_plugin.integrations", "duo_plugin.recipes", "duo_plugin.training", "duo_plugin.objectives",
                  "duo_plugin.eval"),
}
# (module, private name) pairs allowed to cross a module boundary. Keep empty: make a shared helper public instead.
PRIVATE_OK: set[tuple[str, str]] = set()
# (module, attribute) reads ``module._name`` allowed likewise. Keep empty.
PRIVATE_ATTR_OK: set[tuple[str, str]] = set()


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


def test_the_sampling_rule_catches_a_planted_violation():
    """sampling/ sits beside objectives/ and eval/: a planted import of either (eager or lazy) is flagged."""
    tree = ast.parse("from duo_plugin.eval.genppl import unigram_entropy\n"
                     "def f():\n    from ..objectives import mdlm\n    return mdlm\n")
    mods = [m for m, _ in _imports(tree, "sampling/planted.py")]
    assert [m for m in mods if m.startswith(FORBIDDEN["sampling/"])] == ["duo_plugin.eval.genppl",
                                                                           "duo_plugin.objectives"]


def test_no_private_names_across_modules():
    bad = []
    for rel, tree in _modules():
        for mod, name in _imports(tree, rel):
            if mod.startswith("duo_plugin") and name and name.startswith("_") and not name.startswith("__"):
                if (rel, name) not in PRIVATE_OK:
                    bad.append((rel, mod, name))
    assert not bad, bad


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "duo_plugin":
        return False
    base = PKG.joinpath(*parts[1:]) if len(parts) > 1 else PKG
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _module_aliases(tree, rel):
    """Local names bound to a duo_plugin module by an import (``from duo_plugin.x import y`` with y a module,
    ``import duo_plugin.x.y as m``)."""
    pkg_parts = ["duo_plugin", *rel.split("/")[:-1]]
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and _is_module(a.name):
                    out[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(pkg_parts[: len(pkg_parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                if _is_module(f"{mod}.{a.name}"):
                    out[a.asname or a.name] = f"{mod}.{a.name}"
    return out


def test_no_private_attributes_of_other_modules():
    """``module._name`` on an imported duo_plugin module is a cross-module private use too."""
    bad = []
    for rel, tree in _modules():
        aliases = _module_aliases(tree, rel)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and (rel, node.attr) not in PRIVATE_ATTR_OK):
                bad.append((rel, aliases[node.value.id], node.attr))
    assert not bad, bad


def test_the_private_name_checks_catch_a_violation():
    """The two checks above flag a planted private import and a planted ``module._name`` read."""
    tree = ast.parse("from duo_plugin.diffusion.uniform import _gen_device\n"
                     "from duo_plugin.diffusion import uniform as u\nu._check_generator\n")
    rel = "sampling/planted.py"
    assert ("duo_plugin.diffusion.uniform", "_gen_device") in set(_imports(tree, rel))
    aliases = _module_aliases(tree, rel)
    assert aliases == {"u": "duo_plugin.diffusion.uniform"}


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
