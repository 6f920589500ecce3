"""Absorbing-state ("masked") diffusion: the MDLM baseline (Sahoo et al. 2024, "Simple and Effective Masked
Diffusion Language Models"), pure tensor maths.

Vocabulary convention
    The data vocabulary has ``K`` ids (the tokenizer's model width, padded rows included).  MDLM needs one extra
    absorbing id, ``[MASK]``.  We **append** it: ``mask_id = K`` and the denoiser is built with width ``K + 1``
    (:func:`mask_vocab`).  This is what the reference code does when the tokenizer has no mask token, it never
    collides with a real token, and the data ids keep their meaning (so an AR scorer, the tokenizer and uniform-state
    checkpoints share ids).  Every function takes ``mask_id`` explicitly, so a reserved id inside the tokenizer's
    range (e.g. an unused special token) works the same way: then pass ``mask_id=that_id`` and width ``K``.
    ``valid_vocab`` (``Bool[width]`` or None) marks ids the *data* may contain; the mask id is never a data id and is
    always excluded from x_θ.

Process (continuous time, t ∈ [0, 1], schedule α_t decreasing, log-linear α_t = 1 − (1 − ε) t by default)
    q_t(z_t | x) = Cat(α_t x + (1 − α_t) m)                          (m = one-hot of the mask id)
    q(z_s | z_t, x) = z_t                                            if z_t ≠ m   (unmasked tokens never change)
                    = ((α_s − α_t) x + (1 − α_s) m) / (1 − α_t)      if z_t = m
    NELBO (SUBS parameterisation, per token):  f = α'_t / (1 − α_t) · log x_θ(x)  if z_t = m, else 0   (≥ 0)
    The SUBS parameterisation (:func:`subs_log_probs`): −∞ on the mask logit (x_θ never predicts [MASK]) and
    carry-over of unmasked tokens (x_θ = one-hot(z_t) where z_t ≠ m).

Posterior and categorical sampling are float64; the NELBO is returned in float32 (weights computed in float64).
Random draws follow ``duo_plugin.diffusion.uniform``: a ``torch.Generator`` or one generator per batch row.
"""

from __future__ import annotations

import torch

from .schedules import LogLinearSchedule, ScheduledTime
from .uniform import Generator, check_valid_vocab, draw, per_token, sample_categorical

__all__ = [
    "mask_vocab",
    "corrupt",
    "prior_sample",
    "subs_log_probs",
    "mdlm_nelbo",
    "posterior",
    "sample_step",
    "greedy_denoise",
    "XThetaCache",
    "AbsorbingProcess",
]


def mask_vocab(vocab_size: int) -> tuple[int, int]:
    """``(width, mask_id) = (K + 1, K)``: the denoiser width and the appended [MASK] id for a data vocabulary K."""
    k = int(vocab_size)
    if k < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return k + 1, k


def _check_mask_id(mask_id: int, width: int) -> int:
    mask_id = int(mask_id)
    if not 0 <= mask_id < width:
        raise ValueError(
            f"mask_id={mask_id} is outside the model vocabulary [0, {width}); build the model with width K + 1 and "
            "mask_id = K (duo_plugin.diffusion.absorbing.mask_vocab(K))"
        )
    return mask_id


