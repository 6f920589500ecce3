"""The shared diffusion objective (docs/method.md §7; docs/architecture.md "Adding an objective").

Every continuous-time diffusion objective of the toolkit is ONE path over a noise process
(:class:`duo_plugin.diffusion.process.NoiseProcess`)::

    t      = stratified_times(seed, step, position, N)            one time per sequence, stratified over the batch
    α, α'  = process.alpha(t), process.alpha_prime(t)
    z_t    = process.corrupt(x0, α, row_generators(seed, step, position))
    z_t    = pad_rule(z_t, x0, mask, ctx.pad_mode, valid)           clean_masked: pads stay clean and are masked
                                                                    (the loss sees a valid filler at pads)
    σ      = process.sigma(t)                                       = −log α(t), the network's time conditioning
    f      = head(model, batch)                                     forward + process.nelbo (or a fused kernel)
    loss   = Σ_{mask} f                                             masked_token_sum

:class:`DiffusionObjective` implements it; a subclass only says which process it trains (:meth:`build_process`).
Instances: :class:`~duo_plugin.objectives.mdlm.MDLMObjective` (absorbing process),
:class:`~duo_plugin.objectives.duo.DuoObjective` (uniform process; its discrete phase IS this path, its curriculum
phase swaps the corruption for the Gaussian latent and keeps the head), and UDLM (``DuoObjective`` without a
curriculum). A new baseline (SEDD, D3PM, ...) is a process class plus a subclass that returns it; override
:meth:`noisy_batch` only when the corruption is not ``process.corrupt`` (Duo's curriculum), and set
:attr:`head` in :meth:`setup` when the loss is not ``process.nelbo`` of the network's log-probabilities.

The two pluggable pieces are strategy objects chosen once at setup, never per call:

* the **head** ``head(model, batch, autocast) -> f Float[B, L]`` (:class:`DenseNelbo`: ``model(...)`` then
  ``process.nelbo``; Duo's fused-kernel head lives in :mod:`duo_plugin.objectives.duo`);
* the **noisy batch** (:class:`NoisyBatch`): everything the head needs (``z_t``, the network input, α, α', σ, the
  model keyword arguments and an optional context that overrides the input embedding).

Pads (``ctx.pad_mode``, docs/evaluation.md): ``clean_masked`` keeps pads clean (``z_t = x0`` there) and masks them
from attention; ``official`` noises and attends to them like any token. In both only the loss skips them.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

from duo_plugin.diffusion.schedules import LogLinearSchedule, stratified_times
from duo_plugin.diffusion.uniform import row_generators

from .base import ObjectiveContext, masked_token_sum

__all__ = ["DiffusionObjective", "NoisyBatch", "DenseNelbo", "PadView", "pad_rule"]


class NoisyBatch(NamedTuple):
    """One micro-batch ready for the loss head.

    ``x0``/``z_t``: ``Long[B, L]`` clean and noisy ids for the loss (unscored positions hold a valid filler,
    :func:`pad_rule`); ``model_in``: what the network's input embedding reads
    (``z_t``, or soft logits / a top-k input in Duo's curriculum); ``alpha``/``alpha_prime``: float64 ``[B]``;
    ``sigma``: float32 ``[B]`` = −log α; ``model_kwargs``: ``padding_mask`` / ``attn_mask`` for the forward;
    ``override``: a context entered around the forward (e.g. the fused curriculum embedding), else a null context.
    """

    x0: torch.Tensor
    z_t: torch.Tensor
    model_in: Any
    alpha: torch.Tensor
    alpha_prime: torch.Tensor
    sigma: torch.Tensor
    model_kwargs: dict
    override: Any


class PadView(NamedTuple):
    """What the pad rule gives: the network's ids and keyword arguments, and the ids the loss reads."""

    z_in: torch.Tensor  # Long[B, L] fed to the network
    model_kwargs: dict  # {"padding_mask": mask} in clean_masked mode with pads, else {}
    z_loss: torch.Tensor  # z_t for the loss (a valid filler at unscored positions)
    x_loss: torch.Tensor  # x0 for the loss (a valid filler at unscored positions)


def pad_rule(z_t: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, pad_mode: str,
             valid_vocab: torch.Tensor | None = None) -> PadView:
    """The pad convention (docs/evaluation.md) in one place.

    Network side: with ``clean_masked`` and any pad in the batch, pads are put back to ``x0`` and masked from
    attention (``{"padding_mask": mask}``); ``official`` (or no pad) leaves ``z_t`` as drawn and attention unmasked.
    Loss side: unscored positions get the first id of ``valid_vocab`` in both ``z_t`` and ``x0`` (the value there is
    never used, and ``duo_nelbo`` accepts valid ids only); a SCORED id outside ``valid_vocab`` (e.g. BERT's
    ``[UNK]`` when special ids are excluded) is a ValueError naming the ids and the config fix.
    """
    full = bool(mask.all())
    z_in, kw = (z_t, {}) if full or pad_mode == "official" else (torch.where(mask, z_t, x0), {"padding_mask": mask})
    if valid_vocab is None:
        return PadView(z_in, kw, z_in, x0)
    vv = valid_vocab.to(x0.device)
    bad = mask & ~vv[x0]
    if bool(bad.any()):
        ids = sorted({int(v) for v in x0[bad].unique()[:8]})
        raise ValueError(f"the training data holds ids outside the model's valid_vocab at {int(bad.sum())} scored "
                         f"position(s): {ids}; make them valid (data.valid_vocab.include_special: true, e.g. for "
                         "BERT's [UNK], or data.pad_mode: official) or remove them from the data")
    if full:
        return PadView(z_in, kw, z_t, x0)
    fill = torch.full_like(x0, int(torch.nonzero(vv)[0]))
    return PadView(z_in, kw, torch.where(mask, z_t, fill), torch.where(mask, x0, fill))


class DenseNelbo:
    """The dense head: ``log x_θ = model(model_in, σ)`` under autocast, then ``process.nelbo`` in fp32."""

    name = "dense"

    def __init__(self, process):
        self.process = process

    def __call__(self, model, b: NoisyBatch, autocast) -> torch.Tensor:
        with b.override, autocast():
            log_x = model(b.model_in, b.sigma, **b.model_kwargs)
        return self.process.nelbo(log_x.float(), b.z_t, b.x0, b.alpha, b.alpha_prime)


class DiffusionObjective:
    """times → corrupt → pad rule → σ → forward → ``process.nelbo`` → masked sum, for any noise process.

    Args (config keys of ``objective:``): alpha_eps: ε of the log-linear schedule ``α_t = 1 − (1 − ε) t``
    (:attr:`schedule`, which :meth:`build_process` normally hands to its process); t_min: times are stratified in
    ``[t_min, 1]``.

    Subclasses implement :meth:`build_process` and set :attr:`name` (saved in the model metadata); the process's
    ``valid_vocab`` (the ids the data may hold; None = all) drives the pad rule's filler and is what the recipe
    records in the model folder. After
    :meth:`setup`: :attr:`process` (the noise process), :attr:`head` (the loss head), :attr:`ctx`.
    """

    name = "diffusion"
    causal = False

    def __init__(self, *, alpha_eps: float = 1e-3, t_min: float = 1e-3):
        self.alpha_eps, self.t_min = float(alpha_eps), float(t_min)
        self.schedule = LogLinearSchedule(eps=self.alpha_eps)
        self.ctx: ObjectiveContext | None = None
        self.process = None
        self.head = None

    # ------------------------------------------------------------------------------------------ setup
    def build_process(self, model: torch.nn.Module, ctx: ObjectiveContext):
        """The noise process this objective trains (raise ValueError naming the config key on a bad setup)."""
        raise NotImplementedError

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        self.ctx = ctx
        self.process = self.build_process(model, ctx)
        self.head = DenseNelbo(self.process)

    # ------------------------------------------------------------------------------------------ per step
    def phase(self, step: int) -> str:
        return self.name

    def count_tokens(self, mask: torch.Tensor) -> int:
        return int(mask.sum())

    def times(self, step: int, positions) -> torch.Tensor:
        """float64 ``[B]``: the stratum of each sample's global-batch position (docs/method.md §6)."""
        ctx = self.ctx
        return stratified_times(ctx.seed, step, positions, ctx.global_batch_size, self.t_min, dtype=torch.float64)

    def extra_model_kwargs(self, step: int, seq_len: int) -> dict:
        """Further forward keyword arguments for this step (none here; Duo adds its attention-annealing mask)."""
        return {}

    def noisy_batch(self, model, x0: torch.Tensor, mask: torch.Tensor, positions, step: int) -> NoisyBatch:
        """Draw ``t`` and ``z_t ~ q(z_t | x0)`` from the process, apply the pad rule, compute σ. (``model`` is for
        subclasses whose input reads the network, e.g. Duo's fused curriculum embedding; unused here.)"""
        ctx, proc = self.ctx, self.process
        dev = ctx.device
        t = self.times(step, positions)
        alpha = proc.alpha(t).to(dev)
        z_t = proc.corrupt(x0, alpha, row_generators(ctx.seed, step, positions, device=dev))
        pads = pad_rule(z_t, x0, mask, ctx.pad_mode, getattr(proc, "valid_vocab", None))
        kw = {**pads.model_kwargs, **self.extra_model_kwargs(step, x0.shape[1])}
        return NoisyBatch(pads.x_loss, pads.z_loss, pads.z_in, alpha, proc.alpha_prime(t).to(dev),
                          proc.sigma(t).to(dev).float(), kw, contextlib.nullcontext())

    def corruption(self, step: int):
        """The function that makes this step's :class:`NoisyBatch` (``(model, x0, mask, positions, step) ->
        NoisyBatch``): :meth:`noisy_batch` here; a phased objective (Duo's curriculum) returns its phase's maker,
        so ``x0`` goes straight to the corruption of the phase."""
        return self.noisy_batch

    def __call__(self, model, x0, mask, positions, step):
        """``(Σ_mask f, #mask tokens, {"phase": ...})`` for this micro-batch (fp32 scalar, differentiable)."""
        f = self.head(model, self.corruption(step)(model, x0, mask, positions, step), self.ctx.autocast)
        return masked_token_sum(f, mask), self.count_tokens(mask), {"phase": self.phase(step)}

    # ------------------------------------------------------------------------------------------ validation
    def validation_process(self):
        """The process handed to ``nelbo_perplexity`` (None: its uniform-state default, which Duo/UDLM use)."""
        return self.process

    def validation_nll(self, model, blocks, mask, *, batch_size: int, special_ids=(), nelbo_perplexity) -> dict:
        """NELBO on held-out blocks (one stratified t per sequence, the objective's own process; docs/method.md §8)
        by the evaluation function passed in (:func:`duo_plugin.eval.likelihood.nelbo_perplexity`; objectives and
        eval are sibling layers, so the caller supplies it): ``{"nll": per content token (``special_ids`` not
        counted), "nll_all": per token}``."""
        ctx = self.ctx
        proc = self.validation_process()
        vv = ctx.valid_vocab if proc is None else getattr(proc, "valid_vocab", ctx.valid_vocab)
        res = nelbo_perplexity(model, blocks, mask, batch_size=batch_size, seed=ctx.seed, valid_vocab=vv,
                               schedule=self.schedule if proc is None else None, t_min=self.t_min,
                               device=ctx.device, progress=False, special_ids=tuple(special_ids), process=proc,
                               pad_mode=ctx.pad_mode)
        return {"nll": float(res["nll_per_token"]), "nll_all": float(res["nll_per_token_all"])}
