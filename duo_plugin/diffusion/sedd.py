"""Score Entropy Discrete Diffusion (SEDD; Lou, Meng & Ermon 2024, "Discrete Diffusion Modeling by Estimating the
Ratios of the Data Distribution"): the absorbing and uniform graphs, the denoising score-entropy (DSE) NELBO and
the reverse steps of its samplers. Pure tensor maths.

Forward process (per token, continuous time)
    A CTMC with rates σ̄'(t) Q. ``Q(a → b)`` for the two graphs:

    * ``absorb``: every data id jumps to ``[MASK]`` at rate 1 (``Q(y → m) = 1``), nothing leaves the mask;
    * ``uniform``: every valid id jumps to each other valid id at rate 1/N (N = number of valid ids).

    Both give ``q_t(· | x) = α x + (1 − α) π`` with ``α = exp(−σ̄(t))`` and π = one-hot(m) (absorb) or U(valid ids)
    (uniform): the same marginals as :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess` and
    :class:`~duo_plugin.diffusion.process.UniformProcess`, so σ̄ = −log α is the package's ``sigma``. Schedules:
    log-linear (``LogLinearSchedule``: σ̄ = −log(1 − (1 − ε) t), SEDD's absorbing default) and geometric
    (:class:`GeometricSchedule`: σ̄ = σ_min^(1−t) σ_max^t, SEDD's uniform default).

Score parametrisation (how the network output is read)
    The denoiser returns ``ℓ = log_softmax(logits)`` ``[B, L, W]`` (the package convention). SEDD needs the
    *concrete scores* ``s_θ(z)_y ≈ p_t(y) / p_t(z)`` for the states ``y`` one token away from ``z``. We read them
    from differences of the output, so the softmax normalisation drops out and the scores are unnormalised:

    * uniform: ``log s_y = ℓ_y − ℓ_z`` (z = the current token; ``s_z = 1``);
    * absorb, at a masked position: ``log s_y = ℓ_y − ℓ_m + log(α/(1 − α)) − log N_D`` for the N_D data ids y
      (the σ-dependent offset is SEDD's ``scale_by_sigma`` preconditioning: a constant output gives the score of a
      uniform denoiser, the exact score at initialisation); unmasked positions have no reverse moves.

    This is SEDD's free log-score output up to a gauge (SEDD's raw output y ↔ ``logit_y − logit_z`` here); it is
    *not* MDLM's mean parametrisation ``s_y = α/(1 − α) · x_θ(y)`` (with which the absorbing DSE loss would reduce
    exactly to the MDLM NELBO).

DSE NELBO (per token; Lou et al. Thm 3.6 / Eq. 14, Benton et al. path KL)
    ``f = σ̄'(t) Σ_{y ≠ z} Q(y → z) [s_y − r_y log s_y + K(r_y)]``, ``r_y = q_t(y | x0) / q_t(z | x0)``,
    ``K(a) = a (log a − 1)``; ``σ̄' = −α'/α``. Each bracket equals ``r φ(log s − log r)`` with ``φ(d) = e^d − 1 − d
    ≥ 0`` (computed that way: no cancellation of large terms), and ``s_y`` when ``r_y = 0``. ``∫_0^1 E_{q_t} f dt
    + KL(q_1(·|x0) ‖ prior) ≥ −log p_θ(x0)``, with equality for the exact scores (tests/diffusion/test_sedd.py
    checks it by enumeration). As for MDLM/Duo in this package the prior term is left out of the estimate.

Reverse steps (:meth:`SEDDProcess.reverse_probs`, float64, per position from the scores at t)
    * ``analytic`` (SEDD's "Tweedie τ-leaping", Thm 4.2): ``p(z_s = y) = (exp(−Δσ Q) s)_y · exp(Δσ Q)(y, z)``,
      Δσ = σ̄(t) − σ̄(s); exact for the exact scores;
    * ``euler``: ``p(y) = Δσ Q(y → z) s_y`` for y ≠ z, the rest stays; both clamp negative values to 0 and
      renormalise (as SEDD does).
"""

from __future__ import annotations

import math

import torch

from . import absorbing, uniform
from .schedules import LogLinearSchedule, ScheduledTime
from .uniform import check_valid_vocab, per_token

__all__ = ["GRAPHS", "PREDICTORS", "GeometricSchedule", "dse_phi", "SEDDProcess"]

GRAPHS = ("absorb", "uniform")
PREDICTORS = ("analytic", "euler")
_F64 = torch.float64


