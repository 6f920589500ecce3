"""D3PM with the absorbing transition in discrete time (Austin et al. 2021, "Structured Denoising Diffusion Models
in Discrete State-Spaces", §3 and App. A.2.4). Pure tensor maths.

Chain (per token, steps k = 1 … T)
    ``q(x_k | x_{k−1}) = Cat((1 − β_k) x_{k−1} + β_k m)`` with ``β_k = 1/(T − k + 1)`` (m = one-hot [MASK]), so
    ``ᾱ_k = Π_{i≤k} (1 − β_i) = 1 − k/T``: ``q(x_k | x_0) = Cat(ᾱ_k x_0 + (1 − ᾱ_k) m)`` and ``x_T = [MASK]``
    surely. The posterior ``q(x_{k−1} | x_k = m, x_0)`` reveals x_0 w.p. ``(ᾱ_{k−1} − ᾱ_k)/(1 − ᾱ_k) = 1/k`` and keeps
    the mask otherwise; an unmasked x_k never changes.

Model (x_0-parametrisation, Austin et al. Eq. 4)
    ``p_θ(x_{k−1} | x_k) ∝ Σ_{x̃} q(x_{k−1}, x_k | x̃) p̃_θ(x̃ | x_k)`` with p̃_θ = the network's distribution over the
    *data* ids (its [MASK] and invalid ids are dropped and the rest renormalised: a clean token is never [MASK]).
    That makes p_θ the posterior above with x_0 replaced by p̃_θ.

ELBO (Austin et al. Eq. 1)
    ``−log p_θ(x_0) ≤ Σ_{k=2}^T E_q KL(q(x_{k−1} | x_k, x_0) ‖ p_θ(x_{k−1} | x_k)) − E_q log p_θ(x_0 | x_1)
    + KL(q(x_T | x_0) ‖ p(x_T))``; the last term is 0 (both are [MASK] surely). Per token and step:
    ``L_k = (1/k) · (−log p̃_θ(x_0 | x_k))`` at a masked x_k (the stay-masked terms cancel), 0 elsewhere; L_1 is the
    same expression. The estimator draws k uniformly from {1 … T} and scores ``T · L_k`` (:meth:`D3PMProcess.nelbo`),
    an unbiased estimate of the sum. Tests check ``L_k`` against brute-force products of the T transition matrices.

Continuous-clock interface
    Consumers written for continuous time (objectives, ``eval.likelihood``, the samplers) pass a clock ``u ∈ [0, 1]``;
    :class:`D3PMSchedule` maps it to the step ``k(u) = ceil(u T)`` (clamped to [1, T]; u within 1e-6 of a step
    boundary above it rounds down, so grid values ``k/T`` map to k) and returns ``α = ᾱ_{k(u)}``. For u ~ U[0, 1],
    k is uniform on {1 … T}. The process's ``corrupt`` / ``nelbo`` / ``posterior`` accept only such grid values of α.
"""

from __future__ import annotations

import torch

from . import absorbing
from .schedules import sigma_from_alpha
from .uniform import check_valid_vocab, per_token

__all__ = ["D3PMSchedule", "D3PMProcess"]

_F64 = torch.float64
_TOL = 1e-6  # fraction of a step


class D3PMSchedule:
    """ᾱ on the clock: ``alpha(u) = 1 − k(u)/T`` with ``k(u) = clamp(ceil(u T), 1, T)`` (float64, shape of u);
    ``alpha_prime(u) = −1`` (the slope of the linear clock; the D3PM NELBO does not use it)."""

    def __init__(self, steps: int = 1000):
        if int(steps) < 1:
            raise ValueError(f"D3PM needs steps >= 1, got {steps}")
        self.steps = int(steps)

    def step(self, u) -> torch.Tensor:
        """k(u) as ``Long`` (shape of u)."""
        u = torch.as_tensor(u, dtype=_F64)
        return torch.ceil(u * self.steps - _TOL).clamp(1, self.steps).long()

    def alpha(self, u) -> torch.Tensor:
        return 1.0 - self.step(u).to(_F64) / self.steps

    def alpha_prime(self, u) -> torch.Tensor:
        return torch.full_like(torch.as_tensor(u, dtype=_F64), -1.0)

    def t_for_alpha(self, alpha: float) -> float:
        return float(1.0 - float(alpha))

    def __repr__(self) -> str:
        return f"D3PMSchedule(steps={self.steps})"


