"""Fused curriculum input (docs/method.md §3.1): the soft embedding ``softmax((α̃ onehot(x0) + σ̃ ε)/τ) @ E`` and the
hard latent ``z_t = argmax(w)`` without a dense ``[B, L, K]`` tensor.

ε is the counter-based normal of :mod:`duo_plugin.kernels.rng` keyed by (row seed, position, vocab id), so the
three implementations — ``reference`` (dense), ``chunked`` (PyTorch, tokens in chunks of ``workspace // K`` rows,
sparse gather of the softmax support) and ``triton`` (one pass over vocabulary tiles with an online softmax) —
see the same noise, and backward recomputes it instead of storing it.

Only ``E`` receives a gradient (``w`` depends on x0, the schedule and the seed only):
``dE = Pᵀ · dEmb`` with ``P = softmax(w/τ)``.
"""

from __future__ import annotations

import torch

from duo_plugin.diffusion.uniform import per_token

from . import rng

__all__ = [
    "curriculum_latent_reference",
    "curriculum_soft_embedding_reference",
    "curriculum_soft_embedding_chunked",
    "curriculum_soft_embedding_triton",
]

DEFAULT_WORKSPACE = 1 << 20  # elements of one [rows, K] chunk in the PyTorch path
SPARSE_MAX_DENSITY = 1.0 / 16  # above this fraction of non-zero softmax weights a chunk uses a dense matmul



def _prep(x0, alpha_tilde, sigma_tilde, tau, seeds, vocab_size, valid_vocab):
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2 or x0.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"x0 must be integer ids [B, L]; got {getattr(x0, 'shape', x0)}")
    if not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"tau must be a positive float, got {tau!r}")
    b, l = x0.shape
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (b,):
        raise ValueError("seeds must be a LongTensor [B] (one per row; see duo_plugin.kernels.row_seeds)")
    k = int(vocab_size)
    if valid_vocab is not None:
        if valid_vocab.dtype != torch.bool or valid_vocab.shape != (k,):
            raise ValueError(f"valid_vocab must be BoolTensor[K={k}]")
        if int(valid_vocab.sum()) < 2:
            raise ValueError("need at least 2 valid ids")
    dev = x0.device
    keys = rng.position_keys(seeds.to(dev), l, rng.STREAM_CURRICULUM)
    a = per_token(alpha_tilde, b, l, dev, "alpha_tilde").float()
    s = per_token(sigma_tilde, b, l, dev, "sigma_tilde").float()
    return keys, a, s


def _latent_eager(keys, j, x0, a, s):
    w = rng.normal_from_bits(rng.element_bits(keys, j)) * s[:, None]
    return torch.where(j[None, :] == x0[:, None], w + a[:, None], w)


# Inductor (C++ on CPU) fuses the ~30 integer ops of the hash + Box-Muller with argmax, max and exp of a chunk into one
# loop (_softmax_chunk): ~50x faster than eager
# PyTorch on CPU (docs/kernels.md).  Same integer bits; log/cos/sqrt may differ by an ulp (as with Triton).
# DUO_KERNELS_COMPILE: "auto" (default: CPU chunks of >= COMPILE_MIN_ELEMENTS), "1" (always), "0" (never).
COMPILE_MIN_ELEMENTS = 1 << 16
_compile_failed = False


def _use_compile(numel: int, device) -> bool:
    import os

    mode = os.environ.get("DUO_KERNELS_COMPILE", "auto").lower()
    if mode in ("0", "false", "no") or _compile_failed:
        return False
    if mode in ("1", "true", "yes"):
        return True
    return torch.device(device).type == "cpu" and numel >= COMPILE_MIN_ELEMENTS


def _softmax_chunk_eager(keys, j, x0, a, s, tau: float, valid):
    """One chunk's ``(e = exp(w/τ − m), z = argmax w, m = max w/τ, Σe, nnz(e))`` with ``w`` the latent (invalid ids −inf):
    one fused loop under ``torch.compile`` (no fp32 ``w`` round trip, and the vectorised ``exp`` of the very negative
    arguments τ = 1e-3 produces is fast; eager ``exp`` takes a slow path on them)."""
    w = _latent_eager(keys, j, x0, a, s)
    if valid is not None:
        w = torch.where(valid[None, :], w, float("-inf"))
    z = w.argmax(1)
    lg = w / tau
    m = lg.amax(1, keepdim=True)
    e = torch.exp(lg - m)
    return e, z, m, e.sum(1, keepdim=True), (e > 0).sum()


_compiled_softmax = {}


def _softmax_chunk(keys, x0, a, s, tau: float, k: int, valid):
    global _compile_failed
    j = torch.arange(0, int(k), dtype=torch.int64, device=keys.device)
    args = (keys, j, x0.long(), a.float(), s.float(), float(tau), valid)
    if _use_compile(keys.numel() * int(k), keys.device):
        try:
            key = valid is None
            if key not in _compiled_softmax:
                _compiled_softmax[key] = torch.compile(_softmax_chunk_eager, dynamic=True)
            return _compiled_softmax[key](*args)
        except Exception as e:  # no C++ compiler etc.: eager from now on
            import warnings

            _compile_failed = True
            warnings.warn(f"duo_plugin.kernels: torch.compile of the curriculum softmax failed ({e!r}); using eager")
    return _softmax_chunk_eager(*args)


