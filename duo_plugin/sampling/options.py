"""Sampler options: one dataclass shared by :func:`duo_plugin.sampling.sample`, ``duo_generate`` and the lm-eval
backend, so an option is added (field, check, config key) in one place.

Update-rule options (``predictor``, ``psi``, ``temperature``, ``top_p``, ``guidance_weight``, ``posterior_impl``) go
to the scheduler (:func:`duo_plugin.sampling.scheduler_for_model`); loop options (``steps``, ``t_eps``,
``noise_removal``, ``chunk_size``, ``progress``) and block options (``n_blocks``, ``block_len``) to the loop. Every
value is checked when the object is built: a bad value is a one-line ``ValueError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .schedulers import POSTERIOR_IMPLS, PREDICTORS, PsiSchedule

__all__ = ["NOISE_REMOVAL_MODES", "SamplerOptions", "SCHEDULER_FIELDS"]

NOISE_REMOVAL_MODES = ("ancestral", "greedy", "none")
#: the fields a scheduler is built from (the rest drive the loop)
SCHEDULER_FIELDS = ("predictor", "psi", "temperature", "top_p", "guidance_weight", "posterior_impl")
_PSI_KEYS = ("high_mode", "middle_mode", "low_mode", "high_frac", "middle_frac", "time_profile")


def _bad(key: str, value: Any, rule: str, fix: str) -> ValueError:
    return ValueError(f"sampler option {key} {rule}, got {value!r}; {fix}")


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample (docs/sampling.md, "Configuration").

    Attributes:
        steps: T, the number of denoising steps (NFE = T + 1 with a noise-removal call).
        noise_removal: ``"ancestral"`` | ``"greedy"`` (Greedy-Tail) | ``"none"``: the call at t_eps after the steps.
        top_p: nucleus mass on x_θ, in (0, 1] (1 = off). temperature: > 0, divides log x_θ (1 = off).
        t_eps: the last time of the grid, in (0, 1).
        predictor: ``"ancestral"`` | ``"psi"``; psi: a :class:`PsiSchedule` or a mapping of its keys (only with
            ``predictor="psi"``; default ``PsiSchedule()``).
        guidance_weight: prompt guidance w (finite; 1 = off, 0 = unconditional).
        posterior_impl: ``"auto"`` | ``"dense"`` | ``"chunked"`` | ``"mixture"`` (uniform-state draw paths).
        chunk_size: sequences per denoiser call (None = all). progress: a progress bar on a terminal.
        n_blocks, block_len: semi-autoregressive windows beyond the context (:func:`~duo_plugin.sampling.sample_blocks`).
    """

    steps: int = 64
    noise_removal: str = "ancestral"
    top_p: float = 1.0
    temperature: float = 1.0
    t_eps: float = 1e-5
    predictor: str = "ancestral"
    psi: Optional[PsiSchedule] = None
    guidance_weight: float = 1.0
    posterior_impl: str = "auto"
    chunk_size: Optional[int] = None
    n_blocks: int = 0
    block_len: int = 0
    progress: bool = field(default=True, compare=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        set_("steps", _int("steps", self.steps, 1, "set steps to the number of denoising steps T (e.g. 64)"))
        if self.noise_removal not in NOISE_REMOVAL_MODES:
            raise _bad("noise_removal", self.noise_removal, f"must be one of {', '.join(NOISE_REMOVAL_MODES)}",
                       "greedy = argmax of x_θ at t_eps (Greedy-Tail), none = no final call")
        top_p = _float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"sampler option top_p must be in (0, 1] (1 = no nucleus truncation), got {self.top_p!r};"
                             " for deterministic final tokens use noise_removal=greedy")
        temp = _float("temperature", self.temperature)
        if not temp > 0.0:
            raise ValueError(f"sampler option temperature must be > 0 (1 = the model's distribution), got "
                             f"{self.temperature!r}; temperature=0 is not greedy decoding here: use "
                             "noise_removal=greedy for deterministic final tokens")
        t_eps = _float("t_eps", self.t_eps)
        if not 0.0 < t_eps < 1.0:
            raise _bad("t_eps", self.t_eps, "must lie in (0, 1)", "the paper uses t_eps=1e-5")
        set_("top_p", top_p)
        set_("temperature", temp)
        set_("t_eps", t_eps)
        set_("guidance_weight", _float("guidance_weight", self.guidance_weight))
        if self.predictor not in PREDICTORS:
            raise _bad("predictor", self.predictor, f"must be one of {', '.join(PREDICTORS)}",
                       "psi selects the Ψ-samplers (settings in psi)")
        self._set_psi()
        if self.posterior_impl not in POSTERIOR_IMPLS:
            raise _bad("posterior_impl", self.posterior_impl, f"must be one of {', '.join(POSTERIOR_IMPLS)}",
                       "auto picks the fastest exact path")
        if self.guidance_weight != 1.0 and self.posterior_impl == "mixture":
            raise _bad("posterior_impl", self.posterior_impl, "cannot draw a guided posterior (guidance_weight != 1)",
                       "set posterior_impl=auto (chunked) or dense")
        if self.chunk_size is not None:
            set_("chunk_size", _int("chunk_size", self.chunk_size, 1, "or None for the whole batch at once"))
        set_("n_blocks", _int("n_blocks", self.n_blocks, 0, "0 = no generation beyond the context"))
        set_("block_len", _int("block_len", self.block_len, 0, "new tokens per window"))
        if self.n_blocks and not self.block_len:
            raise _bad("block_len", self.block_len, "must be >= 1 when n_blocks > 0",
                       "set blocks.block_len (tokens added per window, < seq_len)")
        set_("progress", bool(self.progress))

    def _set_psi(self) -> None:
        psi = self.psi
        if self.predictor != "psi":
            if psi is not None:
                raise _bad("psi", "<settings>", "needs predictor=psi", "set predictor=psi or drop the psi settings")
            return
        if psi is None:
            psi = PsiSchedule()
        elif not isinstance(psi, PsiSchedule):
            try:
                psi = PsiSchedule.from_config(dict(psi))
            except ValueError as e:
                raise ValueError(f"sampler option psi: {e}") from None
        object.__setattr__(self, "psi", psi)

    # ------------------------------------------------------------------------------------------------ building
    def replace(self, **changes) -> "SamplerOptions":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def scheduler_options(self) -> dict:
        """The update-rule options (:data:`SCHEDULER_FIELDS`) as keyword arguments."""
        return {k: getattr(self, k) for k in SCHEDULER_FIELDS}

    @classmethod
    def from_config(cls, cfg: Optional[Mapping], **overrides) -> "SamplerOptions":
        """From a config mapping (``duo_generate``'s keys: ``psi:`` and ``blocks:`` sections, ``batch_size`` = the
        chunk size, ``progress_bar``; or the lm-eval backend's flat ``psi_<key>`` / ``block_len`` model_args). Other
        keys are ignored (the recipe checks its own schema); missing or null keys keep their defaults. The Ψ
        settings are read only with ``predictor=psi``. ``overrides`` win over ``cfg``."""
        cfg = dict(_plain(cfg) or {})
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"psi"}
        for k in names:
            if cfg.get(k) is not None:
                kw[k] = cfg[k]
        if cfg.get("batch_size") is not None and "chunk_size" not in kw:
            kw["chunk_size"] = cfg["batch_size"]
        if cfg.get("progress_bar") is not None and "progress" not in kw:
            kw["progress"] = cfg["progress_bar"]
        blocks = _plain(cfg.get("blocks")) or {}
        for k in ("n_blocks", "block_len"):
            if blocks.get(k) is not None:
                kw[k] = blocks[k]
        psi = dict(_plain(cfg.get("psi")) or {})
        psi.update({k[4:]: cfg[k] for k in cfg if k.startswith("psi_") and k[4:] in _PSI_KEYS})
        kw.update(overrides)
        if kw.get("predictor", "ancestral") == "psi" and "psi" not in overrides:
            kw["psi"] = {k: v for k, v in psi.items() if v is not None}
        return cls(**kw)

    def as_dict(self) -> dict:
        """JSON-friendly values (``psi`` as its mapping, or None)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["psi"] = None if self.psi is None else dict(vars(self.psi))
        return out


def _plain(v):
    """A DictConfig (or any mapping) as a plain dict; other values unchanged."""
    if v is None or isinstance(v, dict):
        return v
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(v, DictConfig):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(v) if isinstance(v, Mapping) else v


def _float(key: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise _bad(key, v, "must be a number", f"write e.g. {key}=1.0") from None
    if isinstance(v, bool) or not math.isfinite(f):
        raise _bad(key, v, "must be a finite number", f"write e.g. {key}=1.0")
    return f


def _int(key: str, v: Any, minimum: int, fix: str) -> int:
    ok = not isinstance(v, bool)
    try:
        f = float(v)
        i = int(f)
        ok = ok and math.isfinite(f) and f == i
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or i < minimum:
        raise _bad(key, v, f"must be an integer >= {minimum}", fix)
    return i
