"""Register duo-plugin's recipes and configs with torchtune's CLI (``tune ls/cp/cat/run``).

torchtune 0.6.1 has no plugin mechanism: ``tune`` resolves names by a linear scan of the
module-level list ``torchtune._recipe_registry._ALL_RECIPES`` and joins each entry's
``file_path`` onto ``<site-packages>/recipes[/configs]``. ``pathlib`` lets an **absolute**
right operand win, so entries whose ``file_path`` is absolute work unchanged in every subcommand
(torchtune 0.6.1 `_recipe_registry` and `tune run` path handling).

:func:`register` appends one ``Recipe`` per recipe file that exists in ``duo_plugin/recipes/``
with the configs found by globbing ``duo_plugin/configs/duo/**/*.yaml``; a new YAML registers
automatically. Which recipe owns a config is decided by :data:`RECIPE_CONFIG_PREFIXES`
(first match wins, checked in order); a config matched by no prefix belongs to
:data:`DEFAULT_RECIPE`. ``register()`` is idempotent: calling it again refreshes our own
entries in place (so YAMLs added later appear) and never duplicates or touches torchtune's.

It is called by three routes:
  * the lazy import hook ``duo_plugin._autoregister`` (installed by the ``.pth``/``.start``
    start-up files) when ``torchtune._recipe_registry`` is first imported, so plain ``tune``
    works after ``pip install``;
  * the ``duo-tune`` console script (:func:`main`), for ``python -S`` or environments that skip
    ``.pth`` files;
  * explicitly, by tests or notebooks.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PACKAGE_DIR = Path(__file__).resolve().parent.parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
CONFIGS_DIR = PACKAGE_DIR / "configs"

#: recipe name -> (config-name glob patterns it claims, supports_distributed).
#: Patterns are ``fnmatch`` globs over the config name (``duo/<relative path without .yaml>``).
RECIPE_CONFIG_PREFIXES: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    "duo_distill": (("duo/distill_*",), True),
    "duo_generate": (("duo/generate*",), False),
    "duo_eval": (("duo/eval_*",), False),
    "duo_pretrain": (
        ("duo/tiny_cpu*", "duo/owt_small*", "duo/lm1b_small*", "duo/*_adapt*"),
        True,
    ),
}
#: Recipe that receives every config not claimed by a pattern above.
DEFAULT_RECIPE = "duo_pretrain"


def discover_configs(configs_dir: Optional[Path] = None) -> List[Tuple[str, Path]]:
    """All ``*.yaml`` under ``configs_dir/duo`` as ``(name, absolute path)``, sorted by name.

    The name is the path relative to ``configs_dir`` without the suffix, with ``/`` separators,
    e.g. ``duo/tiny_cpu`` -- the string users pass to ``tune run ... --config``.
    """
    root = Path(CONFIGS_DIR if configs_dir is None else configs_dir).resolve()
    out = []
    for p in sorted((root / "duo").rglob("*.yaml")):
        name = p.relative_to(root).with_suffix("").as_posix()
        out.append((name, p))
    return out


def assign_configs(
    config_names: Sequence[str], available_recipes: Sequence[str]
) -> Dict[str, List[str]]:
    """Map each config name to exactly one recipe (pure function, see module docstring).

    A config whose owning recipe does not exist (file missing) is dropped: a ``Config`` must
    hang under a ``Recipe`` in torchtune's registry.
    """
    table: Dict[str, List[str]] = {r: [] for r in available_recipes}
    for name in config_names:
        owner = DEFAULT_RECIPE
        for recipe, (patterns, _) in RECIPE_CONFIG_PREFIXES.items():
            if recipe == DEFAULT_RECIPE:
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                owner = recipe
                break
        if owner in table:
            table[owner].append(name)
    return table


def _entries():
    from torchtune._recipe_registry import Config, Recipe

    configs = discover_configs()
    paths = dict(configs)
    available = [r for r in RECIPE_CONFIG_PREFIXES if (RECIPES_DIR / f"{r}.py").is_file()]
    table = assign_configs([n for n, _ in configs], available)
    entries = []
    for recipe in available:
        entries.append(
            Recipe(
                name=recipe,
                file_path=str(RECIPES_DIR / f"{recipe}.py"),
                configs=[Config(name=c, file_path=str(paths[c])) for c in table[recipe]],
                supports_distributed=RECIPE_CONFIG_PREFIXES[recipe][1],
            )
        )
    return entries


def _is_ours(recipe) -> bool:
    try:
        return Path(recipe.file_path).is_absolute() and Path(recipe.file_path).resolve().parent == RECIPES_DIR
    except (OSError, ValueError):
        return False


def register() -> List[str]:
    """Add (or refresh) duo-plugin's entries in ``torchtune._recipe_registry._ALL_RECIPES``.

    Returns the names of the duo recipes now registered. Idempotent: an existing entry of ours
    (same name, file inside ``duo_plugin/recipes``) is replaced in place; a *foreign* entry with
    the same name is left alone and ours is skipped with a warning on stderr.
    """
    from torchtune import _recipe_registry as reg

    registered = []
    for entry in _entries():
        idx = next((i for i, r in enumerate(reg._ALL_RECIPES) if r.name == entry.name), None)
        if idx is None:
            reg._ALL_RECIPES.append(entry)
        elif _is_ours(reg._ALL_RECIPES[idx]):
            reg._ALL_RECIPES[idx] = entry
        else:
            print(
                f"[duo_plugin] not registering recipe {entry.name!r}: torchtune already has a "
                f"recipe of that name ({reg._ALL_RECIPES[idx].file_path}); run ours by path: "
                f"tune run duo_plugin/recipes/{entry.name}.py --config ...",
                file=sys.stderr,
            )
            continue
        registered.append(entry.name)
    return registered


def main() -> None:
    """``duo-tune``: register duo-plugin's recipes, then run torchtune's own CLI (same flags)."""
    register()
    from torchtune._cli.tune import main as tune_main

    tune_main()


if __name__ == "__main__":
    main()
