"""The MDLM baseline objective (Sahoo et al. 2024): the absorbing ("masked") process, SUBS parameterisation.

Per sequence a stratified ``t`` over the global batch, the log-linear ``α_t = 1 − (1 − ε) t``, ``z_t`` = ``x0`` with
each token replaced by ``[MASK]`` w.p. ``1 − α_t`` (``diffusion.absorbing.corrupt``), and the loss
``α'_t/(1 − α_t) · log x_θ(z_t)[x0]`` at masked positions (``diffusion.absorbing.mdlm_nelbo`` after
``subs_log_probs``: −∞ on the mask logit, carry-over of unmasked tokens).  ``σ = −log α_t`` conditions the network
(a model built with ``time_conditioning: false`` ignores it, as MDLM's default).

Vocabulary: the ``[MASK]`` id is the LAST embedding row, ``mask_id = model.vocab_size − 1``, and must not be a
tokenizer id: build the model with one row more than the tokenizer (``model.vocab_size: <tokenizer size> + 1``;
``duo/mdlm_tiny_cpu`` does).  The recipe's ``valid_vocab`` then marks that row invalid like any padded row.

Noise keys as every objective: ``t`` from ``stratified_times(seed, step, position, N)``, the masking draw from
``row_generators(seed, step, position)``.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.absorbing import AbsorbingProcess
from duo_plugin.diffusion.schedules import LogLinearSchedule, stratified_times
from duo_plugin.diffusion.uniform import row_generators

from .base import ObjectiveContext, masked_token_sum

__all__ = ["MDLMObjective"]


class MDLMObjective:
    """MDLM: continuous-time absorbing-state NELBO with the log-linear schedule.

    Args (``objective: {_component_: duo_plugin.objectives.MDLMObjective, ...}``):
        alpha_eps: ε of the log-linear schedule. t_min: times are stratified in ``[t_min, 1]``.
        mask_id: the [MASK] id (default: the model's last row).
    """

    name = "mdlm"
    causal = False

    def __init__(self, *, alpha_eps: float = 1e-3, t_min: float = 1e-3, mask_id: int | None = None):
        self.alpha_eps, self.t_min = float(alpha_eps), float(t_min)
        self.mask_id = mask_id
        self.schedule = LogLinearSchedule(eps=self.alpha_eps)
        self.ctx: ObjectiveContext | None = None
        self.process: AbsorbingProcess | None = None

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        width = int(ctx.vocab_size)
        mask_id = width - 1 if self.mask_id is None else int(self.mask_id)
        if not 0 <= mask_id < width:
            raise ValueError(f"objective.mask_id={mask_id} is outside the model's {width} embedding rows")
        if bool(ctx.valid_vocab[mask_id]):
            raise ValueError(
                f"MDLM needs a [MASK] row that is not a tokenizer id, but row {mask_id} is a valid token: build the "
                f"model with one extra row (model.vocab_size: {width + 1}, i.e. tokenizer size + 1) or set "
                "objective.mask_id to an unused id")
        self.ctx = ctx
        self.process = AbsorbingProcess(width, mask_id, valid_vocab=ctx.valid_vocab, schedule=self.schedule)
        if ctx.log:
            ctx.log(f"mdlm: absorbing process, [MASK] = id {mask_id} of {width} rows, log-linear "
                    f"eps={self.alpha_eps:g}")

    def phase(self, step: int) -> str:
        return "mdlm"

    def count_tokens(self, mask: torch.Tensor) -> int:
        return int(mask.sum())

    def __call__(self, model, x0, mask, positions, step):
        ctx = self.ctx
        dev = ctx.device
        t = stratified_times(ctx.seed, step, positions, ctx.global_batch_size, self.t_min, dtype=torch.float64)
        gens = row_generators(ctx.seed, step, positions, device=dev)
        alpha = self.schedule.alpha(t).to(dev)
        alpha_prime = self.schedule.alpha_prime(t).to(dev)
        z_t = self.process.corrupt(x0, alpha, gens)
        # official pad mode: pads are corrupted and attended to like any token; only the loss skips them
        padded = not bool(mask.all()) and getattr(ctx, "pad_mode", "clean_masked") != "official"
        if padded:  # padding is neither corrupted, attended to nor scored
            z_t = torch.where(mask, z_t, x0)
        kw = {"padding_mask": mask} if padded else {}
        with ctx.autocast():
            log_x = model(z_t, (-torch.log(alpha)).float(), **kw)
        nelbo = self.process.nelbo(log_x.float(), z_t, x0, alpha, alpha_prime)
        return masked_token_sum(nelbo, mask), self.count_tokens(mask), {"phase": "mdlm"}

    def validation_nll(self, model, blocks, mask, *, batch_size: int, special_ids=()) -> dict:
        """MDLM NELBO on held-out blocks (one stratified t per sequence) via ``eval.likelihood.nelbo_perplexity``
        with the absorbing process: ``{"nll": per content token (``special_ids`` not counted), "nll_all": per
        token}``."""
        from duo_plugin.eval.likelihood import nelbo_perplexity

        ctx = self.ctx
        res = nelbo_perplexity(model, blocks, mask, batch_size=batch_size, seed=ctx.seed, valid_vocab=ctx.valid_vocab,
                               t_min=self.t_min, device=ctx.device, progress=False, special_ids=tuple(special_ids),
                               process=self.process, pad_mode=getattr(ctx, "pad_mode", "clean_masked"))
        return {"nll": float(res["nll_per_token"]), "nll_all": float(res["nll_per_token_all"])}
