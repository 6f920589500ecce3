"""Pick the scheduler: from a noise-process object (:func:`scheduler_for_process`) or from a model folder's metadata
(:func:`scheduler_for_model`, as evaluation's ``process_for`` picks the process), with the update-rule options of a
:class:`~duo_plugin.sampling.options.SamplerOptions`.

:data:`SCHEDULERS` maps ``(process.name, predictor)`` to the scheduler class; a new process adds its rows here (its
scheduler implements :class:`~duo_plugin.sampling.base.Scheduler`, usually by subclassing ``SchedulerBase``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from duo_plugin.diffusion.model_process import process_for_metadata

from .base import Scheduler
from .d3pm import D3PMScheduler
from .mdlm import AbsorbingPsiScheduler, AbsorbingScheduler
from .options import SamplerOptions
from .schedulers import AncestralScheduler, PsiScheduler
from .sedd import SEDDScheduler

__all__ = ["SCHEDULERS", "scheduler_for_model", "scheduler_for_process"]

#: (process name, predictor) -> scheduler class; Ψ classes take ``psi`` as their second argument
SCHEDULERS: dict[tuple[str, str], Any] = {
    ("uniform", "ancestral"): AncestralScheduler,
    ("uniform", "psi"): PsiScheduler,
    ("absorbing", "ancestral"): AbsorbingScheduler,
    ("absorbing", "psi"): AbsorbingPsiScheduler,
    ("sedd_absorb", "ancestral"): SEDDScheduler,  # SEDD's analytic (Tweedie) reverse step
    ("sedd_uniform", "ancestral"): SEDDScheduler,
    ("d3pm", "ancestral"): D3PMScheduler,
}


def scheduler_for_process(process, options: Optional[SamplerOptions] = None, *, reuse_x_theta: bool = False,
                          **overrides) -> Scheduler:
    """The scheduler of ``process`` (``process.name`` selects the row of :data:`SCHEDULERS`) configured by
    ``options`` (fields in ``overrides`` win). ``reuse_x_theta``: the denoiser ignores σ (not time-conditioned).
    The result remembers its options (``scheduler.options``) so that :func:`~duo_plugin.sampling.sample` can refuse
    different update-rule options."""
    opts = options if options is not None else SamplerOptions()
    if overrides:
        opts = opts.replace(**overrides)
    name = str(getattr(process, "name", type(process).__name__))
    cls = SCHEDULERS.get((name, opts.predictor))
    if cls is None:
        have = sorted(p for n, p in SCHEDULERS if n == name)
        raise ValueError(f"predictor={opts.predictor!r} has no scheduler for the {name} process"
                         + (f"; available: {', '.join(have)}" if have else ""))
    kw = dict(temperature=opts.temperature, top_p=opts.top_p, guidance_weight=opts.guidance_weight,
              posterior_impl=opts.posterior_impl, reuse_x_theta=reuse_x_theta)
    sched = cls(process, opts.psi, **kw) if opts.predictor == "psi" else cls(process, **kw)
    sched.options = opts
    return sched


def scheduler_for_model(model_or_metadata: Any, options: Optional[SamplerOptions] = None, *, schedule=None,
                        vocab_size: Optional[int] = None, valid_vocab: Optional[torch.Tensor] = None,
                        time_conditioned: Optional[bool] = None, **overrides) -> Scheduler:
    """The scheduler for a model folder's process (``metadata.objective``: Duo/UDLM/DCD → uniform state, MDLM →
    absorbing; :mod:`duo_plugin.diffusion.model_process`).

    Args:
        model_or_metadata: a loaded model (its ``duo_metadata``, ``vocab_size``, ``valid_vocab``, ``causal`` and
            ``time_conditioning`` are read) or the metadata mapping itself (then pass ``vocab_size`` and, as
            needed, ``valid_vocab`` / ``time_conditioned``).
        options: :class:`SamplerOptions` (``overrides``: fields that win over it). schedule: α_t (default
            log-linear, ε = 1e-3).
    Raises:
        ValueError for a causal (``objective: ar``) model: it has no noise process; decode it left to right
        (:func:`duo_plugin.sampling.generate` does either).
    """
    if isinstance(model_or_metadata, Mapping):
        meta, causal = model_or_metadata, False
        if vocab_size is None:
            raise ValueError("scheduler_for_model(metadata) needs vocab_size= (the model's output width)")
        where = "the model folder"
    else:
        model = model_or_metadata
        meta = getattr(model, "duo_metadata", None) or {}
        vocab_size = int(model.vocab_size) if vocab_size is None else vocab_size
        vv = getattr(model, "valid_vocab", None)
        valid_vocab = vv if valid_vocab is None and isinstance(vv, torch.Tensor) else valid_vocab
        causal = bool(getattr(model, "causal", False))
        if time_conditioned is None:
            time_conditioned = bool(getattr(model, "time_conditioning", True))
        where = type(model).__name__
    mp = process_for_metadata(meta, vocab_size=int(vocab_size), valid_vocab=valid_vocab, causal=causal,
                              schedule=schedule, where=where)
    if mp.process is None:
        raise ValueError(f"{where}: objective={mp.objective or 'ar'!r} is autoregressive and has no diffusion "
                         "scheduler; decode it left to right (duo_plugin.sampling.generate)")
    reuse = time_conditioned is not None and not time_conditioned
    return scheduler_for_process(mp.process, options, reuse_x_theta=reuse, **overrides)
