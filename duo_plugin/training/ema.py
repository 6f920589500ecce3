"""Exponential moving average of model weights (docs/method.md §6 "EMA 0.9999 with warm-up").

Update ``n`` (1-based: the first call of :meth:`EMA.update` is ``n = 1``, as in the reference code, which
increments its counter before computing the decay) uses

    decay_n = min(decay, (1 + n) / (10 + n))        (use_warmup=True; otherwise decay_n = decay)
    shadow  <- decay_n * shadow + (1 - decay_n) * param

The shadow is kept in fp32 whatever the parameter dtype (bf16 training). FSDP2 ``DTensor`` parameters are
handled by operating on their local shards (``param.to_local()``), so each rank keeps the EMA of its own shard
and ``state_dict()`` holds local shards (save it per rank, or with the same sharding).

Shadows are keyed by CANONICAL parameter names (:func:`duo_plugin.training.checkpointing.canonical_name`: wrapper
components such as activation checkpointing's ``_checkpoint_wrapped_module`` or compile's ``_orig_mod`` removed), the
names of the model's state dict and of saved checkpoints, so an EMA saves and loads whatever wrappers are on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from duo_plugin.training.checkpointing import canonical_named_parameters

__all__ = ["EMA"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares storage), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class EMA:
    """EMA of a model's trainable parameters.

    Args:
        model: the model whose ``named_parameters()`` with ``requires_grad`` are tracked.
        decay: the asymptotic decay (0.9999 in Duo).
        use_warmup: use ``min(decay, (1+n)/(10+n))``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_warmup: bool = True):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.use_warmup = bool(use_warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: _local(p.detach()).to(torch.float32).clone()
                for name, p in canonical_named_parameters(model).items()
                if p.requires_grad
            }
        if not self.shadow:
            raise ValueError("EMA: the model has no trainable parameters")

    def _params(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        params = canonical_named_parameters(model)
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA: model lacks tracked parameters {missing[:5]} (was the model re-wrapped after "
                           "creating the EMA? create the EMA from the same wrapped model)")
        for name in self.shadow:
            yield name, params[name]

    def current_decay(self, n: int | None = None) -> float:
        """The decay used by update number ``n`` (default: the next update)."""
        n = self.num_updates + 1 if n is None else int(n)
        if self.use_warmup:
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the model's current weights into the shadow; returns the decay used."""
        d = self.current_decay()
        self.num_updates += 1
        for name, p in self._params(model):
            s = self.shadow[name]
            src = _local(p.detach())
            if src.shape != s.shape:
                raise ValueError(f"EMA: shape of {name} changed from {tuple(s.shape)} to {tuple(src.shape)}")
            if s.device != src.device:
                self.shadow[name] = s = s.to(src.device)
            s.mul_(d).add_(src.to(torch.float32), alpha=1.0 - d)
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (cast to each parameter's dtype)."""
        for name, p in self._params(model):
            dst = _local(p.data)
            dst.copy_(self.shadow[name].to(device=dst.device, dtype=dst.dtype))

    @contextlib.contextmanager
    def swap_into(self, model: nn.Module):
        """Temporarily run ``model`` with EMA weights (evaluation / sampling); restores the weights after,
        also on exceptions."""
        with torch.no_grad():
            backup = {name: _local(p.data).clone() for name, p in self._params(model)}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for name, p in self._params(model):
                    _local(p.data).copy_(backup[name])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "use_warmup": self.use_warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.detach().clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        from duo_plugin.training.checkpointing import canonical_state_dict

        shadow = canonical_state_dict(state["shadow"])
        if set(shadow) != set(self.shadow):
            extra = sorted(set(shadow) - set(self.shadow))[:5]
            missing = sorted(set(self.shadow) - set(shadow))[:5]
            raise KeyError(f"EMA state does not match the model: missing {missing}, unexpected {extra}")
        for k, v in shadow.items():
            if tuple(v.shape) != tuple(self.shadow[k].shape):
                raise ValueError(f"EMA state {k}: shape {tuple(v.shape)} != model {tuple(self.shadow[k].shape)}")
        self.decay = float(state["decay"])
        self.use_warmup = bool(state["use_warmup"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.detach().to(device=self.shadow[k].device, dtype=torch.float32).clone()
                       for k, v in shadow.items()}

    def full_state_dict(self, model: nn.Module) -> dict:
        """:meth:`state_dict` with FULL (unsharded) fp32 shadows on CPU.  Under FSDP2 each rank's shadow is its local
        shard of the parameter's DTensor; the full tensor is rebuilt with the parameter's mesh and placements (a
        collective: call it on every rank)."""
        sd = self.state_dict()
        params = canonical_named_parameters(model)
        shadow = {}
        for k, v in sd["shadow"].items():
            p = params[k]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                v = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            shadow[k] = v.detach().cpu()
        return {**sd, "shadow": shadow}

    def load_full_state_dict(self, state: dict, model: nn.Module, device: torch.device | str) -> None:
        """Inverse of :meth:`full_state_dict`: full shadows are re-sharded like ``model``'s FSDP2 parameters (plain
        parameters take the full tensor) before :meth:`load_state_dict`."""
        from duo_plugin.training.checkpointing import canonical_state_dict

        params = canonical_named_parameters(model)
        shadow = {}
        for k, v in canonical_state_dict(state["shadow"]).items():
            p = params.get(k)
            if p is not None and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(device), p.device_mesh, p.placements).to_local()
            shadow[k] = v
        self.load_state_dict({**state, "shadow": shadow})
