"""D3PM's ancestral sampler (Austin et al. 2021) over :class:`duo_plugin.diffusion.d3pm.D3PMProcess`: the absorbing
update of :class:`~duo_plugin.sampling.mdlm.AbsorbingScheduler` on the discrete grid of the chain.

``steps`` reverse steps visit ``k_0 = T > k_1 > … > k_steps = 1`` (evenly spaced integers; ``steps = T − 1`` is the
full chain, fewer steps use the exact skip-step posterior ``q(x_{k_{i+1}} | x_{k_i}, x̃)`` of the absorbing chain),
and the final step is ``p_θ(x_0 | x_1)``: every remaining mask drawn from p̃_θ (``ancestral``) or its argmax
(``greedy``). NFE = steps + 1 = T for the full chain.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.d3pm import D3PMProcess

from .mdlm import AbsorbingScheduler

__all__ = ["D3PMScheduler"]


class D3PMScheduler(AbsorbingScheduler):
    """Args: process: :class:`~duo_plugin.diffusion.d3pm.D3PMProcess`; the options of
    :class:`~duo_plugin.sampling.mdlm.AbsorbingScheduler` (temperature, top_p on p̃_θ; guidance; reuse_x_theta)."""

    def __init__(self, process: D3PMProcess, **options):
        super().__init__(process, **options)

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        """Clock values ``k_i / T`` (float64 ``[steps + 1]``) of the integer grid from T down to 1; ``t_eps`` is
        unused (the chain ends at k = 1, then ``final`` takes x_0)."""
        big_t = self.process.steps
        if not 1 <= int(steps) <= big_t - 1:
            raise ValueError(f"D3PM with T={big_t} takes 1 <= steps <= T - 1 = {big_t - 1} reverse steps before the "
                             f"final one; got {steps}")
        ks = torch.round(torch.linspace(float(big_t), 1.0, int(steps) + 1, dtype=torch.float64))
        return ks / big_t
