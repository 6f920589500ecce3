"""Curriculum phase switch and τ schedule (docs/method.md §3.1–3.2; reference code ``DUO.nll`` /
``DUO._compute_gumbel_tau_inverse``).

* Phase: the Gaussian-relaxed curriculum loss is used while ``step <= curriculum_end`` (the code switches to
  the discrete NELBO when ``global_step > curriculum_end``); afterwards ``"discrete"``. ``step`` is the number
  of optimizer steps completed before this one (Lightning's ``global_step``; 0 for the first step).
* τ: ``log10 τ`` is ``log10(tau_start)`` before ``curriculum_start``, interpolates linearly to
  ``log10(tau_end)`` on ``[curriculum_start, curriculum_end)``, and is ``-10`` (τ = 1e-10, i.e. argmax) from
  ``curriculum_end`` on, exactly as the reference code. With ``tau_start == tau_end`` τ is constant (the
  paper's scripts: 1e-3 on OWT and LM1B).
* γ window: ``[gamma_min, gamma_max]`` (OWT [-3.55, -1.85], LM1B [-3.5, -1.75]); the curriculum draws
  ``γ_t = gamma_min + t (gamma_max - gamma_min)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CurriculumPhase", "PhaseInfo"]

_END_LOG10_TAU = -10.0


@dataclass(frozen=True)
class PhaseInfo:
    phase: str  # "curriculum" | "discrete"
    tau: float | None  # None in the discrete phase
    gamma_min: float
    gamma_max: float

    def gamma(self, t):
        """γ_t = gamma_min + t (gamma_max − gamma_min) (works for floats and tensors)."""
        return self.gamma_min + t * (self.gamma_max - self.gamma_min)


@dataclass(frozen=True)
class CurriculumPhase:
    """Which loss is active at a step, with the curriculum temperature τ.

    Args:
        curriculum_start, curriculum_end: steps (``0 <= start <= end``); ``end < 0`` disables the curriculum
            (always "discrete", i.e. a Duo-base run).
        tau_start, tau_end: τ at the start/end of the anneal (> 0), interpolated in log10.
        gamma_min, gamma_max: the Gaussian log-SNR window (``gamma_min < gamma_max``).
    """

    curriculum_start: int = 0
    curriculum_end: int = 500_000
    tau_start: float = 1e-3
    tau_end: float = 1e-3
    gamma_min: float = -3.55
    gamma_max: float = -1.85

    def __post_init__(self):
        if self.curriculum_end >= 0 and not 0 <= self.curriculum_start <= self.curriculum_end:
            raise ValueError(f"need 0 <= curriculum_start <= curriculum_end, got {self.curriculum_start}, "
                             f"{self.curriculum_end}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ValueError(f"tau_start and tau_end must be > 0, got {self.tau_start}, {self.tau_end}")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")

    def phase(self, step: int) -> str:
        return "curriculum" if 0 <= self.curriculum_end and int(step) <= self.curriculum_end else "discrete"

    def log10_tau(self, step: int) -> float:
        """log10 τ at ``step`` (reference-code schedule, see module docstring)."""
        s = int(step)
        a, b = math.log10(self.tau_start), math.log10(self.tau_end)
        if s < self.curriculum_start:
            return a
        if s < self.curriculum_end:
            frac = (s - self.curriculum_start) / (self.curriculum_end - self.curriculum_start)
            return a + frac * (b - a)
        return _END_LOG10_TAU

    def tau(self, step: int) -> float | None:
        """τ during the curriculum phase, None in the discrete phase."""
        if self.phase(step) != "curriculum":
            return None
        return 10.0 ** self.log10_tau(step)

    def at(self, step: int) -> PhaseInfo:
        return PhaseInfo(self.phase(step), self.tau(step), float(self.gamma_min), float(self.gamma_max))
