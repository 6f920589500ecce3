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

from .base import SchedulerBase, StepNoise, check_alpha_grid, time_grid

__all__ = ["SEDDScheduler"]

_F64 = torch.float64


class SEDDScheduler(SchedulerBase):
    """Args: process: :class:`~duo_plugin.diffusion.sedd.SEDDProcess`. predictor: ``analytic`` (default; SEDD's
    and the Duo paper's choice; what ``scheduler_for_process`` builds for ``predictor="ancestral"``) | ``euler``.
    ``temperature``/``top_p``/``guidance_weight``/``posterior_impl`` are accepted only at their defaults (SEDD's
    sampler draws from the scores; those options are defined on x_θ). ``reuse_x_theta``: the denoiser ignores σ."""

    def __init__(self, process: SEDDProcess, *, predictor: str = "analytic", temperature: float = 1.0,
                 top_p: float = 1.0, guidance_weight: float = 1.0, posterior_impl: str = "auto",
                 reuse_x_theta: bool = False):
        if predictor not in PREDICTORS:
            raise ValueError(f"SEDD predictor must be one of {PREDICTORS}, got {predictor!r}")
        fixed = (("temperature", temperature, 1.0), ("top_p", top_p, 1.0), ("guidance_weight", guidance_weight, 1.0),
                 ("posterior_impl", posterior_impl, "auto"))
        for key, value, default in fixed:
            if value != default:
                raise ValueError(f"{key}={value!r} is not defined for SEDD's score-based sampler; leave it at "
                                 f"{default!r}")
        self.process, self.predictor = process, predictor
        self.reuse_x_theta = bool(reuse_x_theta)

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        """``linspace(1, t_eps, steps + 1)``; α_t must lie in (0, 1) on it."""
        grid = time_grid(steps, t_eps)
        check_alpha_grid(self.process, grid, low_open=True, high_open=True)
        return grid

    def check_clamp(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        """Clamp values must be ids in [0, W); the uniform graph needs states (valid ids), the absorbing graph refuses
        only its [MASK] id (an unmasked clamp never moves)."""
        p = self.process
        bad = mask & ((values < 0) | (values >= p.vocab_size))
        inside = values.clamp(0, p.vocab_size - 1)
        if p.graph == "uniform":
            bad |= mask & ~p.support.to(values.device)[inside]
        else:
            bad |= mask & (values == p.mask_id)
        if bool(bad.any()):
            raise ValueError("clamp_values must be ids of the SEDD state space (valid ids; not the [MASK] id) at every "
                             "clamped position")

    def step(self, log_x_theta: torch.Tensor, t, s, z: torch.Tensor, generator: StepNoise, *,
             log_x_theta_uncond=None) -> torch.Tensor:
        p = self.process
        probs = p.reverse_probs(log_x_theta, z, p.alpha(t), p.alpha(s), self.predictor)
        return sample_categorical(probs, generator.generator)

    def final(self, log_x_theta: torch.Tensor, t, z: torch.Tensor, generator: StepNoise, mode: str, *,
              log_x_theta_uncond=None):
        if mode not in ("ancestral", "greedy"):
            raise ValueError(f"noise-removal mode must be 'ancestral' or 'greedy', got {mode!r}")
        p = self.process
        probs = p.reverse_probs(log_x_theta, z, p.alpha(t), torch.ones((), dtype=_F64), self.predictor)
        return probs.argmax(-1) if mode == "greedy" else sample_categorical(probs, generator.generator)
