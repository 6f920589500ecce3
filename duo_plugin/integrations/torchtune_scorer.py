"""Gen PPL scorer from a torchtune model builder + an HF-format checkpoint directory (e.g. a local GPT-2 / Llama /
Qwen-class causal LM), loaded with torchtune's ``FullModelHFCheckpointer``. torchtune is imported here only.

Usage::

    scorer = load_torchtune_scorer("torchtune.models.qwen2_5.qwen2_5_0_5b", "/ckpts/Qwen2.5-0.5B",
                                   model_type="QWEN2")
    logits = scorer(tokens)  # Long[B, T] -> Float[B, T, V]
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

__all__ = ["TorchtuneScorer", "load_torchtune_scorer"]


class TorchtuneScorer:
    """Causal LM callable ``tokens Long[B, T] -> logits Float[B, T, V]`` around a torchtune ``TransformerDecoder``."""

    def __init__(self, model: torch.nn.Module, device: Union[str, torch.device] = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(tokens.to(self.device))
        if isinstance(out, list):  # chunked output
            out = torch.cat(out, dim=1)
        return out.float()


def _resolve(builder: Union[str, Callable[..., torch.nn.Module]]) -> Callable[..., torch.nn.Module]:
    if callable(builder):
        return builder
    module, _, name = str(builder).rpartition(".")
    if not module:
        raise ValueError(f"model_builder must be a dotted path like 'torchtune.models.llama3_2.llama3_2_1b', got {builder!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        raise ValueError(f"model builder {builder!r} not found")
    return fn


def load_torchtune_scorer(
    model_builder: Union[str, Callable[..., torch.nn.Module]],
    checkpoint_dir: Union[str, Path],
    *,
    model_type: str = "LLAMA3_2",
    checkpoint_files: Optional[Sequence[str]] = None,
    builder_kwargs: Optional[dict[str, Any]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TorchtuneScorer:
    """Build ``model_builder(**builder_kwargs)`` and load HF safetensors from ``checkpoint_dir``.

    Args:
        model_builder: dotted path or callable of a torchtune builder (e.g. ``torchtune.models.llama3_2.llama3_2``).
        checkpoint_dir: directory with ``config.json`` and the ``*.safetensors`` (or ``*.bin``) weights.
        model_type: torchtune ``ModelType`` name (``LLAMA3_2``, ``QWEN2``, ``LLAMA2``, ``MISTRAL``, ...).
        checkpoint_files: weight file names (default: every ``*.safetensors`` in the directory, sorted).
    """
    from torchtune.training import FullModelHFCheckpointer

    ckpt_dir = Path(checkpoint_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no config.json: point checkpoint_dir at an HF-format checkpoint")
    if checkpoint_files is None:
        checkpoint_files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
        if not checkpoint_files:
            checkpoint_files = sorted(p.name for p in ckpt_dir.glob("*.bin"))
        if not checkpoint_files:
            raise FileNotFoundError(f"no *.safetensors / *.bin weight files in {ckpt_dir}")
    with tempfile.TemporaryDirectory(prefix="duo_scorer_") as out:
        ckpt = FullModelHFCheckpointer(
            checkpoint_dir=str(ckpt_dir),
            checkpoint_files=list(checkpoint_files),
            model_type=model_type,
            output_dir=out,
        )
        sd = ckpt.load_checkpoint()["model"]
    model = _resolve(model_builder)(**(builder_kwargs or {}))
    model.load_state_dict(sd, strict=True)
    return TorchtuneScorer(model.to(dtype), device)
