"""Typed reading of recipe config values: a wrong type is a :class:`ConfigError` naming the key, the value and the fix.

``int("abc")`` deep inside a recipe says ``invalid literal for int() with base 10: 'abc'`` and names no key;
``int(31.9)`` silently gives 31.  :func:`coerce_config` checks every listed key once, right after the config is
merged with its defaults, and writes the converted value back (so ``max_steps="50"`` from a YAML string works).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from duo_plugin.training.recipe_utils import ConfigError

__all__ = ["INT", "FLOAT", "BOOL", "read_int", "read_float", "read_bool", "coerce_config"]

INT, FLOAT, BOOL = "int", "float", "bool"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def read_int(key: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int: ints, integral floats (``32.0``) and digit strings; anything else names ``key``."""
    out = None
    if isinstance(value, bool):
        out = None
    elif isinstance(value, int):
        out = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        out = int(value)
    elif isinstance(value, str):
        try:
            out = int(value.strip())
        except ValueError:
            out = None
    if out is None:
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}; set {key}=<integer>")
    if minimum is not None and out < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {out}")
    return out


def read_float(key: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite float (ints, floats, numeric strings such as ``"3e-4"``); anything else names ``key``."""
    out = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = None
    if out is None or not math.isfinite(out):
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}; set {key}=<number> (e.g. 3e-4)")
    if positive and not out > 0:
        raise ConfigError(f"config key '{key}' must be > 0, got {out}")
    if minimum is not None and out < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {out}")
    return out


def read_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")


def coerce_config(cfg: DictConfig, spec: Mapping[str, tuple]) -> None:
    """Check and convert, in place, each dotted ``key`` of ``spec`` (``key -> (kind, options)``; ``kind`` is
    :data:`INT`, :data:`FLOAT` or :data:`BOOL`; options: ``minimum``/``positive``).  Absent or null keys are skipped
    (requiredness is checked elsewhere)."""
    for key, (kind, opts) in spec.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if kind == INT:
            new = read_int(key, value, **opts)
        elif kind == FLOAT:
            new = read_float(key, value, **opts)
        elif kind == BOOL:
            new = read_bool(key, value)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown kind {kind!r}")
        if new != value or type(new) is not type(value):
            OmegaConf.update(cfg, key, new, merge=False)
