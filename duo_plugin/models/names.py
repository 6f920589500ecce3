"""The one parameter naming of EMA shadows, model checkpoints and optimizer state, whatever wrappers are on.

Wrappers insert module names into parameter names: activation checkpointing (``checkpoint_wrapper``),
``torch.compile`` (``OptimizedModule``) and FSDP1 (``FullyShardedDataParallel``); FSDP2 (``fully_shard``) keeps them.
Model folders (``models.checkpoint``) and training state (``training.checkpointing``, ``training.ema``) both key
tensors by the canonical name, so this lives below both.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["WRAPPER_PREFIXES", "canonical_name", "canonical_state_dict", "canonical_named_parameters"]

#: module names inserted into parameter names by wrappers (module docstring)
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter / buffer name with every wrapper component removed (``blocks.0._checkpoint_wrapped_module.attn.w``
    -> ``blocks.0.attn.w``): the one name used by EMA shadows, model checkpoints and optimizer state, whatever
    wrappers are on when saving or loading."""
    for w in WRAPPER_PREFIXES:
        if w in name:
            name = name.replace(w, "")
    return name


def canonical_state_dict(sd: Mapping[str, Any]) -> dict:
    """``sd`` with canonical keys (see :func:`canonical_name`); two keys collapsing to one is an error."""
    out: dict = {}
    for k, v in sd.items():
        c = canonical_name(k)
        if c in out:
            raise ValueError(f"state dict keys {k!r} and another both map to {c!r}")
        out[c] = v
    return out


def canonical_named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{canonical name: parameter}`` of ``model`` (wrapped or not)."""
    return {canonical_name(n): p for n, p in model.named_parameters()}
