"""The Duo / MDLM "DDiT" denoiser (docs/method.md §6), written from the description, no torchtune.

Architecture (Sahoo et al. 2025, Sec. 5 / App. C.2; the SEDD/MDLM DiT):

* input embedding ``E`` (``K x d``, Kaiming-uniform), accepting hard ids, dense soft *logits*
  (softmax applied inside, Duo Eq. 21 curriculum input ``softmax(w/tau) @ E``) or a sparse top-k
  soft input :class:`SoftTopK`;
* ``n_layers`` pre-LayerNorm blocks (LayerNorm weight only, computed in fp32), rotary q/k
  (base 10,000, rotate-half layout), bidirectional SDPA (``causal=True`` for the AR baseline),
  GELU-tanh MLP x4 (linears with bias; attention projections without), residual dropout;
* adaLN-zero time conditioning on ``sigma = -log alpha_t``: 256-dim sinusoidal features
  (max period 10,000) -> Linear(256, cond) -> SiLU -> Linear(cond, cond) -> SiLU -> per block
  Linear(cond, 6 d) = (shift, scale, gate) for attention and MLP, zero-initialised, so that
  ``x <- x + gate * dropout(f(LN(x) * (1 + scale) + shift))``;
* final layer LayerNorm -> adaLN shift/scale (Linear(cond, 2 d), zero-init) -> Linear(d, K)
  zero-initialised, so ``x_theta`` is exactly uniform at initialisation;
* untied input / output embeddings.

Call convention (docs/architecture.md): ``model(x, sigma, *, padding_mask=None)`` returns
``log_x_theta``: fp32 ``[B, L, K]`` log-probabilities.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Any, Callable, Iterator, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SoftTopK",
    "DenoiserInput",
    "DiT",
    "DiTKVCache",
    "sigma_batch",
    "duo_dit_tiny",
    "duo_dit_small",
    "duo_dit_medium",
    "embed_inputs",
    "input_batch_shape",
    "timestep_embedding",
    "record_builder",
]


class SoftTopK(NamedTuple):
    """Sparse soft input: for every position, ``k`` token ids and their (already normalised) weights.

    ``ids``: LongTensor ``[B, L, k]``; ``weights``: FloatTensor ``[B, L, k]`` (rows sum to 1).
    The embedding is ``sum_j weights[..., j] * E[ids[..., j]]`` (``F.embedding_bag``, mode "sum"),
    which equals the dense soft input ``softmax(logits) @ E`` when ``k = K`` and the weights are
    the softmax probabilities.
    """

    ids: torch.Tensor
    weights: torch.Tensor


DenoiserInput = Union[torch.Tensor, SoftTopK]


def input_batch_shape(x: DenoiserInput) -> Tuple[int, int]:
    """``(B, L)`` of a denoiser input (ids ``[B, L]``, logits ``[B, L, K]`` or :class:`SoftTopK`)."""
    if isinstance(x, SoftTopK):
        if x.ids.dim() != 3:
            raise ValueError(f"SoftTopK.ids must be [B, L, k], got shape {tuple(x.ids.shape)}")
        return int(x.ids.shape[0]), int(x.ids.shape[1])
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"denoiser input must be a LongTensor [B, L], a FloatTensor [B, L, K] of logits or "
            f"duo_plugin.models.SoftTopK, got {type(x).__name__}"
        )
    if x.dim() < 2:
        raise ValueError(f"denoiser input must be [B, L] or [B, L, K], got shape {tuple(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


def embed_inputs(x: DenoiserInput, weight: torch.Tensor) -> torch.Tensor:
    """Embed ids / soft logits / :class:`SoftTopK` with the ``[K, d]`` matrix ``weight``.

    * ``LongTensor [B, L]`` -> ``weight[x]``;
    * ``FloatTensor [B, L, K]`` of **logits** (``w / tau``) -> ``softmax(x) @ weight``; softmax and
      matmul are computed in fp32 (autocast off), the result is cast to ``weight.dtype``;
    * ``SoftTopK(ids [B, L, k], weights [B, L, k])`` -> ``F.embedding_bag(mode="sum")``.

    Returns ``[B, L, d]`` in ``weight.dtype``. Ids are not range-checked (that would force a
    device sync); out-of-range ids raise inside ``F.embedding``.
    """
    K, d = weight.shape
    if isinstance(x, SoftTopK):
        ids, w = x.ids, x.weights
        if ids.dim() != 3 or w.shape != ids.shape:
            raise ValueError(
                f"SoftTopK needs ids and weights of the same shape [B, L, k]; got ids "
                f"{tuple(ids.shape)}, weights {tuple(w.shape)}"
            )
        if ids.is_floating_point() or not w.is_floating_point():
            raise TypeError("SoftTopK.ids must be integer and SoftTopK.weights floating point")
        B, L, k = ids.shape
        if k > K:
            raise ValueError(f"SoftTopK has k={k} > vocabulary width K={K}")
        out = F.embedding_bag(
            ids.reshape(B * L, k),
            weight,
            per_sample_weights=w.reshape(B * L, k).to(weight.dtype),
            mode="sum",
        )
        return out.view(B, L, d)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"unsupported denoiser input type {type(x).__name__}")
    if x.is_floating_point():
        if x.dim() != 3:
            raise ValueError(f"soft input logits must be [B, L, K], got shape {tuple(x.shape)}")
        if x.shape[-1] != K:
            raise ValueError(
                f"soft input has vocabulary width {x.shape[-1]} but the model's embedding has K={K} "
                f"rows; pad/trim the logits to K (use -inf for ids that must get zero weight)"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = torch.softmax(x.float(), dim=-1)
            out = probs @ weight.float()
        return out.to(weight.dtype)
    if x.dtype == torch.bool or x.dim() != 2:
        raise ValueError(
            f"hard input must be an integer tensor [B, L] of token ids, got dtype {x.dtype} and "
            f"shape {tuple(x.shape)}"
        )
    return F.embedding(x, weight)


def timestep_embedding(sigma: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of ``sigma`` ``[B]`` -> fp32 ``[B, dim]`` = ``[cos(sigma f), sin(sigma f)]``,
    with ``f_i = max_period^(-i / (dim/2))``, ``i = 0 .. dim/2 - 1`` (DiT / MDLM ``TimestepEmbedder``)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    )
    args = sigma.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _rotary_cos_sin(seq_len: int, head_dim: int, base: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``[L, head_dim]`` for rotate-half RoPE (angles in float64)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, H, L, hd]``; rotate-half RoPE computed in fp32, returned in ``x.dtype``."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in fp32 (autocast off); returns ``x.dtype``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (self.dim,), eps=self.eps) * self.weight.float()
        return y.to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``x + gate * dropout(y)`` (no dropout kernel when it is the identity). Kept as separate ops: the fused
    ``addcmul`` forms measured within noise on CPU and change the losses by an ulp (docs/performance.md)."""
    if training and p > 0:
        y = F.dropout(y, p, True)
    return x + gate * y


