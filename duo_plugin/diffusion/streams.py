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
eval: conditional NELBO     ``(seed, EVAL_COND + request, sample)``  ``eval.likelihood`` (stratified times:
                            (times: ``+ stage · EVAL_STAGE``)         ``stratified_times`` at that step)
eval: i.i.d. times          ``(seed, EVAL_IID + request, sample)``   ``eval.likelihood`` (``time_sampling=iid``)
                            (times: a generator seeded by
                            ``seed·EVAL_IID_TIMES + request``)
data order                  ``sha256(DATA_ORDER:seed:epoch)``        ``data.text.GlobalBatchSampler`` (epoch
                                                                     permutation of the training blocks)
eval: split permutation     ``(seed, pass, EVAL_PERM)``              ``eval.likelihood.stratum_permutation``
eval: greedy check          ``(seed, EVAL_GREEDY(+1), request)``     ``eval.greedy`` (one-pass, official)
lm-eval generation          ``(seed, EVAL_GENERATE(_AR), request)``  ``integrations.lm_eval.generate_until``
==========================  =======================================  ==========================================

The two counter streams are keyed by the row seed ``stable_seed(seed, step, global index)`` (``kernels.row_seeds``)
and hashed on the device (``kernels.rng``). Changing any value here changes every recorded loss.
"""

from __future__ import annotations

__all__ = ["TIME", "ATTN_ANNEAL", "CURRICULUM", "SAMPLER", "EVAL_COND", "EVAL_IID", "EVAL_STAGE", "EVAL_PERM",
           "EVAL_GREEDY", "EVAL_GENERATE", "EVAL_GENERATE_AR", "EVAL_IID_TIMES", "DATA_ORDER"]

TIME = 0x74696D65  # "time": the stratified time draw of a global step
ATTN_ANNEAL = 0xA77E  # the random-mode attention-annealing mask of a step
CURRICULUM = 1  # kernels' counter stream of curriculum Gaussian noise
SAMPLER = 2  # kernels' counter stream of posterior sampling
# Evaluation streams: step offsets far above any training step; ``request`` is a 40-bit hash of the request's ids.
EVAL_COND = 1 << 40  # conditional NELBO: corruption (and stratified times) of request i at step EVAL_COND + i
EVAL_IID = 1 << 41  # the same with i.i.d. times
EVAL_STAGE = 1 << 48  # adaptive MC: the fresh stage r >= 1 shifts the time stream by r * EVAL_STAGE
EVAL_PERM = 0x5EED_9E4D  # nelbo_perplexity: the per-pass permutation of the split's strata
EVAL_GREEDY = 1 << 42  # the one-pass greedy check's t = 1 draw (the official check: EVAL_GREEDY + 1)
EVAL_GENERATE = 1 << 43  # lm-eval generate_until, diffusion models
EVAL_GENERATE_AR = 1 << 44  # lm-eval generate_until, AR models
EVAL_IID_TIMES = 1_000_003  # i.i.d. MC times of request i: torch generator seeded by seed * EVAL_IID_TIMES + i
DATA_ORDER = "duo-sampler"  # sha256 key prefix of the training data order (epoch permutation from (seed, epoch))
