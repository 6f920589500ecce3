"""Ancestral sampling for the absorbing (MDLM) process, float64 posterior, with the x_θ cache.

A standalone loop over ``duo_plugin.diffusion.absorbing``: start from all-[MASK], take ``steps`` ancestral steps on
the grid ``linspace(1, t_eps, steps + 1)``, then remove the remaining noise (``"greedy"``: argmax x_θ at the masks,
MDLM's default; ``"ancestral"``: one more posterior step to α = 1, i.e. sample x_θ at every mask; ``"none"``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from duo_plugin.diffusion import absorbing
from duo_plugin.diffusion.uniform import row_generators

from .samplers import time_grid

__all__ = ["sample_mdlm"]


def sample_mdlm(
    denoiser,
    schedule=None,
    *,
    batch_size: int,
    seq_len: int,
    mask_id: int,
    steps: int,
    noise_removal: str = "greedy",
    time_conditioned: bool = True,
    valid_vocab: Optional[torch.Tensor] = None,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    t_eps: float = 1e-5,
    device=None,
    return_nfe: bool = False,
):
    """Draw ``Long[batch_size, seq_len]`` from an MDLM denoiser ``denoiser(z, sigma) -> log-probs [B, L, W]``.

    ``time_conditioned=False`` turns on the x_θ cache (the network ignores σ, so x_θ only changes when z does).
    Exactly one of ``generator`` (one, or one per row) / ``seed`` (→ ``row_generators(seed, 0, range(B))``).
    Returns the tokens, or ``(tokens, nfe)`` with ``return_nfe=True``.  No [MASK] is left unless
    ``noise_removal="none"``.
    """
    if noise_removal not in ("greedy", "ancestral", "none"):
        raise ValueError(f"noise_removal must be 'greedy', 'ancestral' or 'none'; got {noise_removal!r}")
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    if schedule is None:
        from duo_plugin.diffusion.schedules import LogLinearSchedule

        schedule = LogLinearSchedule()
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = row_generators(int(seed), 0, range(batch_size), device=device) if seed is not None else generator
    grid = time_grid(steps, t_eps)
    alphas = torch.as_tensor(schedule.alpha(grid), dtype=torch.float64).reshape(-1)
    if bool(((alphas < 0) | (alphas >= 1)).any()):
        raise ValueError("schedule.alpha(t) must lie in [0, 1) on the sampling grid (t_eps > 0)")

    def call(z, alpha):
        sigma = (-torch.log(alpha.clamp_min(torch.finfo(torch.float64).tiny))).to(torch.float32).expand(batch_size)
        out = denoiser(z, sigma.to(device))
        if out.dim() != 3 or tuple(out.shape[:2]) != (batch_size, seq_len):
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}; expected [B, L, W]")
        return out

    cache = absorbing.XThetaCache(call, time_conditioned)
    z = absorbing.prior_sample((batch_size, seq_len), mask_id, device=device)
    for i in range(int(steps)):
        lx = cache(z, alphas[i])
        z_new = absorbing.sample_step(lx, z, alphas[i], alphas[i + 1], gen, mask_id, valid_vocab)
        cache.update(z, z_new)
        z = z_new
    if noise_removal != "none":
        lx = cache(z, alphas[-1])
        if noise_removal == "greedy":
            z = absorbing.greedy_denoise(lx, z, mask_id, valid_vocab)
        else:
            z = absorbing.sample_step(lx, z, alphas[-1], torch.ones((), dtype=torch.float64), gen, mask_id, valid_vocab)
    return (z, cache.nfe) if return_nfe else z
