"""Small helpers shared by the duo recipes (duo_pretrain, duo_distill): config-key checking with "did you mean"
suggestions, the LR multiplier, masked token sums and distributed/DTensor utilities.

Recipes stay torchtune-style single files (copy-and-modify), but the pieces that must behave identically in every
recipe live here once.  No torchtune import: this is core code.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

import torch
import torch.distributed as dist

from duo_plugin.diffusion.losses import masked_token_sum  # noqa: F401  (re-export)
from duo_plugin.errors import UserError

__all__ = ["COMPONENT", "ANY", "ConfigError", "check_keys", "lr_multiplier", "masked_token_sum", "is_dist", "all_ranks_agree",
           "world_rank", "full_tensor", "is_block"]

#: Schema markers: a section instantiated via ``_component_`` (its keys are checked against the component's
#: signature by ``instantiate``), or a free-form section.
COMPONENT = "<component>"
ANY = "<any>"


class ConfigError(UserError):
    """A bad recipe config; the message names the fix."""


def check_keys(node: Any, schema: Any, prefix: str = "", *, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` for the first key of ``node`` that ``schema`` does not know, suggesting the closest valid key.

    ``schema`` is a nested dict of known keys; ``COMPONENT``/``ANY``/``None`` leaves accept anything below them.
    """
    if schema in (COMPONENT, ANY) or schema is None:
        return
    if not isinstance(node, Mapping):
        if node is None:
            return
        raise error(f"config key '{prefix}' must be a mapping, got {node!r}")
    for key in node.keys():
        key = str(key)
        if key not in schema:
            full = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, list(schema.keys()), n=1, cutoff=0.6)
            hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else (
                f"valid keys here: {sorted(schema.keys())}")
            raise error(f"unknown config key '{full}': {hint}")
        check_keys(node[key], schema[key], f"{prefix}.{key}" if prefix else key, error=error)


def lr_multiplier(step: int, *, name: str = "constant_with_warmup", warmup_steps: int, max_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    """LR factor applied before optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps`` then constant
    (paper, ``get_constant_schedule_with_warmup``) or cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return float(step + 1) / float(warmup_steps)  # first step already uses lr/warmup, as in HF get_*_warmup + 1
    if name == "constant_with_warmup":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_rank() -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` outside torch.distributed."""
    if is_dist():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 ``DTensor`` parameter (all-gathers), or ``t`` itself."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def is_block(name: str, module: torch.nn.Module, *, types: set[type]) -> bool:
    """FSDP2 / activation-checkpointing wrap policy: shard/checkpoint modules whose exact type is in ``types``."""
    return type(module) in types


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter NAME (not position), as a full (unsharded) state dict.

    One format whatever the world size: a single-process checkpoint resumes under FSDP2 on N processes (whose loader
    matches state by parameter name) and an N-process checkpoint resumes in one process.  Single-process only; under
    FSDP2 use torchtune's ``get_full_optimizer_state_dict`` (same key format).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def all_ranks_agree(flag: bool, device: torch.device | str) -> bool:
    """``flag`` OR-ed over ranks (each rank's clock differs; a rank leaving a loop alone would hang the rest)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
