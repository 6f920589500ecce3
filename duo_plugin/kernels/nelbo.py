"""Fused output projection + log-softmax + Duo NELBO (docs/method.md §1.3) without full ``[B, L, K]`` fp32 logits.

f_Duo needs, per token, only: ``lse`` = logsumexp of the (valid) logits, the logits at z_t and at x0, and
``S = Σ_j softplus(logit_j − lse + log r)`` (``ℓ_j = log(x̄_θ,j / (1−α))``, r = Kα/(1−α)).  Its gradient w.r.t. logit_j
is ``c_p p_j + c_s σ_j + c_z 1[j=z_t] + c_m 1[j=x0]`` with p = softmax, σ_j = sigmoid(logit_j − lse + log r) and
per-token coefficients obtained by differentiating the per-token algebra (``T = Σ_j σ_j`` enters ``c_p``).

* ``reference``: ``duo_nelbo(log_softmax(F.linear(h, W, b).float()), ...)`` (dense).
* ``chunked``: the same, token chunk by token chunk (``workspace // K`` tokens), backward recomputes each chunk.
* ``triton``: a stats kernel (two passes over vocabulary tiles: online logsumexp, then S and T), the per-token
  algebra in fp64 PyTorch, and two backward kernels (dh over token blocks, dW/db over vocabulary tiles).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from duo_plugin.diffusion.losses import duo_nelbo
from duo_plugin.diffusion.uniform import per_token as _per_token

from .stats import nelbo_from_stats  # noqa: F401  (moved to stats.py so _triton.py need not import this module)

__all__ = ["fused_duo_nelbo_reference", "fused_duo_nelbo_chunked", "fused_duo_nelbo_triton", "nelbo_from_stats"]

DEFAULT_WORKSPACE = 1 << 21


def fused_duo_nelbo_reference(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab=None):
    """Dense reference: ``duo_nelbo(log_softmax(F.linear(hidden, weight, bias).float()), ...)`` → ``float32 [B, L]``."""
    logp = torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)
    return duo_nelbo(logp, z_t, x0, alpha_t, alpha_prime_t, valid_vocab)



class _ChunkedNelbo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, z, x0, a, ap, valid, rows):
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        with torch.no_grad():
            for i in range(0, n, rows):
                j = min(n, i + rows)
                logp = torch.log_softmax(F.linear(h[i:j], weight, bias).float(), dim=-1)
                out[i:j] = duo_nelbo(logp[None], z[None, i:j], x0[None, i:j], a[None, i:j], ap[None, i:j], valid)[0]
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), z, x0, a, ap)
        ctx.has_bias, ctx.valid, ctx.rows = bias is not None, valid, rows
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, z, x0, a, ap = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need_b and bias is not None) else None
        wd = weight.detach().requires_grad_(need_w)
        bd = bias.detach().requires_grad_(need_b) if bias is not None else None
        n, rows = h.shape[0], ctx.rows
        for i in range(0, n, rows):
            j = min(n, i + rows)
            hc = h[i:j].detach().requires_grad_(need_h)
            with torch.enable_grad():
                logp = torch.log_softmax(F.linear(hc, wd, bd).float(), dim=-1)
                f = duo_nelbo(logp[None], z[None, i:j], x0[None, i:j], a[None, i:j], ap[None, i:j], ctx.valid)[0]
                inputs = [t for t, need in ((hc, need_h), (wd, need_w), (bd, need_b and bd is not None)) if need]
                grads = torch.autograd.grad(f, inputs, grad_outputs=g[i:j].float())
            it = iter(grads)
            if need_h:
                gh[i:j] = next(it)
            if need_w:
                gw += next(it)
            if need_b and bd is not None:
                gb += next(it)
        return (gh, gw.to(weight.dtype) if gw is not None else None, gb.to(bias.dtype) if gb is not None else None,
                None, None, None, None, None, None)


def _flatten(hidden, z_t, x0, alpha_t, alpha_prime_t):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, L, d]; got {tuple(hidden.shape)}")
    b, l, d = hidden.shape
    for name, t in (("z_t", z_t), ("x0", x0)):
        if tuple(t.shape) != (b, l) or t.is_floating_point():
            raise ValueError(f"{name} must be integer ids [B, L]=[{b}, {l}]")
    a = _per_token(alpha_t, b, l, hidden.device, "alpha_t").reshape(-1)
    ap = _per_token(alpha_prime_t, b, l, hidden.device, "alpha_prime_t").reshape(-1)
    return hidden.reshape(b * l, d), z_t.reshape(-1).long(), x0.reshape(-1).long(), a, ap


def fused_duo_nelbo_chunked(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab=None,
                            workspace: int = DEFAULT_WORKSPACE):
    """Token-chunked PyTorch path (peak extra memory ``O(workspace)`` instead of several ``B·L·K`` tensors)."""
    b, l = z_t.shape
    h, z, x, a, ap = _flatten(hidden, z_t, x0, alpha_t, alpha_prime_t)
    rows = max(1, int(workspace) // weight.shape[0])
    vv = None if valid_vocab is None else valid_vocab.to(hidden.device)
    return _ChunkedNelbo.apply(h, weight, bias, z, x, a, ap, vv, rows).view(b, l)


def fused_duo_nelbo_triton(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab=None):
    """Triton path: vocabulary-tiled stats kernel + fp64 per-token algebra + recomputing backward kernels."""
    from ._triton import TritonNelbo

    b, l = z_t.shape
    h, z, x, a, ap = _flatten(hidden, z_t, x0, alpha_t, alpha_prime_t)
    if bool(((a <= 0) | (a >= 1)).any()) or bool((ap > 0).any()):
        raise ValueError("alpha_t must lie in (0, 1) and alpha_prime_t <= 0")
    vv = None if valid_vocab is None else valid_vocab.to(hidden.device)
    k_eff = weight.shape[0] if vv is None else int(vv.sum())
    if bias is None:
        bias_t = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        out = TritonNelbo.apply(h, weight, bias_t, z, x, a, ap, vv, k_eff)
    else:
        out = TritonNelbo.apply(h, weight, bias, z, x, a, ap, vv, k_eff)
    return out.view(b, l)