class TimestepEmbedder(nn.Module):
    """sigma ``[B]`` -> sinusoidal(256) -> Linear -> SiLU -> Linear; the caller applies the outer SiLU."""

    def __init__(self, cond_dim: int, freq_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(sigma, self.freq_dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-zero modulation (shift/scale/gate for attention and MLP)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1,
                 causal: bool = False):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim, self.dropout, self.causal = n_heads, dim // n_heads, dropout, causal
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def _pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """adaLN modulation and the q/k/v projections (before rotary): ``(mods, q, k, v)``, q/k/v ``[B, H, L, hd]``."""
        B, L, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return (gate1, shift2, scale2, gate2), qkv[0], qkv[1], qkv[2]

    def _post_attention(self, x: torch.Tensor, a: torch.Tensor, mods) -> torch.Tensor:
        """Output projection of the attention ``a`` ``[B, H, L, hd]``, gated residuals and the MLP."""
        B, L, D = x.shape
        gate1, shift2, scale2, gate2 = mods
        a = self.attn_out(a.transpose(1, 2).reshape(B, L, D))
        x = _gated_residual(x, gate1, a, self.dropout, self.training)
        m = self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return _gated_residual(x, gate2, m, self.dropout, self.training)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        mods, q, k, v = self._pre_attention(x, c)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=self.causal and attn_mask is None
        )
        return self._post_attention(x, a, mods)

    def forward_cached(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        """Causal block on the new positions ``start .. start + s - 1`` (``x``: ``[B, s, d]``): their keys/values
        are written into ``k_cache`` / ``v_cache`` (``[B, H, L_max, hd]``) and the queries attend to every cached
        position up to their own. ``cos`` / ``sin``: the rotary table of the whole cache (``[L_max, hd]``)."""
        s = x.shape[1]
        end = start + s
        mods, q, k, v = self._pre_attention(x, c)
        q, k = _apply_rotary(q, cos[start:end], sin[start:end]), _apply_rotary(k, cos[start:end], sin[start:end])
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        mask = None
        if s > 1:  # query i (position start + i) sees keys 0 .. start + i
            mask = torch.ones(s, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        a = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
                                           dropout_p=0.0)
        return self._post_attention(x, a, mods)


class DiTFinalLayer(nn.Module):
    """LayerNorm -> adaLN shift/scale -> Linear(d, K); both linears zero-initialised."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size, bias=True)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim, bias=True)
        for lin in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def hidden(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)


class DiTEmbedding(nn.Module):
    """Input embedding ``weight``: ``[K, d]``, Kaiming-uniform (a = sqrt 5); see :func:`embed_inputs`."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: DenoiserInput) -> torch.Tensor:
        return embed_inputs(x, self.weight)


def sigma_batch(sigma: Optional[torch.Tensor], B: int, device, time_conditioning: bool) -> torch.Tensor:
    """The time input as ``Float[B]`` (scalar / ``[B]`` / ``[B, 1]`` accepted); zeros without time conditioning."""
    if not time_conditioning:
        return torch.zeros(B, device=device)
    if sigma is None:
        raise ValueError("this denoiser is time-conditioned: pass sigma = -log(alpha_t) as FloatTensor[B]")
    sigma = torch.as_tensor(sigma, device=device)
    if sigma.dim() == 2 and sigma.shape[1] == 1:
        sigma = sigma[:, 0]
    if sigma.dim() == 0:
        sigma = sigma.expand(B)
    if sigma.dim() != 1 or sigma.shape[0] != B:
        raise ValueError(
            f"sigma must be a per-sequence FloatTensor [B]={B} (or [B, 1] / scalar), got shape "
            f"{tuple(sigma.shape)}; per-token sigma is not supported by adaLN conditioning"
        )
    return sigma


def check_padding_mask(padding_mask: Optional[torch.Tensor], B: int, L: int) -> Optional[torch.Tensor]:
    if padding_mask is None:
        return None
    if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (B, L):
        raise ValueError(
            f"padding_mask must be a BoolTensor [B, L]=[{B}, {L}] with True = real token, got dtype "
            f"{padding_mask.dtype} and shape {tuple(padding_mask.shape)}"
        )
    return padding_mask


class DiTKVCache:
    """Keys and values of every block of a causal :class:`DiT` for incremental decoding (:meth:`DiT.forward_cached`).

    ``k[i]`` / ``v[i]``: ``[B, H, max_len, hd]`` of block ``i``; ``pos``: the number of positions written so far (the
    next call's first position); ``cos`` / ``sin``: the rotary table of positions ``0 .. max_len - 1`` (the rows the
    full forward uses at those positions)."""

    def __init__(self, model: "DiT", batch_size: int, max_len: int):
        weight = model.vocab_embed.weight
        hd = model.dim // model.n_heads
        shape = (int(batch_size), model.n_heads, int(max_len), hd)
        self.k = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.blocks]
        self.v = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.blocks]
        self.cos, self.sin = _rotary_cos_sin(int(max_len), hd, model.rope_base, weight.device)
        self.batch_size, self.max_len, self.pos = int(batch_size), int(max_len), 0


