"""Uniform-state forward process, exact posterior and categorical sampling (Duo paper §2, Eq. 1 and Eq. 4).

Conventions (docs/architecture.md):

* ``K`` is the width of the model vocabulary.  ``valid_vocab`` (``BoolTensor[K]`` or ``None``) marks the ids that
  uniform noise may produce; ``K_eff = valid_vocab.sum()`` is "the vocabulary size" in every formula.  Invalid ids
  get probability exactly 0 in the prior, the corruption kernel and the posterior.
* Random draws take ``generator: torch.Generator | Sequence[torch.Generator]``; a sequence holds one generator per
  batch row and row ``b`` draws only from generator ``b`` (so noise depends on the global sample index, not on how a
  global batch is split).  :func:`row_generators` builds such a list from ``(seed, step, index)``.
* Posterior probabilities and categorical sampling are computed in float64.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator]]

__all__ = [
    "Generator",
    "splitmix64",
    "stable_seed",
    "row_generators",
    "num_valid",
    "valid_ids",
    "corrupt",
    "prior_sample",
    "posterior",
    "sample_categorical",
    "draw",
    "per_token",
    "check_valid_vocab",
]

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------------
# Deterministic seeding
# ----------------------------------------------------------------------------------------------------------------
def splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer (Steele et al. 2014) on a Python int, returning a 64-bit unsigned int."""
    x = (int(x) + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stable_seed(*parts: int) -> int:
    """Stable 63-bit hash of a tuple of integers (chained SplitMix64); independent of Python's ``hash()``/PYTHONHASHSEED."""
    h = splitmix64(0x6475_6F2D_706C_7567)  # "duo-plug"
    for p in parts:
        h = splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def row_generators(
    seed: int, step: int, indices: Iterable[int] | torch.Tensor, device: torch.device | str | None = None
) -> list[torch.Generator]:
    """One ``torch.Generator`` per global sample index, seeded by ``stable_seed(seed, step, index)``.

    Pass the result as ``generator=`` to any random function here: row ``b`` then draws from the generator of global
    sample ``indices[b]``, so the noise is identical whatever the world size, accumulation split or resume point.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.flatten().tolist()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gens = []
    for i in indices:
        g = torch.Generator(device=dev)
        g.manual_seed(stable_seed(seed, step, int(i)))
        gens.append(g)
    return gens


def _gen_device(g: torch.Generator) -> torch.device:
    return torch.device(g.device)


def _check_generator(generator: Generator, rows: int) -> None:
    if isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, Sequence) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(
            "generator must be a torch.Generator or a sequence of torch.Generator (one per batch row); "
            f"got {type(generator).__name__}"
        )
    if len(generator) != rows:
        raise ValueError(
            f"got {len(generator)} per-row generators for a batch of {rows} rows; pass exactly one generator per "
            "row (e.g. row_generators(seed, step, global_indices_of_this_batch))"
        )


def draw(kind: str, shape: Sequence[int], generator: Generator, device, dtype=None, high: int | None = None):
    """Draw ``kind`` in {"rand", "randn", "randint"} of ``shape``; a generator list splits along dim 0."""
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else None

    def one(shp, g: torch.Generator):
        gdev = _gen_device(g)
        if kind == "rand":
            out = torch.rand(shp, generator=g, device=gdev, dtype=dtype)
        elif kind == "randn":
            out = torch.randn(shp, generator=g, device=gdev, dtype=dtype)
        elif kind == "randint":
            out = torch.randint(0, high, shp, generator=g, device=gdev)
        else:  # pragma: no cover
            raise AssertionError(kind)
        return out if device is None else out.to(device)

    if isinstance(generator, torch.Generator):
        return one(shape, generator)
    _check_generator(generator, shape[0])
    if shape[0] == 0:
        return one(shape, torch.Generator())
    return torch.stack([one(shape[1:], g) for g in generator], dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Valid vocabulary helpers
# ----------------------------------------------------------------------------------------------------------------
def check_valid_vocab(vocab_size: int, valid_vocab: torch.Tensor | None) -> None:
    if valid_vocab is None:
        return
    if not isinstance(valid_vocab, torch.Tensor) or valid_vocab.dtype != torch.bool or valid_vocab.dim() != 1:
        raise TypeError("valid_vocab must be a 1-D torch.bool tensor of length vocab_size (True = id may be sampled)")
    if valid_vocab.numel() != vocab_size:
        raise ValueError(
            f"valid_vocab has length {valid_vocab.numel()} but the vocabulary (model output width) is {vocab_size}; "
            "build valid_vocab over all K embedding rows"
        )


def num_valid(vocab_size: int, valid_vocab: torch.Tensor | None = None) -> int:
    """``K_eff``: the number of ids uniform noise covers (``vocab_size`` when ``valid_vocab`` is None)."""
    vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    check_valid_vocab(vocab_size, valid_vocab)
    k = vocab_size if valid_vocab is None else int(valid_vocab.sum().item())
    if k < 1:
        raise ValueError("valid_vocab marks no id as valid; at least one id must be True")
    return k


def valid_ids(vocab_size: int, valid_vocab: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Sorted ``LongTensor[K_eff]`` of valid ids."""
    check_valid_vocab(int(vocab_size), valid_vocab)
    if valid_vocab is None:
        return torch.arange(int(vocab_size), device=device)
    return torch.nonzero(valid_vocab, as_tuple=False).flatten().to(device if device is not None else valid_vocab.device)


def _resolve_vocab(vocab_size, valid_vocab):
    """Accept ``valid_vocab`` given as an int (all ids valid) for convenience; return (K, valid_vocab|None)."""
    if isinstance(valid_vocab, int) and not isinstance(valid_vocab, bool):
        if vocab_size is not None and int(vocab_size) != valid_vocab:
            raise ValueError(f"vocab_size={vocab_size} disagrees with valid_vocab={valid_vocab}")
        return int(valid_vocab), None
    if valid_vocab is not None:
        if vocab_size is not None and int(vocab_size) != valid_vocab.numel():
            raise ValueError(
                f"vocab_size={vocab_size} disagrees with len(valid_vocab)={valid_vocab.numel()}; valid_vocab must "
                "cover all K embedding rows"
            )
        check_valid_vocab(valid_vocab.numel(), valid_vocab)
        return int(valid_vocab.numel()), valid_vocab
    if vocab_size is None:
        raise ValueError("the vocabulary size is unknown: pass vocab_size=K or a valid_vocab BoolTensor[K]")
    return int(vocab_size), None


def per_token(alpha, batch: int, length: int, device, name: str = "alpha_t") -> torch.Tensor:
    """Broadcast a scalar / [B] / [B, L] schedule value to float64 [B, L]."""
    a = torch.as_tensor(alpha, dtype=torch.float64, device=device)
    if a.dim() == 0:
        return a.expand(batch, length)
    if a.dim() == 1:
        if a.shape[0] != batch:
            raise ValueError(f"{name} has shape {tuple(a.shape)}; expected a scalar, [B]={batch} or [B, L]")
        return a[:, None].expand(batch, length)
    if a.dim() == 2 and tuple(a.shape) == (batch, length):
        return a
    raise ValueError(f"{name} has shape {tuple(a.shape)}; expected a scalar, [B]=[{batch}] or [B, L]=[{batch}, {length}]")


def _check_unit_interval(a: torch.Tensor, name: str, open_right: bool = False) -> None:
    bad = (a <= 0) | (a >= 1 if open_right else a > 1) | torch.isnan(a)
    if bool(bad.any()):
        rng = "(0, 1)" if open_right else "(0, 1]"
        raise ValueError(
            f"{name} must lie in {rng}; got values in [{a.min().item():.4g}, {a.max().item():.4g}]. "
            "Draw t in [t_min, 1] with t_min > 0 (e.g. 1e-3) and use a schedule with eps > 0."
        )


# ----------------------------------------------------------------------------------------------------------------
# Forward process and prior
# ----------------------------------------------------------------------------------------------------------------
def prior_sample(
    shape: Sequence[int],
    vocab_size: int,
    generator: Generator,
    valid_vocab: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Sample ``LongTensor[shape]`` from the uniform prior over the valid ids (the t = 1 marginal, Eq. 1 with α = 0)."""
    k = num_valid(vocab_size, valid_vocab)
    shape = tuple(int(s) for s in shape)
    idx = draw("randint", shape, generator, device, high=k)
    if valid_vocab is None:
        return idx
    return valid_ids(vocab_size, valid_vocab, device=idx.device)[idx]


def corrupt(
    x0: torch.Tensor,
    alpha_t,
    generator: Generator,
    valid_vocab: torch.Tensor | int | None = None,
    *,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Sample z_t ~ q_t(z_t | x) = Cat(α_t x + (1 − α_t)/K_eff · 1_valid)  (paper Eq. 1).

    Each position independently keeps ``x0`` with probability α_t and is otherwise replaced by an id drawn uniformly
    from the ``K_eff`` valid ids (which may coincide with ``x0``).

    Args:
        x0: ``LongTensor[B, L]`` clean ids.
        alpha_t: scalar, ``[B]`` or ``[B, L]`` discrete signal level in [0, 1].
        generator: a ``torch.Generator`` or one per batch row.
        valid_vocab: ``BoolTensor[K]`` of ids noise may produce, or ``None`` (then ``vocab_size`` is required).
            An ``int`` is accepted as shorthand for ``vocab_size`` with all ids valid.
        vocab_size: ``K`` (the model's vocabulary width); required when ``valid_vocab`` is None.

    Returns:
        ``LongTensor[B, L]`` noisy ids on ``x0.device``.

    Draw order (per generator): uniforms ``[L]`` (keep/replace) then replacement indices ``[L]``.
    """
    if x0.dim() != 2 or x0.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"x0 must be an integer tensor [B, L]; got {tuple(x0.shape)} {x0.dtype}")
    k_full, vv = _resolve_vocab(vocab_size, valid_vocab)
    k = num_valid(k_full, vv)
    b, l = x0.shape
    a = per_token(alpha_t, b, l, x0.device)
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError("alpha_t must lie in [0, 1]")
    if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= k_full):
        raise ValueError(f"x0 has ids outside [0, {k_full}); check the tokenizer / vocab_size")
    u = draw("rand", (b, l), generator, x0.device, dtype=torch.float64)
    idx = draw("randint", (b, l), generator, x0.device, high=k)
    noise = idx if vv is None else valid_ids(k_full, vv, device=x0.device)[idx]
    return torch.where(u < a, x0.long(), noise)


