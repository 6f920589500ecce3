"""Samplers for uniform-state diffusion LMs (ancestral / Greedy-Tail, nucleus, temperature, prompts, infilling)."""

from duo_plugin.sampling.samplers import (
    NOISE_REMOVAL_MODES,
    DenoiserFn,
    SampleResult,
    apply_temperature,
    nucleus_filter,
    sample,
    time_grid,
)

__all__ = [
    "NOISE_REMOVAL_MODES",
    "DenoiserFn",
    "SampleResult",
    "apply_temperature",
    "nucleus_filter",
    "sample",
    "time_grid",
]
