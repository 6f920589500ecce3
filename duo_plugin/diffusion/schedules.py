"""Noise schedules and time sampling (docs/method.md §0, §1.1, §3.1).

* Log-linear discrete schedule α_t = 1 − (1 − ε) t, α'_t = −(1 − ε)   (code ``LogLinear``; ε = 1e-3).
* Gaussian γ-parameterisation: α̃ = sqrt(sigmoid(−γ)), σ̃ = sqrt(sigmoid(γ)), γ_t = γ_min + t (γ_max − γ_min).
* Duality schedule: α_t = T(γ_t) (paper Eq. 11) with α'_t = dT/dγ · (γ_max − γ_min) (chain rule).
* Stratified ("antithetic") times over the global batch: one u per (seed, step), t_i = (u/N + i/N) mod 1, then
  t ← (1 − t_min) t + t_min; the draw depends only on (seed, step, global sample index).

All schedule values are returned in float64 unless stated otherwise; σ = −log α is the network's time input.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from . import streams
from .uniform import row_generators, stable_seed

__all__ = [
    "log_linear_alpha",
    "log_linear_alpha_prime",
    "gaussian_coefficients",
    "gamma_at",
    "stratified_times",
    "micro_batch_times",
    "micro_batch_generators",
    "LogLinearSchedule",
    "DualitySchedule",
    "t_for_alpha",
    "sigma_from_alpha",
    "ScheduledTime",
]



def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def sigma_from_alpha(alpha) -> torch.Tensor:
    """σ = −log α, the noise level every denoiser is told (``model(z_t, σ)``): the one place σ is written.

    Keeps ``alpha``'s floating dtype (a Python number becomes float64) and clamps α at that dtype's smallest positive
    value, so α = 0 (the end of a schedule without ε, D3PM's step T) gives a large finite σ instead of +∞."""
    a = torch.as_tensor(alpha)
    if not a.is_floating_point():
        a = a.to(torch.float64)
    return -torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))


