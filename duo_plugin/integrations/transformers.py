"""Hugging Face ``transformers`` loading of Duo / MDLM DiT folders **without remote code**.

:func:`register` (run automatically when ``transformers.models.auto.modeling_auto`` is imported, by the start-up hook
in :mod:`duo_plugin._autoregister`, which ``import duo_plugin`` also installs) registers with the auto classes:

* ``model_type: mdlm`` -> :class:`MDLMConfig` (the official HF-export layout, ``duo-convert to-official``), and
* ``model_type: duo_dit`` -> :class:`DuoDiTConfig` (the ``config.json`` that ``duo-convert official`` writes into a
  duo model folder),

served by :class:`MDLMForMaskedLM` / :class:`DuoDiTForMaskedLM`, so ``AutoModelForMaskedLM.from_pretrained(folder)``
loads such a folder with ``trust_remote_code`` off: transformers finds the model type locally and never runs the
checkpoint's ``modeling_mdlm.py``. Weights are read by our own loaders
(:func:`duo_plugin.models.checkpoint.load_pretrained` for a duo folder,
:func:`duo_plugin.convert.official.read_official` for an HF export): safetensors or the restricted unpickler;
nothing in the folder is imported or called.

``model(input_ids, timesteps=None)`` returns the raw logits ``[B, L, K]`` like the official remote-code model
(a tensor, as its ``return_dict: false``; ``return_dict=True`` gives a ``MaskedLMOutput``); ``log_softmax`` of them
equals the duo model's log-probabilities. ``timesteps`` is σ = −log α_t (ignored when the model is not
time-conditioned). ``.duo_model`` is the underlying :class:`~duo_plugin.models.dit.DiT` (with ``duo_metadata`` /
``valid_vocab``).

This module imports ``transformers`` (an optional extra: ``pip install duo-plugin[hf]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

__all__ = ["MDLMConfig", "DuoDiTConfig", "DuoDiTForMaskedLM", "MDLMForMaskedLM", "register"]

_REGISTERED = False


class MDLMConfig(PretrainedConfig):
    """The official MDLM/Duo HF-export config fields (``hidden_dim``, ``n_blocks``, ``n_heads``, ``cond_dim``,
    ``model_length``, ``vocab_size``, ``time_conditioning``, ``dropout``); read as data."""

    model_type = "mdlm"

    def __init__(self, vocab_size: int = 50258, model_length: int = 1024, hidden_dim: int = 768, cond_dim: int = 128,
                 n_blocks: int = 12, n_heads: int = 12, dropout: float = 0.1, time_conditioning: bool = False,
                 **kwargs: Any):
        kwargs.pop("auto_map", None)  # the remote code it names is never used
        self.vocab_size, self.model_length, self.hidden_dim = vocab_size, model_length, hidden_dim
        self.cond_dim, self.n_blocks, self.n_heads = cond_dim, n_blocks, n_heads
        self.dropout, self.time_conditioning = dropout, time_conditioning
        super().__init__(**kwargs)


class DuoDiTConfig(MDLMConfig):
    """A duo model folder (``duo_config.json`` + ``model.safetensors``); the sizes come from ``duo_config.json``."""

    model_type = "duo_dit"


class DuoDiTForMaskedLM(PreTrainedModel):
    """A duo :class:`~duo_plugin.models.dit.DiT` behind the transformers API (see the module docstring)."""

    config_class = DuoDiTConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"

    def __init__(self, config: MDLMConfig, duo_model: Optional[torch.nn.Module] = None):
        super().__init__(config)
        if duo_model is None:
            from duo_plugin.models.dit import duo_dit_small

            duo_model = duo_dit_small(int(config.vocab_size), int(config.model_length), dropout=float(config.dropout),
                                      dim=int(config.hidden_dim), n_layers=int(config.n_blocks),
                                      n_heads=int(config.n_heads), cond_dim=int(config.cond_dim),
                                      time_conditioning=bool(config.time_conditioning))
        self.backbone = duo_model
        self.post_init()

    def _init_weights(self, module):  # weights always come from the folder (or the DiT's own init)
        pass

    @property
    def duo_model(self) -> torch.nn.Module:
        return self.backbone

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a local duo model folder or official HF export with our own loaders (no remote code, no hub)."""
        path = Path(os.fspath(pretrained_model_name_or_path))
        if not path.is_dir():
            raise OSError(f"{path}: DuoDiTForMaskedLM loads local folders only (a duo model folder or an official "
                          "HF export); download it first")
        weights = "model" if kwargs.pop("duo_weights", "ema") in ("raw", "model") else "ema"
        if (path / "duo_config.json").is_file():
            from duo_plugin.models.checkpoint import load_pretrained

            dit = load_pretrained(path, weights=weights)
        else:
            from duo_plugin.convert.official import build_model, read_official

            dit = build_model(read_official(path))
        if not hasattr(dit, "time_conditioning") or getattr(dit, "causal", False):
            raise ValueError(f"{path}: not a bidirectional DiT denoiser (AR / decoder folders are not served here)")
        cfg = cls.config_class(vocab_size=dit.vocab_size, model_length=dit.max_seq_len, hidden_dim=dit.dim,
                      cond_dim=int(dit.output_layer.adaLN_modulation.in_features), n_blocks=len(dit.blocks),
                      n_heads=dit.n_heads, dropout=float(dit.blocks[0].dropout),
                      time_conditioning=bool(dit.time_conditioning))
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        model = cls(cfg, duo_model=dit)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()

    def forward(self, input_ids: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs: Any):
        dit = self.backbone
        if timesteps is None:
            timesteps = torch.zeros(input_ids.shape[0], device=input_ids.device)
        h = dit.forward_hidden(input_ids, timesteps, kwargs.get("padding_mask"))
        logits = dit.output_projection(h).float()
        return MaskedLMOutput(logits=logits) if return_dict else logits  # the tensor by default, as the official model


class MDLMForMaskedLM(DuoDiTForMaskedLM):
    """:class:`DuoDiTForMaskedLM` for ``model_type: mdlm`` configs (the official HF-export layout)."""

    config_class = MDLMConfig


def register() -> None:
    """Register the config and model classes with ``AutoConfig`` / ``AutoModelForMaskedLM`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForMaskedLM

    for model_cls in (MDLMForMaskedLM, DuoDiTForMaskedLM):
        AutoConfig.register(model_cls.config_class.model_type, model_cls.config_class, exist_ok=True)
        AutoModelForMaskedLM.register(model_cls.config_class, model_cls, exist_ok=True)
    _REGISTERED = True
