"""Counter-based random numbers shared bit-for-bit by the PyTorch and Triton paths.

Every draw is a pure function of integer keys, so the forward pass, the recomputing backward, the argmax and
any other implementation (dense reference, chunked PyTorch, Triton) see *the same* noise without storing it.

Construction (SplitMix64 finaliser, Steele et al. 2014, used as a keyed hash; all arithmetic mod 2^64):

* ``mix64(z)``: ``z ^= z >>> 30; z *= C1; z ^= z >>> 27; z *= C2; z ^= z >>> 31``.
* Position key ``k(b, l) = chain(seed_b, stream, *parts, l)`` with ``chain(h, p) = mix64(h + (p + 1) * G)``,
  computed in PyTorch (``O(B*L)``) and passed to every implementation as ``Long[B, L]``.
* Element bits ``z(b, l, j) = mix64(k(b, l) + (j + 1) * G)`` for vocabulary id ``j`` — the only per-element
  hash, implemented identically (same integer ops) in :func:`element_bits` and in the Triton kernels.
* Standard normal (Box–Muller, fp32): ``u1 = (float32(z >>> 32) + 0.5) * 2^-32``,
  ``u2 = (float32((z & 0xFFFFFFFF) >>> 8) + 0.5) * 2^-24``, ``n = sqrt(-2 log u1) * cos(2π u2)``.
* Exponential (fp64, for the sampler's race): ``v = (float64(z >>> 11) + 1) * 2^-53 ∈ (0, 1]``, ``e = -log v``.

PyTorch has no unsigned 64-bit arithmetic, so values live in ``int64`` (two's complement, multiplication wraps)
and logical right shifts are arithmetic shifts followed by a mask; the Triton kernels use ``uint64``.
Both give the same bits.  Transcendentals (log/cos/sqrt) may differ by an ulp between backends.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from duo_plugin.diffusion import streams

__all__ = [
    "GOLDEN",
    "C1",
    "C2",
    "STREAM_CURRICULUM",
    "STREAM_SAMPLER",
    "mix64",
    "uniform_from_bits",
    "mix64_int",
    "position_keys",
    "element_bits",
    "normal_from_bits",
    "exponential_from_bits",
    "counter_normal",
    "counter_exponential",
    "row_seeds",
]

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    """Python int → the int64 with the same low 64 bits."""
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


GOLDEN = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB
_G64, _C1_64, _C2_64 = _s64(GOLDEN), _s64(C1), _s64(C2)

STREAM_CURRICULUM = streams.CURRICULUM  # the stream-tag table: duo_plugin/diffusion/streams.py
STREAM_SAMPLER = streams.SAMPLER


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (bits of a uint64)."""
    z = (z ^ _srl(z, 30)) * _C1_64
    z = (z ^ _srl(z, 27)) * _C2_64
    return z ^ _srl(z, 31)


def mix64_int(z: int) -> int:
    """Python-int version of :func:`mix64` (unsigned result), used to test the tensor version."""
    z &= _M64
    z = ((z ^ (z >> 30)) * C1) & _M64
    z = ((z ^ (z >> 27)) * C2) & _M64
    return z ^ (z >> 31)


def _chain(h: torch.Tensor, p) -> torch.Tensor:
    return mix64(h + (torch.as_tensor(p, dtype=torch.int64, device=h.device) + 1) * _G64)


def position_keys(seeds: torch.Tensor, length: int, stream: int, parts: Sequence[int] = ()) -> torch.Tensor:
    """``Long[B, L]`` keys ``chain(seed_b, stream, *parts, l)``.

    ``seeds``: ``Long[B]`` per-row seeds (e.g. :func:`row_seeds`), ``stream`` separates uses (curriculum vs
    sampler), ``parts`` are extra integers (e.g. the sampler step).
    """
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise TypeError("seeds must be a LongTensor [B] (one seed per batch row, e.g. kernels.row_seeds(...))")
    h = mix64(seeds.clone())
    h = _chain(h, stream)
    for p in parts:
        h = _chain(h, int(p))
    pos = torch.arange(int(length), dtype=torch.int64, device=seeds.device)
    return _chain(h[:, None], pos[None, :])


def element_bits(keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """``mix64(key + (j + 1) * G)`` broadcast over ``keys[..., None]`` and ``vocab_ids`` (int64)."""
    return mix64(keys[..., None] + (vocab_ids.to(torch.int64) + 1) * _G64)


def normal_from_bits(z: torch.Tensor) -> torch.Tensor:
    """fp32 standard normal from 64 random bits (Box–Muller, one normal per 64 bits)."""
    hi = _srl(z, 32).to(torch.float32)
    lo = _srl(z & 0xFFFFFFFF, 8).to(torch.float32)
    u1 = (hi + 0.5) * (2.0**-32)
    u2 = (lo + 0.5) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def uniform_from_bits(z: torch.Tensor) -> torch.Tensor:
    """fp64 uniform in the open interval (0, 1) from 64 random bits: ``(z >>> 11 + 0.5) 2^-53``."""
    return (_srl(z, 11).to(torch.float64) + 0.5) * (2.0**-53)


def exponential_from_bits(z: torch.Tensor) -> torch.Tensor:
    """fp64 Exp(1) from 64 random bits: ``-log(v)``, ``v = (z >>> 11 + 1) 2^-53 ∈ (0, 1]``."""
    v = (_srl(z, 11).to(torch.float64) + 1.0) * (2.0**-53)
    return -torch.log(v)


def counter_normal(keys: torch.Tensor, vocab_size: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """fp32 normals ``[*keys.shape, stop - start]`` for vocabulary ids ``start..stop-1``."""
    stop = int(vocab_size) if stop is None else int(stop)
    j = torch.arange(int(start), stop, dtype=torch.int64, device=keys.device)
    return normal_from_bits(element_bits(keys, j))


def counter_exponential(keys: torch.Tensor, vocab_size: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """fp64 Exp(1) draws ``[*keys.shape, stop - start]`` for vocabulary ids ``start..stop-1``."""
    stop = int(vocab_size) if stop is None else int(stop)
    j = torch.arange(int(start), stop, dtype=torch.int64, device=keys.device)
    return exponential_from_bits(element_bits(keys, j))


def row_seeds(seed: int, step: int, indices, device=None) -> torch.Tensor:
    """``Long[B]`` seeds ``stable_seed(seed, step, index)`` per global sample index (topology-independent noise)."""
    from duo_plugin.diffusion.uniform import stable_seed

    if isinstance(indices, torch.Tensor):
        indices = indices.flatten().tolist()
    return torch.tensor([stable_seed(seed, step, int(i)) for i in indices], dtype=torch.int64, device=device)
