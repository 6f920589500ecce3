"""Monte Carlo policies of the evaluation estimators (docs/evaluation.md §2 "Monte Carlo policy").

A policy says how many samples M each request gets:

* **fixed** (``target_stderr=None``): M = ``samples`` for every request, decided before any draw.
* **two-stage adaptive** (``target_stderr`` set): a pilot round of ``samples`` draws estimates the per-sample
  variance s² of the request; the request then gets ``M = clip(ceil(s² / target²), samples, max_samples)`` **fresh**
  draws and its estimate is their mean -- the pilot is discarded. M is a function of the pilot only, which is
  independent of the fresh draws, so ``E[mean | M] = μ`` for every M and the estimate is unbiased (the NELBO stays
  an upper bound in expectation). The earlier rule (add rounds until the *running* standard error falls below the
  target) stops preferentially after draws that happened to be small: on a heavy-tailed integrand it is biased low
  (``tests/eval/test_mc_policy.py`` shows both on a lognormal).

The estimators call :func:`plan_samples` on the pilot values; :func:`two_stage_mean` is the same policy over any
``draw(stage, n)`` (for a toy integrand, or any estimator that is not one of ours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["MCPolicy", "plan_samples", "two_stage_mean", "mean_and_stderr"]

#: default cap of the adaptive policy, in multiples of the pilot size
DEFAULT_CAP_FACTOR = 32


@dataclass(frozen=True)
class MCPolicy:
    """How many Monte Carlo samples a request gets.

    Attributes:
        samples: M of the fixed policy; the pilot size of the adaptive one (and its minimum M).
        target_stderr: None = fixed M; else the per-request standard error (nats) the fresh round is sized for.
        max_samples: the adaptive cap on the fresh round (default ``32 · samples``).
        time_sampling: ``stratified`` (the M times stratified over [t_min, 1]) | ``iid``.
    """

    samples: int = 128
    target_stderr: Optional[float] = None
    max_samples: Optional[int] = None
    time_sampling: str = "stratified"

    def __post_init__(self):
        if int(self.samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {self.samples}")
        if self.time_sampling not in ("stratified", "iid"):
            raise ValueError(f"time_sampling must be 'stratified' or 'iid', got {self.time_sampling!r}")
        if self.target_stderr is not None and not float(self.target_stderr) > 0:
            raise ValueError(f"target_stderr must be > 0 nats, got {self.target_stderr}")
        if self.target_stderr is not None and self.cap < int(self.samples):
            raise ValueError(f"max_mc_samples={self.cap} must be >= mc_samples={self.samples}")

    @property
    def adaptive(self) -> bool:
        return self.target_stderr is not None

    @property
    def cap(self) -> int:
        return int(self.max_samples) if self.max_samples is not None else DEFAULT_CAP_FACTOR * int(self.samples)

    def describe(self) -> str:
        if not self.adaptive:
            return f"M={int(self.samples)} {self.time_sampling} times per request"
        return (f"two-stage adaptive M (pilot of {int(self.samples)} discarded, then M = clip(s^2/target^2, "
                f"{int(self.samples)}, {self.cap}) fresh {self.time_sampling} times for an MC stderr of "
                f"{float(self.target_stderr):g} nats)")


def plan_samples(pilot: torch.Tensor, policy: MCPolicy) -> int:
    """The size of the fresh round for a request whose pilot values are ``pilot`` (``[n]``).

    ``M = clip(ceil(s² / target²), samples, cap)`` with s² the unbiased pilot variance; ``0`` when a pilot value is
    not finite (the request's value is +∞ whatever else is drawn) and ``samples`` for a one-sample pilot.
    """
    v = pilot.to(torch.float64).flatten()
    if not bool(torch.isfinite(v).all()):
        return 0
    lo = int(policy.samples)
    if v.numel() < 2:
        return lo
    want = math.ceil(float(v.var(unbiased=True)) / float(policy.target_stderr) ** 2)
    return max(lo, min(policy.cap, want))


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """``(mean, std/√n)`` of the samples (``(+inf, 0)`` when one is not finite, stderr NaN for one sample)."""
    v = values.to(torch.float64).flatten()
    if not bool(torch.isfinite(v).all()):
        return float("inf"), 0.0
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() >= 2 else float("nan")
    return float(v.mean()), se


def two_stage_mean(draw: Callable[[int, int], torch.Tensor], policy: MCPolicy) -> tuple[float, float, int]:
    """The policy over an arbitrary integrand: ``draw(stage, n)`` returns ``n`` i.i.d. values (stage 0 = the pilot,
    stage 1 = the fresh round; the caller keeps their randomness independent). Returns ``(mean, stderr, M)``."""
    if not policy.adaptive:
        v = draw(0, int(policy.samples))
        return (*mean_and_stderr(v), int(policy.samples))
    m = plan_samples(draw(0, int(policy.samples)), policy)
    if m == 0:
        return float("inf"), 0.0, int(policy.samples)
    v = draw(1, m)
    return (*mean_and_stderr(v), m)
