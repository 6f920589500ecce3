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

from .base import ObjectiveContext, masked_token_sum
from .sedd import diffusion_loss, mask_row, validation

__all__ = ["D3PMObjective"]


class D3PMObjective:
    """D3PM absorbing, discrete time.

    Args (``objective: {_component_: duo_plugin.objectives.d3pm.D3PMObjective, ...}``):
        steps: T. hybrid_weight: λ of the auxiliary cross-entropy (Austin et al. use 0.01 for text; 0 = pure L_vb).
        t_min: the clock is stratified in ``[t_min, 1]`` (0 = every step k has probability 1/T).
        mask_id: the [MASK] id (default the model's last row).
    """

    name = "d3pm"
    causal = False

    def __init__(self, *, steps: int = 1000, hybrid_weight: float = 0.01, t_min: float = 0.0,
                 mask_id: int | None = None):
        if int(steps) < 1:
            raise ValueError(f"objective.steps must be >= 1, got {steps}")
        if not float(hybrid_weight) >= 0.0:
            raise ValueError(f"objective.hybrid_weight must be >= 0, got {hybrid_weight}")
        if not 0.0 <= float(t_min) < 1.0:
            raise ValueError(f"objective.t_min must lie in [0, 1), got {t_min}")
        self.steps, self.hybrid_weight, self.t_min = int(steps), float(hybrid_weight), float(t_min)
        self.mask_id = mask_id
        self.extra_metadata = {"d3pm_steps": self.steps}
        self.ctx: ObjectiveContext | None = None
        self.process: D3PMProcess | None = None

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        if bool(getattr(model, "time_conditioning", False)):
            raise ValueError("D3PM: build the model with model.time_conditioning: false (the last step has "
                             "alpha = 0, i.e. sigma = inf; the number of masks carries the step)")
        mask_id = mask_row(ctx, self.mask_id, "D3PM")
        self.ctx = ctx
        self.process = D3PMProcess(int(ctx.vocab_size), mask_id, valid_vocab=ctx.valid_vocab, steps=self.steps)
        if ctx.log:
            ctx.log(f"d3pm: absorbing, T={self.steps} steps, [MASK] = id {mask_id}, hybrid lambda="
                    f"{self.hybrid_weight:g}")

    def phase(self, step: int) -> str:
        return "d3pm"

    def count_tokens(self, mask: torch.Tensor) -> int:
        return int(mask.sum())

    def __call__(self, model, x0, mask, positions, step):
        nelbo, z_t, log_x = diffusion_loss(self, model, x0, mask, positions, step, self.t_min)
        metrics = {"phase": "d3pm"}
        loss = nelbo
        if self.hybrid_weight > 0:
            lp = self.process.log_x0(log_x, z_t).gather(-1, x0.long()[..., None]).squeeze(-1)
            masked = z_t == self.process.mask_id
            ce = torch.where(masked, -torch.where(masked, lp, torch.zeros_like(lp)), torch.zeros_like(lp))
            loss = nelbo + self.hybrid_weight * ce
        return masked_token_sum(loss, mask), self.count_tokens(mask), metrics

    def validation_nll(self, model, blocks, mask, *, batch_size: int, special_ids=()) -> dict:
        """The discrete-time NELBO (λ = 0) per content token and per token on held-out blocks."""
        return validation(self, model, blocks, mask, batch_size, special_ids, self.t_min)
