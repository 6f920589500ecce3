"""The noise-process interface an objective (and later a sampler) is written against (docs/method.md §1, §7.4).

A discrete diffusion process is fixed by a schedule ``α_t`` (signal level, ``α_0 = 1`` clean, ``α_1 ≈ 0`` prior)
and a noise distribution: the uniform-state process (USDM, this package's Duo) replaces a token by a uniform
valid id; an absorbing ("masked", MDLM) process replaces it by a ``[MASK]`` id. Everything a training objective
needs from it is:

* ``alpha(t)``, ``alpha_prime(t)``: the schedule (float64, ``dα/dt ≤ 0``);
* ``corrupt(x0, alpha_t, generator)``: a draw of ``z_t ~ q(z_t | x0)`` (one generator per row);
* ``posterior(z_t, x0_probs, alpha_t, alpha_s)``: ``q(z_s | z_t, x)`` in float64, linear in ``x`` so ``x = x_θ``
  gives the ancestral-sampling step;
* ``prior_sample(shape, generator)``: ``z_1``;
* ``nelbo(log_x_theta, z_t, x0, alpha_t, alpha_prime_t)``: the per-token continuous-time NELBO ``[B, L]`` (fp32).

:class:`UniformProcess` implements it over :mod:`duo_plugin.diffusion.uniform` and :func:`~duo_plugin.diffusion.
losses.duo_nelbo`. A masked process is one more class with the same five methods plus an objective file
(docs/architecture.md, "Adding an objective").
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from . import uniform
from .losses import duo_nelbo
from .schedules import LogLinearSchedule

__all__ = ["NoiseProcess", "UniformProcess"]


@runtime_checkable
class NoiseProcess(Protocol):
    vocab_size: int  # K, the model's vocabulary width

    def alpha(self, t) -> torch.Tensor: ...

    def alpha_prime(self, t) -> torch.Tensor: ...

    def corrupt(self, x0: torch.Tensor, alpha_t, generator) -> torch.Tensor: ...

    def posterior(self, z_t: torch.Tensor, x0_probs: torch.Tensor, alpha_t, alpha_s) -> torch.Tensor: ...

    def prior_sample(self, shape: Sequence[int], generator, device=None) -> torch.Tensor: ...

    def nelbo(self, log_x_theta: torch.Tensor, z_t: torch.Tensor, x0: torch.Tensor, alpha_t, alpha_prime_t
              ) -> torch.Tensor: ...


class UniformProcess:
    """Uniform-state process over the valid ids (docs/method.md §1.1), with a schedule (default log-linear).

    Args:
        vocab_size: K. valid_vocab: ``Bool[K]`` (ids noise may produce) or None (all).
        schedule: any object with ``alpha(t)`` / ``alpha_prime(t)`` (``LogLinearSchedule``, ``DualitySchedule``).
    """

    def __init__(self, vocab_size: int, valid_vocab: torch.Tensor | None = None, schedule=None):
        self.vocab_size = int(vocab_size)
        self.valid_vocab = valid_vocab
        self.schedule = schedule if schedule is not None else LogLinearSchedule()

    def alpha(self, t) -> torch.Tensor:
        return self.schedule.alpha(t)

    def alpha_prime(self, t) -> torch.Tensor:
        return self.schedule.alpha_prime(t)

    def corrupt(self, x0, alpha_t, generator):
        if self.valid_vocab is None:
            return uniform.corrupt(x0, alpha_t, generator, vocab_size=self.vocab_size)
        return uniform.corrupt(x0, alpha_t, generator, self.valid_vocab)

    def posterior(self, z_t, x0_probs, alpha_t, alpha_s):
        return uniform.posterior(z_t, x0_probs, alpha_t, alpha_s, self.valid_vocab)

    def prior_sample(self, shape, generator, device=None):
        return uniform.prior_sample(shape, self.vocab_size, generator, self.valid_vocab, device=device)

    def nelbo(self, log_x_theta, z_t, x0, alpha_t, alpha_prime_t):
        return duo_nelbo(log_x_theta, z_t, x0, alpha_t, alpha_prime_t, self.valid_vocab)

    def __repr__(self) -> str:
        return f"UniformProcess(K={self.vocab_size}, schedule={self.schedule!r})"
