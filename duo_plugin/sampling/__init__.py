"""Samplers for uniform-state diffusion LMs: ancestral / Greedy-Tail and Ψ-samplers (schedulers with a ``step``),
nucleus, temperature, prompts, infilling, prompt guidance, block (semi-autoregressive) and variable-length output.
See docs/sampling.md."""

from duo_plugin.sampling.samplers import (
    NOISE_REMOVAL_MODES,
    DenoiserFn,
    SampleResult,
    apply_temperature,
    nucleus_filter,
    sample,
    sample_blocks,
    time_grid,
    trim_at_eos,
)
from duo_plugin.sampling.base import Scheduler, SchedulerBase, StepNoise
from duo_plugin.sampling.schedulers import (
    PSI_MODES,
    AncestralScheduler,
    PsiSchedule,
    PsiScheduler,
    UniformProcess,
    make_scheduler,
)

__all__ = [
    "NOISE_REMOVAL_MODES",
    "PSI_MODES",
    "AncestralScheduler",
    "DenoiserFn",
    "PsiSchedule",
    "PsiScheduler",
    "SampleResult",
    "Scheduler",
    "SchedulerBase",
    "StepNoise",
    "UniformProcess",
    "apply_temperature",
    "make_scheduler",
    "nucleus_filter",
    "sample",
    "sample_blocks",
    "time_grid",
    "trim_at_eos",
]
