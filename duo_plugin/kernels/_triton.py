"""Triton kernels (imported lazily by the dispatchers; importing this module requires triton).

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).  All arithmetic is fp32 (fp64 for the
sampler), bf16 inputs are upcast on load.  The hash is the uint64 twin of :mod:`duo_plugin.kernels.rng`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_INTERP = bool(int(__import__("os").environ.get("TRITON_INTERPRET", "0") or 0))


@triton.jit
def _mix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _bits(key, j):
    """key: uint64 [M]; j: int [N] vocab ids → uint64 [M, N] = mix64(key + (j + 1) * G)."""
    jj = (j.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    return _mix64(key[:, None] + jj[None, :])


@triton.jit
def _normal(z):
    hi = (z >> 32).to(tl.float32)
    lo = ((z & 0xFFFFFFFF) >> 8).to(tl.float32)
    u1 = (hi + 0.5) * 2.3283064365386963e-10  # 2^-32
    u2 = (lo + 0.5) * 5.960464477539063e-08  # 2^-24
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


# ------------------------------------------------------------------------------------------------------------
# Curriculum soft embedding
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _latent_tile(keys, x0, a, s, inv_tau, cols, valid_ptr, K, HAS_VALID: tl.constexpr):
    z = _bits(keys, cols)
    w = _normal(z) * s[:, None]
    w = tl.where(cols[None, :] == x0[:, None], w + a[:, None], w)
    ok = cols < K
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + cols, mask=cols < K, other=0) != 0)
    w = tl.where(ok[None, :], w, float("-inf"))
    return w, w * inv_tau


@triton.jit
def _soft_emb_fwd(keys_ptr, x0_ptr, a_ptr, s_ptr, valid_ptr, e_ptr, emb_ptr, z_ptr, m_ptr, l_ptr,
                  N, K, D, inv_tau,
                  HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    keys = tl.load(keys_ptr + rows, mask=rmask, other=0).to(tl.uint64, bitcast=True)
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    dd = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK_M], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w, lg = _latent_tile(keys, x0, a, s, inv_tau, cols, valid_ptr, K, HAS_VALID)
        tmax = tl.max(w, 1)
        targ = tl.argmax(w, 1).to(tl.int64) + k0
        upd = tmax > best
        best_id = tl.where(upd, targ, best_id)
        best = tl.where(upd, tmax, best)
        m_new = tl.maximum(m_i, tl.max(lg, 1))
        scale = tl.exp(m_i - m_new)
        p = tl.exp(lg - m_new[:, None])
        l_i = l_i * scale + tl.sum(p, 1)
        e = tl.load(e_ptr + cols[:, None] * D + dd[None, :], mask=(cols[:, None] < K) & (dd[None, :] < D),
                    other=0.0).to(tl.float32)
        acc = acc * scale[:, None] + tl.dot(p, e, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(emb_ptr + rows[:, None] * D + dd[None, :], out, mask=rmask[:, None] & (dd[None, :] < D))
    tl.store(z_ptr + rows, best_id, mask=rmask)
    tl.store(m_ptr + rows, m_i, mask=rmask)
    tl.store(l_ptr + rows, l_i, mask=rmask)


@triton.jit
def _soft_emb_bwd(keys_ptr, x0_ptr, a_ptr, s_ptr, valid_ptr, m_ptr, l_ptr, g_ptr, ge_ptr,
                  N, K, D, inv_tau,
                  HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for r0 in range(0, N, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        keys = tl.load(keys_ptr + rows, mask=rmask, other=0).to(tl.uint64, bitcast=True)
        x0 = tl.load(x0_ptr + rows, mask=rmask, other=0)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
        l = tl.load(l_ptr + rows, mask=rmask, other=1.0)
        w, lg = _latent_tile(keys, x0, a, s, inv_tau, cols, valid_ptr, K, HAS_VALID)
        p = tl.exp(lg - m[:, None]) / l[:, None]
        p = tl.where(rmask[:, None], p, 0.0)
        g = tl.load(g_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
        acc += tl.dot(tl.trans(p), g, input_precision="ieee")
    tl.store(ge_ptr + cols[:, None] * D + dd[None, :], acc, mask=(cols[:, None] < K) & (dd[None, :] < D))


def _blocks(d: int):
    bd = max(16, triton.next_power_of_2(d))
    if _INTERP:
        return 16, 32, bd
    return 32, 64 if bd <= 128 else 32, bd


class TritonSoftEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, keys, x0, a, s, tau, valid):
        n = keys.shape[0]
        k, d = weight.shape
        dev = weight.device
        wc = weight.detach().contiguous()
        emb = torch.empty(n, d, dtype=torch.float32, device=dev)
        z = torch.empty(n, dtype=torch.int64, device=dev)
        m = torch.empty(n, dtype=torch.float32, device=dev)
        lsum = torch.empty(n, dtype=torch.float32, device=dev)
        vptr = valid.to(torch.int8).contiguous() if valid is not None else keys
        bm, bk, bd = _blocks(d)
        _soft_emb_fwd[(triton.cdiv(n, bm),)](keys, x0, a, s, vptr, wc, emb, z, m, lsum, n, k, d, 1.0 / tau,
                                             HAS_VALID=valid is not None, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd)
        ctx.save_for_backward(keys, x0, a, s, m, lsum, vptr)
        ctx.tau, ctx.has_valid, ctx.kd, ctx.wdtype = tau, valid is not None, (k, d), weight.dtype
        ctx.mark_non_differentiable(z)
        return emb.to(weight.dtype), z

    @staticmethod
    def backward(ctx, g_emb, _gz):
        keys, x0, a, s, m, lsum, vptr = ctx.saved_tensors
        k, d = ctx.kd
        n = keys.shape[0]
        g = g_emb.float().contiguous()
        ge = torch.empty(k, d, dtype=torch.float32, device=g.device)
        bm, bk, bd = _blocks(d)
        _soft_emb_bwd[(triton.cdiv(k, bk),)](keys, x0, a, s, vptr, m, lsum, g, ge, n, k, d, 1.0 / ctx.tau,
                                             HAS_VALID=ctx.has_valid, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd)
        return ge.to(ctx.wdtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------------
# Fused projection + Duo NELBO
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, HAS_VALID: tl.constexpr):
    """h: fp32 [M, BLOCK_D]; returns fp32 logits [M, BLOCK_K] (invalid / out-of-range ids → −inf) and the mask."""
    wt = tl.load(w_ptr + cols[None, :] * D + dd[:, None], mask=(cols[None, :] < K) & (dd[:, None] < D),
                 other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    lg = tl.dot(h, wt, input_precision="ieee") + bias[None, :]
    ok = cols < K
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + cols, mask=cols < K, other=0) != 0)
    return tl.where(ok[None, :], lg, float("-inf")), ok


@triton.jit
def _softplus(x):
    # accurate softplus: x for x > 20 (as torch), else log1p(exp(x)) with the Goldberg log1p trick
    y = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + y
    l1p = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x > 20.0, x, l1p)


@triton.jit
def _load_h(h_ptr, rows, dd, N, D):
    return tl.load(h_ptr + rows[:, None] * D + dd[None, :], mask=(rows[:, None] < N) & (dd[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _nelbo_stats(h_ptr, w_ptr, b_ptr, z_ptr, x_ptr, logr_ptr, valid_ptr, lse_ptr, lz_ptr, lm_ptr, s_ptr, t_ptr,
                 N, K, D, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D)
    h = _load_h(h_ptr, rows, dd, N, D)
    zi = tl.load(z_ptr + rows, mask=rmask, other=-1)
    xi = tl.load(x_ptr + rows, mask=rmask, other=-1)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lz = tl.zeros([BLOCK_M], tl.float32)
    lm = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        lg, ok = _logits_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, HAS_VALID)
        raw = tl.where((cols < K)[None, :], lg, 0.0)
        lz += tl.sum(tl.where(cols[None, :] == zi[:, None], raw, 0.0), 1)
        lm += tl.sum(tl.where(cols[None, :] == xi[:, None], raw, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(lg, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lg - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    logr = tl.load(logr_ptr + rows, mask=rmask, other=0.0)
    s_acc = tl.zeros([BLOCK_M], tl.float64)
    t_acc = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        lg, ok = _logits_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, HAS_VALID)
        xx = (lg - lse[:, None]) + logr[:, None]
        sp = tl.where(ok[None, :], _softplus(xx), 0.0)
        sg = tl.where(ok[None, :], 1.0 / (1.0 + tl.exp(-xx)), 0.0)
        s_acc += tl.sum(sp, 1).to(tl.float64)
        t_acc += tl.sum(sg, 1)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(lz_ptr + rows, lz, mask=rmask)
    tl.store(lm_ptr + rows, lm, mask=rmask)
    tl.store(s_ptr + rows, s_acc, mask=rmask)
    tl.store(t_ptr + rows, t_acc, mask=rmask)


@triton.jit
def _nelbo_grad_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, zi, xi, lse, logr, cp, cs, cz, cm,
                     HAS_VALID: tl.constexpr):
    lg, ok = _logits_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, HAS_VALID)
    lx = lg - lse[:, None]
    p = tl.where(ok[None, :], tl.exp(lx), 0.0)
    xx = lx + logr[:, None]
    sg = tl.where(ok[None, :], 1.0 / (1.0 + tl.exp(-xx)), 0.0)
    g = cp[:, None] * p + cs[:, None] * sg
    g += tl.where(cols[None, :] == zi[:, None], cz[:, None], 0.0)
    g += tl.where(cols[None, :] == xi[:, None], cm[:, None], 0.0)
    return tl.where((cols < K)[None, :], g, 0.0)


@triton.jit
def _nelbo_bwd_h(h_ptr, w_ptr, b_ptr, z_ptr, x_ptr, logr_ptr, valid_ptr, lse_ptr, c_ptr, gh_ptr,
                 N, K, D, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D)
    h = _load_h(h_ptr, rows, dd, N, D)
    zi = tl.load(z_ptr + rows, mask=rmask, other=-1)
    xi = tl.load(x_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    logr = tl.load(logr_ptr + rows, mask=rmask, other=0.0)
    cp = tl.load(c_ptr + rows * 4 + 0, mask=rmask, other=0.0)
    cs = tl.load(c_ptr + rows * 4 + 1, mask=rmask, other=0.0)
    cz = tl.load(c_ptr + rows * 4 + 2, mask=rmask, other=0.0)
    cm = tl.load(c_ptr + rows * 4 + 3, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        g = _nelbo_grad_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, zi, xi, lse, logr, cp, cs, cz, cm,
                             HAS_VALID)
        w = tl.load(w_ptr + cols[:, None] * D + dd[None, :], mask=(cols[:, None] < K) & (dd[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += tl.dot(g, w, input_precision="ieee")
    tl.store(gh_ptr + rows[:, None] * D + dd[None, :], acc, mask=rmask[:, None] & (dd[None, :] < D))


@triton.jit
def _nelbo_bwd_w(h_ptr, w_ptr, b_ptr, z_ptr, x_ptr, logr_ptr, valid_ptr, lse_ptr, c_ptr, gw_ptr, gb_ptr,
                 N, K, D, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    accb = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, N, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        h = _load_h(h_ptr, rows, dd, N, D)
        zi = tl.load(z_ptr + rows, mask=rmask, other=-1)
        xi = tl.load(x_ptr + rows, mask=rmask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        logr = tl.load(logr_ptr + rows, mask=rmask, other=0.0)
        cp = tl.load(c_ptr + rows * 4 + 0, mask=rmask, other=0.0)
        cs = tl.load(c_ptr + rows * 4 + 1, mask=rmask, other=0.0)
        cz = tl.load(c_ptr + rows * 4 + 2, mask=rmask, other=0.0)
        cm = tl.load(c_ptr + rows * 4 + 3, mask=rmask, other=0.0)
        g = _nelbo_grad_tile(h, w_ptr, b_ptr, cols, dd, K, D, valid_ptr, zi, xi, lse, logr, cp, cs, cz, cm,
                             HAS_VALID)
        g = tl.where(rmask[:, None], g, 0.0)
        acc += tl.dot(tl.trans(g), h, input_precision="ieee")
        accb += tl.sum(g, 0)
    tl.store(gw_ptr + cols[:, None] * D + dd[None, :], acc, mask=(cols[:, None] < K) & (dd[None, :] < D))
    tl.store(gb_ptr + cols, accb, mask=cols < K)


class TritonNelbo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, z, x0, a, ap, valid, k_eff):
        from .stats import nelbo_from_stats

        n, d = h.shape
        k = weight.shape[0]
        dev = h.device
        hc, wc, bc = h.detach().contiguous(), weight.detach().contiguous(), bias.detach().contiguous()
        logr64 = math.log(k_eff) + torch.log(a) - torch.log1p(-a)
        logr = logr64.float().contiguous()
        vptr = valid.to(torch.int8).contiguous() if valid is not None else z
        lse, lz, lm, t = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4))
        s = torch.empty(n, dtype=torch.float64, device=dev)
        bm, bk, bd = _blocks(d)
        _nelbo_stats[(triton.cdiv(n, bm),)](hc, wc, bc, z, x0, logr, vptr, lse, lz, lm, s, t, n, k, d,
                                            HAS_VALID=valid is not None, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd)
        z_ok = valid[z] if valid is not None else None
        m_ok = valid[x0] if valid is not None else None
        delta = (z == x0).double()
        f = nelbo_from_stats(lse.double(), lz.double(), lm.double(), s, a, ap, delta, k_eff, z_ok, m_ok)
        ctx.save_for_backward(hc, wc, bc, z, x0, a, ap, delta, logr, vptr, lse, lz, lm, s, t)
        ctx.k_eff, ctx.has_valid = k_eff, valid is not None
        ctx.valid = valid
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)
        return f.float()

    @staticmethod
    def backward(ctx, g):
        from .stats import nelbo_from_stats

        hc, wc, bc, z, x0, a, ap, delta, logr, vptr, lse, lz, lm, s, t = ctx.saved_tensors
        valid = ctx.valid
        z_ok = valid[z] if valid is not None else None
        m_ok = valid[x0] if valid is not None else None
        with torch.enable_grad():
            ins = [lse.double().requires_grad_(), lz.double().requires_grad_(), lm.double().requires_grad_(),
                   s.clone().requires_grad_()]
            f = nelbo_from_stats(*ins, a, ap, delta, ctx.k_eff, z_ok, m_ok)
            f_lse, f_lz, f_lm, f_s = torch.autograd.grad(f, ins, grad_outputs=g.double())
        coef = torch.stack([f_lse - f_s * t.double(), f_s, f_lz, f_lm], dim=1).float().contiguous()
        n, d = hc.shape
        k = wc.shape[0]
        bm, bk, bd = _blocks(d)
        gh = torch.empty(n, d, dtype=torch.float32, device=hc.device)
        gw = torch.empty(k, d, dtype=torch.float32, device=hc.device)
        gb = torch.empty(k, dtype=torch.float32, device=hc.device)
        args = (hc, wc, bc, z, x0, logr, vptr, lse, coef)
        if ctx.needs_input_grad[0]:
            _nelbo_bwd_h[(triton.cdiv(n, bm),)](*args, gh, n, k, d, HAS_VALID=ctx.has_valid, BLOCK_M=bm,
                                                BLOCK_K=bk, BLOCK_D=bd)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _nelbo_bwd_w[(triton.cdiv(k, bk),)](*args, gw, gb, n, k, d, HAS_VALID=ctx.has_valid, BLOCK_M=bm,
                                                BLOCK_K=bk, BLOCK_D=bd)
        hd, wd, bdt = ctx.dtypes
        return (gh.to(hd) if ctx.needs_input_grad[0] else None, gw.to(wd) if ctx.needs_input_grad[1] else None,
                gb.to(bdt) if ctx.needs_input_grad[2] else None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------------------
# Sampler: float64 posterior + race of counter-based exponentials, online argmax over vocabulary tiles
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _posterior_sample(logx_ptr, keys_ptr, z_ptr, c_ptr, valid_ptr, out_ptr, N, K,
                      HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)  # rows * K can exceed 2^31 (e.g. 64 x 1024 positions x 50k ids)
    keys = tl.load(keys_ptr + rows, mask=rmask, other=0).to(tl.uint64, bitcast=True)
    zi = tl.load(z_ptr + rows, mask=rmask, other=-1)
    xsum = tl.load(c_ptr + rows * 5 + 0, mask=rmask, other=1.0)
    c1 = tl.load(c_ptr + rows * 5 + 1, mask=rmask, other=0.0)
    c2 = tl.load(c_ptr + rows * 5 + 2, mask=rmask, other=0.0)
    stay = tl.load(c_ptr + rows * 5 + 3, mask=rmask, other=0.0)
    norm = tl.load(c_ptr + rows * 5 + 4, mask=rmask, other=1.0)
    best = tl.full([BLOCK_M], -1.0, tl.float64)
    best_id = tl.zeros([BLOCK_M], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        inb = (cols < K)[None, :] & rmask[:, None]
        x = tl.exp(tl.load(logx_ptr + rows64[:, None] * K + cols[None, :], mask=inb, other=float("-inf"))
                   .to(tl.float64))
        c2u = tl.zeros([BLOCK_M, BLOCK_K], tl.float64) + c2[:, None]  # ((1 - a_t|s)(1 - a_s)) / K_eff
        if HAS_VALID:
            ok = tl.load(valid_ptr + cols, mask=cols < K, other=0) != 0
            x = tl.where(ok[None, :], x, 0.0) / xsum[:, None]
            c2u = tl.where(ok[None, :], c2u, 0.0)
        num = c1[:, None] * x + c2u
        num = tl.where(cols[None, :] == zi[:, None], num + stay[:, None], num)
        prob = num / norm[:, None]
        zb = _bits(keys, cols)
        v = ((zb >> 11).to(tl.float64) + 1.0) * 1.1102230246251565e-16  # 2^-53
        e = -tl.log(v)
        score = tl.where(inb, prob / e, -1.0)
        tmax = tl.max(score, 1)
        targ = tl.argmax(score, 1).to(tl.int64) + k0
        upd = tmax > best
        best_id = tl.where(upd, targ, best_id)
        best = tl.where(upd, tmax, best)
    tl.store(out_ptr + rows, best_id, mask=rmask)


def posterior_sample(logx, keys, z, coef, valid):
    n, k = logx.shape
    out = torch.empty(n, dtype=torch.int64, device=logx.device)
    vptr = valid.to(torch.int8).contiguous() if valid is not None else z
    bm, bk = (16, 32) if _INTERP else (16, 256)
    _posterior_sample[(triton.cdiv(n, bm),)](logx, keys, z, coef, vptr, out, n, k,
                                             HAS_VALID=valid is not None, BLOCK_M=bm, BLOCK_K=bk)
    return out