class ScheduledTime:
    """The time half of a noise process, read from its ``schedule`` (any object with ``alpha(t)`` and
    ``alpha_prime(t)``): ``alpha(t)`` (float64, the shape of ``t``), ``alpha_prime(t)``, ``sigma(t)`` = −log α(t)
    (:func:`sigma_from_alpha`, the network's time conditioning) and the inverse ``t_for_alpha(α)``. The uniform,
    absorbing and SEDD processes inherit it; a process with its own clock (D3PM) defines the four itself."""

    schedule: object

    def alpha(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.as_tensor(self.schedule.alpha(t), dtype=torch.float64).reshape(t.shape)

    def alpha_prime(self, t) -> torch.Tensor:
        return self.schedule.alpha_prime(t)

    def sigma(self, t) -> torch.Tensor:
        return sigma_from_alpha(self.alpha(t))

    def t_for_alpha(self, alpha: float) -> float:
        """The time with α_t = ``alpha`` (:func:`t_for_alpha`)."""
        return t_for_alpha(self.schedule, alpha)


def log_linear_alpha(t, eps: float = 1e-3) -> torch.Tensor:
    """α_t = 1 − (1 − ε) t  (float64, same shape as ``t``)."""
    return 1.0 - (1.0 - eps) * _as_f64(t)


def log_linear_alpha_prime(t, eps: float = 1e-3) -> torch.Tensor:
    """dα_t/dt = −(1 − ε)  (float64, same shape as ``t``)."""
    t = _as_f64(t)
    return torch.full_like(t, -(1.0 - eps))


def gaussian_coefficients(gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """(α̃, σ̃) = (sqrt(sigmoid(−γ)), sqrt(sigmoid(γ))) — variance preserving, SNR = e^{−γ}. Float64."""
    g = _as_f64(gamma)
    return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()


def gamma_at(t, gamma_min: float, gamma_max: float) -> torch.Tensor:
    """γ_t = γ_min + t (γ_max − γ_min)  (float64)."""
    return gamma_min + _as_f64(t) * (gamma_max - gamma_min)


def stratified_times(
    seed: int,
    step: int,
    indices: Iterable[int] | torch.Tensor,
    global_batch_size: int,
    t_min: float = 1e-3,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Stratified times for the given global sample indices (one uniform u per (seed, step)).

    ``t_i = (u/N + i/N) mod 1`` for stratum ``i = index mod N`` (N = ``global_batch_size``), then
    ``t ← (1 − t_min) t + t_min``.  Each of the N strata [i/N, (i+1)/N) holds exactly one sample of the global batch,
    and the value for a sample depends only on (seed, step, index) — not on world size, rank or accumulation split.

    Args:
        indices: positions of this process's samples inside the global batch (0 … N−1).
    Returns:
        ``Tensor[n]`` of times in [t_min, 1).
    """
    n = int(global_batch_size)
    if n < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.int64)
    idx = idx.flatten().cpu()
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("indices must be non-negative global sample positions")
    u = (stable_seed(seed, step, streams.TIME) >> 10) / float(1 << 53)  # 53-bit uniform in [0, 1)
    strata = (idx % n).to(torch.float64)
    t = torch.remainder(u / n + strata / n, 1.0)
    t = (1.0 - t_min) * t + t_min
    return t.to(dtype=dtype, device=device)


def micro_batch_times(seed: int, step: int, positions: Iterable[int] | torch.Tensor, global_batch_size: int,
                      t_min: float = 1e-3, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """:func:`stratified_times` for the samples at ``positions`` (``0..N-1`` inside the global batch of ``step``, as
    returned by :func:`duo_plugin.data.text.shard`); raises ValueError for a position outside ``[0, N)``."""
    pos = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions,
                          dtype=torch.int64).flatten()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= int(global_batch_size)):
        raise ValueError(f"positions must lie in [0, {global_batch_size}) (positions inside the global batch, "
                         "as returned by duo_plugin.data.text.shard), got range "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    return stratified_times(seed, step, pos, global_batch_size, t_min, dtype=dtype, device=device)


def micro_batch_generators(seed: int, step: int, positions: Iterable[int] | torch.Tensor,
                           device=None) -> list[torch.Generator]:
    """One generator per sample keyed by (seed, step, position in the global batch) (= :func:`row_generators`)."""
    return row_generators(seed, step, positions, device=device)


class LogLinearSchedule:
    """Discrete log-linear schedule α_t = 1 − (1 − ε) t (post-curriculum training, evaluation, sampling)."""

    def __init__(self, eps: float = 1e-3):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.eps = float(eps)

    def alpha(self, t) -> torch.Tensor:
        return log_linear_alpha(t, self.eps)

    def alpha_prime(self, t) -> torch.Tensor:
        return log_linear_alpha_prime(t, self.eps)

    def sigma(self, t) -> torch.Tensor:
        """σ = −log α_t = −log1p(−(1 − ε) t)."""
        return -torch.log1p(-(1.0 - self.eps) * _as_f64(t))

    def __repr__(self) -> str:
        return f"LogLinearSchedule(eps={self.eps})"


class DualitySchedule:
    """Curriculum schedule: α_t = T(γ_t), γ_t linear in t over [γ_min, γ_max] (paper Eq. 11, §3.1).

    ``vocab_size`` is K_eff (the number of valid ids).  With ``table`` (a :class:`~.duality.DualityTable` for this
    K covering the window) values come from its cubic-Hermite interpolant; otherwise T is integrated directly.
    ``alpha_prime(t)`` = dT/dγ · (γ_max − γ_min).
    """

    def __init__(self, vocab_size: int, gamma_min: float, gamma_max: float, table=None):
        if int(vocab_size) < 2:
            raise ValueError(f"vocab_size must be >= 2 for the duality map, got {vocab_size}")
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(f"need finite gamma_min < gamma_max, got [{gamma_min}, {gamma_max}]")
        self.vocab_size = int(vocab_size)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        if table is not None:
            if int(table.vocab_size) != self.vocab_size:
                raise ValueError(
                    f"DualityTable was built for K={table.vocab_size} but the schedule uses K={self.vocab_size}; "
                    "rebuild it with `duo-duality build --vocab-size K ...`"
                )
            if table.gamma_min > self.gamma_min + 1e-12 or table.gamma_max < self.gamma_max - 1e-12:
                raise ValueError(
                    f"DualityTable covers γ ∈ [{table.gamma_min}, {table.gamma_max}] but the schedule needs "
                    f"[{self.gamma_min}, {self.gamma_max}]; rebuild the table with a wider range"
                )
        self.table = table

    def gamma(self, t) -> torch.Tensor:
        return gamma_at(t, self.gamma_min, self.gamma_max)

    def gaussian_coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_coefficients(self.gamma(t))

    def alpha(self, t) -> torch.Tensor:
        g = self.gamma(t)
        if self.table is not None:
            return self.table.alpha(g)
        from .duality import discrete_alpha

        return discrete_alpha(g, self.vocab_size)

    def alpha_prime(self, t) -> torch.Tensor:
        g = self.gamma(t)
        if self.table is not None:
            d = self.table.alpha_prime(g)
        else:
            from .duality import discrete_alpha_prime

            d = discrete_alpha_prime(g, self.vocab_size)
        return d * (self.gamma_max - self.gamma_min)

    def sigma(self, t) -> torch.Tensor:
        return sigma_from_alpha(self.alpha(t))

    def __repr__(self) -> str:
        return (
            f"DualitySchedule(vocab_size={self.vocab_size}, gamma_min={self.gamma_min}, gamma_max={self.gamma_max}, "
            f"table={'yes' if self.table is not None else 'no'})"
        )


def t_for_alpha(schedule, alpha: float) -> float:
    """The time ``t ∈ [0, 1]`` with ``schedule.alpha(t) = alpha``: the schedule's own ``t_for_alpha`` if it has one,
    else bisection on [0, 1] (α decreases in t; 200 halvings, float64 times)."""
    inv = getattr(schedule, "t_for_alpha", None)
    if callable(inv):
        return float(inv(alpha))
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(schedule.alpha(torch.tensor(mid, dtype=torch.float64))) > float(alpha):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
