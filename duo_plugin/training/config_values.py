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

__all__ = ["INT", "FLOAT", "BOOL", "read_int", "read_float", "read_bool", "coerce_config", "check_data_source",
           "COMMON_TYPES", "PRETRAIN_TYPES", "DISTILL_TYPES", "GENERATE_TYPES", "EVAL_TYPES"]

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


def read_float(key: str, value: Any, *, minimum: float | None = None, positive: bool = False,
               maximum: float | None = None, below: float | None = None) -> float:
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
    if maximum is not None and out > maximum:
        raise ConfigError(f"config key '{key}' must be <= {maximum}, got {out}")
    if below is not None and not out < below:
        raise ConfigError(f"config key '{key}' must be < {below}, got {out}")
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


def check_data_source(cfg: DictConfig, key: str = "data", default_source: str = "files") -> None:
    """``<key>.files`` / ``<key>.hub`` given while ``<key>.source`` reads another source would be silently ignored
    (e.g. ``data.files=[...]`` on a config whose ``data.source`` is the built-in corpus): a :class:`ConfigError`
    naming both keys."""
    section = OmegaConf.select(cfg, key, default=None)
    if section is None or not isinstance(section, (DictConfig, dict)):
        return
    source = section.get("source") or default_source
    for field, wants in (("files", "files"), ("hub", "hub")):
        if section.get(field) and str(source) != wants:
            raise ConfigError(f"{key}.{field} is set but {key}.source={source} ignores it; set {key}.source={wants} "
                              f"to read {key}.{field}, or {key}.{field}=null to use {key}.source={source}")


def _i(minimum: int | None = None) -> tuple:
    return (INT, {} if minimum is None else {"minimum": minimum})


def _f(minimum: float | None = None, positive: bool = False, maximum: float | None = None,
       below: float | None = None) -> tuple:
    opts: dict = {"positive": True} if positive else {}
    for name, v in (("minimum", minimum), ("maximum", maximum), ("below", below)):
        if v is not None:
            opts[name] = v
    return (FLOAT, opts)


_B = (BOOL, {})

#: Keys shared by the training recipes (duo_pretrain, duo_distill).
COMMON_TYPES: dict[str, tuple] = {
    "seed": _i(0), "global_batch_size": _i(1), "gradient_accumulation_steps": _i(1), "max_steps": _i(0),
    "optimizer.lr": _f(positive=True), "optimizer.weight_decay": _f(0.0), "optimizer.eps": _f(positive=True),
    "lr_scheduler.warmup_steps": _i(0), "clip_grad_norm": _f(positive=True), "ema.decay": _f(0.0, maximum=1.0),
    "data.seq_len": _i(1), "data.val_fraction": _f(0.0, below=1.0), "data.val_docs": _i(0),
    "checkpoint.every": _i(0), "checkpoint.keep_last": _i(0), "log_every": _i(1), "max_wall_s": _f(0.0),
    "compile": _B, "progress_bar": _B, "overwrite": _B,
}

#: duo_pretrain's typed keys.
PRETRAIN_TYPES: dict[str, tuple] = {
    **COMMON_TYPES, "eval_batch_size": _i(1), "eval_every": _i(0), "eval_max_batches": _i(1),
    "lr_scheduler.min_lr_ratio": _f(0.0), "schedule.alpha_eps": _f(positive=True), "schedule.t_min": _f(0.0),
    "curriculum.steps": _i(0), "curriculum.tau": _f(), "curriculum.topk": _i(1), "curriculum.table_points": _i(2),
    "adapt.attn_anneal_steps": _i(0), "kernels.auto_min_row_elements": _i(0), "tokenizer.train.vocab_size": _i(1),
    "enable_activation_checkpointing": _B,
}

#: duo_distill's typed keys.
DISTILL_TYPES: dict[str, tuple] = {
    **COMMON_TYPES, "distill.rounds": _i(1), "distill.steps_per_round": _i(1), "distill.delta0": _f(positive=True),
    "distill.growth": _f(positive=True), "distill.t_min": _f(0.0), "distill.table_points": _i(2),
    "eval.num_samples": _i(1), "eval.batch_size": _i(1), "eval.seq_len": _i(1), "eval.seed": _i(0),
}

#: duo_generate's typed keys (booleans strict: ``add_bos=maybe`` is an error, not "true").
GENERATE_TYPES: dict[str, tuple] = {
    "seed": _i(0), "num_samples": _i(1), "batch_size": _i(1), "seq_len": _i(1), "steps": _i(1), "add_bos": _B,
    "variable_length": _B, "progress_bar": _B, "blocks.n_blocks": _i(0), "blocks.block_len": _i(1),
}

#: duo_eval's typed keys (``block_size=0`` / ``max_blocks=0`` are errors: leave the key unset for the default / all).
EVAL_TYPES: dict[str, tuple] = {
    "seed": _i(0), "block_size": _i(3), "mc_passes": _i(1), "batch_size": _i(1), "max_blocks": _i(1),
    "t_min": _f(0.0), "alpha_eps": _f(positive=True), "progress_bar": _B, "dataset.val_fraction": _f(0.0, below=1.0),
    "dataset.max_docs": _i(1),
}
