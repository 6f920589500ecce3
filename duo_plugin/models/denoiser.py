"""The denoiser callable every sampler and estimator is written against: ``denoiser(z, sigma) -> log x_θ``.

:class:`DenoiserFn` wraps a model following the denoiser convention (``model(x, sigma) -> log x_θ`` or logits); it
lives with the models because samplers, evaluation and objectives all call it and none of them may import another.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

__all__ = ["DenoiserFn", "log_probs_at"]


class DenoiserFn:
    """Wrap a model as a sampler/eval denoiser: eval mode during each call (the model's previous train/eval mode is
    restored afterwards), ``torch.no_grad``, optional bf16 autocast (CUDA only).

    ``DenoiserFn(model)(z, sigma)`` returns fp32 log-probabilities ``[B, L, K]`` (re-normalised with log_softmax, so
    a model returning logits also works, unless the model sets ``output_is_log_probs = True``). ``nfe`` counts calls (one per batched forward).

    Args:
        model: a module following the denoiser convention ``model(x, sigma) -> log x_θ``.
        dtype: ``None``/``"fp32"`` (no autocast) or ``"bf16"``/``torch.bfloat16`` (autocast, only if the input is on
            CUDA; ignored on CPU so CPU runs stay fp32).
    """

    def __init__(self, model: torch.nn.Module, dtype: Union[str, torch.dtype, None] = None):
        self.model = model
        if isinstance(dtype, str):
            dtype = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(dtype, "?")
            if dtype == "?":
                raise ValueError("DenoiserFn dtype must be one of None, 'fp32', 'bf16'")
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"DenoiserFn supports fp32 or bf16 autocast, got {dtype}")
        self.autocast_dtype = dtype if dtype == torch.bfloat16 else None
        self.nfe = 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        # The forward runs in eval mode (no dropout), then every submodule gets its previous mode back: sampling or
        # evaluating mid-training must not leave the live model in eval mode.
        saved = [(m, m.training) for m in self.model.modules()] if self.model.training else None
        if saved is not None:
            self.model.eval()
        try:
            self.nfe += 1
            ctx = contextlib.nullcontext()
            if self.autocast_dtype is not None and z.device.type == "cuda":
                ctx = torch.autocast("cuda", dtype=self.autocast_dtype)
            with ctx:
                out = self.model(z, sigma, **kwargs)
            out = out.float()
            # models that declare normalised log-probabilities (the DiT) skip a second K-wide log_softmax
            return out if getattr(self.model, "output_is_log_probs", False) else torch.log_softmax(out, dim=-1)
        finally:
            if saved is not None:
                for m, mode in saved:
                    m.training = mode


@torch.no_grad()
def log_probs_at(denoiser, z: torch.Tensor, sigma: torch.Tensor, padding_mask: Optional[torch.Tensor],
                  rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``log x_θ(z, σ)`` at the positions ``(rows[i], pos[i])`` only: fp32 ``[P, K]``.

    For a :class:`DenoiserFn` around a model with ``forward_hidden`` and ``output_projection``
    (the DiT and the adapters, whose forward is ``log_softmax(output_projection(forward_hidden(...)))``), the
    position-wise output projection and log-softmax run only at the requested positions: the network input is
    unchanged, so the values are those of the full forward, without the K-wide work at the context positions. Any
    other denoiser is called in full and indexed.
    """
    kw = {} if padding_mask is None else {"padding_mask": padding_mask}
    model = denoiser.model if isinstance(denoiser, DenoiserFn) else None
    if model is None or not (hasattr(model, "forward_hidden") and hasattr(model, "output_projection")):
        return denoiser(z, sigma, **kw)[rows, pos].float()
    saved = [(m, m.training) for m in model.modules()] if model.training else None
    if saved is not None:
        model.eval()
    try:
        denoiser.nfe += 1
        ctx = contextlib.nullcontext()
        if denoiser.autocast_dtype is not None and z.device.type == "cuda":
            ctx = torch.autocast("cuda", dtype=denoiser.autocast_dtype)
        with ctx:
            h = model.forward_hidden(z, sigma, padding_mask)
            out = model.output_projection(h[rows, pos])
        return torch.log_softmax(out.float(), dim=-1)
    finally:
        if saved is not None:
            for m, mode in saved:
                m.training = mode
