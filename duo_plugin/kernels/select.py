"""Choosing the training-loss paths (recipes' ``kernels:`` config section) and finding a model's parameters.

``kernels.curriculum_input``: ``dense`` (``losses.curriculum_inputs``: torch.Generator noise, dense ``[B, L, K]``
soft logits into the model), ``reference`` / ``chunked`` / ``triton`` (:func:`curriculum_soft_embedding` with the
counter-based noise stream and :func:`embedding_override`) or ``auto``.
``kernels.nelbo``: ``dense`` (``model(...)`` + ``duo_nelbo``), ``reference`` / ``chunked`` / ``triton``
(:func:`fused_duo_nelbo` on ``model.forward_hidden``) or ``auto``.

``auto`` (decided once per run from quantities that do not depend on world size or accumulation, so the noise
stream of a run is the same on every topology):

* CUDA with Triton importable → ``triton`` for both;
* CPU → the fused ``chunked`` paths when one row's dense tensor ``L·K`` has at least ``auto_min_row_elements``
  elements (memory: the dense path keeps several ``B·L·K`` fp32 tensors alive), otherwise ``dense`` (faster at
  small ``L·K``; see docs/kernels.md for the measurements behind :data:`AUTO_MIN_ROW_ELEMENTS`);
* never a fused path when it cannot apply: FSDP (DTensor parameters), ``curriculum.input: topk``, or an output
  projection that is not a plain linear layer (e.g. LoRA) — then ``dense``.
"""

from __future__ import annotations

import torch

__all__ = ["KERNEL_CHOICES", "AUTO_MIN_ROW_ELEMENTS", "choose_paths", "input_embedding", "projection_params"]

KERNEL_CHOICES = ("auto", "dense", "reference", "chunked", "triton")
# L·K above which `auto` uses the chunked paths on CPU (e.g. K = 50k at L >= 80, K = 151,936 at L >= 28).
AUTO_MIN_ROW_ELEMENTS = 1 << 22


def input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose ``.weight [K, d]`` embeds input ids (DiT ``vocab_embed``, torchtune ``tok_embeddings``)."""
    for path in ("vocab_embed", "decoder.tok_embeddings"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
            return m
    return None


def projection_params(model: torch.nn.Module):
    """``(weight [K, d], bias | None)`` of ``model.output_projection`` if it is a plain ``nn.Linear`` or a
    torchtune ``TiedLinear`` (weight of the tied embedding), else ``None`` (e.g. LoRA: the fused loss would drop
    the adapter)."""
    proj = getattr(model, "output_projection", None)
    if proj is None:
        return None
    if type(proj) is torch.nn.Linear:
        return proj.weight, proj.bias
    if type(proj).__name__ == "TiedLinear" and hasattr(proj, "tied_module"):
        return proj.tied_module.weight, None
    return None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def choose_paths(curriculum_input: str, nelbo: str, *, model: torch.nn.Module, device, seq_len: int,
                 vocab_size: int, soft_input: str = "dense",
                 auto_min_row_elements: int = AUTO_MIN_ROW_ELEMENTS) -> dict[str, str]:
    """Concrete ``{"curriculum_input": ..., "nelbo": ...}`` (each ``dense|reference|chunked|triton``).

    Explicit fused choices that cannot apply raise ``ValueError`` naming the reason; ``auto`` falls back to
    ``dense`` instead.
    """
    from ._env import triton_available

    for name, v in (("curriculum_input", curriculum_input), ("nelbo", nelbo)):
        if v not in KERNEL_CHOICES:
            raise ValueError(f"kernels.{name} must be one of {KERNEL_CHOICES}, got {v!r}")
    dev = torch.device(device)
    emb = input_embedding(model)
    proj = projection_params(model)
    blockers = {
        "curriculum_input": ("curriculum.input is 'topk' (sparse soft input)" if soft_input != "dense" else
                             "the model has no input embedding with a .weight" if emb is None else
                             "parameters are sharded (FSDP DTensor)" if _is_dtensor(emb.weight) else None),
        "nelbo": ("model.output_projection is not a plain linear layer (e.g. LoRA)" if proj is None else
                  "parameters are sharded (FSDP DTensor)" if _is_dtensor(proj[0]) else None),
    }
    if dev.type == "cuda" and triton_available(dev):
        auto = "triton"
    elif int(seq_len) * int(vocab_size) >= int(auto_min_row_elements):
        auto = "chunked"
    else:
        auto = "dense"
    out = {}
    for name, v in (("curriculum_input", curriculum_input), ("nelbo", nelbo)):
        if v == "auto":
            v = "dense" if blockers[name] else auto
        elif v != "dense" and blockers[name]:
            raise ValueError(f"kernels.{name}={v!r} cannot be used: {blockers[name]}; use 'dense' or 'auto'")
        if v == "triton" and not triton_available(dev):
            raise ValueError("kernels: 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                             "use 'chunked' or 'auto'")
        out[name] = v
    return out
