"""Autoregressive decoding with a KV cache for the project's AR models (``objective: ar``).

Models: a causal :class:`~duo_plugin.models.dit.DiT` (its own per-layer K/V cache, rotary at the cached offsets) and
a causal :class:`~duo_plugin.models.adapters.DecoderDenoiser` (torchtune's ``setup_caches`` KV cache). Both provide
``model.kv_cache(batch_size, max_len)`` (a context manager yielding the cache) and
``model.forward_cached(ids Long[B, s], cache, sigma) -> log-probs fp32 [B, s, K]`` for the next ``s`` positions.

The loop: one call on the prompt (prefill), then one call per new token on that token alone, so a sequence of
``seq_len`` tokens with a ``P``-token prompt costs ``NFE = seq_len - P`` network calls (the last token is never fed
back). Each new token is drawn from the float64 next-token law ``filter_next_token(log p, ...)`` (temperature, the
model's valid ids, optional top-k and nucleus top-p) by :func:`~duo_plugin.diffusion.uniform.sample_categorical`
(race of exponentials: one draw of ``K`` float64 uniforms per row per token) from the row's own generator. With
``seed``, row ``b`` uses ``row_generators(seed, 0, [b])`` (diffusion/streams.py, per-sample noise), so the samples do
not depend on ``chunk_size``; a caller-given generator list is used row for row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from duo_plugin._progress import progress_bar
from duo_plugin.diffusion.uniform import row_generators, sample_categorical
from duo_plugin.sampling.schedulers import apply_temperature, nucleus_filter

__all__ = ["ARSampleResult", "filter_next_token", "sample_ar", "supports_kv_cache"]

_F64 = torch.float64


@dataclass
class ARSampleResult:
    """``tokens``: ``Long[B, seq_len]`` (prompt included); ``nfe``: network calls per sequence (``seq_len - P``)."""

    tokens: torch.Tensor
    nfe: int


def supports_kv_cache(model) -> bool:
    """True for a causal model with the incremental-decoding hooks (``kv_cache``, ``forward_cached``)."""
    return bool(getattr(model, "causal", False)) and callable(getattr(model, "kv_cache", None)) and callable(
        getattr(model, "forward_cached", None))


def filter_next_token(log_probs: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      valid_vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next-token law, float64 ``[B, K]`` (rows sum to 1), from fp32 log-probabilities ``[B, K]``: temperature
    (``log_softmax(log p / T)``), then only the ``valid_vocab`` ids (``Bool[K]``), then the ``top_k`` most likely ids
    (0 = all; ties at the k-th value are all kept), then the nucleus ``top_p`` (1 = off)."""
    lp = apply_temperature(log_probs, temperature)
    if valid_vocab is not None:
        lp = lp.masked_fill(~valid_vocab.to(lp.device), float("-inf"))
    probs = torch.exp(lp - lp.max(dim=-1, keepdim=True).values)
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if 0 < int(top_k) < probs.shape[-1]:
        kth = probs.topk(int(top_k), dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros((), dtype=_F64, device=probs.device))
    probs = probs / probs.sum(-1, keepdim=True)
    return nucleus_filter(probs, top_p)


def _prompt_rows(prompt: Optional[torch.Tensor], batch_size: int, seq_len: int, device) -> torch.Tensor:
    if prompt is None:
        raise ValueError("AR decoding needs a prompt of at least one token (e.g. [BOS]: set add_bos=true)")
    p = torch.as_tensor(prompt, dtype=torch.long, device=device)
    p = p.expand(batch_size, -1) if p.dim() == 1 else p
    if p.dim() != 2 or p.shape[0] != batch_size or not 1 <= p.shape[1] <= seq_len:
        raise ValueError(f"prompt must be Long[P] or Long[B={batch_size}, P] with 1 <= P <= seq_len={seq_len}; got "
                         f"shape {tuple(p.shape)}")
    return p


@torch.no_grad()
def _decode_chunk(model, prompt: torch.Tensor, seq_len: int, gens, law: dict, bar) -> torch.Tensor:
    B, P = prompt.shape
    z = torch.empty(B, seq_len, dtype=torch.long, device=prompt.device)
    z[:, :P] = prompt
    sigma = torch.zeros(B, device=prompt.device)
    with model.kv_cache(B, seq_len) as cache:
        lp = model.forward_cached(z[:, :P], cache, sigma)[:, -1]
        for i in range(P, seq_len):
            if bar is not None:
                bar.update(1)
            z[:, i] = sample_categorical(filter_next_token(lp, **law), gens)
            if i + 1 < seq_len:
                lp = model.forward_cached(z[:, i:i + 1], cache, sigma)[:, -1]
    return z


def sample_ar(model, *, batch_size: int, seq_len: int, prompt: Optional[torch.Tensor],
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              valid_vocab: Optional[torch.Tensor] = None,
              generator: Union[torch.Generator, Sequence[torch.Generator], None] = None, seed: Optional[int] = None,
              chunk_size: Optional[int] = None, progress: bool = False) -> ARSampleResult:
    """Draw ``Long[batch_size, seq_len]`` from a causal model with a KV cache (module docstring).

    ``prompt``: ``Long[P]`` (every row) or ``Long[B, P]``, ``P >= 1`` (our AR models are trained on ``[BOS] + text``);
    exactly one of ``generator`` (one, or one per row) / ``seed`` (row b: ``row_generators(seed, 0, [b])``);
    ``chunk_size`` rows per cached pass (default all). The model runs in eval mode (its mode is restored after).
    """
    if not supports_kv_cache(model):
        raise ValueError(f"{type(model).__name__} has no KV-cache decoding (a causal DiT or causal DecoderDenoiser, "
                         "i.e. a model trained with objective: ar, is needed)")
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    if seq_len > int(model.max_seq_len):
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
    device = next(model.parameters()).device
    rows = _prompt_rows(prompt, batch_size, seq_len, device)
    law = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p), "valid_vocab": valid_vocab}
    chunk = int(chunk_size or batch_size)
    P = rows.shape[1]
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    bar = progress_bar(progress, total=-(-batch_size // chunk) * (seq_len - P),
                       desc="AR sample (KV cache)", unit="token", leave=False)
    outs = []
    try:
        for lo in range(0, batch_size, chunk):
            hi = min(batch_size, lo + chunk)
            if seed is not None:
                gens = row_generators(int(seed), 0, range(lo, hi), device=device)
            else:
                gens = generator if isinstance(generator, torch.Generator) else list(generator)[lo:hi]
            outs.append(_decode_chunk(model, rows[lo:hi], seq_len, gens, law, bar))
    finally:
        if bar is not None:
            bar.close()
        for m, mode in was_training:
            m.training = mode
    return ARSampleResult(tokens=torch.cat(outs, 0), nfe=seq_len - P)
