"""docs/architecture.md is checked against the code: its machine-checkable claims are read from the document itself.

* The fenced ``layers`` block: one layer per line, top to bottom; a package (or top-level module) may import only
  itself and members of LOWER layers — never a layer above, never a sibling on its own line. Every package and
  top-level module of ``duo_plugin`` must be placed in exactly one layer.
* The module list: every module ``duo_plugin/<pkg>/<name>.py`` (``__init__`` excepted) is named in the document as
  ``<pkg>/<name>.py`` or, inside the ``## duo_plugin.<pkg>`` section, as ``<name>.py``; and every ``<pkg>/<name>.py``
  the document names exists.
* The fenced ``signatures`` block: each entry ``duo_plugin.mod.name(params)`` (continuation lines indented) equals the
  code's signature — parameter names, order, kinds (``/``, ``*``, ``*args``, ``**kw``) and defaults (as ``repr``);
  annotations and return types are not compared.

Each check is also run on a planted violation, so none of them can pass vacuously.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "duo_plugin"
DOC = ROOT / "docs" / "architecture.md"


# ---------------------------------------------------------------- document parsing

def fenced_block(text: str, tag: str) -> str:
    m = re.search(rf"^```{tag}[ \t]*\n(.*?)^```", text, re.S | re.M)
    if not m:
        raise AssertionError(f"docs/architecture.md has no ```{tag} block")
    return m.group(1)


def parse_layers(block: str) -> list[list[str]]:
    layers = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            layers.append(line.split())
    return layers


def parse_signatures(block: str) -> list[str]:
    entries: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        if line[0].isspace() and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    return entries


# ---------------------------------------------------------------- code facts

def unit_of(rel: str) -> str:
    """``diffusion/uniform.py`` -> ``diffusion``; ``runtime.py`` -> ``runtime``."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else parts[0][:-3]


