"""Build an objective from a recipe config (plain dicts; no torchtune, no OmegaConf needed).

Two spellings, same objects:

* component form (like torchtune's ``loss:``)::

      objective:
        _component_: duo_plugin.objectives.DuoObjective
        curriculum_steps: 100
        tau: 1.0e-3

* short form (the shipped configs): ``objective: duo | ar`` for duo_pretrain, with the method's values in the
  ``schedule:``, ``curriculum:``, ``kernels:`` and ``adapt:`` sections (:data:`PRETRAIN_KEYS` says which key is
  which constructor argument); duo_distill's ``distill:`` section (:data:`DISTILL_KEYS`).

With the component form, a method key in an old section is an error naming the new key (one place per value).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__all__ = ["PRETRAIN_KEYS", "DISTILL_KEYS", "objective_from_config", "instantiate_component", "legacy_conflicts"]

#: old (short-form) config key -> DuoObjective constructor argument
PRETRAIN_KEYS = {
    "curriculum.steps": "curriculum_steps",
    "curriculum.tau": "tau",
    "curriculum.gamma_min": "gamma_min",
    "curriculum.gamma_max": "gamma_max",
    "curriculum.table": "table",
    "curriculum.table_points": "table_points",
    "curriculum.table_cache": "table_cache",
    "curriculum.input": "curriculum_input",
    "curriculum.topk": "topk",
    "kernels.curriculum_input": "kernels_curriculum_input",
    "kernels.nelbo": "kernels_nelbo",
    "kernels.auto_min_row_elements": "auto_min_row_elements",
    "kernels.ram_fraction": "ram_fraction",
    "kernels.memory_budget_mb": "memory_budget_mb",
    "schedule.alpha_eps": "alpha_eps",
    "schedule.t_min": "t_min",
    "adapt.attn_anneal_steps": "attn_anneal_steps",
    "adapt.attn_anneal_mode": "attn_anneal_mode",
}

#: old ``distill.*`` key -> DCDObjective constructor argument (``distill.teacher`` stays a recipe key)
DISTILL_KEYS = {f"distill.{k}": k for k in ("rounds", "steps_per_round", "delta0", "growth", "gamma_min",
                                             "gamma_max", "t_min", "kl", "table_points")}


def _get(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def instantiate_component(section: Mapping, **kwargs):
    """``section["_component_"]`` (a dotpath) called with the other keys (+ ``kwargs``)."""
    path = str(section["_component_"])
    mod, _, attr = path.rpartition(".")
    if not mod:
        raise ValueError(f"_component_ must be a dotted path (module.Class), got {path!r}")
    fn = getattr(importlib.import_module(mod), attr)
    args = {k: v for k, v in section.items() if k != "_component_"}
    return fn(**args, **kwargs)


def legacy_conflicts(user_cfg: Mapping, keys: Mapping[str, str]) -> list[str]:
    """Messages for old-section method keys present in ``user_cfg`` (the config BEFORE defaults are merged)."""
    out = []
    for old, new in keys.items():
        if _get(user_cfg, old, _MISSING) is not _MISSING:
            out.append(f"config key '{old}' is set, but objective is a _component_: set 'objective.{new}' instead")
    return out


_MISSING = object()


def objective_from_config(cfg: Mapping, *, recipe: str = "pretrain",
                          instantiate: Callable[..., Any] = instantiate_component):
    """The objective of a (defaults-merged, plain-dict) recipe config.

    ``recipe="pretrain"``: ``objective`` is ``"duo"``, ``"ar"`` or a ``_component_`` mapping.
    ``recipe="distill"``: ``objective`` absent (DCD from the ``distill:`` section) or a ``_component_`` mapping.
    Raises ValueError naming the key to fix.
    """
    from .ar import ARObjective
    from .dcd import DCDObjective
    from .duo import DuoObjective

    obj = cfg.get("objective")
    if isinstance(obj, Mapping):
        if "_component_" not in obj:
            raise ValueError("objective must be 'duo', 'ar' or a mapping with _component_ (e.g. "
                             "duo_plugin.objectives.DuoObjective)")
        return instantiate(obj)
    if recipe == "distill":
        if obj not in (None, "dcd"):
            raise ValueError(f"duo_distill: objective must be omitted (DCD) or a _component_ mapping, got {obj!r}")
        return DCDObjective(**{arg: _get(cfg, key) for key, arg in DISTILL_KEYS.items()
                               if _get(cfg, key) is not None or arg in ("gamma_min", "gamma_max")})
    if obj == "ar":
        if int(_get(cfg, "curriculum.steps", 0) or 0) > 0:
            raise ValueError("curriculum.steps must be 0 for objective: ar (the curriculum is a diffusion objective)")
        return ARObjective()
    if obj == "duo":
        kw = {arg: _get(cfg, key) for key, arg in PRETRAIN_KEYS.items() if _get(cfg, key, _MISSING) is not _MISSING}
        keep_none = ("gamma_min", "gamma_max", "table", "table_points")
        kw = {k: v for k, v in kw.items() if v is not None or k in keep_none}
        return DuoObjective(**kw)
    raise ValueError(f"objective must be 'duo' or 'ar' (or a _component_ mapping), got {obj!r}")
