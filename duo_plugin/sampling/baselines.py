"""The sampling loop for the SEDD and D3PM schedulers: prior → ``steps`` scheduler steps on ``scheduler.timesteps``
→ ``scheduler.final`` (noise removal). Network calls only here; the update rule is the scheduler's.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from duo_plugin.diffusion.uniform import row_generators

from .schedulers import StepNoise

__all__ = ["sample_with_scheduler"]

_F64 = torch.float64


@torch.no_grad()
def sample_with_scheduler(
    denoiser,
    scheduler,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    noise_removal: str = "ancestral",
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    t_eps: float = 1e-5,
    device=None,
    return_nfe: bool = False,
):
    """Draw ``Long[batch_size, seq_len]`` with ``scheduler`` (``SEDDScheduler`` / ``D3PMScheduler`` / any scheduler
    with ``process``, ``timesteps``, ``step``, ``final``) from ``denoiser(z, sigma) -> [B, L, W]``; σ = −log α of the
    scheduler's process (α = 0 is fed as σ = −log(float64 tiny), which a model without time conditioning ignores).
    Exactly one of ``generator`` (one, or one per row) / ``seed`` (→ ``row_generators(seed, 0, range(B))``).
    ``noise_removal``: ``ancestral`` | ``greedy`` | ``none``. Returns tokens, or ``(tokens, nfe)``."""
    if noise_removal not in ("ancestral", "greedy", "none"):
        raise ValueError(f"noise_removal must be 'ancestral', 'greedy' or 'none'; got {noise_removal!r}")
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = row_generators(int(seed), 0, range(batch_size), device=device) if seed is not None else generator
    proc = scheduler.process
    grid = scheduler.timesteps(steps, t_eps)
    nfe = 0

    def call(z, t):
        nonlocal nfe
        a = torch.as_tensor(proc.alpha(t), dtype=_F64).clamp_min(torch.finfo(_F64).tiny)
        out = denoiser(z, (-torch.log(a)).to(torch.float32).expand(batch_size).to(device))
        nfe += 1
        if tuple(out.shape) != (batch_size, seq_len, proc.vocab_size):
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}; expected [B, L, W] = "
                             f"{[batch_size, seq_len, proc.vocab_size]}")
        return out

    z = proc.prior_sample((batch_size, seq_len), gen, device=device)
    for i in range(int(steps)):
        z = scheduler.step(call(z, grid[i]), grid[i], grid[i + 1], z, StepNoise(gen, None, i))
    if noise_removal != "none":
        z = scheduler.final(call(z, grid[-1]), grid[-1], z, StepNoise(gen, None, int(steps)), noise_removal)
    return (z, nfe) if return_nfe else z