class DiT(nn.Module):
    """The Duo DiT denoiser. See the module docstring for the architecture.

    Args:
        vocab_size: ``K`` (input embedding rows and output logits).
        max_seq_len: longest accepted sequence ``L``.
        dim, n_layers, n_heads, cond_dim, mlp_ratio, dropout: sizes (paper small: 768, 12, 12, 128, 4, 0.1).
        causal: causal attention (AR baseline). With ``causal=False`` attention is bidirectional.
        time_conditioning: if False, ``sigma`` is ignored and replaced by zeros (the adaLN path then
            acts as a learned constant, as in the reference code).
        rope_base, freq_dim, max_period: rotary base (10,000), sinusoidal feature size (256) and
            max period (10,000).
        gate_init, output_init_std: initialisation variants for studies (the defaults are the paper's adaLN-zero:
            every block's residual gates start at 0, the output linear at 0 so ``x_theta`` is uniform). A non-zero
            ``gate_init`` sets the bias of both residual gates of every block (the blocks start open, the
            modulation weights stay 0); ``output_init_std`` draws the output linear's weight from N(0, std²)
            (bias 0), after every other initialisation (so the defaults draw the same numbers as before).
    """

    # ``forward`` already returns normalised fp32 log-probabilities: wrappers (e.g. a sampler's denoiser) can skip
    # a second log_softmax over [B, L, K] when this is True.
    output_is_log_probs = True

    def __init__(self, vocab_size: int, max_seq_len: int, *, dim: int = 768, n_layers: int = 12,
                 n_heads: int = 12, cond_dim: int = 128, mlp_ratio: int = 4, dropout: float = 0.1,
                 causal: bool = False, time_conditioning: bool = True, rope_base: float = 10_000.0,
                 freq_dim: int = 256, max_period: float = 10_000.0, gate_init: float = 0.0,
                 output_init_std: float = 0.0):
        super().__init__()
        if vocab_size < 2 or max_seq_len < 1:
            raise ValueError(f"need vocab_size >= 2 and max_seq_len >= 1, got {vocab_size}, {max_seq_len}")
        self._vocab_size, self._max_seq_len = int(vocab_size), int(max_seq_len)
        self.dim, self.n_heads, self.rope_base = dim, n_heads, float(rope_base)
        self.causal, self.time_conditioning = bool(causal), bool(time_conditioning)
        self.vocab_embed = DiTEmbedding(vocab_size, dim)
        self.sigma_map = TimestepEmbedder(cond_dim, freq_dim, max_period)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, n_heads, cond_dim, mlp_ratio, dropout, causal) for _ in range(n_layers)
        )
        self.output_layer = DiTFinalLayer(dim, vocab_size, cond_dim)
        if not (float(output_init_std) >= 0.0 and math.isfinite(float(gate_init))):
            raise ValueError(f"need output_init_std >= 0 and a finite gate_init, got {output_init_std}, {gate_init}")
        with torch.no_grad():
            if gate_init:
                for block in self.blocks:  # (shift1, scale1, gate1, shift2, scale2, gate2) chunks of 6 d
                    block.adaLN_modulation.bias[2 * dim:3 * dim].fill_(float(gate_init))
                    block.adaLN_modulation.bias[5 * dim:6 * dim].fill_(float(gate_init))
            if output_init_std:
                nn.init.normal_(self.output_layer.linear.weight, std=float(output_init_std))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def output_projection(self) -> nn.Linear:
        """The final ``nn.Linear(d, K)``; ``log_softmax(output_projection(h).float())`` == forward."""
        return self.output_layer.linear

    def _attn_mask(self, padding_mask: Optional[torch.Tensor], L: int) -> Optional[torch.Tensor]:
        if padding_mask is None:
            return None
        keys = padding_mask | ~padding_mask.any(dim=-1, keepdim=True)  # an all-pad row attends to all
        if not self.causal:
            return keys[:, None, None, :]  # [B, 1, 1, L], True = attend
        tri = torch.ones(L, L, dtype=torch.bool, device=keys.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=keys.device)
        return (tri & (keys[:, None, :] | eye))[:, None]  # [B, 1, L, L]; a query always sees itself

    def forward_hidden(self, x: DenoiserInput, sigma: Optional[torch.Tensor] = None,
                       padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden state entering :attr:`output_projection`: ``[B, L, d]``."""
        B, L = input_batch_shape(x)
        if L > self._max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len={self._max_seq_len} of this model")
        padding_mask = check_padding_mask(padding_mask, B, L)
        h = self.vocab_embed(x)
        s = sigma_batch(sigma, B, h.device, self.time_conditioning)
        c = F.silu(self.sigma_map(s))
        cos, sin = _rotary_cos_sin(L, self.dim // self.n_heads, self.rope_base, h.device)
        mask = self._attn_mask(padding_mask, L)
        for block in self.blocks:
            h = block(h, c, cos, sin, mask)
        return self.output_layer.hidden(h, c)

    @contextlib.contextmanager
    def kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> Iterator[DiTKVCache]:
        """A fresh :class:`DiTKVCache` for ``batch_size`` rows and ``max_len`` positions (default ``max_seq_len``)
        for :meth:`forward_cached`; causal models only. The cache lives outside the module (nothing to tear down)."""
        if not self.causal:
            raise ValueError("a KV cache is for causal (AR) DiTs; this DiT is bidirectional (causal=False)")
        max_len = self._max_seq_len if max_len is None else int(max_len)
        if not 1 <= max_len <= self._max_seq_len:
            raise ValueError(f"KV cache length {max_len} must be in [1, max_seq_len={self._max_seq_len}]")
        yield DiTKVCache(self, batch_size, max_len)

    def forward_cached(self, x: torch.Tensor, cache: DiTKVCache, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Incremental causal forward: ``log x_theta`` fp32 ``[B, s, K]`` of the ids ``x`` ``Long[B, s]`` placed at
        positions ``cache.pos .. cache.pos + s - 1``, attending to every earlier position through ``cache`` (which
        then advances by ``s``). Equal, up to float rounding, to the rows ``cache.pos ..`` of :meth:`forward` on
        the whole prefix."""
        B, s = input_batch_shape(x)
        start = cache.pos
        if B != cache.batch_size or start + s > cache.max_len:
            raise ValueError(f"forward_cached: {B} rows at positions {start}..{start + s - 1} do not fit a cache of "
                             f"{cache.batch_size} rows x {cache.max_len} positions")
        h = self.vocab_embed(x)
        c = F.silu(self.sigma_map(sigma_batch(sigma, B, h.device, self.time_conditioning)))
        for block, k, v in zip(self.blocks, cache.k, cache.v):
            h = block.forward_cached(h, c, cache.cos, cache.sin, k, v, start)
        cache.pos = start + s
        return torch.log_softmax(self.output_projection(self.output_layer.hidden(h, c)).float(), dim=-1)

    def forward(self, x: DenoiserInput, sigma: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log x_theta``: fp32 ``[B, L, K]`` log-probabilities (Duo Eq. 12's denoiser output).

        ``x``: ids ``Long[B, L]`` | soft logits ``Float[B, L, K]`` | :class:`SoftTopK`;
        ``sigma``: ``-log alpha_t`` ``Float[B]``; ``padding_mask``: ``Bool[B, L]``, True = real token
        (pad keys are not attended to; pad positions still get outputs).
        """
        h = self.forward_hidden(x, sigma, padding_mask)
        return torch.log_softmax(self.output_projection(h).float(), dim=-1)


def record_builder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: the built model gets ``_duo_builder = (dotpath, kwargs)`` so that
    :func:`duo_plugin.models.checkpoint.save_pretrained` can rebuild it (kwargs must be JSON-able)."""

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> nn.Module:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        recorded = {}
        for name, value in bound.arguments.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        model = fn(*args, **kwargs)
        model._duo_builder = (f"{fn.__module__}.{fn.__qualname__}", recorded)
        return model

    wrapper._duo_record_builder = True  # load_pretrained only calls builders carrying this mark
    return wrapper


@record_builder
def duo_dit_tiny(vocab_size: int, max_seq_len: int, dropout: float = 0.0, **overrides: Any) -> DiT:
    """Tiny DiT for CPU tests: 2 layers x 64 x 4 heads, cond 32."""
    cfg = dict(dim=64, n_layers=2, n_heads=4, cond_dim=32, dropout=dropout)
    cfg.update(overrides)
    return DiT(vocab_size, max_seq_len, **cfg)


@record_builder
def duo_dit_small(vocab_size: int = 50258, max_seq_len: int = 1024, dropout: float = 0.1,
                  **overrides: Any) -> DiT:
    """Paper "small" (170M at K = 50,258): 12 layers x 768 x 12 heads, cond 128."""
    cfg = dict(dim=768, n_layers=12, n_heads=12, cond_dim=128, dropout=dropout)
    cfg.update(overrides)
    return DiT(vocab_size, max_seq_len, **cfg)


@record_builder
def duo_dit_medium(vocab_size: int = 50258, max_seq_len: int = 1024, dropout: float = 0.1,
                   **overrides: Any) -> DiT:
    """Paper "medium": 24 layers x 1024 x 16 heads, cond 128."""
    cfg = dict(dim=1024, n_layers=24, n_heads=16, cond_dim=128, dropout=dropout)
    cfg.update(overrides)
    return DiT(vocab_size, max_seq_len, **cfg)
