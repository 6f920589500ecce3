"""Discrete Consistency Distillation (DCD; paper Sec. 4.2, Alg. 1; docs/method.md §4): the objective and its math.

* :class:`DistillSchedule`: rounds of ``steps_per_round`` steps; the teacher is refreshed (θ⁻ ← θ, the *current
  student weights*, or the student's EMA for the paper's Alg. 2 ablation) before steps 0, M, 2M, …; the time gap
  δ = δ₀ · 2^round (1/512, 1/256, … over the paper's 5 rounds).
* :func:`distill_times`: the reference code's time convention — t stratified over the global batch in [t_min, 1],
  then ``t ← clip(t + δ, 0, 1)`` and ``s = t − δ`` (the paper writes s = max(t − δ, 0) with t ~ U[0, 1]; the code's
  shift puts a small point mass at t = 1 and keeps s ≥ t_min).  Times are linear in γ over the distillation window.
* :func:`distill_gamma_window`: the window (paper: γ ∈ [−4, −1] for GPT-2's K = 50,258).  For another vocabulary
  the default is the γ window with the same *discrete* α range, T_K(γ) ∈ [T_50258(−1), T_50258(−4)].
* :func:`dcd_batch`: one deterministic discrete trajectory per sequence from ONE Gaussian ε (``dcd_pair``), the
  student input z_t, the teacher input z_s, and the conditioning σ = −log T(γ) of each (duality, paper Eq. 11).
* :func:`dcd_token_losses`: per-token KL(student(z_t) ‖ teacher(z_s)) (``"bwd"``, default) or the reverse (``"fwd"``).
* :class:`DCDObjective`: the training objective built from these (``objective(model, x0, mask, positions, step)``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from duo_plugin.diffusion.losses import dcd_pair, distillation_kl
from duo_plugin.diffusion.schedules import gamma_at, sigma_from_alpha, stratified_times
from duo_plugin.diffusion.uniform import row_generators

from .base import ObjectiveContext, masked_token_sum

__all__ = [
    "PAPER_GAMMA_WINDOW",
    "PAPER_VOCAB_SIZE",
    "DistillSchedule",
    "distill_times",
    "paper_alpha_window",
    "distill_gamma_window",
    "DCDBatch",
    "dcd_batch",
    "dcd_token_losses",
    "DCDObjective",
]

PAPER_GAMMA_WINDOW = (-4.0, -1.0)  # distillation window of the reference code (configs/algo/distillation.yaml)
PAPER_VOCAB_SIZE = 50258  # GPT-2 + [PAD], the vocabulary that window was chosen for


# ---------------------------------------------------------------------------------------------------------- rounds
@dataclass(frozen=True)
class DistillSchedule:
    """Round structure of DCD (paper: 5 rounds × 10K steps, δ₀ = 1/512, doubling each round).

    Steps are 0-based optimizer steps.  Round ``r`` covers steps ``[r M, (r + 1) M)``; steps past the last round stay
    in the last round (same δ, no further refresh).
    """

    rounds: int = 5
    steps_per_round: int = 10_000
    delta0: float = 1.0 / 512
    growth: float = 2.0

    def __post_init__(self):
        if int(self.rounds) < 1 or int(self.steps_per_round) < 1:
            raise ValueError(f"need rounds >= 1 and steps_per_round >= 1, got {self.rounds}, {self.steps_per_round}")
        if not (0.0 < float(self.delta0) < 1.0):
            raise ValueError(f"delta0 must lie in (0, 1) (paper: 1/512), got {self.delta0}")
        if not float(self.growth) >= 1.0:
            raise ValueError(f"growth must be >= 1 (paper: 2), got {self.growth}")
        if self.delta0 * self.growth ** (self.rounds - 1) >= 1.0:
            raise ValueError(f"the last round's delta {self.delta0 * self.growth ** (self.rounds - 1)} is >= 1; use "
                             "fewer rounds or a smaller delta0 (the pair (t, s) must lie inside [0, 1])")

    @property
    def total_steps(self) -> int:
        return int(self.rounds) * int(self.steps_per_round)

    def round_of(self, step: int) -> int:
        """0-based round of optimizer step ``step``."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(int(step) // int(self.steps_per_round), int(self.rounds) - 1)

    def delta(self, step: int) -> float:
        """δ used at step ``step``: δ₀ · growth^round."""
        return float(self.delta0) * float(self.growth) ** self.round_of(step)

    def refreshes_teacher(self, step: int) -> bool:
        """True if the teacher is set to the student's weights *before* step ``step`` (steps 0, M, …, (rounds−1)M)."""
        return int(step) % int(self.steps_per_round) == 0 and int(step) < self.total_steps

    def ends_round(self, step: int) -> bool:
        """True if step ``step`` is the last step of a round (evaluate after it)."""
        return (int(step) + 1) % int(self.steps_per_round) == 0 and int(step) < self.total_steps


