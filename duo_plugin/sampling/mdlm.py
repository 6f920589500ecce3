"""Schedulers of the absorbing (MDLM) process: float64 laws, the scheduler interface of
:mod:`duo_plugin.sampling.base` (one loop, :func:`duo_plugin.sampling.sample`, serves every process).

* :class:`AbsorbingScheduler`: z_s ~ q(z_s | z_t, x_θ) (unmasked tokens stay; a mask is revealed w.p.
  (α_s − α_t)/(1 − α_t)); its ``process`` is a :class:`duo_plugin.diffusion.absorbing.AbsorbingProcess`.
* :class:`AbsorbingPsiScheduler`: the Ψ-sampler of the absorbing process (docs/sampling.md, ReMDM-style remasking)

      q_Ψ(z_s | z_t) = κ_t q(z_s | z_t, x_θ) + (1 − κ_t) Σ_x q(x | z_t, x_θ) q_{α_s}(z_s | x),

  with q(x | z_t, x_θ) the posterior to time 0 (x_θ at the masks, z_t where unmasked) and q_{α_s}(z | x) =
  α_s x + (1 − α_s) m: κ = 1 is the ancestral step; with κ < 1 a decoded token is re-masked w.p.
  (1 − κ)(1 − α_s). κ per step from the same :class:`~duo_plugin.sampling.schedulers.PsiSchedule` (modes and time
  profiles of the official ``sampling.psi`` config) as for the uniform process.
* :func:`sample_mdlm`: the former MDLM entry point, now :func:`duo_plugin.sampling.sample` with an
  :class:`AbsorbingScheduler` (same seeds, same samples).

Both filter x_θ (temperature, nucleus) over the data ids only (never [MASK], never an id outside ``valid_vocab``)
and support prompt guidance (q ∝ q_cond^w q_uncond^(1−w), the unconditional input has the clamped positions
masked, i.e. the absorbing prior). The noise-removal call: ``"greedy"`` = argmax of the filtered x_θ at the
remaining masks (MDLM's default), ``"ancestral"`` = the posterior with α_s = 1 (every mask drawn from x_θ).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from duo_plugin.diffusion import absorbing
from duo_plugin.diffusion.uniform import sample_categorical

from .base import SchedulerBase, StepNoise, check_alpha_grid, time_grid
from .schedulers import PsiSchedule, XThetaFilter, guided_posterior

__all__ = ["AbsorbingScheduler", "AbsorbingPsiScheduler", "sample_mdlm"]

_F64 = torch.float64


class AbsorbingScheduler(SchedulerBase):
    """The ancestral update of the absorbing process (float64 posterior, race of exponentials from the torch
    generator(s) in ``StepNoise.generator``).

    Args:
        process: :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess` (schedule, mask id, valid ids).
        temperature, top_p: applied to x_θ before the posterior (1.0 = off).
        guidance_weight: prompt guidance w (1.0 = off). posterior_impl: ``"auto"`` or ``"dense"`` (the absorbing
            law is always drawn densely). reuse_x_theta: the denoiser ignores σ (MDLM's x_θ cache).
    """

    predictor = "ancestral"

    def __init__(self, process: absorbing.AbsorbingProcess, *, temperature: float = 1.0, top_p: float = 1.0,
                 guidance_weight: float = 1.0, posterior_impl: str = "auto", reuse_x_theta: bool = False):
        if posterior_impl not in ("auto", "dense"):
            raise ValueError(f"posterior_impl={posterior_impl!r} selects a uniform-state draw path; the absorbing "
                             "(MDLM) process draws its dense float64 law: set posterior_impl=auto")
        w = float(guidance_weight)
        if not math.isfinite(w):
            raise ValueError(f"guidance_weight must be a finite number, got {guidance_weight}")
        self.process = process
        data = torch.ones(process.vocab_size, dtype=torch.bool)
        data[process.mask_id] = False
        if process.valid_vocab is not None:
            data &= process.valid_vocab.cpu()
        if not bool(data.any()):
            raise ValueError("valid_vocab leaves no data id besides [MASK]")
        self.filter = XThetaFilter(temperature, top_p, data)
        self._fill = int(torch.nonzero(data)[0])
        self.guidance_weight = w
        self.reuse_x_theta = bool(reuse_x_theta)

    @property
    def fill_id(self) -> int:
        """The smallest data id: what the loop writes at clamped positions before a step (a clamp value such as BOS
        need not be a data id; the law there is never used)."""
        return self._fill

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        """``linspace(1, t_eps, steps + 1)``; α_t must lie in [0, 1) on it."""
        grid = time_grid(steps, t_eps)
        check_alpha_grid(self.process, grid, low_open=False, high_open=True)
        return grid

    def check_clamp(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        bad = mask & ((values < 0) | (values >= self.process.vocab_size) | (values == self.process.mask_id))
        if bool(bad.any()):
            raise ValueError("clamp_values must be token ids in [0, vocab_size) other than the [MASK] id at every "
                             "clamped position")

    def kappa(self, index: int) -> float:
        """Weight of the ancestral posterior at step ``index`` (1 for the ancestral sampler)."""
        return 1.0

    def step(self, log_x_theta: torch.Tensor, t, s, z: torch.Tensor, generator: StepNoise, *,
             log_x_theta_uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One update ``z_t → z_s`` (``Long[B, L]``) from ``log x_θ(z_t, σ_t)`` ``[B, L, W]``."""
        p = self.process
        law = self.law(z, log_x_theta, p.alpha(t), p.alpha(s), self.kappa(generator.index), log_x_theta_uncond)
        return sample_categorical(law, generator.generator)

    def final(self, log_x_theta: torch.Tensor, t, z: torch.Tensor, generator: StepNoise, mode: str, *,
              log_x_theta_uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise removal at ``t``: ``"greedy"`` = argmax of the filtered conditional x_θ at the remaining masks;
        ``"ancestral"`` = the posterior with α_s = 1 (κ = 1 for every predictor)."""
        if mode == "greedy":
            x = self.filter(log_x_theta)
            return torch.where(z == self.process.mask_id, x.argmax(-1), z)
        if mode != "ancestral":
            raise ValueError(f"noise-removal mode must be 'ancestral' or 'greedy', got {mode!r}")
        law = self.law(z, log_x_theta, self.process.alpha(t), torch.ones((), dtype=_F64), 1.0, log_x_theta_uncond)
        return sample_categorical(law, generator.generator)

    def law(self, z, log_x_theta, alpha_t, alpha_s, kappa: float = 1.0, log_x_theta_uncond=None) -> torch.Tensor:
        """The step's law ``float64 [B, L, W]``: κ q(z_s | z_t, x_θ) + (1 − κ) q_{α_s}(q(x | z_t, x_θ)), each
        posterior guided when ``log_x_theta_uncond`` is given and w ≠ 1."""
        p, f = self.process, self.filter
        guided = log_x_theta_uncond is not None and self.guidance_weight != 1.0

        def post(a_s):
            # The process's posterior without its valid_vocab: the filter has already restricted x_θ to the data
            # ids and renormalised (renormalising twice could change the last bits of the draws).
            q = absorbing.posterior(z, f(log_x_theta), alpha_t, a_s, p.mask_id)
            if guided:
                q = guided_posterior(q, absorbing.posterior(z, f(log_x_theta_uncond), alpha_t, a_s, p.mask_id),
                                     self.guidance_weight)
            return q

        q = post(alpha_s)
        if kappa < 1.0:
            q = kappa * q + (1.0 - kappa) * p.marginal(post(torch.ones((), dtype=_F64)), alpha_s)
        return q


class AbsorbingPsiScheduler(AbsorbingScheduler):
    """The Ψ-sampler of the absorbing process: step i draws from κ_i q(z_s | z_t, x_θ) + (1 − κ_i) q_{α_s}(q(x | z_t,
    x_θ)) on the grid of ``psi.time_profile`` (one denoiser call per step, as the ancestral sampler)."""

    predictor = "psi"

    def __init__(self, process: absorbing.AbsorbingProcess, psi: Optional[PsiSchedule] = None, **kwargs):
        super().__init__(process, **kwargs)
        self.psi = psi if psi is not None else PsiSchedule()
        self._kappas: Optional[torch.Tensor] = None

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        grid = self.psi.time_grid(steps, t_eps, self.process)
        check_alpha_grid(self.process, grid, low_open=False, high_open=True)
        self._kappas = self.psi.kappas(grid, self.process.alpha)
        return grid

    def kappa(self, index: int) -> float:
        if self._kappas is None:
            raise RuntimeError("call AbsorbingPsiScheduler.timesteps(steps, t_eps) before step()")
        return float(self._kappas[int(index)])


def sample_mdlm(
    denoiser,
    process: absorbing.AbsorbingProcess,
    options=None,
    *,
    batch_size: int,
    seq_len: int,
    time_conditioned: bool = True,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    device=None,
    return_nfe: bool = False,
    clamp=None,
    **option_kwargs,
):
    """Draw ``Long[batch_size, seq_len]`` from an MDLM denoiser ``denoiser(z, sigma) -> log-probs [B, L, W]``: the
    one sampling loop, :func:`duo_plugin.sampling.sample`, with an :class:`AbsorbingScheduler` (or
    :class:`AbsorbingPsiScheduler` with ``predictor="psi"``).

    ``process``: the :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess` (W = data ids + the mask row, the
    [MASK] id, ``valid_vocab`` ``Bool[W]`` the ids x_θ may produce — the mask id always excluded — and its schedule).
    ``options``: the :class:`~duo_plugin.sampling.SamplerOptions` (None: the defaults with ``noise_removal="greedy"``,
    MDLM's); ``option_kwargs``: any of its fields (``steps``, ``noise_removal``, ``temperature``, ``top_p``,
    ``t_eps``, ``predictor``, ``psi``, ``guidance_weight``, ...) replacing the value in ``options``. Never shows a
    progress line. ``time_conditioned=False`` turns on the x_θ cache (the network ignores σ, so x_θ only changes
    when z does). Exactly one of ``generator`` (one, or one per row) / ``seed`` (→ ``row_generators(seed, 0,
    range(B))``). Returns the tokens, or ``(tokens, nfe)`` with ``return_nfe=True``. No [MASK] is left unless
    ``noise_removal="none"``.

    Conditioning (prompts, infilling): ``clamp`` = :class:`~duo_plugin.sampling.base.Clamp` ``(mask, values)``:
    ``mask`` ``Bool[L]`` or ``Bool[B, L]`` marks positions that start as ``values`` (``Long[L]`` / ``Long[B, L]``,
    token ids other than [MASK]; BOS is fine) instead of [MASK]. The
    absorbing posterior never changes an unmasked token, so they stay, and the chain is exactly the model's reverse
    process started from that partially masked state (the conditional given the clamped tokens, as far as x_θ is).
    """
    import dataclasses

    from .options import SamplerOptions
    from .samplers import sample
    from .select import scheduler_for_process

    base = SamplerOptions(noise_removal="greedy") if options is None else options
    opts = dataclasses.replace(base, **option_kwargs, progress=False)
    sched = scheduler_for_process(process, opts, reuse_x_theta=not time_conditioned)
    res = sample(denoiser, sched, batch_size=batch_size, seq_len=seq_len, options=opts, clamp=clamp,
                 generator=generator, seed=seed, device=device, return_trajectory=True)
    return (res.tokens, res.nfe) if return_nfe else res.tokens
