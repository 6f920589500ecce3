"""Ancestral sampling for the absorbing (MDLM) process: float64 posterior, with the x_θ cache.

* :class:`AbsorbingScheduler`: the update rule with the scheduler interface of :mod:`duo_plugin.sampling.schedulers`
  (``timesteps``, ``step(log_x_theta, t, s, z, generator: StepNoise)``, ``final(..., mode)``); its ``process`` is a
  :class:`duo_plugin.diffusion.absorbing.AbsorbingProcess`.
* :func:`sample_mdlm`: the loop — start from all-[MASK], ``steps`` ancestral steps on ``linspace(1, t_eps, steps +
  1)``, then remove the remaining noise (``"greedy"``: argmax x_θ at the masks, MDLM's default; ``"ancestral"``: one
  more posterior step to α = 1, i.e. sample x_θ at every mask; ``"none"``), reusing x_θ while z is unchanged when the
  network is not time-conditioned.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from duo_plugin.diffusion import absorbing
from duo_plugin.diffusion.uniform import row_generators, sample_categorical

from .schedulers import StepNoise, XThetaFilter, time_grid

__all__ = ["AbsorbingScheduler", "sample_mdlm"]

_F64 = torch.float64


class AbsorbingScheduler:
    """z_s ~ q(z_s | z_t, x_θ) of the absorbing process (float64 posterior, race of exponentials from the torch
    generator(s) in ``StepNoise.generator``); x_θ filtered (temperature, nucleus) over the data ids only.

    Args:
        process: :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess` (schedule, mask id, valid ids).
        temperature, top_p: applied to x_θ before the posterior (1.0 = off).
    """

    predictor = "ancestral"
    guidance_weight = 1.0
    uses_counter_stream = False

    def __init__(self, process: absorbing.AbsorbingProcess, *, temperature: float = 1.0, top_p: float = 1.0):
        self.process = process
        data = torch.ones(process.vocab_size, dtype=torch.bool)
        data[process.mask_id] = False
        if process.valid_vocab is not None:
            data &= process.valid_vocab.cpu()
        self.filter = XThetaFilter(temperature, top_p, data)

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        return time_grid(steps, t_eps)

    def step(self, log_x_theta: torch.Tensor, t, s, z: torch.Tensor, generator: StepNoise, **_) -> torch.Tensor:
        """One update ``z_t → z_s``: unmasked tokens stay; a mask is revealed w.p. (α_s − α_t)/(1 − α_t)."""
        p = self.process
        return self._draw(log_x_theta, z, p.alpha(t), p.alpha(s), generator)

    def final(self, log_x_theta: torch.Tensor, t, z: torch.Tensor, generator: StepNoise, mode: str, **_):
        """Noise removal at ``t``: ``"greedy"`` = argmax of the filtered x_θ at the remaining masks; ``"ancestral"``
        = the posterior with α_s = 1 (every mask drawn from x_θ)."""
        if mode == "greedy":
            x = self.filter(log_x_theta)
            return torch.where(z == self.process.mask_id, x.argmax(-1), z)
        if mode != "ancestral":
            raise ValueError(f"noise-removal mode must be 'ancestral' or 'greedy', got {mode!r}")
        return self._draw(log_x_theta, z, self.process.alpha(t), torch.ones((), dtype=_F64), generator)

    def _draw(self, lx, z, alpha_t, alpha_s, noise: StepNoise) -> torch.Tensor:
        p = self.process
        # The process's posterior without its valid_vocab: the filter has already restricted x_θ to the valid data
        # ids and renormalised (renormalising twice could change the last bits of the draws).
        probs = absorbing.posterior(z, self.filter(lx), alpha_t, alpha_s, p.mask_id)
        return sample_categorical(probs, noise.generator)


def sample_mdlm(
    denoiser,
    schedule=None,
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    mask_id: int,
    steps: int,
    noise_removal: str = "greedy",
    time_conditioned: bool = True,
    valid_vocab: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    t_eps: float = 1e-5,
    device=None,
    return_nfe: bool = False,
    clamp_mask: Optional[torch.Tensor] = None,
    clamp_values: Optional[torch.Tensor] = None,
):
    """Draw ``Long[batch_size, seq_len]`` from an MDLM denoiser ``denoiser(z, sigma) -> log-probs [B, L, W]``.

    ``vocab_size`` = W (data ids + the mask row), ``mask_id`` the [MASK] id, ``valid_vocab`` ``Bool[W]`` the ids x_θ
    may produce (the mask id is always excluded).  ``time_conditioned=False`` turns on the x_θ cache (the network
    ignores σ, so x_θ only changes when z does).  Exactly one of ``generator`` (one, or one per row) / ``seed``
    (→ ``row_generators(seed, 0, range(B))``).  Returns the tokens, or ``(tokens, nfe)`` with ``return_nfe=True``.
    No [MASK] is left unless ``noise_removal="none"``.

    Conditioning (prompts, infilling): ``clamp_mask`` ``Bool[L]`` or ``Bool[B, L]`` marks positions that start as
    ``clamp_values`` (``Long[L]`` / ``Long[B, L]``, token ids other than [MASK]; BOS is fine) instead of [MASK]. The absorbing posterior never changes
    an unmasked token, so they stay, and the chain is exactly the model's reverse process started from that
    partially masked state (the conditional given the clamped tokens, as far as x_θ is).
    """
    if noise_removal not in ("greedy", "ancestral", "none"):
        raise ValueError(f"noise_removal must be 'greedy', 'ancestral' or 'none'; got {noise_removal!r}")
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = row_generators(int(seed), 0, range(batch_size), device=device) if seed is not None else generator
    proc = absorbing.AbsorbingProcess(vocab_size, mask_id, valid_vocab=valid_vocab, schedule=schedule)
    scheduler = AbsorbingScheduler(proc, temperature=temperature, top_p=top_p)
    grid = scheduler.timesteps(steps, t_eps)
    alphas = torch.as_tensor(proc.alpha(grid), dtype=_F64)
    if bool(((alphas < 0) | (alphas >= 1)).any()):
        raise ValueError("schedule.alpha(t) must lie in [0, 1) on the sampling grid (t_eps > 0)")

    def call(z, t):
        sigma = (-torch.log(proc.alpha(t).clamp_min(torch.finfo(_F64).tiny))).to(torch.float32).expand(batch_size)
        out = denoiser(z, sigma.to(device))
        if tuple(out.shape) != (batch_size, seq_len, proc.vocab_size):
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}; expected [B, L, W] = "
                             f"{[batch_size, seq_len, proc.vocab_size]}")
        return out

    cache = absorbing.XThetaCache(call, time_conditioned)
    z = proc.prior_sample((batch_size, seq_len), device=device)
    if clamp_mask is not None:
        if clamp_values is None:
            raise ValueError("clamp_mask needs clamp_values (the data ids of the clamped positions)")
        cm = torch.as_tensor(clamp_mask, dtype=torch.bool, device=device).expand(batch_size, seq_len)
        cv = torch.as_tensor(clamp_values, dtype=torch.long, device=device).expand(batch_size, seq_len)
        bad = cm & ((cv < 0) | (cv >= proc.vocab_size) | (cv == mask_id))
        if bool(bad.any()):
            raise ValueError("clamp_values must be token ids in [0, vocab_size) other than the [MASK] id at every clamped position")
        z = torch.where(cm, cv, z)
    for i in range(int(steps)):
        z_new = scheduler.step(cache(z, grid[i]), grid[i], grid[i + 1], z, StepNoise(gen, None, i))
        cache.update(z, z_new)
        z = z_new
    if noise_removal != "none":
        z = scheduler.final(cache(z, grid[-1]), grid[-1], z, StepNoise(gen, None, int(steps)), noise_removal)
    return (z, cache.nfe) if return_nfe else z
