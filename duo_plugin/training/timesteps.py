"""Per-micro-batch time and noise draws that do not depend on the topology (duo-method.md §6 "Time sampling").

A recipe processes, at global step ``s``, the slice of the global batch returned by
:func:`duo_plugin.data.text.shard` together with its ``positions`` (``0..N-1`` inside the global batch of size
``N``). Feeding those positions here gives every sample the same ``t`` and the same noise generator whatever
the world size, gradient-accumulation split or resume point:

    t_i = ((u/N + i/N) mod 1) (1 - t_min) + t_min,   u = u(seed, s)     (stratified over the *global* batch)
"""

from __future__ import annotations

from typing import Iterable

import torch

from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators

__all__ = ["micro_batch_times", "micro_batch_generators"]


def micro_batch_times(
    seed: int,
    step: int,
    positions: Iterable[int] | torch.Tensor,
    global_batch_size: int,
    t_min: float = 1e-3,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """``Tensor[n]`` stratified times for the samples at ``positions`` of global batch ``step``.

    Raises ValueError if a position is outside ``[0, global_batch_size)``.
    """
    pos = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions,
                          dtype=torch.int64).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= int(global_batch_size)):
        raise ValueError(f"positions must lie in [0, {global_batch_size}) (positions inside the global batch, "
                         "as returned by duo_plugin.data.text.shard), got range "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    return stratified_times(seed, step, pos, global_batch_size, t_min, dtype=dtype, device=device)


def micro_batch_generators(seed: int, step: int, positions: Iterable[int] | torch.Tensor,
                           device=None) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, position in the global batch); pass as ``generator=``
    to the diffusion functions (``corrupt``, ``curriculum_inputs``, ...)."""
    return row_generators(seed, step, positions, device=device)
