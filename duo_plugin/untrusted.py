"""A model folder is data: checks for the JSON it holds (``duo_config.json``, an HF ``config.json``, tokenizer
descriptors, metadata) before anything in it is used.

Nothing a folder names is ever imported or called except the allow-listed model builders
(:mod:`duo_plugin.models.checkpoint`) and tokenizer builders with allow-listed, typed arguments
(:func:`duo_plugin.data.tokenizers.check_descriptor`).  On top of that, :func:`check_folder_json` refuses, at any depth,
the keys of instantiation mechanisms and every string that reads as a dotted path into an importable module -- so a
value that some library might resolve later (torchtune resolves ``prompt_template`` that way) cannot be planted in any
field.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from duo_plugin.errors import UserError

__all__ = ["CODE_KEYS", "names_code", "check_folder_json"]

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*([.:][A-Za-z_][A-Za-z0-9_]*)+$")
#: Keys of instantiation / remote-code mechanisms (hydra/torchtune ``_component_``/``_target_``, HF ``auto_map``): no
#: JSON of a model folder may carry them, even where nothing reads them today.
CODE_KEYS = frozenset({"_component_", "_target_", "_partial_", "auto_map"})


def names_code(value: str) -> bool:
    """``value`` reads as a reference to Python code: ``pkg.mod.attr`` or ``pkg:attr`` whose first component is a
    standard-library module, an imported module or a module importable from ``sys.path`` (located, never imported).
    File names such as ``tokenizer.model`` are not (no module called ``tokenizer``)."""
    if not isinstance(value, str) or not _DOTTED.match(value):
        return False
    if ":" in value:
        return True
    parts = value.split(".")
    if parts[0] in sys.stdlib_module_names or parts[0] in sys.modules:
        return True
    try:
        spec = importlib.util.find_spec(parts[0])  # locates a top-level module; runs none of its code
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.origin not in (None, "namespace"):
        return True  # a module or a regular package: importing it runs code
    # a namespace package (a plain directory, e.g. a model folder's tokenizer/): code only if it holds the next part
    return any((Path(loc) / parts[1]).is_dir() or (Path(loc) / f"{parts[1]}.py").is_file()
               for loc in (spec.submodule_search_locations or ()))


def check_folder_json(obj: Any, where: str, *, skip: tuple = ()) -> None:
    """Refuse JSON from a model folder that could name code: a key of :data:`CODE_KEYS` or a string that
    :func:`names_code`, at any depth; values must be JSON scalars, lists or objects.  ``skip``: top-level keys
    validated elsewhere (the allow-listed ``builder``, the tokenizer descriptor).  :class:`UserError` naming the file
    and the field."""
    def walk(v: Any, path: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or k in CODE_KEYS:
                    raise UserError(f"{where}: refusing field {path}{k!r}: a model folder is data and may not carry "
                                    "instantiation keys; remove it (or use another model folder)")
                if not path and k in skip:
                    continue
                walk(x, f"{path}{k}.")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{path}{i}.")
        elif isinstance(v, str):
            if names_code(v):
                raise UserError(f"{where}: refusing field {path.rstrip('.')}={v!r}: it names Python code and a model "
                                "folder is data (nothing in it is imported or called); remove the value")
        elif v is not None and not isinstance(v, (bool, int, float)):
            raise UserError(f"{where}: field {path.rstrip('.')} holds a {type(v).__name__}, not JSON data")

    walk(obj, "")
