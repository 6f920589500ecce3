"""Helpers for adapting a pretrained autoregressive LLM into a Duo (uniform-state) diffusion LM.

No torchtune import here (core package). Three pieces, used by :class:`duo_plugin.objectives.DuoObjective` and ``duo_pretrain``:

* :func:`annealed_attention_mask` — attention-mask annealing from causal to full (DiffuLLaMA-style):
  position i may attend to j ≤ i + ⌊L·progress⌋ (``"window"``) or, in ``"random"`` mode, to every j ≤ i
  plus each future j independently with probability ``progress``; ``progress = step / anneal_steps``. Returns
  ``None`` once annealed (progress ≥ 1), so the decoder runs mask-free (flash-capable SDPA).
* :func:`topk_curriculum_inputs` — the sparse top-k curriculum input for large vocabularies (Chapter II style,
  docs/method.md §3.3): the Gaussian latent w = α̃·onehot(x) + σ̃ε is never materialised K-wide. Only
  (i) the clean token's value α̃ + σ̃ε_x and (ii) the k largest of the K_eff − 1 other iid N(0, σ̃²) values are
  drawn — the latter as order statistics through the inverse normal CDF of the top uniform order statistics
  (Rényi representation: −log U_(n) = E_1/n, −log U_(n−j) = −log U_(n−j+1) + E_{j+1}/(n−j), E iid Exp(1)) —
  and their ids uniformly without replacement among the other *valid* ids (Floyd's algorithm, then a random
  permutation). The top-k of {clean} ∪ {k noise values} is exactly the top-k of the dense w, so the hard latent
  z_t = argmax is *exactly* distributed as the dense argmax, Cat(T(γ)x + (1 − T(γ))/K_eff), and the softmax of
  the kept values / τ equals the dense softmax restricted to the dense top-k. Cost O(B·L·k²) time and
  O(B·L·k) memory instead of O(B·L·K).
* :func:`describe_valid_vocab` — explicit embedding-rows vs tokenizer-size handling.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from duo_plugin.diffusion.uniform import check_valid_vocab, draw, num_valid

__all__ = [
    "anneal_progress",
    "annealed_attention_mask",
    "topk_curriculum_inputs",
    "top_order_statistics",
    "describe_valid_vocab",
]

Generator = Union[torch.Generator, Sequence[torch.Generator]]


# ----------------------------------------------------------------------------------------------------------------
# Attention-mask annealing
# ----------------------------------------------------------------------------------------------------------------
def anneal_progress(step: int, anneal_steps: int) -> float:
    """``min(1, step / anneal_steps)``; 1.0 (fully bidirectional) when ``anneal_steps <= 0``."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, float(step) / float(anneal_steps)))


def annealed_attention_mask(seq_len: int, progress: float, *, mode: str = "window",
                            generator: Optional[torch.Generator] = None,
                            device=None) -> Optional[torch.Tensor]:
    """Bool ``[L, L]`` attention mask (True = query i may attend key j) between causal (progress 0) and full.

    ``"window"``: j ≤ i + ⌊L·progress⌋.  ``"random"``: j ≤ i, plus each future key independently with
    probability ``progress`` (one draw shared by the batch; pass a generator keyed on the step for
    reproducibility).  Returns ``None`` when ``progress >= 1`` (no mask: full attention, flash path).
    """
    if mode not in ("window", "random"):
        raise ValueError(f"attention annealing mode must be 'window' or 'random', got {mode!r}")
    if not (progress >= 0.0):
        raise ValueError(f"progress must be >= 0, got {progress}")
    if progress >= 1.0:
        return None
    L = int(seq_len)
    i = torch.arange(L, device=device)
    causal = i[None, :] <= i[:, None]
    if mode == "window":
        return i[None, :] <= i[:, None] + int(math.floor(L * progress))
    u = torch.rand((L, L), generator=generator, device=generator.device if generator is not None else None)
    return causal | (u.to(causal.device) < progress)


# ----------------------------------------------------------------------------------------------------------------
# Sparse top-k curriculum input
# ----------------------------------------------------------------------------------------------------------------
def top_order_statistics(n: int, k: int, batch_shape, generator: Generator, device=None) -> torch.Tensor:
    """The k largest of ``n`` iid N(0, 1) values, descending, float64 ``[*batch_shape, k]``, without drawing n.

    Rényi: for uniforms, −log U_(n−j) = Σ_{i≤j} E_i/(n−i) with E_i iid Exp(1); then Φ⁻¹(U) = −Φ⁻¹(1 − U)
    with 1 − U = −expm1(log U) (accurate in the far tail).  ``generator``: one, or one per leading row.
    """
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    u = draw("rand", (*batch_shape, k), generator, device, dtype=torch.float64)
    e = -torch.log1p(-u)  # Exp(1), finite since u < 1
    denom = n - torch.arange(k, dtype=torch.float64, device=e.device)
    neg_log_u = torch.cumsum(e / denom, dim=-1)  # −log U_(n), −log U_(n−1), ... increasing
    one_minus_u = -torch.expm1(-neg_log_u)
    return -torch.special.ndtri(one_minus_u)


