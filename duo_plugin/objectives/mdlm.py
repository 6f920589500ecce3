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

from .base import ObjectiveContext
from .diffusion import DiffusionObjective

__all__ = ["MDLMObjective"]


class MDLMObjective(DiffusionObjective):
    """MDLM: continuous-time absorbing-state NELBO with the log-linear schedule; the :class:`DiffusionObjective`
    path over :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess`.

    Args (``objective: {_component_: duo_plugin.objectives.MDLMObjective, ...}``):
        alpha_eps: ε of the log-linear schedule. t_min: times are stratified in ``[t_min, 1]``.
        mask_id: the [MASK] id (default: the model's last row).
    """

    name = "mdlm"

    def __init__(self, *, alpha_eps: float = 1e-3, t_min: float = 1e-3, mask_id: int | None = None):
        super().__init__(alpha_eps=alpha_eps, t_min=t_min)
        self.mask_id = mask_id

    def build_process(self, model: torch.nn.Module, ctx: ObjectiveContext) -> AbsorbingProcess:
        width = int(ctx.vocab_size)
        mask_id = width - 1 if self.mask_id is None else int(self.mask_id)
        if not 0 <= mask_id < width:
            raise ValueError(f"objective.mask_id={mask_id} is outside the model's {width} embedding rows")
        if bool(ctx.valid_vocab[mask_id]):
            raise ValueError(
                f"MDLM needs a [MASK] row that is not a tokenizer id, but row {mask_id} is a valid token: build the "
                f"model with one extra row (model.vocab_size: {width + 1}, i.e. tokenizer size + 1) or set "
                "objective.mask_id to an unused id")
        if ctx.log:
            ctx.log(f"mdlm: absorbing process, [MASK] = id {mask_id} of {width} rows, log-linear "
                    f"eps={self.alpha_eps:g}")
        return AbsorbingProcess(width, mask_id, valid_vocab=ctx.valid_vocab, schedule=self.schedule)
