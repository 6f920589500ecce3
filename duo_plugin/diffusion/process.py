"""The noise-process interface that objectives, samplers and evaluation are written against (docs/method.md §1,
§7.4), and the uniform-state process.

A discrete diffusion process is fixed by a schedule ``α_t`` (signal level, ``α_0 = 1`` clean, ``α_1 ≈ 0`` prior)
and a noise distribution: the uniform-state process (USDM, this package's Duo) replaces a token by a uniform
valid id; an absorbing ("masked", MDLM) process replaces it by a ``[MASK]`` id. One class per process, used by
every consumer:

* ``alpha(t)``, ``alpha_prime(t)``: the schedule (float64, ``dα/dt ≤ 0``); ``sigma(t) = −log α(t)``, the network's
  time conditioning (float64; the one place σ is written);
* ``corrupt(x0, alpha_t, generator)``: a draw of ``z_t ~ q(z_t | x0)`` (one generator per row);
* ``posterior(z_t, x0_probs, alpha_t, alpha_s)``: ``q(z_s | z_t, x)`` in float64, linear in ``x`` so ``x = x_θ``
  gives the ancestral-sampling step;
* ``prior_sample(shape, generator, device=None)``: ``z_1``;
* ``nelbo(log_x_theta, z_t, x0, alpha_t, alpha_prime_t)``: the per-token continuous-time NELBO ``[B, L]`` (fp32);
* for the samplers: ``marginal(x_probs, alpha)`` = the forward law ``q_α(· | x)`` of a probability vector x
  (float64; the Ψ-sampler re-noises with it) and ``t_for_alpha(alpha)`` (the schedule's inverse).

:class:`UniformProcess` implements it over :mod:`duo_plugin.diffusion.uniform` and :func:`~duo_plugin.diffusion.
losses.duo_nelbo`; :class:`duo_plugin.diffusion.absorbing.AbsorbingProcess` is the masked process. A new process is
one more class with these methods (docs/architecture.md, "Where things go").
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from . import uniform
from .losses import duo_nelbo
from .schedules import LogLinearSchedule, ScheduledTime

_F64 = torch.float64

__all__ = ["NoiseProcess", "UniformProcess"]


@runtime_checkable
class NoiseProcess(Protocol):
    vocab_size: int  # K, the model's vocabulary width

    def alpha(self, t) -> torch.Tensor: ...

    def alpha_prime(self, t) -> torch.Tensor: ...

    def sigma(self, t) -> torch.Tensor: ...

    def corrupt(self, x0: torch.Tensor, alpha_t, generator) -> torch.Tensor: ...

    def posterior(self, z_t: torch.Tensor, x0_probs: torch.Tensor, alpha_t, alpha_s) -> torch.Tensor: ...

    def prior_sample(self, shape: Sequence[int], generator, device=None) -> torch.Tensor: ...

    def nelbo(self, log_x_theta: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor, alpha_t, alpha_prime_t
              ) -> torch.Tensor: ...

    def marginal(self, x_probs: torch.Tensor, alpha) -> torch.Tensor: ...

    def t_for_alpha(self, alpha: float) -> float: ...


class UniformProcess(ScheduledTime):
    """Uniform-state process over the valid ids (docs/method.md §1.1), with a schedule (default log-linear): prior
    U(valid ids), the exact posterior q(z_s | z_t, x) (paper Eq. 4), the forward marginal
    q_α(· | x) = α x + (1 − α) U(valid) and the NELBO of Duo.

    Args:
        vocab_size: K. valid_vocab: ``Bool[K]`` (ids noise may produce) or None (all).
        schedule: any object with ``alpha(t)`` / ``alpha_prime(t)`` (``LogLinearSchedule``, ``DualitySchedule``).

    Attributes: ``k_eff`` (number of valid ids), ``fill_id`` (the smallest valid id: a placeholder the samplers put
    at clamped positions, whose law is never used).
    """

    name = "uniform"

    def __init__(self, vocab_size: int, valid_vocab: torch.Tensor | None = None, schedule=None):
        self.vocab_size = int(vocab_size)
        self.valid_vocab = valid_vocab
        self.schedule = schedule if schedule is not None else LogLinearSchedule()
        self.k_eff = uniform.num_valid(self.vocab_size, valid_vocab)  # validates valid_vocab against K
        self._fill_id: int | None = None

    @property
    def fill_id(self) -> int:
        if self._fill_id is None:
            self._fill_id = 0 if self.valid_vocab is None else int(torch.nonzero(self.valid_vocab)[0])
        return self._fill_id

    def corrupt(self, x0, alpha_t, generator):
        if self.valid_vocab is None:
            return uniform.corrupt(x0, alpha_t, generator, vocab_size=self.vocab_size)
        return uniform.corrupt(x0, alpha_t, generator, self.valid_vocab)

    def posterior(self, z_t, x0_probs, alpha_t, alpha_s):
        return uniform.posterior(z_t, x0_probs, alpha_t, alpha_s, self.valid_vocab)

    def prior_sample(self, shape, generator, device=None):
        return uniform.prior_sample(shape, self.vocab_size, generator, self.valid_vocab, device=device)

    def marginal(self, x_probs: torch.Tensor, alpha) -> torch.Tensor:
        """q_α(· | x) for a probability vector x: ``α x + (1 − α) U(valid)`` (float64 ``[..., K]``; ``alpha`` a
        scalar or one value per leading index)."""
        a = torch.as_tensor(alpha, dtype=_F64, device=x_probs.device)
        if a.dim():
            a = a[..., None]
        if self.valid_vocab is None:
            uni = torch.full((x_probs.shape[-1],), 1.0 / self.k_eff, dtype=_F64, device=x_probs.device)
        else:
            uni = self.valid_vocab.to(x_probs.device).to(_F64) / self.k_eff
        return a * x_probs.to(_F64) + (1 - a) * uni

    def subs(self, log_x_theta, z_t):
        """The process's parameterisation of x_θ: −∞ at ids outside ``valid_vocab`` (which it never produces)."""
        if self.valid_vocab is None:
            return log_x_theta
        return log_x_theta.masked_fill(~self.valid_vocab.to(log_x_theta.device), float("-inf"))

    def nelbo(self, log_x_theta, z_t, x0, alpha_t, alpha_prime_t):
        return duo_nelbo(log_x_theta, z_t, x0, alpha_t, alpha_prime_t, self.valid_vocab)

    def __repr__(self) -> str:
        return f"UniformProcess(K={self.vocab_size}, schedule={self.schedule!r})"
