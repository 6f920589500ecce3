"""The MDLM baseline objective (Sahoo et al. 2024): the absorbing ("masked") process, SUBS parameterisation.

Per sequence a stratified ``t`` over the global batch, the log-linear ``α_t = 1 − (1 − ε) t``, ``z_t`` = ``x0`` with
each token replaced by ``[MASK]`` w.p. ``1 − α_t`` (``diffusion.absorbing.corrupt``), and the loss
``α'_t/(1 − α_t) · log x_θ(z_t)[x0]`` at masked positions (``diffusion.absorbing.mdlm_nelbo`` after
``subs_log_probs``: −∞ on the mask logit, carry-over of unmasked tokens).  ``σ = −log α_t`` (``process.sigma``) is handed to the network;
a model built with ``time_conditioning: false`` ignores it, as the published MDLM (``duo/mdlm_*`` configs), which
lets the sampler reuse x_θ while no token changes. One instance of :class:`~duo_plugin.objectives.diffusion.
DiffusionObjective`: only the process is MDLM's.

Vocabulary (``mask_id``): by default the ``[MASK]`` id is the LAST embedding row, ``mask_id = model.vocab_size − 1``,
which must not be a tokenizer id: build the model with one row more than the tokenizer (``model.vocab_size:
<tokenizer size> + 1``; ``duo/mdlm_tiny_cpu`` does), and the recipe's ``valid_vocab`` marks that row invalid like any
padded row. ``mask_id: "[MASK]"`` reuses the tokenizer's own mask token instead (LM1B's BERT ``[MASK]``, id 103 of
30,522, as the official MDLM; ``duo/mdlm_lm1b_small``).

Noise keys as every objective: ``t`` from ``stratified_times(seed, step, position, N)``, the masking draw from
``row_generators(seed, step, position)``.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.absorbing import AbsorbingProcess

from .base import ObjectiveContext
from .diffusion import DiffusionObjective

__all__ = ["MDLMObjective", "resolve_mask_id"]


def resolve_mask_id(mask_id, width: int, tokenizer=None) -> int:
    """The [MASK] id from ``objective.mask_id``: None → the model's last row (``width − 1``, the appended row); an
    int (or digits) → that id; a token's text (e.g. ``"[MASK]"``) → its id, which must be ONE special token of
    ``tokenizer`` (LM1B's BERT ``[MASK]`` = 103, reused as the official MDLM does, no extra row)."""
    if mask_id is None:
        return int(width) - 1
    if isinstance(mask_id, str) and not mask_id.strip().lstrip("-").isdigit():
        if tokenizer is None:
            raise ValueError(f"objective.mask_id={mask_id!r} names a token but no tokenizer is known here; give its "
                             "integer id")
        ids = list(tokenizer.encode(mask_id))
        if len(ids) != 1 or int(ids[0]) not in tokenizer.special_ids:
            raise ValueError(f"objective.mask_id={mask_id!r} is not one special token of the tokenizer (it encodes "
                             f"to {ids[:8]}); give the tokenizer's mask token (e.g. '[MASK]'), an id, or null (a "
                             "new last row: model.vocab_size = tokenizer size + 1)")
        mask_id = ids[0]
    mask_id = int(mask_id)
    if not 0 <= mask_id < int(width):
        raise ValueError(f"objective.mask_id={mask_id} is outside the model's {int(width)} embedding rows")
    return mask_id


class MDLMObjective(DiffusionObjective):
    """MDLM: continuous-time absorbing-state NELBO with the log-linear schedule; the :class:`DiffusionObjective`
    path over :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess`.

    Args (``objective: {_component_: duo_plugin.objectives.MDLMObjective, ...}``):
        alpha_eps: ε of the log-linear schedule. t_min: times are stratified in ``[t_min, 1]``.
        mask_id: the [MASK] id: null (default) = the model's last row (build it with tokenizer size + 1 rows), an
            id, or the text of the tokenizer's own mask token (``"[MASK]"``: BERT's id 103 for LM1B, as the official
            MDLM; :func:`resolve_mask_id`). The process's data ids (``process.valid_vocab``, saved with the model)
            never include the mask id.
    """

    name = "mdlm"

    def __init__(self, *, alpha_eps: float = 1e-3, t_min: float = 1e-3, mask_id: int | str | None = None):
        super().__init__(alpha_eps=alpha_eps, t_min=t_min)
        self.mask_id = mask_id

    def build_process(self, model: torch.nn.Module, ctx: ObjectiveContext) -> AbsorbingProcess:
        width = int(ctx.vocab_size)
        mask_id = resolve_mask_id(self.mask_id, width, ctx.tokenizer)
        specials = set(getattr(ctx.tokenizer, "special_ids", ()) or ())
        if bool(ctx.valid_vocab[mask_id]) and mask_id not in specials:
            raise ValueError(
                f"MDLM needs a [MASK] row that is not a tokenizer id, but row {mask_id} is a valid token: build the "
                f"model with one extra row (model.vocab_size: {width + 1}, i.e. tokenizer size + 1), set "
                "objective.mask_id to an unused id or to the tokenizer's own mask token (e.g. '[MASK]')")
        valid = ctx.valid_vocab.clone()
        valid[mask_id] = False  # a reused special mask token is never data (official pad mode counts specials)
        if ctx.log:
            ctx.log(f"mdlm: absorbing process, [MASK] = id {mask_id} of {width} rows, log-linear "
                    f"eps={self.alpha_eps:g}")
        return AbsorbingProcess(width, mask_id, valid_vocab=valid, schedule=self.schedule)