class D3PMProcess:
    """The discrete-time absorbing D3PM chain with the :class:`~duo_plugin.diffusion.process.NoiseProcess` methods.

    Args:
        vocab_size: W (data ids + the [MASK] row). mask_id: default ``W − 1``. valid_vocab: ``Bool[W]`` data ids
            p̃_θ may predict (the mask id is always excluded) or None. steps: T.
    """

    name = "d3pm"

    def __init__(self, vocab_size: int, mask_id: int | None = None, valid_vocab: torch.Tensor | None = None,
                 steps: int = 1000):
        self.vocab_size = int(vocab_size)
        self.mask_id = (self.vocab_size - 1) if mask_id is None else int(mask_id)
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} is outside the model vocabulary [0, {self.vocab_size})")
        check_valid_vocab(self.vocab_size, valid_vocab)
        self.valid_vocab = valid_vocab
        self.schedule = D3PMSchedule(steps)
        self.steps = self.schedule.steps

    def beta(self, k: int) -> float:
        """β_k = 1/(T − k + 1), the masking probability of step k (1 ≤ k ≤ T)."""
        if not 1 <= int(k) <= self.steps:
            raise ValueError(f"step k must lie in [1, {self.steps}], got {k}")
        return 1.0 / (self.steps - int(k) + 1)

    def alpha(self, u) -> torch.Tensor:
        return self.schedule.alpha(u)

    def alpha_prime(self, u) -> torch.Tensor:
        return self.schedule.alpha_prime(u)

    def t_for_alpha(self, alpha: float) -> float:
        return self.schedule.t_for_alpha(alpha)

    def sigma(self, u) -> torch.Tensor:
        """−log ᾱ (float64), with ᾱ_T = 0 fed as −log(float64 tiny) ≈ 708 so that it stays finite (D3PM models are
        not time-conditioned and ignore it)."""
        return sigma_from_alpha(self.alpha(u))

    def step_of(self, alpha) -> torch.Tensor:
        """The step k with ᾱ_k = α (``Long``); raises for a value off the grid ``{1 − k/T}``."""
        a = torch.as_tensor(alpha, dtype=_F64)
        kf = (1.0 - a) * self.steps
        k = torch.round(kf)
        if bool(((kf - k).abs() > 1e-6).any() | (k < 0).any() | (k > self.steps).any()):
            raise ValueError(f"alpha is not on the D3PM grid 1 - k/{self.steps}: the D3PM process takes the alpha of "
                             "its own schedule (process.schedule), not a continuous schedule's")
        return k.long()

    def corrupt(self, x0, alpha_t, generator):
        self.step_of(alpha_t)
        return absorbing.corrupt(x0, alpha_t, generator, self.mask_id)

    def prior_sample(self, shape, generator=None, device=None):
        return absorbing.prior_sample(shape, self.mask_id, device=device)

    def posterior(self, z_t, x0_probs, alpha_t, alpha_s):
        """q(x_s | x_t, x) between two grid steps (float64; skip-step posteriors are exact for this chain)."""
        return absorbing.posterior(z_t, x0_probs, alpha_t, alpha_s, self.mask_id, self._vv(x0_probs.device))

    def marginal(self, x_probs, alpha):
        return absorbing.AbsorbingProcess(self.vocab_size, self.mask_id, self.valid_vocab).marginal(x_probs, alpha)

    def log_x0(self, log_x_theta, z_t):
        """log p̃_θ(x̃ | x_k) over the data ids at masked positions (carry-over elsewhere): the SUBS map of
        :func:`~duo_plugin.diffusion.absorbing.subs_log_probs`."""
        return absorbing.subs_log_probs(log_x_theta, z_t, self.mask_id, self._vv(log_x_theta.device))

    def nelbo(self, log_x_theta, z_t, x0, alpha_t, alpha_prime_t) -> torch.Tensor:
        """Per-token ``T · L_k`` (fp32 ``[B, L]``, ≥ 0) with k the step of ``alpha_t`` (a grid value);
        ``alpha_prime_t`` is only checked (≤ 0)."""
        b, l, w = log_x_theta.shape
        dev = log_x_theta.device
        k = self.step_of(per_token(alpha_t, b, l, dev))
        if bool((k < 1).any()):
            raise ValueError("alpha_t = 1 is step 0 (clean): the D3PM ELBO terms start at k = 1")
        ap = per_token(alpha_prime_t, b, l, dev, "alpha_prime_t")
        if bool(((ap > 0) | ~torch.isfinite(ap)).any()):
            raise ValueError("alpha_prime_t must be finite and <= 0")
        data = torch.ones(w, dtype=torch.bool, device=dev) if self.valid_vocab is None else self.valid_vocab.to(dev)
        data = data & (torch.arange(w, device=dev) != self.mask_id)
        inside = (x0 >= 0) & (x0 < w) & data[x0.long().clamp(0, w - 1)]
        x0 = torch.where(inside, x0.long(), torch.full_like(x0.long(), int(torch.nonzero(data)[0])))
        lp = self.log_x0(log_x_theta, z_t).gather(-1, x0[..., None]).squeeze(-1).to(_F64)
        masked = (z_t == self.mask_id) & inside  # an x0 outside the data ids (an unscored pad) contributes 0
        zero = torch.zeros((), dtype=_F64, device=dev)
        f = torch.where(masked, -torch.where(masked, lp, zero) * self.steps / k.to(_F64), zero)
        return f.to(torch.float32)

    def _vv(self, device):
        return None if self.valid_vocab is None else self.valid_vocab.to(device)

    def __repr__(self) -> str:
        return f"D3PMProcess(W={self.vocab_size}, mask_id={self.mask_id}, steps={self.steps})"