def _distinct_ranks(n: int, k: int, batch_shape, generator: Generator, device=None) -> torch.Tensor:
    """k distinct ranks uniform in [0, n), in uniformly random order: Floyd's algorithm + a random permutation."""
    u = draw("rand", (*batch_shape, 2 * k), generator, device, dtype=torch.float64)
    chosen = torch.empty((*batch_shape, k), dtype=torch.long, device=u.device)
    for s, j in enumerate(range(n - k, n)):
        t = torch.clamp((u[..., s] * (j + 1)).long(), max=j)  # uniform in [0, j]
        seen = (chosen[..., :s] == t[..., None]).any(-1) if s > 0 else torch.zeros_like(t, dtype=torch.bool)
        chosen[..., s] = torch.where(seen, torch.full_like(t, j), t)
    perm = u[..., k:].argsort(dim=-1)  # a uniform random order for the value→id assignment
    return chosen.gather(-1, perm)


def topk_curriculum_inputs(
    x0: torch.Tensor,
    gamma,
    tau: float,
    k: int,
    vocab_size: int,
    generator: Generator,
    valid_vocab: Optional[torch.Tensor] = None,
):
    """Sparse curriculum input: ``(z_t Long[B, L], SoftTopK(ids Long[B, L, k], weights Float[B, L, k]))``.

    Same law as :func:`duo_plugin.diffusion.losses.curriculum_inputs` restricted to the top-k of w (see the
    module docstring): ``z_t`` = argmax(w) exactly; ``weights`` = softmax of the k largest w/τ (they sum to 1);
    ids are always valid. ``k`` is capped at K_eff (then the input is the dense softmax, re-ordered).
    ``gamma``: scalar, ``[B]`` or ``[B, L]``; ``generator``: one, or one per row (as every duo_plugin draw).
    """
    from duo_plugin.models.dit import SoftTopK

    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite positive float (e.g. 1e-3), got {tau!r}")
    if x0.dim() != 2:
        raise ValueError(f"x0 must be [B, L] ids; got {tuple(x0.shape)}")
    K = int(vocab_size)
    check_valid_vocab(K, valid_vocab)
    k_eff = num_valid(K, valid_vocab)
    if k_eff < 2:
        raise ValueError("need at least 2 valid ids")
    k = int(k)
    if k < 1:
        raise ValueError(f"curriculum top-k must be >= 1, got {k}")
    k = min(k, k_eff)
    B, L = x0.shape
    dev = x0.device
    x0 = x0.long()
    if valid_vocab is not None:
        vv = valid_vocab.to(dev)
        if not bool(vv[x0].all()):
            raise ValueError("x0 contains ids outside valid_vocab (pad/special/padded rows); fix the data or set "
                             "data.valid_vocab.include_pad / include_special")
        vids = torch.nonzero(vv, as_tuple=False).squeeze(-1)
        pos_x = torch.searchsorted(vids, x0)  # index of x among the valid ids
    else:
        if bool((x0 < 0).any()) or bool((x0 >= K).any()):
            raise ValueError(f"x0 ids must lie in [0, {K})")
        vids = None
        pos_x = x0
    g = torch.as_tensor(gamma, dtype=torch.float64, device=dev)
    if g.dim() == 1:
        g = g[:, None]
    g = g.expand(B, L)
    a_t, s_t = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()

    n_other = k_eff - 1
    k_noise = min(k, n_other)
    eps_x = draw("randn", (B, L), generator, dev, dtype=torch.float64)
    noise = top_order_statistics(n_other, k_noise, (B, L), generator, dev).to(dev)
    ranks = _distinct_ranks(n_other, k_noise, (B, L), generator, dev).to(dev)
    ranks = ranks + (ranks >= pos_x[..., None]).long()  # skip the clean token's own rank
    other_ids = vids[ranks] if vids is not None else ranks

    w_clean = a_t + s_t * eps_x  # [B, L]
    w_noise = s_t[..., None] * noise  # [B, L, k_noise], descending
    z_t = torch.where(w_clean > w_noise[..., 0], x0, other_ids[..., 0])

    vals = torch.cat([w_clean[..., None], w_noise], dim=-1)
    ids = torch.cat([x0[..., None], other_ids], dim=-1)
    top_vals, top_idx = vals.topk(k, dim=-1)
    top_ids = ids.gather(-1, top_idx)
    weights = torch.softmax(top_vals / tau, dim=-1).to(torch.float32)
    return z_t, SoftTopK(top_ids, weights)


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary handling
# ----------------------------------------------------------------------------------------------------------------
def describe_valid_vocab(valid_vocab: torch.Tensor, tokenizer_vocab_size: int) -> str:
    """One line for the log: K (embedding rows), tokenizer ids, padded rows and excluded specials, K_eff."""
    K = int(valid_vocab.numel())
    k_tok = int(tokenizer_vocab_size)
    padded = max(0, K - k_tok)
    excluded = int((~valid_vocab[:k_tok]).sum())
    return (f"vocabulary: embedding rows K={K}, tokenizer ids={k_tok}, padded rows={padded} (never sampled), "
            f"excluded special/pad ids={excluded}, uniform-noise support K_eff={int(valid_vocab.sum())}")
