"""Turn a stock torchtune ``TransformerDecoder`` into a Duo denoiser without forking it.

:func:`make_denoiser` does three things:

1. every ``MultiHeadAttention`` gets ``is_causal = False``: with ``mask=None`` and no KV cache
   torchtune then calls SDPA with ``is_causal=False`` and no mask tensor (flash-capable);
2. the class of the existing ``tok_embeddings`` module is changed **in place** to
   :class:`SoftInputEmbedding` (an ``nn.Embedding`` subclass), so ``TiedLinear`` tying and the
   state-dict keys are unchanged; it accepts ids, dense soft *logits* (softmax inside) and
   :class:`~duo_plugin.models.dit.SoftTopK`;
3. the decoder is wrapped in :class:`DecoderDenoiser`, which follows the denoiser call convention
   ``model(x, sigma, *, padding_mask=None) -> log_x_theta`` (fp32 ``[B, L, K]``) and optionally
   owns adaLN-zero time conditioning **outside** the decoder (Duo §6: sigma = -log alpha_t ->
   sinusoidal(256) -> Linear -> SiLU -> Linear -> SiLU -> per layer Linear(cond, 6 d)); the
   modulation is ``norm(h) * (1 + scale) + shift`` and ``h + (1 + gate) * f(...)`` so that at
   zero init the model equals the plain bidirectional decoder exactly.

``shift=True`` reuses the AR head: the distribution for token ``i`` is read from the hidden state
at ``i - 1`` (``logits[:, i] = head(h[:, i-1])`` for ``i >= 1``). Position 0 has no left
neighbour; it uses its **own** hidden state (``logits[:, 0] = head(h[:, 0])``, as in Dream/DiffuLLaMA).
:meth:`DecoderDenoiser.forward_hidden` returns the shifted hidden states, so
``log_softmax(output_projection(forward_hidden(...)))`` equals the forward output in both modes.

Limitations: with ``time_conditioning=True`` the wrapper calls each layer's ``sa_norm/attn/mlp_norm/
mlp`` directly, so per-layer FSDP2 ``fully_shard(layer)`` hooks and torchtune's per-layer
activation-checkpoint wrappers are bypassed (they still work with ``time_conditioning=False``,
which calls ``layer(h, mask=...)``). KV caches must not be set up for the full forward; causal (AR) models decode
incrementally with torchtune's caches through :meth:`DecoderDenoiser.kv_cache` / :meth:`DecoderDenoiser.forward_cached`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtune.modules import MultiHeadAttention, TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache

from duo_plugin.models.dit import (
    DenoiserInput,
    SoftTopK,
    TimestepEmbedder,
    sigma_batch,
    check_padding_mask,
    embed_inputs,
    input_batch_shape,
)

__all__ = ["SoftInputEmbedding", "DecoderDenoiser", "DecoderKVCache", "make_denoiser"]

log = logging.getLogger(__name__)


class SoftInputEmbedding(nn.Embedding):
    """``nn.Embedding`` that also takes soft logits ``[B, L, K]`` and :class:`SoftTopK`.

    Installed by changing ``__class__`` of an existing ``nn.Embedding`` (no new parameters).
    """

    def forward(self, x: DenoiserInput) -> torch.Tensor:  # type: ignore[override]
        if isinstance(x, SoftTopK) or x.is_floating_point():
            return embed_inputs(x, self.weight)
        return super().forward(x)


def _out_features(output, vocab_size: int) -> int:
    if hasattr(output, "tied_module"):
        return output.tied_module.weight.shape[0]
    for attr in ("out_features", "out_dim"):
        if hasattr(output, attr):
            return int(getattr(output, attr))
    weight = getattr(output, "weight", None)
    return int(weight.shape[0]) if weight is not None else vocab_size


@dataclasses.dataclass
class DecoderKVCache:
    """Position bookkeeping of :meth:`DecoderDenoiser.kv_cache` (the keys/values live in torchtune's caches)."""

    batch_size: int
    max_len: int
    pos: int = 0


class DecoderDenoiser(nn.Module):
    """A torchtune decoder used as a Duo denoiser (see module docstring).

    Args:
        decoder: a ``TransformerDecoder`` already made bidirectional / soft-input (use
            :func:`make_denoiser`, which does that and builds this wrapper).
        time_conditioning: own adaLN-zero parameters (``sigma_map``, ``adaln``, ``final_adaln``)
            and condition on ``sigma``; if False, ``sigma`` is ignored.
        shift: predict token ``i`` from the hidden state at ``i - 1`` (position 0: its own state).
        causal: causal attention (an explicit lower-triangular mask, ANDed with padding / ``attn_mask``): the
            same decoder trained as an AR model (``objective: ar``; position ``i`` predicts token ``i + 1``).
        cond_dim, freq_dim, max_period: adaLN conditioning width, sinusoidal size and max period.

    State dict: ``decoder.*`` (the decoder's own keys, see :meth:`decoder_state_dict`) plus the
    extra adaLN keys (:meth:`extra_state_dict`), saved beside the HF checkpoint.
    """

    def __init__(self, decoder: TransformerDecoder, *, time_conditioning: bool = False,
                 shift: bool = False, cond_dim: int = 128, freq_dim: int = 256,
                 max_period: float = 10_000.0, causal: bool = False):
        super().__init__()
        if not isinstance(decoder.tok_embeddings, nn.Embedding):
            raise TypeError(
                f"decoder.tok_embeddings must be an nn.Embedding, got {type(decoder.tok_embeddings).__name__}"
            )
        self.decoder = decoder
        self.time_conditioning, self.shift = bool(time_conditioning), bool(shift)
        self.causal = bool(causal)
        if self.causal and self.shift:
            raise ValueError("causal=True (AR training) reads token i+1 from position i; shift must be False")
        K = decoder.tok_embeddings.num_embeddings
        self._vocab_size = int(K)
        out = _out_features(decoder.output, K)
        if out != K:
            raise ValueError(
                f"decoder output width {out} != input embedding rows {K}; a Duo denoiser needs the "
                f"same vocabulary K on both sides"
            )
        d = decoder.tok_embeddings.embedding_dim
        if self.time_conditioning:
            self.sigma_map = TimestepEmbedder(cond_dim, freq_dim, max_period)
            self.adaln = nn.ModuleList(nn.Linear(cond_dim, 6 * d) for _ in decoder.layers)
            self.final_adaln = nn.Linear(cond_dim, 2 * d)
            for lin in [*self.adaln, self.final_adaln]:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # -- contract ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_seq_len(self) -> int:
        return int(self.decoder.max_seq_len)

    @property
    def output_projection(self):
        """The decoder's ``output`` (``nn.Linear`` or torchtune ``TiedLinear``)."""
        return self.decoder.output

    def _mask(self, padding_mask: Optional[torch.Tensor], L: int, attn_mask: Optional[torch.Tensor] = None,
              B: int = 1) -> Optional[torch.Tensor]:
        pad = None
        if padding_mask is not None:
            keys = padding_mask | ~padding_mask.any(dim=-1, keepdim=True)
            eye = torch.eye(L, dtype=torch.bool, device=keys.device)
            pad = keys[:, None, :] | eye  # [B, L, L], True = attend; a query always sees itself
        if attn_mask is None:
            return pad
        # attention-mask annealing: an extra Bool [L, L] or [B, L, L] mask (True = attend), ANDed
        # with the padding mask; the diagonal is always kept so no query row is empty.
        if attn_mask.dtype != torch.bool or attn_mask.shape[-2:] != (L, L) or attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be Bool [L, L] or [B, L, L] with L={L}; got "
                             f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        am = attn_mask | torch.eye(L, dtype=torch.bool, device=attn_mask.device)
        am = am.expand(B, L, L) if am.dim() == 2 else am
        return am if pad is None else (am.to(pad.device) & pad)

    def forward_hidden(self, x: DenoiserInput, sigma: Optional[torch.Tensor] = None,
                       padding_mask: Optional[torch.Tensor] = None,
                       attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states entering :attr:`output_projection`: ``[B, L, d]`` (already shifted).
        ``attn_mask``: optional Bool ``[L, L]``/``[B, L, L]`` (True = attend), e.g. an annealed causal→full
        mask (:func:`duo_plugin.training.adapt.annealed_attention_mask`); None = full attention."""
        B, L = input_batch_shape(x)
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len={self.max_seq_len} of this model")
        if getattr(self.decoder, "caches_are_enabled", lambda: False)():
            raise RuntimeError("KV caches are set up on the decoder; call decoder.reset_caches()/"
                               "teardown before using it as a bidirectional denoiser")
        if self.causal:
            tril = torch.ones(L, L, dtype=torch.bool, device=self.decoder.tok_embeddings.weight.device).tril()
            attn_mask = tril if attn_mask is None else (attn_mask.to(tril.device) & tril)
        mask = self._mask(check_padding_mask(padding_mask, B, L), L, attn_mask, B)
        h = self._layers(self.decoder.tok_embeddings(x), sigma, mask, None)
        if self.shift:
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        return h

    def _layers(self, h: torch.Tensor, sigma: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                input_pos: Optional[torch.Tensor]) -> torch.Tensor:
        """The decoder layers and final norm (with the adaLN modulation when time-conditioned) on embeddings ``h``."""
        dec = self.decoder
        if not self.time_conditioning:
            for layer in dec.layers:
                h = layer(h, mask=mask, input_pos=input_pos)
            return dec.norm(h)
        c = F.silu(self.sigma_map(sigma_batch(sigma, h.shape[0], h.device, True)))
        for layer, ada in zip(dec.layers, self.adaln):
            sh1, sc1, g1, sh2, sc2, g2 = ada(c)[:, None].chunk(6, dim=-1)
            a_in = layer.sa_norm(h) * (1 + sc1) + sh1
            a = layer.attn(a_in, a_in, mask=mask, input_pos=input_pos)
            h = h + (1 + g1) * layer.sa_scale(a)
            m = layer.mlp(layer.mlp_norm(h) * (1 + sc2) + sh2)
            h = h + (1 + g2) * layer.mlp_scale(m)
        sh, sc = self.final_adaln(c)[:, None].chunk(2, dim=-1)
        return dec.norm(h) * (1 + sc) + sh

    @contextlib.contextmanager
    def kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> Iterator["DecoderKVCache"]:
        """torchtune KV caches (``setup_caches`` through ``local_kv_cache``) on the decoder for ``batch_size`` rows and
        ``max_len`` positions (default ``max_seq_len``), deleted on exit; causal (AR) models only. Inside, use
        :meth:`forward_cached` (the full forward refuses to run while caches are set up)."""
        if not self.causal:
            raise ValueError("a KV cache is for causal (AR) decoders; this denoiser is bidirectional (causal=False)")
        max_len = self.max_seq_len if max_len is None else int(max_len)
        if not 1 <= max_len <= self.max_seq_len:
            raise ValueError(f"KV cache length {max_len} must be in [1, max_seq_len={self.max_seq_len}]")
        w = self.decoder.tok_embeddings.weight
        with local_kv_cache(self.decoder, batch_size=int(batch_size), device=w.device, dtype=w.dtype,
                            decoder_max_seq_len=max_len):
            yield DecoderKVCache(int(batch_size), max_len)

    def forward_cached(self, x: torch.Tensor, cache: "DecoderKVCache",
                       sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Incremental causal forward through the torchtune caches: fp32 ``log x_theta`` ``[B, s]`` of the ids ``x``
        ``Long[B, s]`` at positions ``cache.pos .. cache.pos + s - 1`` (rotary at those positions, keys up to each
        query's own position); ``cache.pos`` advances by ``s``."""
        B, s = input_batch_shape(x)
        start = cache.pos
        if B != cache.batch_size or start + s > cache.max_len:
            raise ValueError(f"forward_cached: {B} rows at positions {start}..{start + s - 1} do not fit a cache of "
                             f"{cache.batch_size} rows x {cache.max_len} positions")
        dev = self.decoder.tok_embeddings.weight.device
        pos = torch.arange(start, start + s, device=dev)
        mask = (torch.arange(cache.max_len, device=dev)[None, :] <= pos[:, None]).expand(B, s, cache.max_len)
        h = self._layers(self.decoder.tok_embeddings(x), sigma, mask, pos.expand(B, s))
        cache.pos = start + s
        return torch.log_softmax(self.output_projection(h).float(), dim=-1)

    def forward(self, x: DenoiserInput, sigma: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log x_theta``: fp32 ``[B, L, K]``. ``x``: ids ``[B, L]`` | logits ``[B, L, K]`` |
        :class:`SoftTopK`; ``sigma``: ``Float[B]`` (ignored without time conditioning);
        ``padding_mask``: ``Bool[B, L]``, True = real token (pad keys are not attended to)."""
        h = self.forward_hidden(x, sigma, padding_mask, attn_mask)
        return torch.log_softmax(self.output_projection(h).float(), dim=-1)

    def init_weights(self, std: float = 0.02) -> None:
        """From-scratch init (``duo_pretrain`` calls it when there is no ``init_from``): every ``nn.Linear`` and
        ``nn.Embedding`` of the decoder ~ N(0, std²) (GPT-2 style), biases 0; norms and the zero-initialised adaLN
        are left as built.  torchtune's builders keep PyTorch's defaults (N(0, 1) embeddings, which with a tied head
        give logits of scale sqrt(d)), which suit loading pretrained weights, not training from scratch."""
        with torch.no_grad():
            for m in self.decoder.modules():
                if isinstance(m, nn.Embedding):
                    m.weight.normal_(0.0, std)
                elif isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, std)
                    if m.bias is not None:
                        m.bias.zero_()

    # -- state dict helpers (HF checkpoint = decoder keys; extras saved beside) -------------------
    def decoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """The decoder's own state dict (torchtune keys, e.g. ``tok_embeddings.weight``)."""
        return self.decoder.state_dict()

    def extra_state_dict(self) -> Dict[str, torch.Tensor]:
        """Parameters owned by the wrapper (adaLN); empty without time conditioning."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("decoder.")}

    def load_decoder_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):
        return self.decoder.load_state_dict(state_dict, strict=strict)

    def load_extra_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        expected = self.extra_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"extra (adaLN) parameters do not match this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (time_conditioning={self.time_conditioning}, "
                f"{len(self.decoder.layers)} layers)"
            )
        for k, v in state_dict.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"extra parameter {k}: checkpoint shape {tuple(v.shape)} != model "
                                 f"shape {tuple(expected[k].shape)}")
        with torch.no_grad():
            for k, v in state_dict.items():
                expected[k].copy_(v)


def make_denoiser(decoder: TransformerDecoder, *, time_conditioning: bool = False, shift: bool = False,
                  cond_dim: int = 128, causal: bool = False) -> DecoderDenoiser:
    """Make ``decoder`` bidirectional and soft-input **in place** and wrap it in :class:`DecoderDenoiser`
    (``causal=True``: the wrapper applies an explicit causal mask, for AR training of the same architecture)."""
    n = 0
    for m in decoder.modules():
        if isinstance(m, MultiHeadAttention):
            m.is_causal = False
            n += 1
    if n == 0:
        raise TypeError("no torchtune MultiHeadAttention found in decoder; cannot make it bidirectional")
    emb = decoder.tok_embeddings
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"decoder.tok_embeddings must be an nn.Embedding, got {type(emb).__name__}")
    if type(emb) is nn.Embedding:
        emb.__class__ = SoftInputEmbedding
    elif not isinstance(emb, SoftInputEmbedding):
        raise TypeError(f"unsupported embedding subclass {type(emb).__name__}")
    return DecoderDenoiser(decoder, time_conditioning=time_conditioning, shift=shift, cond_dim=cond_dim,
                           causal=causal)
