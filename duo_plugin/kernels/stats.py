"""Per-token f_Duo from the statistics the fused NELBO kernels collect (shared by the chunked and Triton paths;
its own module so that ``_triton.py`` and ``nelbo.py`` do not import each other)."""

from __future__ import annotations

import torch

from duo_plugin.diffusion.losses import duo_nelbo_from_stats

__all__ = ["nelbo_from_stats"]


def nelbo_from_stats(lse, lz, lm, s, a, ap, delta, k: int, z_ok=None, m_ok=None):
    """f_Duo (fp64 per-token algebra, identical to :func:`duo_nelbo`) from per-token statistics.

    lse: logsumexp of the valid logits; lz/lm: logits at z_t / x0; s: Σ_valid softplus(logit − lse + log r);
    a, ap: α_t, α'_t; delta: 1[z_t = x0] (fp64); k: K_eff; z_ok/m_ok: whether z_t / x0 are valid ids (else their
    log-prob is −inf).  Differentiable w.r.t. lse, lz, lm, s.  Returns fp64 ``[N]``.
    """
    lx_i = lz - lse
    lx_m = lm - lse
    if z_ok is not None:
        lx_i = torch.where(z_ok, lx_i, torch.full_like(lx_i, float("-inf")))
    if m_ok is not None:
        lx_m = torch.where(m_ok, lx_m, torch.full_like(lx_m, float("-inf")))
    return duo_nelbo_from_stats(lx_i, lx_m, s, a, ap, delta, k)
