"""SEDD's samplers (Lou et al. 2024, §4.2): the analytic ("Tweedie τ-leaping") and the Euler reverse step over
:class:`duo_plugin.diffusion.sedd.SEDDProcess`, with the scheduler interface of :mod:`duo_plugin.sampling.schedulers`
(``timesteps``, ``step(log_x_theta, t, s, z, StepNoise)``, ``final(..., mode)``).

Each position moves independently given the scores at t (the τ-leaping factorisation every SEDD sampler uses); the
per-position law is :meth:`SEDDProcess.reverse_probs` (float64, negative values clamped, renormalised), drawn by the
race of exponentials from the step's generator(s). The last step denoises to α = 1 (SEDD's final "denoise" step):
``ancestral`` draws from that law, ``greedy`` takes its argmax; an absorbing row never keeps [MASK] there.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.sedd import PREDICTORS, SEDDProcess
from duo_plugin.diffusion.uniform import sample_categorical

from .schedulers import StepNoise, time_grid

__all__ = ["SEDDScheduler"]

_F64 = torch.float64


class SEDDScheduler:
    """Args: process: :class:`~duo_plugin.diffusion.sedd.SEDDProcess`. predictor: ``analytic`` (default; SEDD's
    and the Duo paper's choice) | ``euler``."""

    guidance_weight = 1.0
    uses_counter_stream = False

    def __init__(self, process: SEDDProcess, *, predictor: str = "analytic"):
        if predictor not in PREDICTORS:
            raise ValueError(f"SEDD predictor must be one of {PREDICTORS}, got {predictor!r}")
        self.process, self.predictor = process, predictor

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        return time_grid(steps, t_eps)

    def step(self, log_x_theta: torch.Tensor, t, s, z: torch.Tensor, generator: StepNoise, **_) -> torch.Tensor:
        p = self.process
        probs = p.reverse_probs(log_x_theta, z, p.alpha(t), p.alpha(s), self.predictor)
        return sample_categorical(probs, generator.generator)

    def final(self, log_x_theta: torch.Tensor, t, z: torch.Tensor, generator: StepNoise, mode: str, **_):
        if mode not in ("ancestral", "greedy"):
            raise ValueError(f"noise-removal mode must be 'ancestral' or 'greedy', got {mode!r}")
        p = self.process
        probs = p.reverse_probs(log_x_theta, z, p.alpha(t), torch.ones((), dtype=_F64), self.predictor)
        return probs.argmax(-1) if mode == "greedy" else sample_categorical(probs, generator.generator)
