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

from duo_plugin.diffusion.schedules import LogLinearSchedule, stratified_times
from duo_plugin.diffusion.sedd import GRAPHS, GeometricSchedule, SEDDProcess
from duo_plugin.diffusion.uniform import row_generators

from .base import ObjectiveContext, masked_token_sum

__all__ = ["SEDDObjective", "NOISES", "mask_row"]

NOISES = ("loglinear", "geometric")


def mask_row(ctx: ObjectiveContext, mask_id, what: str) -> int:
    """The [MASK] row of an absorbing objective: ``mask_id`` or the model's last row; refuses a tokenizer id."""
    width = int(ctx.vocab_size)
    mask_id = width - 1 if mask_id is None else int(mask_id)
    if not 0 <= mask_id < width:
        raise ValueError(f"objective.mask_id={mask_id} is outside the model's {width} embedding rows")
    if bool(ctx.valid_vocab[mask_id]):
        raise ValueError(
            f"{what} needs a [MASK] row that is not a tokenizer id, but row {mask_id} is a valid token: build the "
            f"model with one extra row (model.vocab_size: {width + 1}, i.e. tokenizer size + 1) or set "
            "objective.mask_id to an unused id")
    return mask_id


def diffusion_loss(objective, model, x0, mask, positions, step, t_min):
    """times → α (the process's schedule) → corrupt → pad rule → σ = −log α → forward → ``process.nelbo``.
    Returns ``(per-token NELBO [B, L] fp32, z_t, log-output [B, L, W] fp32)``."""
    ctx, proc = objective.ctx, objective.process
    dev = ctx.device
    t = stratified_times(ctx.seed, step, positions, ctx.global_batch_size, t_min, dtype=torch.float64)
    gens = row_generators(ctx.seed, step, positions, device=dev)
    alpha = proc.alpha(t).to(dev)
    alpha_prime = proc.alpha_prime(t).to(dev)
    z_t = proc.corrupt(x0, alpha, gens)
    # official pad mode: pads are corrupted and attended to like any token; only the loss skips them
    padded = not bool(mask.all()) and getattr(ctx, "pad_mode", "clean_masked") != "official"
    if padded:  # padding is neither corrupted, attended to nor scored
        z_t = torch.where(mask, z_t, x0)
    kw = {"padding_mask": mask} if padded else {}
    sigma = (-torch.log(alpha.clamp_min(1e-30))).float()
    with ctx.autocast():
        log_x = model(z_t, sigma, **kw)
    log_x = log_x.float()
    return proc.nelbo(log_x, z_t, x0, alpha, alpha_prime), z_t, log_x


def validation(objective, model, blocks, mask, batch_size, special_ids, t_min) -> dict:
    """NELBO on held-out blocks via ``eval.likelihood.nelbo_perplexity`` with the objective's process."""
    from duo_plugin.eval.likelihood import nelbo_perplexity

    ctx = objective.ctx
    res = nelbo_perplexity(model, blocks, mask, batch_size=batch_size, seed=ctx.seed, valid_vocab=ctx.valid_vocab,
                           schedule=objective.process.schedule, t_min=t_min, device=ctx.device, progress=False,
                           special_ids=tuple(special_ids), process=objective.process,
                           pad_mode=getattr(ctx, "pad_mode", "clean_masked"))
    return {"nll": float(res["nll_per_token"]), "nll_all": float(res["nll_per_token_all"])}


class SEDDObjective:
    """SEDD: the continuous-time DSE NELBO on the ``absorb`` or ``uniform`` graph.

    Args (``objective: {_component_: duo_plugin.objectives.sedd.SEDDObjective, ...}``):
        graph: ``absorb`` | ``uniform``. noise: ``loglinear`` (``alpha_eps``) | ``geometric`` (``sigma_min``,
        ``sigma_max``). t_min: times are stratified in ``[t_min, 1]``. mask_id: absorb only (default the last row).
    """

    causal = False

    def __init__(self, *, graph: str = "absorb", noise: str = "loglinear", alpha_eps: float = 1e-3,
                 sigma_min: float = 1e-4, sigma_max: float = 20.0, t_min: float = 1e-3, mask_id: int | None = None):
        if graph not in GRAPHS:
            raise ValueError(f"objective.graph must be one of {GRAPHS}, got {graph!r}")
        if noise not in NOISES:
            raise ValueError(f"objective.noise must be one of {NOISES}, got {noise!r}")
        if graph == "uniform" and mask_id is not None:
            raise ValueError("objective.mask_id is for graph: absorb (the uniform graph has no [MASK])")
        if not 0.0 < float(t_min) < 1.0:
            raise ValueError(f"objective.t_min must lie in (0, 1), got {t_min}")
        self.graph, self.noise, self.t_min, self.mask_id = graph, noise, float(t_min), mask_id
        self.name = f"sedd_{graph}"
        self.schedule = (LogLinearSchedule(eps=float(alpha_eps)) if noise == "loglinear"
                         else GeometricSchedule(float(sigma_min), float(sigma_max)))
        self.ctx: ObjectiveContext | None = None
        self.process: SEDDProcess | None = None

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        width = int(ctx.vocab_size)
        mask_id = mask_row(ctx, self.mask_id, "SEDD (absorb)") if self.graph == "absorb" else None
        self.ctx = ctx
        self.process = SEDDProcess(width, self.graph, mask_id, valid_vocab=ctx.valid_vocab, schedule=self.schedule)
        if ctx.log:
            ctx.log(f"sedd: {self.graph} graph over {self.process.n_states} ids"
                    + (f", [MASK] = id {mask_id}" if mask_id is not None else "") + f", {self.schedule!r}")

    def phase(self, step: int) -> str:
        return self.name

    def count_tokens(self, mask: torch.Tensor) -> int:
        return int(mask.sum())

    def __call__(self, model, x0, mask, positions, step):
        nelbo, _, _ = diffusion_loss(self, model, x0, mask, positions, step, self.t_min)
        return masked_token_sum(nelbo, mask), self.count_tokens(mask), {"phase": self.name}

    def validation_nll(self, model, blocks, mask, *, batch_size: int, special_ids=()) -> dict:
        """DSE NELBO per content token (``special_ids`` not counted) and per token on held-out blocks."""
        return validation(self, model, blocks, mask, batch_size, special_ids, self.t_min)
