"""Ancestral sampler step (docs/method.md; docs/sampling.md): float64 posterior q(z_s | z_t, x_θ) + categorical draw by the race
of exponentials ``argmax_j p_j / E_j``, with ``E`` from the counter-based stream keyed by
(row seed, step, position, vocab id) (:mod:`duo_plugin.kernels.rng`, stream ``STREAM_SAMPLER``).

* ``reference``: :func:`duo_plugin.diffusion.uniform.posterior` on the whole batch (``float64 [B, L, K]``) and the
  dense exponentials — the definition.
* ``chunked``: the same operations on chunks of positions (``workspace // K`` rows) — bit-identical.
* ``triton``: one pass over vocabulary tiles per block of positions, fp64, online argmax (no K-wide buffer);
  equal to the reference up to ulp differences of fp64 ``exp``/``log`` between backends.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.uniform import per_token, posterior

from . import rng

__all__ = ["posterior_sample_reference", "posterior_sample_chunked", "posterior_sample_triton",
           "posterior_mixture_reference", "posterior_mixture_sample", "race_sample_rows"]

DEFAULT_WORKSPACE = 1 << 20


def _keys(seeds, step, b, l, dev):
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (b,):
        raise ValueError("seeds must be a LongTensor [B] (one per row; see duo_plugin.kernels.row_seeds)")
    return rng.position_keys(seeds.to(dev), l, rng.STREAM_SAMPLER, parts=(int(step),))


def _draw(probs, keys):
    e = rng.counter_exponential(keys, probs.shape[-1])
    return (probs / e).argmax(dim=-1)


def posterior_sample_reference(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None,
                               probs_fn=None):
    """``z_s`` (``Long[B, L]``) ~ q(z_s | z_t, x_θ = exp(log_x_theta)) with the counter-based exponential race
    (x_θ = ``probs_fn(log_x_theta)`` when given)."""
    b, l, _ = log_x_theta.shape
    x = log_x_theta.double().exp() if probs_fn is None else probs_fn(log_x_theta)
    probs = posterior(z_t, x, alpha_t, alpha_s, valid_vocab)
    return _draw(probs, _keys(seeds, step, b, l, log_x_theta.device))


def posterior_sample_chunked(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None,
                             workspace: int = DEFAULT_WORKSPACE, probs_fn=None):
    """Same as the reference, ``workspace // K`` positions at a time (float64 buffers ``O(workspace)``).

    ``probs_fn`` (optional): maps rows ``log_x_theta[n, K]`` to float64 probabilities ``[n, K]`` (e.g. the sampler's
    temperature + nucleus filter); default ``exp``. It must act row by row."""
    b, l, k = log_x_theta.shape
    dev = log_x_theta.device
    keys = _keys(seeds, step, b, l, dev).reshape(-1)
    at = per_token(alpha_t, b, l, dev, "alpha_t").reshape(-1)
    as_ = per_token(alpha_s, b, l, dev, "alpha_s").reshape(-1)
    lx = log_x_theta.reshape(b * l, k)
    z = z_t.reshape(-1)
    out = torch.empty(b * l, dtype=torch.int64, device=dev)
    rows = max(1, int(workspace) // k)
    for i in range(0, b * l, rows):
        j = min(b * l, i + rows)
        x = lx[i:j].double().exp() if probs_fn is None else probs_fn(lx[i:j])
        probs = posterior(z[None, i:j], x[None], at[None, i:j], as_[None, i:j], valid_vocab)
        out[i:j] = _draw(probs[0], keys[i:j])
    return out.view(b, l)


def posterior_sample_triton(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None):
    """Triton kernel; per-position scalars (normaliser, x_θ at z_t, valid mass) are computed here in fp64 with the
    reference's operation order, the K-wide work happens in the kernel."""
    from ._triton import posterior_sample

    b, l, k = log_x_theta.shape
    dev = log_x_theta.device
    keys = _keys(seeds, step, b, l, dev).reshape(-1).contiguous()
    at = per_token(alpha_t, b, l, dev, "alpha_t").reshape(-1)
    as_ = per_token(alpha_s, b, l, dev, "alpha_s").reshape(-1)
    if bool(((at <= 0) | (at > 1) | (as_ <= 0) | (as_ > 1) | (at > as_ * (1 + 1e-12))).any()):
        raise ValueError("need 0 < alpha_t <= alpha_s <= 1")
    lx = log_x_theta.reshape(b * l, k).contiguous()
    z = z_t.reshape(-1).long().contiguous()
    k_eff = k if valid_vocab is None else int(valid_vocab.sum())
    vv = None if valid_vocab is None else valid_vocab.to(dev)
    x_z = lx.gather(1, z[:, None])[:, 0].double().exp()
    if vv is None:
        xsum = torch.ones_like(x_z)
    else:
        if not bool(vv[z].all()):
            raise ValueError("z_t contains ids outside valid_vocab")
        rows = max(1, DEFAULT_WORKSPACE // k)
        xsum = torch.cat([torch.where(vv, lx[i:i + rows].double().exp(), 0.0).sum(-1)
                          for i in range(0, b * l, rows)])
        x_z = x_z / xsum.clamp_min(torch.finfo(torch.float64).tiny)
        xsum = xsum.clamp_min(torch.finfo(torch.float64).tiny)
    ats = at / as_
    uni = torch.full((1,), 1.0 / k_eff, dtype=torch.float64, device=dev)
    coef = torch.stack([xsum, as_ - at, ((1 - ats) * (1 - as_)) * uni, k_eff * at * x_z + (ats - at),
                        k_eff * at * x_z + 1 - at], dim=1).contiguous()
    return posterior_sample(lx, keys, z, coef, vv).view(b, l)


# ------------------------------------------------------------------------------------------------------ mixture
# The posterior is linear in x (docs/method.md; uniform.posterior's docstring), so with N = K α_t x_z + 1 − α_t
#   q(z_s | z_t, x_θ) = w_stay δ_{z_t} + w_x x_θ(valid, renormalised) + w_u Uniform(valid),
#   w_stay = (K α_t x_z + α_t/α_s − α_t) / N,  w_x = (α_s − α_t) / N,  w_u = (1 − α_t/α_s)(1 − α_s) / N.
# A draw = one coin per position (which component) + an O(1) uniform id or, only on the rows that picked x_θ, an
# inverse-CDF draw over x_θ in float64 (cumsum + searchsorted).  All three uniforms are counter-based (fp64 from 53
# bits of mix64(key + (j + 1) G) with j = −1, −2, −3, which vocabulary ids never use), so the result is a pure
# function of (seed, step, position): ``method="mixture"`` is exactly posterior-distributed but a different stream
# from the race (``method="race"``).

_TINY = torch.finfo(torch.float64).tiny


def _unit_uniforms(keys: torch.Tensor, j: int) -> torch.Tensor:
    z = rng.element_bits(keys, torch.tensor([j], dtype=torch.int64, device=keys.device))[..., 0]
    return rng.uniform_from_bits(z)  # in (0, 1)


def _mixture_setup(log_x_theta, z_t, alpha_t, alpha_s, seeds, step, valid_vocab, probs_fn=None,
                   workspace: int = DEFAULT_WORKSPACE, kappa=None):
    b, l, k = log_x_theta.shape
    dev = log_x_theta.device
    keys = _keys(seeds, step, b, l, dev).reshape(-1)
    at = per_token(alpha_t, b, l, dev, "alpha_t").reshape(-1).double()
    as_ = per_token(alpha_s, b, l, dev, "alpha_s").reshape(-1).double()
    if bool(((at <= 0) | (at > 1) | (as_ <= 0) | (as_ > 1) | (at > as_ * (1 + 1e-12))).any()):
        raise ValueError("need 0 < alpha_t <= alpha_s <= 1")
    lx = log_x_theta.reshape(b * l, k)
    z = z_t.reshape(-1).long()
    if probs_fn is None:
        x_z = lx.gather(1, z[:, None])[:, 0].double().exp()
    else:  # x_θ = probs_fn(rows) (already valid-masked and normalised): K-wide, ``workspace // K`` rows at a time
        rows = max(1, int(workspace) // k)
        x_z = torch.cat([_probs(probs_fn, lx[i:i + rows], valid_vocab).gather(1, z[i:i + rows, None])[:, 0]
                         for i in range(0, b * l, rows)])
    vv, ids = None, None
    if valid_vocab is None:
        k_eff = k
    else:
        vv = valid_vocab.to(dev)
        if not bool(vv[z].all()):
            raise ValueError("z_t contains ids outside valid_vocab")
        ids = vv.nonzero()[:, 0]
        k_eff = int(ids.numel())
        # renormalise x_θ over the valid ids (probs_fn output already is): Σ_valid or 1 − Σ_invalid, the narrower
        if k_eff < k and probs_fn is None:
            inv = (~vv).nonzero()[:, 0]
            if inv.numel() <= k_eff:
                s = 1.0 - lx[:, inv].double().exp().sum(-1)
            else:
                s = lx[:, ids].double().exp().sum(-1)
            x_z = x_z / s.clamp_min(_TINY)
    norm = k_eff * at * x_z + 1 - at
    w_stay = (k_eff * at * x_z + at / as_ - at) / norm
    w_x = (as_ - at) / norm
    if kappa is not None:
        # Ψ step: κ q(z_s | z_t, x_θ) + (1 − κ) [α_s q(x | z_t, x_θ) + (1 − α_s) u]; the posterior to time 0 is the
        # mixture stay (K α_t x_z / N) + x_θ ((1 − α_t) / N), so the law stays a stay / x_θ / uniform mixture.
        kap = float(kappa)
        w_stay = kap * w_stay + (1 - kap) * as_ * (k_eff * at * x_z / norm)
        w_x = kap * w_x + (1 - kap) * as_ * ((1 - at) / norm)
    coin = _unit_uniforms(keys, -1)
    uidx = (_unit_uniforms(keys, -2) * k_eff).long().clamp_(max=k_eff - 1)
    uni = uidx if ids is None else ids[uidx]
    stay = coin < w_stay
    pick_x = ~stay & (coin < w_stay + w_x)
    out = torch.where(stay, z, uni)
    return out, pick_x, keys, lx, vv


def _probs(probs_fn, lx_rows, vv):
    """float64 x_θ rows: ``probs_fn(lx_rows)`` or ``exp(lx_rows)``, zero on invalid ids (not renormalised)."""
    p = lx_rows.double().exp() if probs_fn is None else probs_fn(lx_rows).to(torch.float64)
    if vv is not None:
        p = torch.where(vv.to(p.device), p, torch.zeros((), dtype=torch.float64, device=p.device))
    return p


def _draw_x(lx_rows, keys_rows, vv, probs_fn=None):
    """Inverse-CDF draws from exp(lx) (renormalised over valid ids), float64, one counter uniform per row."""
    p = _probs(probs_fn, lx_rows, vv)
    c = torch.cumsum(p, dim=-1)
    target = _unit_uniforms(keys_rows, -3) * c[:, -1]
    j = torch.searchsorted(c, target[:, None], right=True)[:, 0]
    return j.clamp_(max=p.shape[-1] - 1)


def posterior_mixture_reference(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None,
                                probs_fn=None):
    """Dense evaluation of the mixture stream (every row draws from x_θ; the coin selects) — the definition.

    ``probs_fn`` (optional, row-wise): rows ``log_x_theta[n, K]`` → float64 probabilities over the valid ids
    (normalised), replacing ``exp`` + renormalisation (temperature / nucleus applied by the caller's function)."""
    b, l, _ = log_x_theta.shape
    out, pick_x, keys, lx, vv = _mixture_setup(log_x_theta, z_t, alpha_t, alpha_s, seeds, step, valid_vocab,
                                               probs_fn)
    return torch.where(pick_x, _draw_x(lx, keys, vv, probs_fn), out).view(b, l)


def posterior_mixture_sample(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None,
                             workspace: int = DEFAULT_WORKSPACE, probs_fn=None, kappa=None):
    """Same stream as :func:`posterior_mixture_reference`; K-wide float64 work only on the rows whose coin picked
    x_θ (a fraction (α_s − α_t)/N of them), ``workspace // K`` rows at a time.  With ``probs_fn`` the coin needs
    x_θ at z_t, so ``probs_fn`` runs on every row once (chunked) and again on the rows that picked x_θ.

    ``kappa`` (optional, in [0, 1]): draw from the Ψ law κ q(z_s | z_t, x_θ) + (1 − κ) q_{α_s}(q(x | z_t, x_θ))
    instead (docs/sampling.md); ``None`` is the ancestral posterior (κ = 1, same stream)."""
    b, l, k = log_x_theta.shape
    out, pick_x, keys, lx, vv = _mixture_setup(log_x_theta, z_t, alpha_t, alpha_s, seeds, step, valid_vocab, probs_fn,
                                               workspace, kappa)
    rows = pick_x.nonzero()[:, 0]
    step_rows = max(1, int(workspace) // k)
    for i in range(0, rows.numel(), step_rows):
        r = rows[i:i + step_rows]
        out[r] = _draw_x(lx[r], keys[r], vv, probs_fn)
    return out.view(b, l)


# ------------------------------------------------------------------------------------------------- generic race
def race_sample_rows(row_probs, b: int, l: int, k: int, seeds, step: int, device,
                     workspace: int = DEFAULT_WORKSPACE) -> torch.Tensor:
    """Draw ``Long[B, L]`` from any per-position law with the counter-based race (same keys as the ancestral race):
    ``row_probs(i, j)`` returns float64 (unnormalised) probabilities ``[j − i, K]`` of the flattened positions
    ``i..j−1``; it is called ``workspace // K`` positions at a time, so no ``[B, L, K]`` buffer is built."""
    keys = _keys(seeds, step, b, l, device).reshape(-1)
    out = torch.empty(b * l, dtype=torch.int64, device=device)
    rows = max(1, int(workspace) // int(k))
    for i in range(0, b * l, rows):
        j = min(b * l, i + rows)
        out[i:j] = _draw(row_probs(i, j).to(torch.float64), keys[i:j])
    return out.view(b, l)

