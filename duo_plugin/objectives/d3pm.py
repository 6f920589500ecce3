"""The D3PM baseline objective (Austin et al. 2021): absorbing transitions in discrete time, T steps.

Per sequence a stratified clock ``u`` over the global batch in ``[t_min, 1]`` (default ``t_min = 0``) mapped to the
step ``k = ceil(u T)`` (uniform on {1 … T}; :class:`duo_plugin.diffusion.d3pm.D3PMSchedule`), ``x_k`` with each token
masked w.p. ``k/T``, and the loss

    ``T · L_k + λ · CE``,   ``L_k = (1/k) (−log p̃_θ(x_0 | x_k))`` at masked positions (the ELBO term of step k),
    ``CE = −log p̃_θ(x_0 | x_k)`` at masked positions (Austin et al.'s auxiliary loss L_λ; ``hybrid_weight`` = λ).

``T · L_k`` alone is the NELBO (what validation and ``duo_eval`` report); λ = 0 trains on it. The network must not be
time-conditioned (``model.time_conditioning: false``): ``ᾱ_T = 0`` has no finite ``σ = −log ᾱ``, and the number
of masks carries the step (as in MDLM). [MASK] is the model's last row by default, as for MDLM.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.d3pm import D3PMProcess

from .base import ObjectiveContext
from .diffusion import DiffusionObjective, NoisyBatch
from .sedd import mask_row

__all__ = ["D3PMObjective", "HybridHead"]


class HybridHead:
    """The loss head ``T · L_k + λ · CE``: one forward, the process's NELBO plus λ · (−log p̃_θ(x0 | x_k)) at masked
    positions (λ = 0: the NELBO alone)."""

    name = "d3pm_hybrid"

    def __init__(self, process: D3PMProcess, weight: float):
        self.process, self.weight = process, float(weight)

    def __call__(self, model, b: NoisyBatch, autocast) -> torch.Tensor:
        with b.override, autocast():
            log_x = model(b.model_in, b.sigma, **b.model_kwargs)
        log_x = log_x.float()
        f = self.process.nelbo(log_x, b.z_t, b.x0, b.alpha, b.alpha_prime)
        if self.weight == 0:
            return f
        lp = self.process.log_x0(log_x, b.z_t).gather(-1, b.x0.long()[..., None]).squeeze(-1)
        masked = b.z_t == self.process.mask_id
        zero = torch.zeros_like(lp)
        return f + self.weight * torch.where(masked, -torch.where(masked, lp, zero), zero)


class D3PMObjective(DiffusionObjective):
    """D3PM absorbing, discrete time: the :class:`~duo_plugin.objectives.diffusion.DiffusionObjective` path over
    :class:`~duo_plugin.diffusion.d3pm.D3PMProcess` with the :class:`HybridHead`.

    Args (``objective: {_component_: duo_plugin.objectives.d3pm.D3PMObjective, ...}``):
        steps: T. hybrid_weight: λ of the auxiliary cross-entropy (Austin et al. use 0.01 for text; 0 = pure L_vb).
        t_min: the clock is stratified in ``[t_min, 1]`` (0 = every step k has probability 1/T).
        mask_id: the [MASK] id (as MDLM's; default the model's last row).
    """

    name = "d3pm"

    def __init__(self, *, steps: int = 1000, hybrid_weight: float = 0.01, t_min: float = 0.0, mask_id=None):
        if int(steps) < 1:
            raise ValueError(f"objective.steps must be >= 1, got {steps}")
        if not float(hybrid_weight) >= 0.0:
            raise ValueError(f"objective.hybrid_weight must be >= 0, got {hybrid_weight}")
        if not 0.0 <= float(t_min) < 1.0:
            raise ValueError(f"objective.t_min must lie in [0, 1), got {t_min}")
        super().__init__(t_min=t_min)
        self.steps, self.hybrid_weight, self.mask_id = int(steps), float(hybrid_weight), mask_id
        self.extra_metadata = {"d3pm_steps": self.steps}

    def build_process(self, model: torch.nn.Module, ctx: ObjectiveContext) -> D3PMProcess:
        if bool(getattr(model, "time_conditioning", False)):
            raise ValueError("D3PM: build the model with model.time_conditioning: false (the last step has "
                             "alpha = 0, i.e. sigma = inf; the number of masks carries the step)")
        mask_id, data = mask_row(ctx, self.mask_id, "D3PM")
        proc = D3PMProcess(int(ctx.vocab_size), mask_id, valid_vocab=data, steps=self.steps)
        self.schedule = proc.schedule
        if ctx.log:
            ctx.log(f"d3pm: absorbing, T={self.steps} steps, [MASK] = id {mask_id}, hybrid lambda="
                    f"{self.hybrid_weight:g}")
        return proc

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        super().setup(model, ctx)
        self.head = HybridHead(self.process, self.hybrid_weight)