def _check_ids(name: str, x: torch.Tensor, shape=None) -> None:
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be integer ids [B, L]; got {tuple(x.shape)} {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Forward process and prior
# ----------------------------------------------------------------------------------------------------------------
def corrupt(x0: torch.Tensor, alpha_t, generator: Generator, mask_id: int) -> torch.Tensor:
    """Sample z_t ~ Cat(α_t x + (1 − α_t) m): each position independently stays ``x0`` w.p. α_t, else becomes
    ``mask_id``.  Draw order (per generator): one uniform per position ``[L]``."""
    _check_ids("x0", x0)
    b, l = x0.shape
    if x0.numel() and bool((x0 == int(mask_id)).any()):
        raise ValueError(f"x0 contains the mask id {int(mask_id)}; clean data must not hold [MASK]")
    a = per_token(alpha_t, b, l, x0.device)
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError("alpha_t must lie in [0, 1]")
    u = draw("rand", (b, l), generator, x0.device, dtype=torch.float64)
    return torch.where(u < a, x0.long(), torch.full_like(x0.long(), int(mask_id)))


def prior_sample(shape, mask_id: int, generator: Generator | None = None, device=None) -> torch.Tensor:
    """The t = 1 marginal (α = 0): every position is [MASK] (deterministic; ``generator`` is accepted and unused)."""
    return torch.full(tuple(int(s) for s in shape), int(mask_id), dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------------------------
# SUBS parameterisation and the NELBO
# ----------------------------------------------------------------------------------------------------------------
def subs_log_probs(
    logits: torch.Tensor, z_t: torch.Tensor, mask_id: int, valid_vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """MDLM's SUBS parameterisation applied to the network's logits (or log-probabilities) ``[B, L, W]``.

    * zero masking probability: the mask logit (and every id outside ``valid_vocab``) is set to −∞ before the
      log-softmax, so x_θ never predicts [MASK];
    * carry-over unmasking: where ``z_t ≠ mask_id`` the output is log one-hot(z_t) (0 at z_t, −∞ elsewhere).

    Returns float32 log-probabilities (float64 if ``logits`` is float64), same shape.  Gradients flow only through
    masked positions.
    """
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be float [B, L, W]; got {tuple(logits.shape)} {logits.dtype}")
    b, l, w = logits.shape
    _check_ids("z_t", z_t, (b, l))
    mask_id = _check_mask_id(mask_id, w)
    check_valid_vocab(w, valid_vocab)
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(work)
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=x.device)
    banned = torch.zeros(w, dtype=torch.bool, device=x.device)
    banned[mask_id] = True
    if valid_vocab is not None:
        banned |= ~valid_vocab.to(x.device)
    if bool(banned.all()):
        raise ValueError("valid_vocab leaves no id besides [MASK] for x_θ")
    lp = torch.log_softmax(torch.where(banned, neg_inf, x), dim=-1)
    unmasked = (z_t != mask_id)[..., None]
    carry = torch.where(
        torch.arange(w, device=x.device) == z_t.long()[..., None], torch.zeros((), dtype=work, device=x.device), neg_inf
    )
    return torch.where(unmasked, carry, lp)


def mdlm_nelbo(
    log_x_theta: torch.Tensor,
    z_t: torch.Tensor,
    x0: torch.Tensor,
    alpha_t,
    alpha_prime_t,
    mask_id: int,
) -> torch.Tensor:
    """Per-token continuous-time MDLM NELBO integrand (Sahoo et al. 2024, Eq. 10/11), float32 ``[B, L]``.

    ``f = α'_t / (1 − α_t) · log x_θ(z_t, t)[x0]`` at masked positions (``z_t = mask_id``) and 0 elsewhere (SUBS
    carry-over makes the unmasked terms vanish).  ``α'_t = dα/dt ≤ 0``, so ``f ≥ 0``.  For the log-linear schedule
    α_t = 1 − (1 − ε)t the weight is −1/t: ``f = −log x_θ[x0] / t``.  Summing f over positions and averaging
    t ~ U[0, 1] gives the NELBO of a sequence (an upper bound on −log p(x)).

    Args:
        log_x_theta: ``Float[B, L, W]`` log-probabilities (normally :func:`subs_log_probs` of the network output;
            only masked positions are read).
        z_t, x0: ``Long[B, L]``.  alpha_t, alpha_prime_t: scalar / ``[B]`` / ``[B, L]``; α_t ∈ [0, 1), α' ≤ 0.
    """
    if log_x_theta.dim() != 3 or not log_x_theta.is_floating_point():
        raise ValueError(f"log_x_theta must be float [B, L, W]; got {tuple(log_x_theta.shape)} {log_x_theta.dtype}")
    b, l, w = log_x_theta.shape
    _check_ids("z_t", z_t, (b, l))
    _check_ids("x0", x0, (b, l))
    mask_id = _check_mask_id(mask_id, w)
    dev = log_x_theta.device
    a = per_token(alpha_t, b, l, dev, "alpha_t")
    ap = per_token(alpha_prime_t, b, l, dev, "alpha_prime_t")
    if bool(((a < 0) | (a >= 1) | torch.isnan(a)).any()):
        raise ValueError("alpha_t must lie in [0, 1) for the MDLM NELBO (draw t in [t_min, 1] with t_min > 0)")
    if bool(((ap > 0) | ~torch.isfinite(ap)).any()):
        raise ValueError("alpha_prime_t must be finite and <= 0 (alpha decreases with t); pass d alpha / dt")
    masked = z_t == mask_id
    weight = (ap / (1.0 - a)).to(torch.float32)  # ≤ 0
    logp = log_x_theta.gather(-1, x0.long()[..., None]).squeeze(-1).float()
    # Unmasked positions contribute 0 (also when a caller passes raw log-probs, and without 0 · (−∞) = NaN).
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    return torch.where(masked, weight * torch.where(masked, logp, zero), zero)


# ----------------------------------------------------------------------------------------------------------------
# Ancestral posterior and one sampler step
# ----------------------------------------------------------------------------------------------------------------
def _x_probs(x0_probs: torch.Tensor, mask_id: int, valid_vocab: torch.Tensor | None) -> torch.Tensor:
    """Float64 x with the mask id (and invalid ids) removed and renormalised."""
    x = x0_probs.to(torch.float64)
    keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    keep[mask_id] = False
    if valid_vocab is not None:
        keep &= valid_vocab.to(x.device)
    x = torch.where(keep, x, torch.zeros((), dtype=torch.float64, device=x.device))
    return x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def posterior(
    z_t: torch.Tensor,
    x0_probs: torch.Tensor,
    alpha_t,
    alpha_s,
    mask_id: int,
    valid_vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral posterior q(z_s | z_t, x = x0_probs) for s < t, float64 ``[B, L, W]`` (rows sum to 1).

    Unmasked z_t stays (one-hot z_t); a masked z_t becomes token x w.p. (α_s − α_t)/(1 − α_t) · x(x) and stays
    masked w.p. (1 − α_s)/(1 − α_t).  Linear in x, hence exactly the mixture over x ~ x0_probs.  Mass of
    ``x0_probs`` on the mask id / invalid ids is dropped and the rest renormalised.
    """
    if x0_probs.dim() != 3:
        raise ValueError(f"x0_probs must be [B, L, W]; got {tuple(x0_probs.shape)}")
    b, l, w = x0_probs.shape
    _check_ids("z_t", z_t, (b, l))
    mask_id = _check_mask_id(mask_id, w)
    check_valid_vocab(w, valid_vocab)
    dev = x0_probs.device
    at = per_token(alpha_t, b, l, dev, "alpha_t")
    as_ = per_token(alpha_s, b, l, dev, "alpha_s")
    masked = z_t == mask_id
    if bool(((at < 0) | (as_ > 1) | (at > as_ * (1 + 1e-12)) | torch.isnan(at) | torch.isnan(as_)).any()):
        raise ValueError("posterior needs 0 <= alpha_t <= alpha_s <= 1 (s < t)")
    if bool((masked & (at >= 1)).any()):
        raise ValueError("a masked position needs alpha_t < 1 (at t = 0 nothing is masked)")
    x = _x_probs(x0_probs, mask_id, valid_vocab)
    denom = (1.0 - at).clamp_min(torch.finfo(torch.float64).tiny)
    p_unmask = ((as_ - at) / denom)[..., None]
    p_stay = ((1.0 - as_) / denom)[..., None]
    out = p_unmask * x
    out[..., mask_id] = p_stay[..., 0]
    onehot = torch.nn.functional.one_hot(z_t.long(), w).to(torch.float64)
    return torch.where(masked[..., None], out, onehot)


def sample_step(
    log_x_theta: torch.Tensor,
    z_t: torch.Tensor,
    alpha_t,
    alpha_s,
    generator: Generator,
    mask_id: int,
    valid_vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ancestral step z_t → z_s ~ q(z_s | z_t, x_θ) (float64 posterior + race of exponentials).

    ``log_x_theta`` is ``Float[B, L, W]`` (raw log-probs or SUBS; the mask id is excluded either way).  Draws
    ``rand[L, W]`` per generator.  Returns ``Long[B, L]``; unmasked positions never change.
    """
    probs = posterior(z_t, log_x_theta.to(torch.float64).exp(), alpha_t, alpha_s, mask_id, valid_vocab)
    return sample_categorical(probs, generator)


def greedy_denoise(
    log_x_theta: torch.Tensor, z_t: torch.Tensor, mask_id: int, valid_vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Noise removal of MDLM: every still-masked position takes argmax x_θ (over non-mask valid ids); others stay."""
    b, l, w = log_x_theta.shape
    x = _x_probs(log_x_theta.to(torch.float64).exp(), _check_mask_id(mask_id, w), valid_vocab)
    return torch.where(z_t == mask_id, x.argmax(-1), z_t.long())


class XThetaCache:
    """MDLM's "cache x_θ while nothing changed" speed-up for a denoiser that is *not* time-conditioned.

    An absorbing step changes z only where a mask is revealed; when no position changed and the network ignores t,
    x_θ(z_s) = x_θ(z_t), so the next step can reuse it (the reference code's ``p_x0_cache``).  With
    ``time_conditioned=True`` the cache is never used.  Counts the denoiser calls in ``nfe``.

    ``cache(z, sigma)`` → ``log x_θ``; call ``update(z_old, z_new)`` after each step.
    """

    def __init__(self, denoise_fn, time_conditioned: bool):
        self.denoise_fn = denoise_fn
        self.time_conditioned = bool(time_conditioned)
        self.nfe = 0
        self._cached: torch.Tensor | None = None

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self._cached is None or self.time_conditioned:
            self._cached = self.denoise_fn(z, sigma)
            self.nfe += 1
        return self._cached

    def update(self, z_old: torch.Tensor, z_new: torch.Tensor) -> None:
        if self.time_conditioned or not torch.equal(z_old, z_new):
            self._cached = None


# ----------------------------------------------------------------------------------------------------------------
# The noise-process object (alpha, alpha_prime, corrupt, posterior, prior_sample, nelbo)
# ----------------------------------------------------------------------------------------------------------------
class AbsorbingProcess(ScheduledTime):
    """The absorbing process as one object, with the methods of :class:`duo_plugin.diffusion.process.NoiseProcess`
    (used by :class:`~duo_plugin.objectives.mdlm.MDLMObjective`, :mod:`duo_plugin.sampling.mdlm` and
    :mod:`duo_plugin.eval.likelihood` alike).

    Args:
        vocab_size: W, the denoiser's output width (data ids + the mask id; :func:`mask_vocab`).
        mask_id: the [MASK] id (default ``W − 1``: the appended row).
        valid_vocab: ``Bool[W]`` ids x_θ may predict (the mask id is always excluded), or None.
        schedule: object with ``alpha(t)`` / ``alpha_prime(t)`` (default log-linear, ε = 1e-3).

    ``nelbo`` applies the SUBS parameterisation itself (idempotent), so it takes the network's raw log-probs.
    """

    name = "absorbing"

    def __init__(self, vocab_size: int, mask_id: int | None = None, valid_vocab: torch.Tensor | None = None,
                 schedule=None):
        self.vocab_size = int(vocab_size)
        self.mask_id = _check_mask_id(self.vocab_size - 1 if mask_id is None else mask_id, self.vocab_size)
        check_valid_vocab(self.vocab_size, valid_vocab)
        self.valid_vocab = valid_vocab
        self.schedule = schedule if schedule is not None else LogLinearSchedule()

    def corrupt(self, x0, alpha_t, generator):
        return corrupt(x0, alpha_t, generator, self.mask_id)

    def marginal(self, x_probs: torch.Tensor, alpha) -> torch.Tensor:
        """q_α(· | x) = α x + (1 − α) m for a probability vector x ``[..., W]`` (float64; ``alpha`` a scalar or one
        value per leading index). Mass of x on the mask id / invalid ids is dropped and the rest renormalised."""
        x = _x_probs(x_probs, self.mask_id, self._vv(x_probs.device))
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
        if a.dim():
            a = a[..., None]
        m = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
        m[self.mask_id] = 1.0
        return a * x + (1 - a) * m

    def posterior(self, z_t, x0_probs, alpha_t, alpha_s):
        return posterior(z_t, x0_probs, alpha_t, alpha_s, self.mask_id, self._vv(x0_probs.device))

    def prior_sample(self, shape, generator=None, device=None):
        return prior_sample(shape, self.mask_id, generator, device=device)

    def subs(self, log_x_theta, z_t):
        return subs_log_probs(log_x_theta, z_t, self.mask_id, self._vv(log_x_theta.device))

    def nelbo(self, log_x_theta, z_t, x0, alpha_t, alpha_prime_t):
        return mdlm_nelbo(self.subs(log_x_theta, z_t), z_t, x0, alpha_t, alpha_prime_t, self.mask_id)

    def _vv(self, device):
        return None if self.valid_vocab is None else self.valid_vocab.to(device)

    def __repr__(self) -> str:
        return f"AbsorbingProcess(W={self.vocab_size}, mask_id={self.mask_id}, schedule={self.schedule!r})"
