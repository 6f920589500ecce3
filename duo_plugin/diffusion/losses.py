"""Duo losses: the continuous-time USDM NELBO in Duo's form, curriculum inputs, DCD pairs and distillation KL.

References: docs/method.md §1.3 (f_Duo, paper Eq. 17/50; UDLM Eq. 48–49), §3.1 (curriculum, paper Eq. 21), §4/§11.7
(Discrete Consistency Distillation pairs from one shared Gaussian ε).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .uniform import Generator, check_valid_vocab, draw, per_token, num_valid

__all__ = ["masked_token_sum", "duo_nelbo", "check_nelbo_ids", "duo_nelbo_from_stats", "gaussian_latent", "curriculum_inputs", "dcd_pair", "distillation_kl"]


def masked_token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over valid tokens of a ``[B, L]`` loss; ``where`` (not a product) so garbage at pads cannot leak NaN."""
    return torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()


def _check_ids(name: str, x: torch.Tensor, b: int, l: int, k: int) -> None:
    if x.dim() != 2 or tuple(x.shape) != (b, l) or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be integer ids of shape [B, L]=[{b}, {l}]; got {tuple(x.shape)} {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= k):
        raise ValueError(f"{name} has ids outside [0, {k}); the model's vocabulary width is {k}")


def check_nelbo_ids(valid_vocab: torch.Tensor, **ids: torch.Tensor) -> None:
    """ValueError naming the ids (of ``z_t`` / ``x0``) outside ``valid_vocab``: f_Duo is defined on K_eff ids only."""
    for name, x in ids.items():
        bad = ~valid_vocab[x.long()]
        if bool(bad.any()):
            vals = sorted({int(v) for v in x[bad].unique()[:8]})
            raise ValueError(
                f"duo_nelbo: {name} holds ids outside valid_vocab {vals} at {int(bad.sum())} position(s); the "
                "uniform-state NELBO is defined on the valid ids only (the model never produces the others). Replace "
                "them before the call (unscored positions, e.g. pads: any valid id; the value there is meaningless) "
                "or make them valid (data.valid_vocab.include_pad / include_special, or data.pad_mode: official)")