def code_units() -> set[str]:
    units = {p.name for p in PKG.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    units |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    return units


def unit_imports(sources: dict[str, str] | None = None) -> set[tuple[str, str]]:
    """(importing unit, imported unit) over every module, lazy imports included."""
    if sources is None:
        sources = {f.relative_to(PKG).as_posix(): f.read_text(encoding="utf-8") for f in sorted(PKG.rglob("*.py"))}
    edges = set()
    for rel, src in sources.items():
        tree = ast.parse(src)
        pkg_parts = ["duo_plugin", *rel.split("/")[:-1]]
        for node in ast.walk(tree):
            mods: list[str] = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(pkg_parts[: len(pkg_parts) - node.level + 1])
                    mods = [f"{base}.{node.module}" if node.module else f"{base}.{a.name}" for a in node.names]
                else:
                    mods = [node.module or ""]
            for m in mods:
                parts = m.split(".")
                if parts[0] == "duo_plugin" and len(parts) > 1 and parts[1] != unit_of(rel):
                    edges.add((unit_of(rel), parts[1]))
    return edges


def layer_violations(layers: list[list[str]], edges) -> list[str]:
    rank = {u: i for i, layer in enumerate(layers) for u in layer}
    bad = []
    for src, dst in sorted(edges):
        if src not in rank or dst not in rank:
            continue  # reported by the placement test
        if rank[dst] < rank[src]:
            bad.append(f"{src} imports {dst}, a layer above it")
        elif rank[dst] == rank[src]:
            bad.append(f"{src} imports its sibling {dst}")
    return bad


def default_text(value) -> str:
    """A default as the document writes it: ``repr``, except functions and classes by name (no addresses)."""
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return value.__qualname__
    return repr(value)


def signature_text(obj) -> str:
    sig = inspect.signature(obj)
    out, star_done, slash_pending = [], False, False
    for p in sig.parameters.values():
        if p.kind is p.POSITIONAL_ONLY:
            slash_pending = True
        elif slash_pending:
            out.append("/")
            slash_pending = False
        if p.kind is p.KEYWORD_ONLY and not star_done:
            out.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            star_done = True
        elif p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
        elif p.default is p.empty:
            out.append(p.name)
        else:
            out.append(f"{p.name}={default_text(p.default)}")
    if slash_pending:
        out.append("/")
    return ", ".join(out)


def normalise(params: str) -> str:
    return re.sub(r"\s*,\s*", ", ", re.sub(r"\s*=\s*", "=", params.strip()))


def check_signature(entry: str) -> str | None:
    m = re.fullmatch(r"([\w.]+)\((.*)\)", entry)
    if not m:
        return f"not an entry of the form module.name(params): {entry}"
    dotted, doc_params = m.groups()
    mod_name, _, attr = dotted.rpartition(".")
    obj = None
    # allow module.Class.method
    for split in range(len(dotted.split(".")) - 1, 0, -1):
        parts = dotted.split(".")
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for p in parts[split:]:
                obj = getattr(obj, p)
        except AttributeError:
            return f"{dotted}: not found in the code"
        break
    if obj is None:
        return f"{mod_name}: no such module"
    want, have = normalise(doc_params), normalise(signature_text(obj))
    if want != have:
        return f"{dotted}: the document says ({want}), the code has ({have})"
    return None


# ---------------------------------------------------------------- the checks

@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_unit_is_placed_in_exactly_one_layer(doc_text):
    layers = parse_layers(fenced_block(doc_text, "layers"))
    placed = [u for layer in layers for u in layer]
    dupes = sorted({u for u in placed if placed.count(u) > 1})
    assert not dupes, f"placed twice in the layers block: {dupes}"
    missing, unknown = code_units() - set(placed), set(placed) - code_units()
    assert not missing, f"packages/modules missing from the layers block of docs/architecture.md: {sorted(missing)}"
    assert not unknown, f"the layers block names what the code does not have: {sorted(unknown)}"


def test_imports_follow_the_documented_layers(doc_text):
    layers = parse_layers(fenced_block(doc_text, "layers"))
    assert layer_violations(layers, unit_imports()) == []


def test_the_layer_check_catches_planted_violations():
    """An upward import and a sideways import, one per package the issue names (models, sampling, eval, objectives)."""
    layers = [["recipes"], ["training"], ["objectives", "eval", "sampling"], ["models", "data"], ["diffusion"]]
    planted = {
        "models/x.py": "from duo_plugin.training import checkpointing\n",
        "sampling/x.py": "def f():\n    from duo_plugin.eval import likelihood\n",
        "eval/x.py": "from duo_plugin.objectives.duo import DuoObjective\n",
        "objectives/x.py": "from ..sampling import samplers\n",
        "diffusion/x.py": "import duo_plugin.models.dit\n",
    }
    bad = layer_violations(layers, unit_imports(planted))
    assert bad == ["diffusion imports models, a layer above it", "eval imports its sibling objectives",
                   "models imports training, a layer above it", "objectives imports its sibling sampling",
                   "sampling imports its sibling eval"]


def documented_modules(text: str) -> set[str]:
    found = set(re.findall(r"`(?:duo_plugin/)?([a-z_0-9]+/[a-z_0-9/]+\.py)`", text))
    section = None
    for line in text.splitlines():
        m = re.match(r"^## duo_plugin\.([a-z_0-9]+)", line)
        if m:
            section = m.group(1)
        elif line.startswith("## "):
            section = None
        if section:
            found |= {f"{section}/{n}" for n in re.findall(r"`([a-z_0-9]+\.py)`", line)}
    return found


def test_module_list_matches_the_code(doc_text):
    actual = {f.relative_to(PKG).as_posix() for f in PKG.rglob("*.py")
              if f.name != "__init__.py" and "/" in f.relative_to(PKG).as_posix()}
    named = documented_modules(doc_text)
    undocumented = sorted(actual - named)
    assert not undocumented, f"modules docs/architecture.md does not name: {undocumented}"
    named_pkg = {m for m in named if (PKG / m.split("/")[0]).is_dir()}
    stale = sorted(m for m in named_pkg if not (PKG / m).is_file())
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_module_list_check_catches_omissions():
    text = "## duo_plugin.diffusion\n- `uniform.py`: ...\n## Other\n- `schedules.py` is not in a package section\n"
    assert documented_modules(text) == {"diffusion/uniform.py"}


def test_documented_signatures_match_the_code(doc_text):
    entries = parse_signatures(fenced_block(doc_text, "signatures"))
    assert len(entries) >= 20, "the signatures block lists the public API the document quotes"
    bad = [e for e in map(check_signature, entries) if e]
    assert not bad, "\n".join(bad)


def test_signature_check_catches_drift():
    assert check_signature("duo_plugin.diffusion.schedules.gamma_at(t, gamma_min, gamma_max)") is None
    assert "the code has" in check_signature("duo_plugin.diffusion.schedules.gamma_at(t, gmin, gmax)")
    assert "not found" in check_signature("duo_plugin.diffusion.schedules.no_such_function(x)")