class GeometricSchedule:
    """SEDD's geometric noise: σ̄(t) = σ_min^(1−t) σ_max^t, α_t = exp(−σ̄(t)) (float64)."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if not 0.0 < float(sigma_min) < float(sigma_max) or not math.isfinite(float(sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=_F64)
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(-self.sigma(t))

    def alpha_prime(self, t) -> torch.Tensor:
        """dα/dt = −σ̄'(t) α_t with σ̄' = σ̄ · log(σ_max/σ_min)."""
        s = self.sigma(t)
        return -s * self._log_ratio * torch.exp(-s)

    def t_for_alpha(self, alpha: float) -> float:
        s = -math.log(float(alpha))
        return min(1.0, max(0.0, math.log(s / self.sigma_min) / self._log_ratio)) if s > 0 else 0.0

    def __repr__(self) -> str:
        return f"GeometricSchedule(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"


def dse_phi(d: torch.Tensor) -> torch.Tensor:
    """φ(d) = e^d − 1 − d ≥ 0: ``s − r log s + K(r) = r φ(log s − log r)`` for r > 0."""
    return torch.expm1(d) - d


class SEDDProcess(ScheduledTime):
    """SEDD's forward process on one graph, with the :class:`~duo_plugin.diffusion.process.NoiseProcess` methods,
    the score parametrisation (:meth:`log_scores`), the DSE NELBO (:meth:`nelbo`) and the samplers' reverse step
    (:meth:`reverse_probs`).

    Args:
        vocab_size: W, the denoiser's output width. graph: ``"absorb"`` | ``"uniform"``.
        mask_id: absorb only, the [MASK] id (default ``W − 1``, the appended row). valid_vocab: ``Bool[W]`` data ids
            (uniform: the ids noise covers; absorb: the ids the reverse process may reveal; the mask id is never
            one), or None (all, minus the mask).
        schedule: ``alpha(t)`` / ``alpha_prime(t)`` object (default log-linear, ε = 1e-3).
    """

    def __init__(self, vocab_size: int, graph: str = "absorb", mask_id: int | None = None,
                 valid_vocab: torch.Tensor | None = None, schedule=None):
        if graph not in GRAPHS:
            raise ValueError(f"SEDD graph must be one of {GRAPHS}, got {graph!r}")
        self.vocab_size, self.graph = int(vocab_size), graph
        check_valid_vocab(self.vocab_size, valid_vocab)
        self.valid_vocab = valid_vocab
        self.schedule = schedule if schedule is not None else LogLinearSchedule()
        support = torch.ones(self.vocab_size, dtype=torch.bool) if valid_vocab is None else valid_vocab.cpu().clone()
        if graph == "absorb":
            self.mask_id = (self.vocab_size - 1) if mask_id is None else int(mask_id)
            if not 0 <= self.mask_id < self.vocab_size:
                raise ValueError(f"mask_id={self.mask_id} is outside the model vocabulary [0, {self.vocab_size})")
            support[self.mask_id] = False
        else:
            if mask_id is not None:
                raise ValueError("the uniform graph has no [MASK] id (mask_id must be None)")
            self.mask_id = None
        self.support = support  # Bool[W]: data ids (absorb) / the uniform state space
        self.n_states = int(support.sum())
        if self.n_states < 2:
            raise ValueError(f"SEDD needs at least 2 data ids, got {self.n_states}")
        self.name = f"sedd_{graph}"
        self.fill_id = int(torch.nonzero(support)[0])  # a state id the samplers may put at clamped positions

    # -- schedule ---------------------------------------------------------------------------------------------
    # alpha / alpha_prime / sigma (σ̄(t) = −log α(t)) / t_for_alpha: ScheduledTime

    # -- forward process --------------------------------------------------------------------------------------
    def corrupt(self, x0, alpha_t, generator):
        if self.graph == "absorb":
            return absorbing.corrupt(x0, alpha_t, generator, self.mask_id)
        return uniform.corrupt(x0, alpha_t, generator, self.support.to(x0.device))

    def prior_sample(self, shape, generator=None, device=None):
        if self.graph == "absorb":
            return absorbing.prior_sample(shape, self.mask_id, device=device)
        return uniform.prior_sample(shape, self.vocab_size, generator, self.support, device=device)

    def posterior(self, z_t, x0_probs, alpha_t, alpha_s):
        """The forward process's q(z_s | z_t, x) (float64), linear in x (the process's Bayes posterior)."""
        if self.graph == "absorb":
            return absorbing.posterior(z_t, x0_probs, alpha_t, alpha_s, self.mask_id, self.support.to(x0_probs.device))
        return uniform.posterior(z_t, x0_probs, alpha_t, alpha_s, self.support.to(x0_probs.device))

    def marginal(self, x_probs: torch.Tensor, alpha) -> torch.Tensor:
        """q_α(· | x) = α x + (1 − α) π (float64 ``[..., W]``)."""
        sup = self.support.to(x_probs.device)
        x = torch.where(sup, x_probs.to(_F64), torch.zeros((), dtype=_F64, device=x_probs.device))
        x = x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
        a = torch.as_tensor(alpha, dtype=_F64, device=x.device)
        if a.dim():
            a = a[..., None]
        if self.graph == "absorb":
            pi = torch.zeros(self.vocab_size, dtype=_F64, device=x.device)
            pi[self.mask_id] = 1.0
        else:
            pi = sup.to(_F64) / self.n_states
        return a * x + (1 - a) * pi

    # -- scores -------------------------------------------------------------------------------------------------
    def log_scores(self, log_out: torch.Tensor, z_t: torch.Tensor, alpha_t) -> torch.Tensor:
        """log s_θ(z_t)_y ``[B, L, W]`` (fp32, float64 for a float64 input): the module docstring's parametrisation;
        −∞ for ids that are not states one move away (other ids, and every id at an unmasked absorbing position);
        0 at y = z_t (s_z = 1)."""
        b, l, w = self._check(log_out, z_t)
        work = _F64 if log_out.dtype == _F64 else torch.float32
        lo = log_out.to(work)
        dev = lo.device
        sup = self.support.to(dev)
        neg = torch.tensor(float("-inf"), dtype=work, device=dev)
        at_z = torch.arange(w, device=dev) == z_t[..., None]
        if self.graph == "uniform":
            ls = lo - lo.gather(-1, z_t[..., None])
            return torch.where(at_z, torch.zeros((), dtype=work, device=dev), torch.where(sup, ls, neg))
        a = per_token(alpha_t, b, l, dev)
        c = (torch.log(a) - torch.log1p(-a) - math.log(self.n_states)).to(work)
        ls = lo - lo[..., self.mask_id : self.mask_id + 1] + c[..., None]
        masked = (z_t == self.mask_id)[..., None]
        ls = torch.where(sup, ls, neg)
        return torch.where(masked, torch.where(at_z, torch.zeros((), dtype=work, device=dev), ls),
                           torch.where(at_z, torch.zeros((), dtype=work, device=dev), neg))

    def nelbo(self, log_x_theta, z_t, x0, alpha_t, alpha_prime_t) -> torch.Tensor:
        """Per-token DSE NELBO integrand ``f`` ``[B, L]`` (fp32; per-token scalars in float64) from the network's
        log-output ``[B, L, W]``; ``f ≥ 0``. alpha_t ∈ (0, 1), alpha_prime_t ≤ 0 (scalar / [B] / [B, L]). A position
        whose x0 is outside the state space gets 0 (callers score such ids separately)."""
        b, l, w = self._check(log_x_theta, z_t)
        dev = log_x_theta.device
        a = per_token(alpha_t, b, l, dev)
        ap = per_token(alpha_prime_t, b, l, dev, "alpha_prime_t")
        if bool(((a <= 0) | (a >= 1) | torch.isnan(a)).any()):
            raise ValueError("alpha_t must lie in (0, 1) for the SEDD NELBO (draw t in [t_min, 1] with t_min > 0)")
        if bool(((ap > 0) | ~torch.isfinite(ap)).any()):
            raise ValueError("alpha_prime_t must be finite and <= 0 (alpha decreases with t); pass d alpha / dt")
        # ids outside the state space (e.g. unscored pads that reach the loss as drawn) contribute 0: callers score
        # them separately (evaluation marks a scored one +inf; training refuses them)
        inside = (x0 >= 0) & (x0 < w) & self.support.to(dev)[x0.long().clamp(0, w - 1)]
        x0 = torch.where(inside, x0.long(), torch.full_like(x0.long(), self.fill_id))
        sigma_prime = -ap / a
        masked = z_t == self.mask_id if self.graph == "absorb" else None
        # absorb: read every position as masked (finite rows, no NaN gradients), keep only the masked ones below
        ls = self.log_scores(log_x_theta.float(), torch.full_like(z_t, self.mask_id) if masked is not None else z_t, a)
        lx0 = ls.gather(-1, x0[..., None]).squeeze(-1).to(_F64)
        not_x0 = torch.arange(w, device=dev) != x0[..., None]
        neg = torch.tensor(float("-inf"), dtype=ls.dtype, device=dev)
        s_rest = torch.logsumexp(torch.where(not_x0, ls, neg), -1).exp().to(_F64)  # Σ_{y ≠ x0} s_y (incl. s_z)
        if self.graph == "absorb":
            r = a / (1 - a)
            f = (s_rest - 1.0) + r * dse_phi(lx0 - torch.log(r))  # s_rest counts s_m = 1 at a masked z
            f = torch.where(masked & inside, f, torch.zeros_like(f))
            return (sigma_prime * f).to(torch.float32)
        n = self.n_states
        finite = torch.isfinite(ls) & not_x0
        l_rest = torch.where(finite, ls, torch.zeros((), dtype=ls.dtype, device=dev)).sum(-1).to(_F64)
        rho = (1 - a) / (n * a + 1 - a)  # r_y for y ≠ z when z = x0
        k_rho = torch.special.xlogy(rho, rho) - rho
        f_clean = s_rest - rho * l_rest + (n - 1) * k_rho
        r0 = 1.0 / rho  # r_{x0} when z ≠ x0; the other y ≠ z have r_y = 1
        f_noisy = (s_rest - 1.0) - l_rest - (n - 2) + r0 * dse_phi(lx0 - torch.log(r0))
        f = torch.where(inside, torch.where(z_t == x0, f_clean, f_noisy), torch.zeros_like(f_clean))
        return (sigma_prime / n * f).to(torch.float32)

    # -- reverse steps ------------------------------------------------------------------------------------------
    def reverse_probs(self, log_x_theta, z_t, alpha_t, alpha_s, predictor: str = "analytic") -> torch.Tensor:
        """Float64 ``[B, L, W]`` law of z_s given z_t from the scores at t (module docstring), negatives clamped,
        rows renormalised. ``alpha_s = 1`` (the final step) removes the [MASK] from an absorbing row (renormalised
        over the data ids)."""
        if predictor not in PREDICTORS:
            raise ValueError(f"SEDD predictor must be one of {PREDICTORS}, got {predictor!r}")
        b, l, w = self._check(log_x_theta, z_t)
        dev = log_x_theta.device
        at = per_token(alpha_t, b, l, dev)[..., None]
        as_ = per_token(alpha_s, b, l, dev, "alpha_s")[..., None]
        if bool((at > as_ * (1 + 1e-12)).any() | (at <= 0).any()):
            raise ValueError("reverse_probs needs 0 < alpha_t <= alpha_s <= 1 (s < t)")
        s = self.log_scores(log_x_theta.to(_F64), z_t, at[..., 0]).exp()
        onehot = torch.nn.functional.one_hot(z_t.long(), w).to(_F64)
        sup = self.support.to(dev)
        if predictor == "euler":
            dsig = torch.log(as_) - torch.log(at)
            rate = dsig * (s if self.graph == "absorb" else s / self.n_states) * (1 - onehot)
            p = rate + onehot * (1 - rate.sum(-1, keepdim=True))
        elif self.graph == "absorb":
            p = (as_ / at - 1) * s * (1 - onehot)
            p = p + onehot * (1 - p.sum(-1, keepdim=True))
        else:
            beta = at / as_
            total = s.sum(-1, keepdim=True)  # Σ_y s_y = 1 / p_t(z) (s_z = 1 included)
            back = (s - (1 - beta) * total / self.n_states) / beta
            p = back * (beta * onehot + (1 - beta) / self.n_states) * sup
        p = p.clamp_min(0)
        if self.graph == "absorb":
            final = (as_ >= 1).expand_as(p) & (torch.arange(w, device=dev) == self.mask_id)
            p = torch.where(final & (z_t == self.mask_id)[..., None], torch.zeros((), dtype=_F64, device=dev), p)
        total = p.sum(-1, keepdim=True)
        return torch.where(total > 0, p / total.clamp_min(torch.finfo(_F64).tiny), onehot)

    def _check(self, log_out, z_t):
        if log_out.dim() != 3 or not log_out.is_floating_point():
            raise ValueError(f"the network output must be float [B, L, W]; got {tuple(log_out.shape)}")
        b, l, w = log_out.shape
        if w != self.vocab_size:
            raise ValueError(f"the network output has width {w}; the SEDD process has W={self.vocab_size}")
        if tuple(z_t.shape) != (b, l) or z_t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"z_t must be integer ids [B, L] = {[b, l]}; got {tuple(z_t.shape)} {z_t.dtype}")
        return b, l, w

    def __repr__(self) -> str:
        return (f"SEDDProcess(W={self.vocab_size}, graph={self.graph!r}, mask_id={self.mask_id}, "
                f"schedule={self.schedule!r})")