def distill_times(seed: int, step: int, positions, global_batch_size: int, delta: float,
                  t_min: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Student/teacher times (float64 ``[n]``) of the samples at ``positions`` of the global batch of ``step``.

    t ~ stratified U[t_min, 1] (one stratum per global-batch position, :func:`stratified_times`),
    ``t ← clip(t + δ, 0, 1)``, ``s = t − δ`` (reference code convention), so t − s = δ exactly and s ≥ t_min.
    """
    if not (0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    t = stratified_times(seed, step, positions, global_batch_size, t_min, dtype=torch.float64)
    t = (t + float(delta)).clamp(0.0, 1.0)
    return t, t - float(delta)


@functools.lru_cache(maxsize=None)
def paper_alpha_window() -> tuple[float, float]:
    """(α_min, α_max) = (T(−1), T(−4)) at K = 50,258: the discrete signal range of the paper's distillation window."""
    from duo_plugin.diffusion.duality import discrete_alpha

    a = discrete_alpha(torch.tensor(PAPER_GAMMA_WINDOW, dtype=torch.float64), PAPER_VOCAB_SIZE)
    return float(a[1]), float(a[0])


def distill_gamma_window(k_eff: int, gamma_min: Optional[float] = None,
                         gamma_max: Optional[float] = None) -> tuple[float, float]:
    """The distillation γ window.  Both given: used as is (paper: −4, −1).  Both None: the window whose discrete α
    range equals the paper's (:func:`paper_alpha_window`) for this K_eff (for K_eff = 50,258 that is [−4, −1])."""
    if (gamma_min is None) != (gamma_max is None):
        raise ValueError("set both distill.gamma_min and distill.gamma_max, or neither (null: the paper's discrete "
                         "alpha range for this vocabulary)")
    if gamma_min is not None:
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(f"need finite gamma_min < gamma_max, got [{gamma_min}, {gamma_max}]")
        return float(gamma_min), float(gamma_max)
    from duo_plugin.diffusion.duality import gamma_window

    a_min, a_max = paper_alpha_window()
    return gamma_window(int(k_eff), alpha_min=a_min, alpha_max=a_max)


# ---------------------------------------------------------------------------------------------------------- pairs
class DCDBatch(NamedTuple):
    """Inputs of one DCD step: student sees (z_t, sigma_t), teacher sees (z_s, sigma_s)."""

    z_t: torch.Tensor  # Long[B, L]
    z_s: torch.Tensor  # Long[B, L]
    sigma_t: torch.Tensor  # Float[B]  = -log T(gamma_t)
    sigma_s: torch.Tensor  # Float[B]  = -log T(gamma_s)
    gamma_t: torch.Tensor  # float64 [B]
    gamma_s: torch.Tensor  # float64 [B]


def dcd_batch(x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor, *, gamma_min: float, gamma_max: float,
              alpha_fn: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, generator,
              valid_vocab: Optional[torch.Tensor] = None) -> DCDBatch:
    """DCD inputs for clean ids ``x0 Long[B, L]`` at times ``t ≥ s`` (``[B]``, linear in γ over the window).

    z_u = argmax(α̃(γ_u) onehot(x0) + σ̃(γ_u) ε) with ONE ε per sequence shared by u = t and u = s
    (:func:`duo_plugin.diffusion.losses.dcd_pair`); σ_u = −log α(γ_u) with ``alpha_fn`` = T (the duality map for
    K_eff, e.g. ``DualityTable.alpha`` or ``lambda g: discrete_alpha(g, K_eff)``).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64)
    if bool((s > t).any()):
        raise ValueError("dcd_batch needs s <= t (the teacher sees the less noisy time)")
    gt = gamma_at(t, gamma_min, gamma_max).to(x0.device)
    gs = gamma_at(s, gamma_min, gamma_max).to(x0.device)
    z_t, z_s = dcd_pair(x0, gt, gs, vocab_size, generator, valid_vocab)
    sig_t = sigma_from_alpha(torch.as_tensor(alpha_fn(gt), dtype=torch.float64)).float()
    sig_s = sigma_from_alpha(torch.as_tensor(alpha_fn(gs), dtype=torch.float64)).float()
    return DCDBatch(z_t, z_s, sig_t.to(x0.device), sig_s.to(x0.device), gt, gs)


def dcd_token_losses(student: Callable, teacher: Callable, batch: DCDBatch, *, direction: str = "bwd",
                     padding_mask: Optional[torch.Tensor] = None, autocast=None) -> torch.Tensor:
    """Per-token distillation loss ``float32 [B, L]``: KL(student(z_t, σ_t) ‖ teacher(z_s, σ_s)) for ``"bwd"``
    (paper Eq. 23 / code ``kl-bwd``), KL(teacher ‖ student) for ``"fwd"``.  The teacher runs under ``no_grad``."""
    import contextlib

    kw = {"padding_mask": padding_mask} if padding_mask is not None else {}
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with torch.no_grad(), ctx():
        lt = teacher(batch.z_s, batch.sigma_s, **kw)
    with ctx():
        ls = student(batch.z_t, batch.sigma_t, **kw)
    return distillation_kl(ls.float(), lt.float(), direction)



class DCDObjective:
    """DCD loss of one micro-batch: student at (z_t, σ_t) against the frozen teacher at (z_s, σ_s).

    Args (the ``distill:`` section of ``duo/distill_*`` configs): rounds, steps_per_round, delta0, growth (the
    :class:`DistillSchedule`), gamma_min, gamma_max (both None: :func:`distill_gamma_window`), t_min, kl
    (``bwd`` = KL(student ‖ teacher), paper; ``fwd``), table_points (T table resolution).
    The teacher model is handed over in ``ctx.extra["teacher"]`` at setup (the recipe refreshes its weights).
    """

    name = "dcd"
    causal = False

    def __init__(self, *, rounds: int = 5, steps_per_round: int = 10_000, delta0: float = 1.0 / 512,
                 growth: float = 2.0, gamma_min: Optional[float] = -4.0, gamma_max: Optional[float] = -1.0,
                 t_min: float = 1e-3, kl: str = "bwd", table_points: int = 1025):
        if kl not in ("bwd", "fwd"):
            raise ValueError(f"distill.kl must be 'bwd' (KL(student||teacher), paper default) or 'fwd', got {kl!r}")
        self.schedule = DistillSchedule(int(rounds), int(steps_per_round), float(delta0), float(growth))
        self.gamma_cfg = (gamma_min, gamma_max)
        self.t_min, self.kl, self.table_points = float(t_min), kl, int(table_points)
        self.ctx: ObjectiveContext | None = None
        self.teacher = None

    def setup(self, model, ctx: ObjectiveContext) -> None:
        from duo_plugin.diffusion.duality import DualityTable

        self.ctx = ctx
        self.teacher = ctx.extra.get("teacher")
        self.gamma_min, self.gamma_max = distill_gamma_window(ctx.k_eff, *self.gamma_cfg)
        self.table = DualityTable.build(ctx.k_eff, self.gamma_min, self.gamma_max, num_points=self.table_points)
        if ctx.log:
            a = self.table.alpha(torch.tensor([self.gamma_min, self.gamma_max], dtype=torch.float64))
            s = self.schedule
            ctx.log(f"distillation window gamma in [{self.gamma_min:.4f}, {self.gamma_max:.4f}] -> discrete alpha in "
                    f"[{float(a[1]):.4f}, {float(a[0]):.4f}]; {s.rounds} rounds x {s.steps_per_round} steps, "
                    f"delta0={s.delta0:g}, kl={self.kl}")

    def phase(self, step: int) -> str:
        return f"round{self.schedule.round_of(step) + 1}"

    def count_tokens(self, mask: torch.Tensor) -> int:
        return int(mask.sum())

    def __call__(self, model, x0, mask, positions, step):
        ctx = self.ctx
        t, s = distill_times(ctx.seed, step, positions, ctx.global_batch_size, self.schedule.delta(step), self.t_min)
        gens = row_generators(ctx.seed, step, positions, device=ctx.device)
        b = dcd_batch(x0, t, s, gamma_min=self.gamma_min, gamma_max=self.gamma_max, alpha_fn=self.table.alpha,
                      vocab_size=ctx.vocab_size, generator=gens, valid_vocab=ctx.valid_vocab)
        padded = not bool(mask.all())
        if padded:  # padding stays clean and is neither attended to nor scored
            b = b._replace(z_t=torch.where(mask, b.z_t, x0), z_s=torch.where(mask, b.z_s, x0))
        kl = dcd_token_losses(model, self.teacher, b, direction=self.kl, padding_mask=mask if padded else None,
                              autocast=ctx.autocast)
        return masked_token_sum(kl, mask), self.count_tokens(mask), {"delta": self.schedule.delta(step)}
