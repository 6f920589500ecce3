"""The ``duo`` fairseq2 model family: factory, state-dict converter and native-format conversion.

The fairseq2 model **is** our :class:`duo_plugin.models.dit.DiT` (same module, same parameter names), so
a fairseq2 checkpoint of a ``duo`` model and the weights of a native model directory
(:func:`duo_plugin.models.checkpoint.save_pretrained`) hold the same tensors under the same keys. The
converter's job is therefore to strip wrappers (``{"model": ...}`` nesting, ``module.`` / ``_orig_mod.``
prefixes from DDP / ``torch.compile``) and to refuse anything that is not a DiT state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from duo_plugin.models.dit import DiT, duo_dit_small

from .config import DuoConfig, config_of_module, config_to_builder_kwargs

__all__ = [
    "DUO_FAMILY",
    "create_duo_model",
    "convert_duo_state_dict",
    "duo_config_of",
    "load_native",
    "save_native",
    "write_asset_card",
]

DUO_FAMILY = "duo"

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def create_duo_model(config: DuoConfig) -> DiT:
    """fairseq2 model factory: ``DuoConfig`` -> ``DiT``.

    Built through the recorded builder ``duo_dit_small`` with every size given explicitly, so the model
    carries ``_duo_builder`` and :func:`save_native` (``save_pretrained``) can write a directory that
    ``load_pretrained`` rebuilds without fairseq2.
    """
    config.check()
    kwargs = config_to_builder_kwargs(config)
    return duo_dit_small(**kwargs)


def duo_config_of(model: nn.Module) -> DuoConfig:
    """The :class:`DuoConfig` that rebuilds ``model`` (a DiT)."""
    if not isinstance(model, DiT):
        raise TypeError(f"expected a duo_plugin DiT, got {type(model).__name__}")
    return config_of_module(model)


def convert_duo_state_dict(state_dict: Dict[str, object], config: DuoConfig) -> Dict[str, object]:
    """fairseq2 ``state_dict_converter``: any checkpoint of a ``duo`` model -> DiT parameter names.

    Accepts a bare DiT state dict (native safetensors, fairseq2 model checkpoints), a ``{"model": sd}``
    nesting, and DDP / compile / activation-checkpoint key prefixes. Raises ``ValueError`` when the result
    does not look like a DiT of this config (the embedding must be ``[vocab_size, dim]``).
    """
    sd: Mapping[str, object] = state_dict
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]  # type: ignore[assignment]
    out: Dict[str, object] = {}
    for key, value in sd.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
            k = k.replace("._checkpoint_wrapped_module.", ".")
        out[k] = value
    emb = out.get("vocab_embed.weight")
    if not isinstance(emb, torch.Tensor):
        raise ValueError("checkpoint has no 'vocab_embed.weight': it is not a duo DiT state dict")
    if tuple(emb.shape) != (config.vocab_size, config.dim):
        raise ValueError(
            f"checkpoint embedding is {tuple(emb.shape)} but the duo config expects "
            f"[{config.vocab_size}, {config.dim}] (vocab_size, dim)"
        )
    return out


def save_native(model: nn.Module, out_dir, *, ema_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` (a fairseq2 ``duo`` model, i.e. a DiT) as a native model directory.

    The directory is the one :func:`duo_plugin.models.checkpoint.load_pretrained`, the sampler and the
    lm-eval backend read. A model built outside :func:`create_duo_model` (no recorded builder) gets one.
    """
    from duo_plugin.models.checkpoint import save_pretrained

    model = _unwrap(model)
    if getattr(model, "_duo_builder", None) is None:
        model._duo_builder = (f"{duo_dit_small.__module__}.duo_dit_small",
                              config_to_builder_kwargs(duo_config_of(model)))
    if ema_state_dict is not None:
        ema_state_dict = {k: v.detach().to("cpu") for k, v in ema_state_dict.items()}
    save_pretrained(model, out_dir, ema_state_dict=ema_state_dict, metadata=dict(metadata or {}))
    return Path(out_dir)


def load_native(path, *, weights: str = "ema") -> Tuple[DuoConfig, Dict[str, torch.Tensor]]:
    """Native model directory -> ``(DuoConfig, state_dict)`` for fairseq2 (``family.create_new_model`` +
    ``load_state_dict``, or :func:`write_asset_card`)."""
    from duo_plugin.models.checkpoint import load_pretrained

    model = load_pretrained(path, weights=weights, device="cpu")
    return duo_config_of(model), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def write_asset_card(native_dir, name: str, card_dir, *, weights: str = "ema", arch: Optional[str] = None) -> Path:
    """Write a fairseq2 asset card ``card_dir/<name>.yaml`` for a local native model directory.

    fairseq2 loads Safetensors checkpoints itself, so the card points at a single-file copy of the chosen
    weights (``<native_dir>/fairseq2/<weights>.safetensors``, written here with the DiT keys) and carries the
    full ``model_config``; no fairseq2 download or hub is involved. Returns the card path. Make fairseq2
    see it with ``$DUO_FAIRSEQ2_ASSET_DIRS=card_dir`` (read by the extension) or fairseq2's own
    ``common.assets.extra_paths``.
    """
    from safetensors.torch import save_file

    native_dir = Path(native_dir).resolve()
    config, sd = load_native(native_dir, weights=weights)
    f2_dir = native_dir / "fairseq2"
    f2_dir.mkdir(parents=True, exist_ok=True)
    weights_file = f2_dir / f"{weights}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(weights_file))
    card = {
        "name": name,
        "model_family": DUO_FAMILY,
        "model_arch": arch or "duo_small",
        "model_config": config_to_builder_kwargs(config),
        "checkpoint": weights_file.as_uri(),
    }
    card_dir = Path(card_dir)
    card_dir.mkdir(parents=True, exist_ok=True)
    path = card_dir / f"{name}.yaml"
    # JSON is valid YAML; no YAML writer needed.
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path
