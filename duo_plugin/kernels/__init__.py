"""Fused Duo kernels with one signature per operation and three implementations each.

``impl``: ``"auto"`` (Triton on CUDA tensors when triton imports, else ``"chunked"``), ``"reference"`` (dense,
the definition), ``"chunked"`` (PyTorch, bounded workspace; the CPU default) or ``"triton"`` (CUDA, or CPU under
``TRITON_INTERPRET=1``).  Triton is imported lazily: the package works without it.

* :func:`curriculum_soft_embedding` — ``(softmax((α̃ onehot(x0) + σ̃ ε)/τ) @ E, argmax)`` with counter-based ε.
* :func:`fused_duo_nelbo` — output projection + log-softmax + f_Duo without dense fp32 logits.
* :func:`posterior_sample_step` — float64 posterior + categorical draw with a counter-based exponential race.
* :func:`embedding_override` — feed a precomputed input embedding to any model (forward hook).
"""

from __future__ import annotations

import contextlib

import torch

from . import rng
from ._env import IMPLS, resolve_impl, triton_available  # noqa: F401
from .rng import row_seeds

__all__ = [
    "IMPLS",
    "triton_available",
    "resolve_impl",
    "row_seeds",
    "curriculum_soft_embedding",
    "curriculum_latent_reference",
    "fused_duo_nelbo",
    "posterior_sample_step",
    "embedding_override",
    "rng",
    "choose_paths",
    "input_embedding",
    "projection_params",
]

def curriculum_soft_embedding(x0, alpha_tilde, sigma_tilde, tau: float, seeds, weight, valid_vocab=None, *,
                              impl: str = "auto"):
    """Curriculum input from one Gaussian latent (docs/method.md §3.1), never materialising ``[B, L, K]``.

    ``w = α̃ onehot(x0) + σ̃ ε`` with ε the counter-based normal keyed by (``seeds[b]``, position, vocab id)
    (:mod:`duo_plugin.kernels.rng`); invalid ids (``valid_vocab`` False) get −inf.

    Args:
        x0: ``Long[B, L]``; alpha_tilde, sigma_tilde: scalar/``[B]``/``[B, L]`` (``sqrt(sigmoid(∓γ))``);
        tau: temperature > 0; seeds: ``Long[B]`` (:func:`row_seeds`); weight: input embedding ``E [K, d]``.
    Returns:
        ``(emb [B, L, d] in weight.dtype, z_t Long[B, L])`` — ``emb = softmax(w/τ) @ E`` (differentiable w.r.t.
        ``weight``), ``z_t = argmax(w)`` (the loss's z_t).
    """
    from . import curriculum as C

    impl = resolve_impl(impl, weight.device)
    if impl == "reference":
        return C.curriculum_soft_embedding_reference(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab)
    if impl == "chunked":
        return C.curriculum_soft_embedding_chunked(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab)
    return C.curriculum_soft_embedding_triton(x0, alpha_tilde, sigma_tilde, tau, seeds, weight, valid_vocab)


def curriculum_latent_reference(x0, alpha_tilde, sigma_tilde, seeds, vocab_size, valid_vocab=None):
    """The dense latent ``w`` (``float32 [B, L, K]``) the fused paths use implicitly (tests, debugging)."""
    from .curriculum import curriculum_latent_reference as f

    return f(x0, alpha_tilde, sigma_tilde, seeds, vocab_size, valid_vocab)


def fused_duo_nelbo(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab=None, *, impl: str = "auto"):
    """``duo_nelbo(log_softmax(F.linear(hidden, weight, bias).float()), z_t, x0, α_t, α'_t, valid_vocab)`` →
    ``float32 [B, L]`` without dense fp32 logits (chunked/Triton), differentiable w.r.t. hidden, weight, bias.

    ``hidden`` = ``model.forward_hidden(x, sigma)``; ``weight``/``bias`` = ``model.output_projection`` parameters.
    Same contract as ``duo_nelbo`` for ids outside ``valid_vocab``: a ValueError naming them, on every path.
    """
    from duo_plugin.diffusion.losses import check_nelbo_ids, duo_nelbo

    from . import nelbo as N

    if valid_vocab is not None:
        check_nelbo_ids(valid_vocab.to(z_t.device), z_t=z_t, x0=x0)
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":  # = N.fused_duo_nelbo_reference, x0 handed to duo_nelbo directly
        return duo_nelbo(N.dense_log_probs(hidden, weight, bias), z_t, x0, alpha_t, alpha_prime_t, valid_vocab)
    fn = {"chunked": N.fused_duo_nelbo_chunked, "triton": N.fused_duo_nelbo_triton}[impl]
    return fn(hidden, weight, bias, z_t, x0, alpha_t, alpha_prime_t, valid_vocab)


def posterior_sample_step(log_x_theta, z_t, alpha_t, alpha_s, seeds, step: int, valid_vocab=None, *,
                          impl: str = "auto", method: str = "race", probs_fn=None):
    """One ancestral step ``z_s ~ q(z_s | z_t, x_θ)``.  Returns ``Long[B, L]``.

    ``method="race"``: float64 posterior, exponential race with counter-based exponentials keyed by (``seeds[b]``,
    ``step``, position, vocab id); all impls agree.  ``method="mixture"``: the posterior as the mixture "stay at
    z_t" / "draw from x_θ" / "draw uniform" with per-position weights — a counter-based coin per position and a
    float64 inverse-CDF draw over x_θ only on the rows that picked x_θ (same distribution, a different stream;
    ``impl="reference"`` evaluates it densely, any other impl uses the sparse PyTorch path on any device)."""
    from . import sampler as S

    if method == "mixture":
        fn = S.posterior_mixture_reference if impl == "reference" else S.posterior_mixture_sample
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
        return fn(log_x_theta, z_t, alpha_t, alpha_s, seeds, step, valid_vocab, probs_fn=probs_fn)
    if method != "race":
        raise ValueError(f"method must be 'race' or 'mixture', got {method!r}")
    impl = resolve_impl(impl, log_x_theta.device)
    fn = {"reference": S.posterior_sample_reference, "chunked": S.posterior_sample_chunked,
          "triton": S.posterior_sample_triton}[impl]
    if probs_fn is not None:
        if impl == "triton":
            raise ValueError("probs_fn is not supported by the Triton race kernel; use impl='chunked'")
        return fn(log_x_theta, z_t, alpha_t, alpha_s, seeds, step, valid_vocab, probs_fn=probs_fn)
    return fn(log_x_theta, z_t, alpha_t, alpha_s, seeds, step, valid_vocab)


def choose_paths(*args, **kwargs):
    """Recipe path selection (``kernels:`` config section); see :func:`duo_plugin.kernels.select.choose_paths`."""
    from .select import choose_paths as f

    return f(*args, **kwargs)


def input_embedding(model):
    from .select import input_embedding as f

    return f(model)


def projection_params(model):
    from .select import projection_params as f

    return f(model)


@contextlib.contextmanager
def embedding_override(module: torch.nn.Module, emb: torch.Tensor):
    """Within the block, ``module``'s forward output is replaced by ``emb`` (a forward hook), so any model whose
    input embedding is ``module`` (DiT ``model.vocab_embed``, torchtune ``tok_embeddings``) consumes the fused
    curriculum embedding: call the model with ``z_t`` ids (a cheap lookup whose result is discarded)."""

    def hook(_m, _inp, out):
        if out.shape != emb.shape:
            raise ValueError(f"embedding_override: model embeds to {tuple(out.shape)}, got {tuple(emb.shape)}")
        return emb.to(out.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
