"""The ``duo`` model family's configuration (pure Python: no fairseq2, no torch import needed).

:class:`DuoConfig` mirrors the keyword arguments of :class:`duo_plugin.models.dit.DiT` one to one, so
``DiT(**asdict(config))`` is the model and a native model directory's recorded builder kwargs
(``duo_config.json``) convert to and from it without loss (:func:`config_from_builder_kwargs`,
:func:`config_to_builder_kwargs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Mapping

__all__ = ["DuoConfig", "ARCHS", "config_from_builder_kwargs", "config_to_builder_kwargs"]


@dataclass(kw_only=True)
class DuoConfig:
    """Duo DiT denoiser (docs/method.md §6). Defaults: the paper's "small" model for OWT (K = 50,258, L = 1024)."""

    vocab_size: int = 50258
    max_seq_len: int = 1024
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.1
    causal: bool = False
    time_conditioning: bool = True
    rope_base: float = 10_000.0
    freq_dim: int = 256
    max_period: float = 10_000.0

    def check(self) -> None:
        """Raise ``ValueError`` for sizes the DiT cannot build (called by the fairseq2 factory)."""
        if self.vocab_size < 2 or self.max_seq_len < 1:
            raise ValueError(f"need vocab_size >= 2 and max_seq_len >= 1, got {self.vocab_size}, {self.max_seq_len}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into n_heads={self.n_heads} heads of even size (rotary)")


def _tiny() -> DuoConfig:
    # duo_dit_tiny: 2 x 64 x 4 heads, cond 32 (CPU tests); vocabulary/length are set per use.
    return DuoConfig(vocab_size=512, max_seq_len=128, dim=64, n_layers=2, n_heads=4, cond_dim=32, dropout=0.0)


def _small() -> DuoConfig:
    return DuoConfig()


def _small_lm1b() -> DuoConfig:
    return DuoConfig(vocab_size=30522, max_seq_len=128)


def _medium() -> DuoConfig:
    return DuoConfig(dim=1024, n_layers=24, n_heads=16)


#: Named architectures registered with fairseq2 (``model.arch`` in recipe configs / asset cards).
ARCHS: Dict[str, Callable[[], DuoConfig]] = {
    "duo_tiny": _tiny,
    "duo_small": _small,
    "duo_small_owt": _small,
    "duo_small_lm1b": _small_lm1b,
    "duo_medium": _medium,
}

_FIELDS = None


def _field_names() -> set:
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = {f.name for f in fields(DuoConfig)}
    return _FIELDS


def config_to_builder_kwargs(config: DuoConfig) -> Dict[str, Any]:
    """``DuoConfig`` -> the full keyword set of ``DiT`` / ``duo_dit_*`` (JSON-able)."""
    return asdict(config)


def config_from_builder_kwargs(kwargs: Mapping[str, Any], builder: str | None = None) -> DuoConfig:
    """Recorded builder kwargs (``duo_config.json``) -> ``DuoConfig``.

    ``builder`` is the recorded dotpath; the ``duo_dit_tiny/small/medium`` presets fill in the sizes the
    kwargs do not override. Anything that is not a DiT argument is rejected (not silently dropped).
    """
    from duo_plugin.models import dit as _dit  # plain PyTorch; no fairseq2

    names = _field_names()
    unknown = set(kwargs) - names
    if unknown:
        raise ValueError(f"builder kwargs {sorted(unknown)} are not DiT arguments; cannot express as DuoConfig")
    name = (builder or "").rsplit(".", 1)[-1]
    if name in ("duo_dit_tiny", "duo_dit_small", "duo_dit_medium"):
        # Build on the meta device to read the preset's effective sizes (no memory, no init cost).
        import torch

        with torch.device("meta"):
            m = getattr(_dit, name)(**dict(kwargs))
        base = config_of_module(m)
    elif name in ("", "DiT"):
        base = DuoConfig(**{k: v for k, v in kwargs.items()})
    else:
        raise ValueError(f"builder {builder!r} is not a DiT builder; the fairseq2 duo family covers the DiT only")
    return base


def config_of_module(m) -> DuoConfig:
    blk = m.blocks[0]
    return DuoConfig(
        vocab_size=int(m.vocab_size),
        max_seq_len=int(m.max_seq_len),
        dim=int(m.dim),
        n_layers=len(m.blocks),
        n_heads=int(m.n_heads),
        cond_dim=int(m.sigma_map.mlp[2].out_features),
        mlp_ratio=int(blk.mlp[0].out_features // m.dim),
        dropout=float(blk.dropout),
        causal=bool(m.causal),
        time_conditioning=bool(m.time_conditioning),
        rope_base=float(m.rope_base),
        freq_dim=int(m.sigma_map.freq_dim),
        max_period=float(m.sigma_map.max_period),
    )
