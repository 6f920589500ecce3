"""Ancestral sampler step (duo-method.md §1.2, §5): float64 posterior q(z_s | z_t, x_θ) + categorical draw by the race
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

from duo_plugin.diffusion.uniform import _per_token, posterior

from . import rng

__all__ = ["posterior_sample_reference", "posterior_sample_chunked", "posterior_sample_triton"]

DEFAULT_WORKSPACE = 1 << 20


def _keys(seeds, step, b, l, dev):
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (b,):
        raise ValueError("seeds must be a LongTensor [B] (one per row; see duo_plugin.kernels.row_seeds)")
    return rng.position_keys(seeds.to(dev), l, rng.STREAM_SAMPLER, parts=(int(step),))


def _draw(probs, keys):
    e = rng.counter_exponential(keys, probs.shape[-1])
    return (probs / e).argmax(dim=-1)


def posterior_sample_reference(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None):
    """``z_s`` (``Long[B, L]``) ~ q(z_s | z_t, x_θ = exp(log_x_theta)) with the counter-based exponential race."""
    b, l, _ = log_x_theta.shape
    probs = posterior(z_t, log_x_theta.double().exp(), alpha_t, alpha_s, valid_vocab)
    return _draw(probs, _keys(seeds, step, b, l, log_x_theta.device))


def posterior_sample_chunked(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None,
                             workspace: int = DEFAULT_WORKSPACE):
    """Same as the reference, ``workspace // K`` positions at a time (float64 buffers ``O(workspace)``)."""
    b, l, k = log_x_theta.shape
    dev = log_x_theta.device
    keys = _keys(seeds, step, b, l, dev).reshape(-1)
    at = _per_token(alpha_t, b, l, dev, "alpha_t").reshape(-1)
    as_ = _per_token(alpha_s, b, l, dev, "alpha_s").reshape(-1)
    lx = log_x_theta.reshape(b * l, k)
    z = z_t.reshape(-1)
    out = torch.empty(b * l, dtype=torch.int64, device=dev)
    rows = max(1, int(workspace) // k)
    for i in range(0, b * l, rows):
        j = min(b * l, i + rows)
        probs = posterior(z[None, i:j], lx[None, i:j].double().exp(), at[None, i:j], as_[None, i:j], valid_vocab)
        out[i:j] = _draw(probs[0], keys[i:j])
    return out.view(b, l)


def posterior_sample_triton(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None):
    """Triton kernel; per-position scalars (normaliser, x_θ at z_t, valid mass) are computed here in fp64 with the
    reference's operation order, the K-wide work happens in the kernel."""
    from ._triton import posterior_sample

    b, l, k = log_x_theta.shape
    dev = log_x_theta.device
    keys = _keys(seeds, step, b, l, dev).reshape(-1).contiguous()
    at = _per_token(alpha_t, b, l, dev, "alpha_t").reshape(-1)
    as_ = _per_token(alpha_s, b, l, dev, "alpha_s").reshape(-1)
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
