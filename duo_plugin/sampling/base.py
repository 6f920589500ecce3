"""The scheduler interface shared by every noise process: what :func:`duo_plugin.sampling.sample` needs from a
scheduler, and the defaults a new scheduler inherits.

One sampling loop serves every process. The loop owns the prior draw, the denoiser calls (one per step, two with
prompt guidance, none when x_θ can be reused), the clamping of prompt / infill positions, chunking, the trajectory
and the NFE count. A *scheduler* owns the update rule, diffusers-style: it never calls the network.

A scheduler for a new process (see docs/architecture.md, "Where things go"):

* subclass :class:`SchedulerBase` (or implement :class:`Scheduler` directly) with a ``process`` (the noise-process
  object of :mod:`duo_plugin.diffusion`: ``vocab_size``, ``alpha(t)``, ``prior_sample(shape, generator, device)``);
* ``timesteps(steps, t_eps)``: the float64 grid ``[steps + 1]`` from 1 towards 0 (step i goes from entry i to i + 1);
* ``step(log_x_theta, t, s, z, generator, *, log_x_theta_uncond=None)``: draw z_s ``Long[B, L]`` from the denoiser's
  ``log x_θ(z_t, σ_t)`` ``Float[B, L, W]``, in float64, with every random draw from ``generator`` (a
  :class:`StepNoise`: the torch generator(s) keyed by (seed, row), the counter-stream row seeds, the step index);
* ``final(log_x_theta, t, z, generator, mode, *, log_x_theta_uncond=None)``: the noise-removal call at t = t_eps,
  ``mode`` ``"ancestral"`` or ``"greedy"`` (the loop skips it for ``"none"``).

Clamped (prompt / infill) positions: before ``step`` / ``final`` the loop writes ``fill_id`` at them (a valid id of
the process, so the law is defined there; None leaves the clamp values) and after the call it writes the clamp
values back, so a scheduler never needs to know about clamps. ``check_clamp`` may refuse clamp values (e.g. the
absorbing process refuses its [MASK] id).

With ``guidance_weight != 1`` and clamped positions the loop also passes ``log_x_theta_uncond``: the denoiser's
prediction with the clamped positions replaced by a prior draw. ``reuse_x_theta``: the denoiser ignores σ (not
time-conditioned), so the loop reuses x_θ while z is unchanged (never with guidance); this saves calls, never
changes a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

import torch

__all__ = ["Clamp", "Scheduler", "SchedulerBase", "StepNoise", "check_alpha_grid", "time_grid"]


class Clamp(NamedTuple):
    """Infilling: ``mask`` ``Bool[B, L]`` (or ``[L]``) marks positions held at ``values`` ``Long[B, L]`` (or ``[L]``)
    at every step of the sampler (ids need not be ids of the process's law, e.g. BOS)."""

    mask: Any
    values: Any

_F64 = torch.float64


@dataclass
class StepNoise:
    """The randomness of one step: ``generator`` (a torch.Generator or one per row; dense draws and prior noise),
    ``seeds`` (``Long[B]`` counter-stream row seeds of the kernel paths, or None) and ``index`` (the step's index on
    the grid: the counter key, and the Ψ κ lookup)."""

    generator: Any = None
    seeds: Optional[torch.Tensor] = None
    index: int = 0


def time_grid(steps: int, t_eps: float = 1e-5) -> torch.Tensor:
    """``float64 [steps + 1]`` uniform grid ``linspace(1, t_eps, steps + 1)`` (docs/method.md, sampling)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (0.0 < float(t_eps) < 1.0):
        raise ValueError(f"t_eps must lie in (0, 1), got {t_eps}")
    return torch.linspace(1.0, float(t_eps), int(steps) + 1, dtype=_F64)


def check_alpha_grid(process, grid: torch.Tensor, low_open: bool, high_open: bool) -> None:
    """α_t on ``grid`` must lie in [0, 1] (the bound is excluded where ``low_open`` / ``high_open``)."""
    a = torch.as_tensor(process.alpha(grid), dtype=_F64)
    bad = (a < 0) | (a > 1) | torch.isnan(a)
    if low_open:
        bad |= a == 0
    if high_open:
        bad |= a == 1
    if bool(bad.any()):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"schedule.alpha(t) must lie in {lo}0, 1{hi} on the sampling grid (t_eps > 0)")


@runtime_checkable
class Scheduler(Protocol):
    """What :func:`duo_plugin.sampling.sample` calls (module docstring). Attributes: ``process``, ``predictor`` (a
    name for logs and metrics), ``guidance_weight``, ``uses_counter_stream`` (the loop then derives per-row 63-bit
    counter seeds after the prior draw), ``reuse_x_theta``, ``fill_id``."""

    process: Any
    predictor: str
    guidance_weight: float
    uses_counter_stream: bool
    reuse_x_theta: bool
    fill_id: Optional[int]

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor: ...

    def step(self, log_x_theta: torch.Tensor, t, s, z: torch.Tensor, generator: StepNoise, *,
             log_x_theta_uncond: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def final(self, log_x_theta: torch.Tensor, t, z: torch.Tensor, generator: StepNoise, mode: str, *,
              log_x_theta_uncond: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def check_clamp(self, mask: torch.Tensor, values: torch.Tensor) -> None: ...


class SchedulerBase:
    """Defaults for a :class:`Scheduler`: the uniform grid ``linspace(1, t_eps, steps + 1)`` with α_t checked in
    [0, 1], no guidance, no counter stream, no x_θ reuse, the process's ``fill_id`` (None if it has none), any clamp
    value accepted. Subclasses set ``process`` and implement ``step`` and ``final``."""

    process: Any = None
    predictor = "ancestral"
    guidance_weight = 1.0
    uses_counter_stream = False
    reuse_x_theta = False

    @property
    def fill_id(self) -> Optional[int]:
        fid = getattr(self.process, "fill_id", None)
        return None if fid is None else int(fid)

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        grid = time_grid(steps, t_eps)
        check_alpha_grid(self.process, grid, low_open=False, high_open=False)
        return grid

    def check_clamp(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        return None

    def step(self, log_x_theta, t, s, z, generator: StepNoise, *, log_x_theta_uncond=None):  # pragma: no cover
        raise NotImplementedError

    def final(self, log_x_theta, t, z, generator: StepNoise, mode: str, *,
              log_x_theta_uncond=None):  # pragma: no cover
        raise NotImplementedError