def duo_nelbo(
    log_x_theta: torch.Tensor,
    z_t: torch.Tensor,
    x0: torch.Tensor,
    alpha_t,
    alpha_prime_t,
    valid_vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token continuous-time USDM NELBO integrand f_Duo (paper Eq. 17/50; docs/method.md §1.3).

    Pointwise equal to the UDLM form
    ``f = α'/(Kα) · [K/x̄_i − K/(x̄_θ)_i − Σ_j (x̄_j/x̄_i) log((x̄_θ)_i x̄_j / ((x̄_θ)_j x̄_i))]`` with
    x̄ = Kα x + (1−α), x̄_θ = Kα x_θ + (1−α), i = z_t, but never builds x̄.  Writing
    ℓ_j = log((x̄_θ)_j/(1−α)) = softplus(log x_θ,j + log r), r = Kα/(1−α), m = x0, δ = 1[z_t = x0],
    κ = (1−α)/(Kα+1−α)::

        term1 = K/x̄_i − K/((1−α) e^{ℓ_i})
        term2 = −(κδ + 1−δ)(Σ_j ℓ_j − K ℓ_i) − r (1−δ)(ℓ_m − ℓ_i) + ((K−1)κδ − (1−δ)/κ) log κ
        f     = α'/(Kα) · (term1 − term2)      ≥ 0

    The single K-wide reduction Σ_j ℓ_j runs in fp32 (fp64 if ``log_x_theta`` is fp64) with an fp64 accumulator;
    all per-token algebra is fp64.  With ``valid_vocab`` K = K_eff, ``log_x_theta`` is renormalised over the valid
    ids and the reduction skips invalid ids.

    Contract for ids outside ``valid_vocab``: ``z_t`` and ``x0`` must both lie in it at EVERY position, scored or
    not (a ``ValueError`` names the offending ids): a token the model cannot produce has no finite NELBO, and a
    finite number there would be meaningless. Callers put any valid id at positions they do not score (the
    objectives do so at pads; ``eval.likelihood`` flags an invalid scored id as +∞ instead).

    Args:
        log_x_theta: ``Float[B, L, K]`` log-probabilities of the mean parameterisation x_θ(z_t, t).
        z_t, x0: ``Long[B, L]`` noisy and clean ids.
        alpha_t: scalar/``[B]``/``[B, L]`` in (0, 1).  alpha_prime_t: dα/dt (≤ 0), same shapes.
    Returns:
        ``float32 [B, L]`` (mask padding and average outside).
    """
    if log_x_theta.dim() != 3 or not log_x_theta.is_floating_point():
        raise ValueError(f"log_x_theta must be float [B, L, K]; got {tuple(log_x_theta.shape)} {log_x_theta.dtype}")
    b, l, k_full = log_x_theta.shape
    _check_ids("z_t", z_t, b, l, k_full)
    _check_ids("x0", x0, b, l, k_full)
    check_valid_vocab(k_full, valid_vocab)
    k = num_valid(k_full, valid_vocab)
    if k < 2:
        raise ValueError("the NELBO needs at least 2 valid ids")
    dev = log_x_theta.device
    if valid_vocab is not None:
        check_nelbo_ids(valid_vocab.to(dev), z_t=z_t, x0=x0)
    a = per_token(alpha_t, b, l, dev, "alpha_t")
    ap = per_token(alpha_prime_t, b, l, dev, "alpha_prime_t")
    if bool(((a <= 0) | (a >= 1) | torch.isnan(a)).any()):
        raise ValueError(
            f"alpha_t must lie in (0, 1) for the NELBO; got [{a.min().item():.4g}, {a.max().item():.4g}]. "
            "Draw t in [t_min, 1] with t_min > 0 and a schedule eps > 0 (log-linear: alpha = 1 - (1 - eps) t)."
        )
    if bool(((ap > 0) | ~torch.isfinite(ap)).any()):
        raise ValueError("alpha_prime_t must be finite and <= 0 (alpha decreases with t); pass d alpha / dt, not d/dgamma")

    work = torch.float64 if log_x_theta.dtype == torch.float64 else torch.float32
    logx = log_x_theta.to(work)
    if valid_vocab is not None:
        vmask = valid_vocab.to(dev)
        logx = logx.masked_fill(~vmask, float("-inf"))
        logx = logx - torch.logsumexp(logx, dim=-1, keepdim=True)

    log_r = math.log(k) + torch.log(a) - torch.log1p(-a)  # [B, L] fp64
    ell = F.softplus(logx + log_r.to(work)[..., None])  # [B, L, K]; softplus(-inf) = 0 for masked ids
    if valid_vocab is not None:
        ell = ell.masked_fill(~vmask, 0.0)
    s = ell.sum(dim=-1, dtype=torch.float64)
    del ell

    lx_i = logx.gather(-1, z_t.long()[..., None]).squeeze(-1).double()
    lx_m = logx.gather(-1, x0.long()[..., None]).squeeze(-1).double()
    delta = (z_t == x0).double()
    return duo_nelbo_from_stats(lx_i, lx_m, s, a, ap, delta, k).to(torch.float32)


def duo_nelbo_from_stats(lx_i, lx_m, s, alpha_t, alpha_prime_t, delta, k: int) -> torch.Tensor:
    """The per-token algebra of f_Duo (see :func:`duo_nelbo`) from per-token statistics, in the input dtype (fp64).

    ``lx_i``/``lx_m``: log x_θ at z_t / at x0; ``s``: Σ_j softplus(log x_θ,j + log r) over the valid ids with
    r = Kα/(1−α); ``alpha_t``/``alpha_prime_t``: α_t, α'_t per token; ``delta``: 1[z_t = x0] as float; ``k``: K_eff.
    Shared by :func:`duo_nelbo` and the fused kernels (``duo_plugin.kernels.nelbo``), which compute the statistics
    in vocabulary tiles.  Differentiable in ``lx_i``, ``lx_m`` and ``s``.
    """
    a, ap = alpha_t, alpha_prime_t
    one_m = 1.0 - a
    log_r = math.log(k) + torch.log(a) - torch.log1p(-a)
    ell_i = F.softplus(lx_i + log_r)
    ell_m = F.softplus(lx_m + log_r)
    r = torch.exp(log_r)
    xbar_i = one_m + k * a * delta
    term1 = k / xbar_i - k / (one_m * torch.exp(ell_i))
    kappa = one_m / (k * a + one_m)
    c = kappa * delta + (1 - delta)
    term2 = (
        -c * (s - k * ell_i)
        - r * (1 - delta) * (ell_m - ell_i)
        + ((k - 1) * kappa * delta - (1 - delta) / kappa) * torch.log(kappa)
    )
    return ap / (k * a) * (term1 - term2)


def _gamma_tokens(gamma, b: int, l: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = per_token(gamma, b, l, dev, "gamma")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gamma must be finite")
    return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()


def _check_latent_ids(x0: torch.Tensor, vocab_size: int, valid_vocab) -> None:
    """The argument checks of the Gaussian latent (``x0`` ids in ``[0, K)``, a usable ``valid_vocab``)."""
    k_full = int(vocab_size)
    if x0.dim() != 2:
        raise ValueError(f"x0 must be [B, L] ids; got {tuple(x0.shape)}")
    _check_ids("x0", x0, x0.shape[0], x0.shape[1], k_full)
    check_valid_vocab(k_full, valid_vocab)
    if num_valid(k_full, valid_vocab) < 2:
        raise ValueError("need at least 2 valid ids")


def _noise(b: int, l: int, device, vocab_size: int, generator: Generator, valid_vocab) -> torch.Tensor:
    """ε ~ N(0, I) fp32 ``[B, L, K]`` (drawn over all K ids, per-row generators allowed); invalid ids → −inf.
    Depends on the shape only (never on ``x0``)."""
    eps = draw("randn", (b, l, int(vocab_size)), generator, device, dtype=torch.float32)
    if valid_vocab is not None:
        eps = eps.masked_fill(~valid_vocab.to(device), float("-inf"))
    return eps


def gaussian_latent(
    x0: torch.Tensor, gamma, vocab_size: int, generator: Generator, valid_vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian latent w = α̃ onehot(x) + σ̃ ε (paper Eq. 7, γ-parameterised: α̃ = sqrt(sigmoid(−γ))).

    ε ~ N(0, I_K) fp32, one ``randn([L, K])`` per row generator; invalid ids get −inf (never the argmax, zero
    softmax weight).  argmax(w) ~ Cat(T(γ) x + (1 − T(γ))/K_eff) (the duality, Eq. 10–11).

    Args: x0 ``Long[B, L]``; gamma scalar/``[B]``/``[B, L]``.  Returns ``float32 [B, L, K]``.
    """
    _check_latent_ids(x0, vocab_size, valid_vocab)
    eps = _noise(x0.shape[0], x0.shape[1], x0.device, vocab_size, generator, valid_vocab)
    at, st = _gamma_tokens(gamma, x0.shape[0], x0.shape[1], x0.device)
    w = eps * st.float()[..., None]
    return w.scatter_add(-1, x0.long()[..., None], at.float()[..., None])


def curriculum_inputs(
    x0: torch.Tensor,
    gamma,
    tau: float,
    vocab_size: int,
    generator: Generator,
    valid_vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Curriculum inputs from ONE Gaussian sample (paper Eq. 21, docs/method.md §3.1).

    Returns ``(z_t, soft_logits)``: the hard latent z_t = argmax(w) (``Long[B, L]``, the loss's z_t) and the soft
    network input w/τ (``float32 [B, L, K]`` logits; the embedding applies the softmax).  τ > 0.
    """
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite positive float (e.g. 1e-3), got {tau!r}")
    w = gaussian_latent(x0, gamma, vocab_size, generator, valid_vocab)
    z_t = w.argmax(dim=-1)
    return z_t, w.div_(tau)


def dcd_pair(
    x0: torch.Tensor,
    gamma_t,
    gamma_s,
    vocab_size: int,
    generator: Generator,
    valid_vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discrete Consistency Distillation pair (z_t, z_s) on one deterministic trajectory with a SHARED ε.

    z_u = argmax(α̃_u x + σ̃_u ε) = argmax(m_u x + ε) with m_u = e^{−γ_u/2}: token = x if m_u + ε_x > max_{j≠x} ε_j,
    else argmax_{j≠x} ε_j.  Along increasing γ each token flips at most once (x → the ε runner-up), so with
    γ_s ≤ γ_t, z_s = x wherever z_t = x.  Uses the same ε draw as :func:`gaussian_latent` (same generator state ⇒
    z_t equals its argmax).  Never stores a second K-wide tensor.

    Returns ``(z_t, z_s)``, both ``Long[B, L]``.
    """
    b, l = x0.shape if x0.dim() == 2 else (None, None)
    _check_latent_ids(x0, vocab_size, valid_vocab)
    eps = _noise(b, l, x0.device, vocab_size, generator, valid_vocab)
    gt = per_token(gamma_t, b, l, x0.device, "gamma_t")
    gs = per_token(gamma_s, b, l, x0.device, "gamma_s")
    if bool((gs > gt).any()):
        raise ValueError("dcd_pair needs gamma_s <= gamma_t (s is the less noisy time)")
    idx = x0.long()[..., None]
    eps_x = eps.gather(-1, idx).squeeze(-1).double()
    runner_val, runner_id = eps.scatter(-1, idx, float("-inf")).max(dim=-1)
    runner_val = runner_val.double()
    z_t = torch.where(torch.exp(-gt / 2) + eps_x > runner_val, x0.long(), runner_id)
    z_s = torch.where(torch.exp(-gs / 2) + eps_x > runner_val, x0.long(), runner_id)
    return z_t, z_s


def distillation_kl(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, direction: str = "bwd"
) -> torch.Tensor:
    """Per-token KL for DCD: ``"bwd"`` = KL(student ‖ teacher) (default), ``"fwd"`` = KL(teacher ‖ student).

    KL(p ‖ q) = Σ_j p_j (log p_j − log q_j), terms with p_j = 0 contribute 0.  Inputs ``Float[B, L, K]``
    log-probabilities; returns ``float32 [B, L]`` (computed in fp32, fp64 if inputs are fp64).
    """
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(
            f"student and teacher log-probs must have the same shape; got {tuple(student_log_probs.shape)} vs "
            f"{tuple(teacher_log_probs.shape)} (same tokenizer / vocabulary width?)"
        )
    if direction == "bwd":
        lp, lq = student_log_probs, teacher_log_probs
    elif direction == "fwd":
        lp, lq = teacher_log_probs, student_log_probs
    else:
        raise ValueError(f"direction must be 'bwd' (KL(student||teacher)) or 'fwd' (KL(teacher||student)); got {direction!r}")
    work = torch.float64 if lp.dtype == torch.float64 and lq.dtype == torch.float64 else torch.float32
    lp, lq = lp.to(work), lq.to(work)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=work, device=p.device))
    return terms.sum(-1).to(torch.float32)
