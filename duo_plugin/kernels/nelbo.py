"""Fused output projection + log-softmax + Duo NELBO (docs/method.md §1.3) without full ``[B, L, K]`` fp32 logits.

f_Duo needs, per token, only: ``lse`` = logsumexp of the (valid) logits, the logits at z_t and at x0, and
``S = Σ_j softplus(logit_j − lse + log r)`` (``ℓ_j = log(x̄_θ,j / (1−α))``, r = Kα/(1−α)).  Its gradient w.r.t. logit_j
is ``c_p p_j + c_s σ_j + c_z 1[j=z_t] + c_m 1[j=x0]`` with p = softmax, σ_j = sigmoid(logit_j − lse + log r) and
per-token coefficients obtained by differentiating the per-token algebra (``T = Σ_j σ_j`` enters ``c_p``).

* ``reference``: ``duo_nelbo(log_softmax(F.linear(h, W, b).float()), ...)`` (dense).
* ``chunked``: token tiles (``workspace // K`` tokens, two fp32 ``[rows, K]`` buffers); one vocabulary matmul per
  tile, the closed-form logit gradient, weight gradient accumulated into one buffer, computed in the forward when a
  gradient will be needed (see :class:`_ChunkedNelbo`: exact for any upstream gradient, recomputes only tokens whose
  upstream weight differs from the most common one).
* ``triton``: a stats kernel (two passes over vocabulary tiles: online logsumexp, then S and T), the per-token
  algebra in fp64 PyTorch, and two backward kernels (dh over token blocks, dW/db over vocabulary tiles).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from duo_plugin.diffusion.losses import duo_nelbo
from duo_plugin.diffusion.uniform import per_token

from .stats import nelbo_from_stats  # noqa: F401  (moved to stats.py so _triton.py need not import this module)

__all__ = ["dense_log_probs", "fused_duo_nelbo_reference", "fused_duo_nelbo_chunked", "fused_duo_nelbo_triton",
           "nelbo_from_stats"]

DEFAULT_WORKSPACE = 1 << 22  # fp32 elements per work buffer (two buffers): ~83 tokens per tile at K = 50k


def dense_log_probs(hidden, weight, bias):
    """``log_softmax(F.linear(hidden, weight, bias).float())``: the dense fp32 log-probabilities of the reference."""
    return torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)


def fused_duo_nelbo_reference(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab=None):
    """Dense reference: ``duo_nelbo(log_softmax(F.linear(hidden, weight, bias).float()), ...)`` → ``float32 [B, L]``."""
    return duo_nelbo(dense_log_probs(hidden, weight, bias), z_t, x0, alpha_t, alpha_prime_t, valid_vocab)



def _logits_into(buf, hc, weight, bias, valid):
    """``buf[:r] = hc @ weightᵀ + bias`` in fp32 (written in place when the dtypes allow), invalid ids → −inf."""
    r = hc.shape[0]
    out = buf[:r]
    if hc.dtype == torch.float32 and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        if bias is None:
            torch.mm(hc, weight.t(), out=out)
        else:
            torch.addmm(bias, hc, weight.t(), out=out)
    else:
        out.copy_(F.linear(hc, weight, bias))
    if valid is not None:
        out.masked_fill_(~valid, float("-inf"))
    return out


def _row_sum64(x: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """Row sums of an fp32 ``[r, K]`` tensor with an fp64 accumulator across blocks of ``block`` columns (fp32
    cascade sums inside a block), without the fp64 copy of ``x`` that ``sum(dtype=float64)`` allocates."""
    r, k = x.shape
    nb = k // block
    out = torch.zeros(r, dtype=torch.float64, device=x.device)
    if nb:
        out += x[:, : nb * block].view(r, nb, block).sum(2).double().sum(1)
    if k > nb * block:
        out += x[:, nb * block:].sum(1).double()
    return out


def _tile(buf, buf2, hc, wd, bd, valid, r_t, z_t, m_t, coef_fn=None, gh=None, gw=None, gb=None):
    """One token tile: statistics ``(lse, lz, lm, S)`` and, with ``coef_fn(lse, lz, lm, S) → (f_lse, f_lz, f_lm,
    f_S)``, the closed-form logit gradient ``G = c_p p + c_s σ + f_lz 1[z_t] + f_lm 1[x0]`` (c_p = f_lse − f_S T,
    c_s = f_S, T = Σσ) applied to the projection: ``gh = G W`` (written), ``gw += Gᵀ h``, ``gb += Σ G`` (in place).
    ``buf``/``buf2``: ``[rows, K]`` fp32 work buffers (the only K-wide memory).  Returns ``(stats, coefs)``."""
    lg = _logits_into(buf, hc, wd, bd, valid)
    n = lg.shape[0]
    lz = lg.gather(1, z_t[:, None])[:, 0].double()
    lm = lg.gather(1, m_t[:, None])[:, 0].double()
    mx = lg.amax(1, keepdim=True)
    lg.sub_(mx).exp_()  # exp(l − max); invalid ids → 0
    se = _row_sum64(lg)
    lse = mx[:, 0].double() + torch.log(se)
    lg.mul_((1.0 / se).float()[:, None])  # p = softmax over the valid ids
    q = buf2[:n]
    torch.mul(lg, r_t.float()[:, None], out=q)  # r p = exp(l − lse + log r)
    q.log1p_()  # softplus(l − lse + log r)
    s = _row_sum64(q)
    stats = (lse, lz, lm, s)
    if coef_fn is None:
        return stats, None
    f_lse, f_lz, f_lm, f_s = coefs = coef_fn(*stats)
    q.neg_().exp_()  # 1 / (1 + r p);  σ = r p / (1 + r p)
    t = torch.bmm(lg[:, None, :], q[:, :, None]).view(-1).double() * r_t  # T = Σ σ (no [rows, K] temporary)
    q.mul_((f_s * r_t).float()[:, None]).add_((f_lse - f_s * t).float()[:, None]).mul_(lg)  # c_p p + c_s σ
    q.scatter_add_(1, z_t[:, None], f_lz.float()[:, None])
    q.scatter_add_(1, m_t[:, None], f_lm.float()[:, None])
    if gh is not None:
        w32 = wd if wd.dtype == torch.float32 else wd.float()
        torch.mm(q, w32, out=gh)
    if gw is not None:
        gw.addmm_(q.t(), hc if hc.dtype == torch.float32 else hc.float())
    if gb is not None:
        gb += q.sum(0)
    return stats, coefs


def _coef_fn(g, a, ap, delta, k_eff, z_ok, m_ok):
    """``(lse, lz, lm, S) → ∂(Σ g f)/∂(lse, lz, lm, S)`` from the fp64 per-token algebra (autograd on N scalars);
    also keeps the values ``f`` (``fn.f``)."""
    def fn(lse, lz, lm, s):
        with torch.enable_grad():
            ins = [t.detach().double().requires_grad_() for t in (lse, lz, lm, s)]
            f = nelbo_from_stats(*ins, a, ap, delta, k_eff, z_ok, m_ok)
            fn.f = f.detach()
            return torch.autograd.grad(f, ins, grad_outputs=g.double())
    return fn


class _ChunkedNelbo(torch.autograd.Function):
    """Token tiles of ``rows`` tokens, each doing one ``[rows, d] × [d, K]`` product and a few in-place passes over
    two ``rows × K`` fp32 buffers.

    When a gradient will be needed (``grads``), the forward also computes the gradient of ``Σ_i f_i`` (unit
    upstream weights): ``dh`` per token and one fp32 ``K × d`` weight-gradient buffer accumulated with ``addmm_``.
    Since ``dh_i`` is linear in the upstream ``g_i`` and ``dW = Σ_i g_i Ĝ_iᵀ h_i``, the backward is exact for
    any ``g``: ``dh = g ⊙ dĥ``, ``dW = c·dŴ + Σ_{g_i ≠ c} (g_i − c) Ĝ_iᵀ h_i`` with ``c`` the most common value of
    ``g`` — only the tokens whose weight differs from ``c`` (e.g. padding under a masked mean) are recomputed, so the
    usual training step makes three vocabulary-sized matmuls, as dense autograd does.  Without ``grads`` (no_grad
    evaluation) the forward computes statistics only."""

    @staticmethod
    def forward(ctx, h, weight, bias, z, x0, a, ap, valid, rows, k_eff, grads):
        n, d = h.shape
        k = weight.shape[0]
        dev = h.device
        hd, wd = h.detach(), weight.detach()
        bd = bias.detach() if bias is not None else None
        r = torch.exp(math.log(k_eff) + torch.log(a) - torch.log1p(-a))  # fp64 [N]
        z_ok = valid[z] if valid is not None else None
        m_ok = valid[x0] if valid is not None else None
        delta = (z == x0).double()
        need_h, need_w, need_b = grads
        need_b = need_b and bias is not None
        rows = min(rows, n)
        buf = torch.empty(rows, k, dtype=torch.float32, device=dev)
        buf2 = torch.empty(rows, k, dtype=torch.float32, device=dev)
        stats = [torch.empty(n, dtype=torch.float64, device=dev) for _ in range(4)]
        f = torch.empty(n, dtype=torch.float64, device=dev)
        spec = need_h or need_w or need_b
        gh = torch.empty(n, d, dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros(k, d, dtype=torch.float32, device=dev) if need_w else None
        gb = torch.zeros(k, dtype=torch.float32, device=dev) if need_b else None
        ones = torch.ones(n, dtype=torch.float64, device=dev)
        for i in range(0, n, rows):
            j = min(n, i + rows)
            sl = slice(i, j)
            fn = _coef_fn(ones[sl], a[sl], ap[sl], delta[sl], k_eff, None if z_ok is None else z_ok[sl],
                          None if m_ok is None else m_ok[sl])
            st, _ = _tile(buf, buf2, hd[sl], wd, bd, valid, r[sl], z[sl], x0[sl], fn if spec else None,
                          gh[sl] if need_h else None, gw, gb)
            for dst, src in zip(stats, st):
                dst[sl] = src
            f[sl] = fn.f if spec else nelbo_from_stats(*st, a[sl], ap[sl], delta[sl], k_eff,
                                                       None if z_ok is None else z_ok[sl],
                                                       None if m_ok is None else m_ok[sl])
        del buf, buf2
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), z, x0, a, ap, delta, r, *stats)
        ctx.has_bias, ctx.valid, ctx.rows, ctx.k_eff = bias is not None, valid, rows, k_eff
        ctx.pre = (gh, gw, gb) if spec else None
        return f.float()

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, z, x0, a, ap, delta, r, lse, lz, lm, s = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        valid = ctx.valid
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        n, d = h.shape
        k = weight.shape[0]
        dev = h.device
        g = g.reshape(-1).float()
        gh, gw, gb = ctx.pre if ctx.pre is not None else (None, None, None)
        ctx.pre = None
        full = (need_h and gh is None) or (need_w and gw is None) or (need_b and gb is None)
        if full:  # nothing precomputed for a needed input: recompute every tile with the actual g
            c = g.new_zeros(())
            gh = torch.empty(n, d, dtype=torch.float32, device=dev) if need_h else None
            gw = torch.zeros(k, d, dtype=torch.float32, device=dev) if need_w else None
            gb = torch.zeros(k, dtype=torch.float32, device=dev) if need_b else None
            rest = torch.arange(n, device=dev)
        else:
            c = torch.mode(g).values if n else g.new_zeros(())
            if need_h:
                gh.mul_(g[:, None])
            if need_w:
                gw.mul_(c)
            if need_b:
                gb.mul_(c)
            rest = (g != c).nonzero()[:, 0] if (need_w or need_b) else g.new_empty(0, dtype=torch.long)
        if rest.numel():
            z_ok = valid[z] if valid is not None else None
            m_ok = valid[x0] if valid is not None else None
            gd = (g - c).double()
            rows = ctx.rows
            buf = torch.empty(rows, k, dtype=torch.float32, device=dev)
            buf2 = torch.empty(rows, k, dtype=torch.float32, device=dev)
            hd, wd = h.detach(), weight.detach()
            bd = bias.detach() if bias is not None else None
            for i in range(0, rest.numel(), rows):
                idx = rest[i:i + rows]
                fn = _coef_fn(gd[idx], a[idx], ap[idx], delta[idx], ctx.k_eff,
                              None if z_ok is None else z_ok[idx], None if m_ok is None else m_ok[idx])
                ghc = torch.empty(idx.numel(), d, dtype=torch.float32, device=dev) if (full and need_h) else None
                _tile(buf, buf2, hd[idx], wd, bd, valid, r[idx], z[idx], x0[idx], fn, ghc,
                      gw if need_w else None, gb if need_b else None)
                if ghc is not None:
                    gh[idx] = ghc
        return (gh.to(h.dtype) if need_h else None, gw.to(weight.dtype) if need_w else None,
                gb.to(bias.dtype) if need_b else None, None, None, None, None, None, None, None, None)


def _flatten(hidden, z_t, x0, alpha_t, alpha_prime_t):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, L, d]; got {tuple(hidden.shape)}")
    b, l, d = hidden.shape
    for name, t in (("z_t", z_t), ("x0", x0)):
        if tuple(t.shape) != (b, l) or t.is_floating_point():
            raise ValueError(f"{name} must be integer ids [B, L]=[{b}, {l}]")
    a = per_token(alpha_t, b, l, hidden.device, "alpha_t").reshape(-1)
    ap = per_token(alpha_prime_t, b, l, hidden.device, "alpha_prime_t").reshape(-1)
    return hidden.reshape(b * l, d), z_t.reshape(-1).long(), x0.reshape(-1).long(), a, ap


def fused_duo_nelbo_chunked(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab=None,
                            workspace: int = DEFAULT_WORKSPACE):
    """Token-chunked PyTorch path (peak extra memory ``O(workspace)`` instead of several ``B·L·K`` tensors)."""
    b, l = z_t.shape
    h, z, x, a, ap = _flatten(hidden, z_t, x0, alpha_t, alpha_prime_t)
    if bool(((a <= 0) | (a >= 1) | torch.isnan(a)).any()) or bool(((ap > 0) | ~torch.isfinite(ap)).any()):
        raise ValueError("alpha_t must lie in (0, 1) and alpha_prime_t must be finite and <= 0")
    k = weight.shape[0]
    n = b * l
    # tiles of at most `workspace` elements; at least 64 tokens (the weight is re-read once per tile), and about 8
    # tiles per call above that (bounded memory at small B·L too)
    rows = max(1, min(int(workspace) // k, max(64, -(-n // 8))))
    vv = None if valid_vocab is None else valid_vocab.to(hidden.device)
    k_eff = k if vv is None else int(vv.sum())
    if k_eff < 2:
        raise ValueError("the NELBO needs at least 2 valid ids")
    grads = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad,
             torch.is_grad_enabled() and bias is not None and bias.requires_grad)
    return _ChunkedNelbo.apply(h, weight, bias, z, x, a, ap, vv, rows, k_eff, grads).view(b, l)


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
