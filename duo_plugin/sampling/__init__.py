"""Sampling for every noise process the toolkit trains: one loop (:func:`sample`) driven by a scheduler
(:class:`Scheduler`: uniform-state ancestral / Greedy-Tail / Ψ, absorbing (MDLM) ancestral / Ψ), picked from a model
folder by :func:`scheduler_for_model`; options in one dataclass (:class:`SamplerOptions`); nucleus, temperature,
prompts, infilling, prompt guidance, block (semi-autoregressive) and variable-length output; :func:`generate` for
any loaded model (AR models decode left to right with a KV cache). See docs/sampling.md."""

from duo_plugin.sampling.base import Clamp, Scheduler, SchedulerBase, StepNoise
from duo_plugin.sampling.generate import generate, generate_continuations, model_kind
from duo_plugin.sampling.mdlm import AbsorbingPsiScheduler, AbsorbingScheduler
from duo_plugin.sampling.options import NOISE_REMOVAL_MODES, SamplerOptions
from duo_plugin.sampling.samplers import (
    DenoiserFn,
    SampleResult,
    apply_temperature,
    nucleus_filter,
    sample,
    sample_blocks,
    time_grid,
    trim_at_eos,
)
from duo_plugin.sampling.schedulers import (
    PSI_MODES,
    AncestralScheduler,
    PsiSchedule,
    PsiScheduler,
    UniformProcess,
    make_scheduler,
)
from duo_plugin.sampling.select import SCHEDULERS, scheduler_for_model, scheduler_for_process

__all__ = [
    "Clamp",
    "NOISE_REMOVAL_MODES",
    "PSI_MODES",
    "SCHEDULERS",
    "AbsorbingPsiScheduler",
    "AbsorbingScheduler",
    "AncestralScheduler",
    "DenoiserFn",
    "PsiSchedule",
    "PsiScheduler",
    "SampleResult",
    "SamplerOptions",
    "Scheduler",
    "SchedulerBase",
    "StepNoise",
    "UniformProcess",
    "apply_temperature",
    "generate",
    "generate_continuations",
    "make_scheduler",
    "model_kind",
    "nucleus_filter",
    "sample",
    "sample_blocks",
    "scheduler_for_model",
    "scheduler_for_process",
    "time_grid",
    "trim_at_eos",
]