# ----------------------------------------------------------------------------------------------------------------
# Posterior
# ----------------------------------------------------------------------------------------------------------------
def posterior(
    z_t: torch.Tensor,
    x0_probs: torch.Tensor,
    alpha_t,
    alpha_s,
    valid_vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact USDM posterior q(z_s | z_t, x) for s < t (paper Eq. 4; docs/method.md §1.2), in float64.

    With α_{t|s} = α_t / α_s and K = K_eff::

        q(z_s | z_t, x) ∝ K α_t (x ⊙ z_t) + (α_{t|s} − α_t) z_t + (α_s − α_t) x + (1 − α_{t|s})(1 − α_s)/K · 1_valid
        normaliser      = K α_t ⟨z_t, x⟩ + 1 − α_t

    The expression is linear in x, so for a probability vector x it is exactly the mixture
    Σ_x p(x) q(z_t|z_s) q(z_s|x) / Σ_x p(x) q(z_t|x) (the ancestral-sampling posterior with x = x_θ).

    Args:
        z_t: ``LongTensor[B, L]`` current ids (must be valid ids).
        x0_probs: ``FloatTensor[B, L, K]`` probability vector (one-hot or model x_θ), or ``LongTensor[B, L]`` clean ids.
            With ``valid_vocab`` the mass on invalid ids is dropped and the rest renormalised.
        alpha_t, alpha_s: scalar, ``[B]`` or ``[B, L]``; need 0 < α_t ≤ α_s ≤ 1.
        valid_vocab: ``BoolTensor[K]`` or ``None``.

    Returns:
        ``float64 [B, L, K]`` probabilities (rows sum to 1; invalid ids exactly 0).
    """
    if z_t.dim() != 2:
        raise ValueError(f"z_t must be [B, L] ids; got shape {tuple(z_t.shape)}")
    b, l = z_t.shape
    if x0_probs.dim() == 2:
        raise ValueError(
            "x0_probs given as ids [B, L] needs the vocabulary width; pass a one-hot / probability tensor [B, L, K] "
            "(e.g. torch.nn.functional.one_hot(x0, K).double())"
        )
    if x0_probs.dim() != 3 or tuple(x0_probs.shape[:2]) != (b, l):
        raise ValueError(f"x0_probs must be [B, L, K] matching z_t [B, L]={b, l}; got {tuple(x0_probs.shape)}")
    k_full = x0_probs.shape[-1]
    check_valid_vocab(k_full, valid_vocab)
    k = num_valid(k_full, valid_vocab)
    dev = x0_probs.device
    at = per_token(alpha_t, b, l, dev, "alpha_t")
    as_ = per_token(alpha_s, b, l, dev, "alpha_s")
    _check_unit_interval(at, "alpha_t")
    _check_unit_interval(as_, "alpha_s")
    if bool((at > as_ * (1 + 1e-12)).any()):
        raise ValueError("posterior needs s < t, i.e. alpha_s >= alpha_t (signal decreases with time)")
    if z_t.numel() and (int(z_t.min()) < 0 or int(z_t.max()) >= k_full):
        raise ValueError(f"z_t has ids outside [0, {k_full})")

    x = x0_probs.to(torch.float64)
    if valid_vocab is not None:
        vmask = valid_vocab.to(dev)
        if not bool(vmask[z_t].all()):
            raise ValueError(
                "z_t contains ids outside valid_vocab; the uniform process never produces them. Exclude fixed "
                "positions (prompts, padding) from the posterior and overwrite them after sampling."
            )
        x = torch.where(vmask, x, torch.zeros((), dtype=torch.float64, device=dev))
        x = x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        uni = vmask.to(torch.float64) / k
    else:
        uni = torch.full((k_full,), 1.0 / k, dtype=torch.float64, device=dev)

    at3, as3 = at[..., None], as_[..., None]
    ats = at3 / as3
    zt = z_t.long()[..., None]
    x_at_z = x.gather(-1, zt)  # ⟨z_t, x⟩  [B, L, 1]
    num = (as3 - at3) * x + ((1 - ats) * (1 - as3)) * uni
    stay = k * at3 * x_at_z + (ats - at3)  # coefficient added at index z_t
    num = num.scatter_add(-1, zt, stay)
    norm = k * at3 * x_at_z + 1 - at3
    return num / norm


# ----------------------------------------------------------------------------------------------------------------
# Categorical sampling
# ----------------------------------------------------------------------------------------------------------------
def sample_categorical(probs: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Sample ids from (unnormalised) probabilities ``[B, ..., K]`` by the race of exponentials, in float64.

    ``argmax_j p_j / E_j`` with ``E_j ~ Exp(1)`` i.i.d. is distributed as Cat(p / Σp) (the first arrival of
    independent Poisson clocks with rates p_j).  Ids with p_j = 0 are never returned (unless a whole row is 0).
    With a generator list, row ``b`` (dim 0) uses generator ``b``.  Returns ``LongTensor[B, ...]``.
    """
    if probs.dim() < 1:
        raise ValueError("probs must have a trailing vocabulary dimension")
    p = probs.to(torch.float64)
    u = draw("rand", tuple(p.shape), generator, p.device, dtype=torch.float64)
    e = (-torch.log1p(-u)).clamp_min(torch.finfo(torch.float64).tiny)
    return (p / e).argmax(dim=-1)
