"""The SEDD baseline objective (Lou et al. 2024): denoising score entropy on the absorbing or the uniform graph.

Per sequence a stratified ``t`` over the global batch, ``α_t`` from the noise schedule (``noise: loglinear``:
α = 1 − (1 − ε) t, SEDD's absorbing default; ``noise: geometric``: σ̄ = σ_min^(1−t) σ_max^t, SEDD's uniform
default), ``z_t ~ q_t(· | x0)`` of the graph, the network called with ``σ = σ̄(t) = −log α_t`` and the per-token
DSE NELBO of :class:`duo_plugin.diffusion.sedd.SEDDProcess` (which also fixes how the network's output is read as
scores: docs/baselines.md "SEDD"). The loss is the NELBO itself (SEDD trains on the ELBO-weighted DSE).

Vocabulary: ``graph: absorb`` needs a [MASK] row that is not a tokenizer id (the model's last row by default, as
MDLM); ``graph: uniform`` uses the recipe's ``valid_vocab`` as the state space (no extra row).

Noise keys as every objective: ``t`` from ``stratified_times(seed, step, position, N)``, the corruption from
``row_generators(seed, step, position)``.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.diffusion.sedd import GRAPHS, GeometricSchedule, SEDDProcess

from .base import ObjectiveContext
from .diffusion import DiffusionObjective
from .mdlm import resolve_mask_id

__all__ = ["SEDDObjective", "NOISES", "mask_row"]

NOISES = ("loglinear", "geometric")


def mask_row(ctx: ObjectiveContext, mask_id, what: str) -> tuple[int, torch.Tensor]:
    """``(mask id, data ids)`` of an absorbing objective: ``mask_id`` as MDLM's (:func:`~duo_plugin.objectives.mdlm.
    resolve_mask_id`: null = the model's last row); refuses a row that is an ordinary tokenizer id; the data ids are
    ``ctx.valid_vocab`` without the mask id."""
    width = int(ctx.vocab_size)
    mask_id = resolve_mask_id(mask_id, width, getattr(ctx, "tokenizer", None))
    specials = set(getattr(getattr(ctx, "tokenizer", None), "special_ids", ()) or ())
    if bool(ctx.valid_vocab[mask_id]) and mask_id not in specials:
        raise ValueError(
            f"{what} needs a [MASK] row that is not a tokenizer id, but row {mask_id} is a valid token: build the "
            f"model with one extra row (model.vocab_size: {width + 1}, i.e. tokenizer size + 1) or set "
            "objective.mask_id to an unused id")
    data = ctx.valid_vocab.clone()
    data[mask_id] = False
    return mask_id, data


class SEDDObjective(DiffusionObjective):
    """SEDD: the continuous-time DSE NELBO on the ``absorb`` or ``uniform`` graph; the :class:`~duo_plugin.objectives.
    diffusion.DiffusionObjective` path over :class:`~duo_plugin.diffusion.sedd.SEDDProcess` (whose ``nelbo`` reads
    the network output as scores).

    Args (``objective: {_component_: duo_plugin.objectives.sedd.SEDDObjective, ...}``):
        graph: ``absorb`` | ``uniform``. noise: ``loglinear`` (``alpha_eps``) | ``geometric`` (``sigma_min``,
        ``sigma_max``). t_min: times are stratified in ``[t_min, 1]``. mask_id: absorb only (as MDLM's).
    """

    def __init__(self, *, graph: str = "absorb", noise: str = "loglinear", alpha_eps: float = 1e-3,
                 sigma_min: float = 1e-4, sigma_max: float = 20.0, t_min: float = 1e-3, mask_id=None):
        if graph not in GRAPHS:
            raise ValueError(f"objective.graph must be one of {GRAPHS}, got {graph!r}")
        if noise not in NOISES:
            raise ValueError(f"objective.noise must be one of {NOISES}, got {noise!r}")
        if graph == "uniform" and mask_id is not None:
            raise ValueError("objective.mask_id is for graph: absorb (the uniform graph has no [MASK])")
        if not 0.0 < float(t_min) < 1.0:
            raise ValueError(f"objective.t_min must lie in (0, 1), got {t_min}")
        super().__init__(alpha_eps=alpha_eps, t_min=t_min)
        self.graph, self.noise, self.mask_id = graph, noise, mask_id
        self.name = f"sedd_{graph}"
        self.schedule = (LogLinearSchedule(eps=float(alpha_eps)) if noise == "loglinear"
                         else GeometricSchedule(float(sigma_min), float(sigma_max)))

    def build_process(self, model: torch.nn.Module, ctx: ObjectiveContext) -> SEDDProcess:
        width = int(ctx.vocab_size)
        if self.graph == "absorb":
            mask_id, data = mask_row(ctx, self.mask_id, "SEDD (absorb)")
        else:
            mask_id, data = None, ctx.valid_vocab
        proc = SEDDProcess(width, self.graph, mask_id, valid_vocab=data, schedule=self.schedule)
        if ctx.log:
            ctx.log(f"sedd: {self.graph} graph over {proc.n_states} ids"
                    + (f", [MASK] = id {mask_id}" if mask_id is not None else "") + f", {self.schedule!r}")
        return proc
