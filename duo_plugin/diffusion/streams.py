"""The one table of seeded noise streams (docs/method.md §6 "Noise streams").

Every random draw of training and evaluation is a pure function of integers, so a run gives the same numbers on any
world size, accumulation split or resume point. The keys are chained through :func:`duo_plugin.diffusion.uniform.
stable_seed` (SplitMix64); a *tag* separates streams that would otherwise share a key.

==========================  =======================================  ==========================================
stream                      key                                      used by
==========================  =======================================  ==========================================
per-sample noise            ``(seed, step, global index)`` (no tag)  ``uniform.row_generators``: corruption,
                                                                     curriculum latents, DCD pairs, top-k inputs;
                                                                     samplers with ``seed`` (step 0, index = row),
                                                                     AR decoding (``sampling.ar_decode``)
time sampler                ``(seed, step, TIME)``                   ``schedules.stratified_times``
attention annealing         ``(seed, step, ATTN_ANNEAL)``            ``objectives.DuoObjective`` (random mode)
counter: curriculum         ``(row seed, CURRICULUM, position)``     ``kernels.curriculum_soft_embedding``
counter: sampler            ``(row seed, SAMPLER, step, position)``  ``kernels.posterior_sample_step``
==========================  =======================================  ==========================================

The two counter streams are keyed by the row seed ``stable_seed(seed, step, global index)`` (``kernels.row_seeds``)
and hashed on the device (``kernels.rng``). Changing any value here changes every recorded loss.
"""

from __future__ import annotations

__all__ = ["TIME", "ATTN_ANNEAL", "CURRICULUM", "SAMPLER"]

TIME = 0x74696D65  # "time": the stratified time draw of a global step
ATTN_ANNEAL = 0xA77E  # the random-mode attention-annealing mask of a step
CURRICULUM = 1  # kernels' counter stream of curriculum Gaussian noise
SAMPLER = 2  # kernels' counter stream of posterior sampling