def _latent_rows(keys, x0, a, s, k, valid, start=0, stop=None):
    """fp32 ``w`` for flattened rows: ``[N, K]`` (σ̃ ε + α̃ onehot(x0), invalid ids −inf); eager (the reference)."""
    w = rng.counter_normal(keys, k, start, stop) * s[:, None]
    w.scatter_add_(1, x0.long()[:, None], a[:, None])
    if valid is not None:
        w.masked_fill_(~valid, float("-inf"))
    return w


def curriculum_latent_reference(x0, alpha_tilde, sigma_tilde, seeds, vocab_size, valid_vocab=None) -> torch.Tensor:
    """Dense Gaussian latent ``w = α̃ onehot(x0) + σ̃ ε`` (``float32 [B, L, K]``, invalid ids −inf)."""
    keys, a, s = _prep(x0, alpha_tilde, sigma_tilde, 1.0, seeds, vocab_size, valid_vocab)
    b, l = x0.shape
    valid = None if valid_vocab is None else valid_vocab.to(x0.device)
    w = _latent_rows(keys.reshape(-1), x0.reshape(-1), a.reshape(-1), s.reshape(-1), int(vocab_size), valid)
    return w.view(b, l, -1)


def curriculum_soft_embedding_reference(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab=None):
    """Dense reference: ``(softmax(w/τ) @ E, argmax w)``; autograd to ``weight`` through the dense softmax."""
    w = curriculum_latent_reference(x0, alpha_tilde, sigma_tilde, seeds, weight.shape[0], valid_vocab)
    z = w.argmax(-1)
    emb = torch.softmax(w / tau, dim=-1) @ weight.float()
    return emb.to(weight.dtype), z


class _ChunkedSoftEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, keys, x0, a, s, tau, valid, workspace):
        n = keys.shape[0]
        k, d = weight.shape
        wf = weight.detach().float()
        rows = max(1, int(workspace) // k)
        emb = torch.empty(n, d, dtype=torch.float32, device=weight.device)
        z = torch.empty(n, dtype=torch.int64, device=weight.device)
        saved = []  # per chunk: (start, stop, rows_idx, cols_idx, p) sparse, or (start, stop, m, sum) dense
        for i in range(0, n, rows):
            j = min(n, i + rows)
            e, zc, m, ssum, nnz = _softmax_chunk(keys[i:j], x0[i:j], a[i:j], s[i:j], tau, k, valid)
            z[i:j] = zc
            if int(nnz) <= SPARSE_MAX_DENSITY * e.numel():
                r, c = e.nonzero(as_tuple=True)
                p = e[r, c] / ssum[r, 0]
                out = torch.zeros(j - i, d, dtype=torch.float32, device=weight.device)
                out.index_add_(0, r, p[:, None] * wf[c])
                emb[i:j] = out
                saved.append(("sparse", i, j, r, c, p))
            else:
                emb[i:j] = e.div_(ssum) @ wf
                saved.append(("dense", i, j, m, ssum))
            del e
        ctx.saved_chunks = saved
        ctx.save_for_backward(keys, x0, a, s)
        ctx.tau, ctx.valid, ctx.k, ctx.wdtype = tau, valid, k, weight.dtype
        ctx.mark_non_differentiable(z)
        return emb.to(weight.dtype), z

    @staticmethod
    def backward(ctx, g_emb, _gz):
        keys, x0, a, s = ctx.saved_tensors
        if g_emb is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        g = g_emb.float()
        k = ctx.k
        grad = torch.zeros(k, g.shape[1], dtype=torch.float32, device=g.device)
        for entry in ctx.saved_chunks:
            if entry[0] == "sparse":
                _, i, j, r, c, p = entry
                grad.index_add_(0, c, p[:, None] * g[i:j][r])
            else:
                _, i, j, m, ssum = entry
                pmat = _softmax_chunk(keys[i:j], x0[i:j], a[i:j], s[i:j], ctx.tau, k, ctx.valid)[0].div_(ssum)
                grad.addmm_(pmat.t(), g[i:j])
        return grad.to(ctx.wdtype), None, None, None, None, None, None, None


def _flat_inputs(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab):
    keys, a, s = _prep(x0, alpha_tilde, sigma_tilde, tau, seeds, weight.shape[0], valid_vocab)
    valid = None if valid_vocab is None else valid_vocab.to(x0.device)
    return (keys.reshape(-1).contiguous(), x0.reshape(-1).long().contiguous(), a.reshape(-1).contiguous(),
            s.reshape(-1).contiguous(), valid)


def curriculum_soft_embedding_chunked(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab=None,
                                      workspace: int = DEFAULT_WORKSPACE):
    """PyTorch path: rows in chunks of ``workspace // K``; the softmax support (exactly the entries whose fp32
    ``exp`` does not underflow) is gathered sparsely when it is small (τ = 1e-3: a handful of ids per token), so
    the ``E`` matmul and its backward cost ``O(nnz · d)``; dense chunks are recomputed in backward."""
    b, l = x0.shape
    keys, x, a, s, valid = _flat_inputs(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab)
    emb, z = _ChunkedSoftEmbedding.apply(weight, keys, x, a, s, float(tau), valid, int(workspace))
    return emb.view(b, l, -1), z.view(b, l)


def curriculum_soft_embedding_triton(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab=None):
    """Triton path: one program per block of rows streams the vocabulary in tiles (online softmax + argmax)."""
    from ._triton import TritonSoftEmbedding

    b, l = x0.shape
    keys, x, a, s, valid = _flat_inputs(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab)
    emb, z = TritonSoftEmbedding.apply(weight, keys, x, a, s, float(tau), valid)
    return emb.view(b, l, -1), z.view(b, l)
