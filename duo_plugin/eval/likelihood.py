"""Likelihood evaluation: NELBO perplexity over a split and the conditional NELBO (duo-method.md §1.3 and §8).

Both use the continuous-time USDM NELBO integrand f_Duo (paper Eq. 17/50, ``duo_plugin.diffusion.losses.duo_nelbo``)
with the log-linear schedule α_t = 1 − (1 − 1e-3) t, t ∈ [1e-3, 1], no prior and no reconstruction term (as the
paper's code): for one sequence x, ``NELBO(x) = E_t E_{z_t ~ q_t(·|x)} Σ_ℓ f_Duo(x_θ(z_t), z_t^ℓ, x^ℓ, α_t)`` with
t ~ U[t_min, 1] (the (1 − t_min) interval factor is part of the paper's estimator, not applied here either).

Noise is reproducible and batch-size independent: times come from ``stratified_times`` (one stratified t per
sequence per pass, strata over the whole split) and corruption from ``row_generators(seed, pass, index)``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from duo_plugin._progress import progress_bar
from duo_plugin.diffusion.losses import duo_nelbo
from duo_plugin.diffusion.schedules import LogLinearSchedule, stratified_times
from duo_plugin.diffusion.uniform import corrupt, row_generators

__all__ = ["nelbo_perplexity", "conditional_nelbo", "ConditionalNELBO", "sequence_nelbo"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Offsets that keep the (seed, step) streams of the two estimators apart.
_COND_STEP_OFFSET = 1 << 40


def _model_device(denoiser) -> torch.device:
    m = getattr(denoiser, "model", denoiser)
    if isinstance(m, torch.nn.Module):
        for p in m.parameters():
            return p.device
    return torch.device("cpu")


def _eval_setup(denoiser, device, schedule, valid_vocab):
    """The device (``device`` or the denoiser's), the schedule (default log-linear) and ``valid_vocab`` on it."""
    dev = torch.device(device) if device is not None else _model_device(denoiser)
    schedule = schedule or LogLinearSchedule()
    if valid_vocab is not None:
        valid_vocab = valid_vocab.to(dev)
    return dev, schedule, valid_vocab


@torch.no_grad()
def sequence_nelbo(
    denoiser: Denoiser,
    x0: torch.Tensor,
    t: torch.Tensor,
    generators,
    *,
    score_mask: Optional[torch.Tensor] = None,
    keep_mask: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    schedule=None,
    valid_vocab: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One-sample NELBO estimate per sequence: ``Σ_ℓ score_mask · f_Duo`` at the given times (float64 ``[B]``).

    Args:
        x0: ``Long[B, L]`` clean ids. t: ``Float[B]`` times in (0, 1]. generators: one ``torch.Generator`` per row.
        score_mask: ``Bool[B, L]`` positions summed (default all). keep_mask: ``Bool[B, L]`` positions never
            corrupted (they stay clean in z_t; the caller usually also excludes them from ``score_mask``).
        padding_mask: ``Bool[B, L]`` True = real token; padding is neither corrupted nor (if the caller masks it)
            scored, and is passed to the denoiser as ``padding_mask=`` when any position is padding.
    """
    schedule = schedule or LogLinearSchedule()
    dev = x0.device
    t64 = t.to(device=dev, dtype=torch.float64)
    alpha = schedule.alpha(t64).to(dev)
    alpha_prime = schedule.alpha_prime(t64).to(dev)
    if alpha_prime.dim() == 0:
        alpha_prime = alpha_prime.expand_as(alpha)
    vocab_size = getattr(denoiser, "vocab_size", None)
    if valid_vocab is None and vocab_size is None:
        raise ValueError("the denoiser has no .vocab_size attribute; pass valid_vocab=BoolTensor[K] (all True is fine)")
    z = corrupt(x0, alpha, generators, valid_vocab, vocab_size=None if valid_vocab is not None else int(vocab_size))
    if keep_mask is not None:
        z = torch.where(keep_mask.to(dev), x0, z)
    if padding_mask is not None:
        padding_mask = padding_mask.to(dev).bool()
        z = torch.where(padding_mask, z, x0)  # padding stays as is
    sigma = (-torch.log(alpha)).to(torch.float32)
    if padding_mask is not None and not bool(padding_mask.all()):
        log_x = denoiser(z, sigma, padding_mask=padding_mask)
    else:
        log_x = denoiser(z, sigma)
    k = log_x.shape[-1]
    if valid_vocab is not None and valid_vocab.numel() != k:
        raise ValueError(f"valid_vocab has {valid_vocab.numel()} entries but the denoiser outputs K={k}")
    f = duo_nelbo(log_x.float(), z, x0, alpha, alpha_prime, valid_vocab=valid_vocab).to(torch.float64)
    if score_mask is not None:
        f = f * score_mask.to(dev, torch.float64)
    return f.sum(-1)


@torch.no_grad()
def nelbo_perplexity(
    denoiser: Denoiser,
    blocks: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    batch_size: int = 16,
    mc_passes: int = 1,
    seed: int = 0,
    valid_vocab: Optional[torch.Tensor] = None,
    schedule=None,
    t_min: float = 1e-3,
    device=None,
    progress: bool = True,
) -> dict:
    """NELBO perplexity of a split (duo-method.md §8): PPL = exp(Σ token NELBO / #tokens), an upper bound.

    Each pass gives every sequence n one stratified time t_n (``stratified_times(seed, pass, n, N)``: the N strata
    of [t_min, 1] hold one sequence each) and corruption noise from ``row_generators(seed, pass, [n])``, so the
    result does not depend on ``batch_size``. Token NELBOs are summed over the split and divided by the token count
    (positions where ``attention_mask`` is True; all positions by default), averaged over ``mc_passes`` passes.

    Args:
        denoiser: ``denoiser(z Long[B, L], sigma Float[B]) -> log x_θ Float[B, L, K]`` (e.g. ``DenoiserFn(model)``);
            needs ``.vocab_size`` unless ``valid_vocab`` is given.
        blocks: ``Long[N, L]`` token blocks. attention_mask: ``Bool[N, L]`` positions that count (and padding).

    Returns:
        dict with ``ppl``, ``nll_per_token`` (nats), ``stderr`` (standard error of ``nll_per_token``: from the spread
        of the pass estimates when ``mc_passes >= 2``, else from the per-sequence estimates treated as independent,
        which also includes the sequence-to-sequence spread and is therefore conservative), ``stderr_method``,
        ``ppl_ci`` ([lo, hi] = exp(nll ± 1.96 stderr)), ``tokens``, ``sequences``, ``passes``,
        ``per_pass_nll`` (list).
    """
    if blocks.dim() != 2 or blocks.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"blocks must be an integer tensor [N, L]; got {tuple(blocks.shape)} {blocks.dtype}")
    n, length = blocks.shape
    if n == 0:
        raise ValueError("blocks is empty: nothing to evaluate (check the dataset/split and the block size)")
    if attention_mask is None:
        attention_mask = torch.ones(n, length, dtype=torch.bool)
    if tuple(attention_mask.shape) != (n, length):
        raise ValueError(f"attention_mask must have the shape of blocks {n, length}; got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.bool()
    tokens = int(attention_mask.sum())
    if tokens == 0:
        raise ValueError("attention_mask selects no token")
    if int(mc_passes) < 1 or int(batch_size) < 1:
        raise ValueError("mc_passes and batch_size must be >= 1")
    dev, schedule, valid_vocab = _eval_setup(denoiser, device, schedule, valid_vocab)

    per_seq = torch.zeros(int(mc_passes), n, dtype=torch.float64)
    n_batches = (n + batch_size - 1) // batch_size
    bar = progress_bar(progress, total=int(mc_passes) * n_batches, desc="nelbo ppl", unit="batch", leave=False)
    try:
        for p in range(int(mc_passes)):
            for lo in range(0, n, batch_size):
                idx = range(lo, min(n, lo + batch_size))
                x0 = blocks[lo : lo + batch_size].to(dev).long()
                am = attention_mask[lo : lo + batch_size].to(dev)
                t = stratified_times(seed, p, idx, n, t_min=t_min, dtype=torch.float64)
                gens = row_generators(seed, p, idx, device=dev)
                per_seq[p, lo : lo + len(idx)] = sequence_nelbo(
                    denoiser, x0, t, gens, score_mask=am, padding_mask=am, schedule=schedule, valid_vocab=valid_vocab
                ).cpu()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    per_pass = per_seq.sum(1) / tokens  # [P]
    nll = float(per_pass.mean())
    if mc_passes >= 2:
        stderr = float(per_pass.std(unbiased=True) / math.sqrt(mc_passes))
        method = "between-pass"
    elif n >= 2:
        seq_est = per_seq.mean(0)  # [N]
        stderr = float(seq_est.std(unbiased=True) * math.sqrt(n) / tokens)
        method = "per-sequence"
    else:
        stderr, method = float("nan"), "none"
    lo_ci = math.exp(nll - 1.96 * stderr) if math.isfinite(stderr) else float("nan")
    hi_ci = math.exp(nll + 1.96 * stderr) if math.isfinite(stderr) else float("nan")
    return {
        "ppl": math.exp(nll),
        "nll_per_token": nll,
        "stderr": stderr,
        "stderr_method": method,
        "ppl_ci": [lo_ci, hi_ci],
        "tokens": tokens,
        "sequences": n,
        "passes": int(mc_passes),
        "per_pass_nll": per_pass.tolist(),
    }


class ConditionalNELBO(NamedTuple):
    """Result of :func:`conditional_nelbo` (all ``[B]``, float64 / int64, on CPU).

    nelbo: NELBO summed over the scored positions, averaged over the MC samples (nats; an upper bound on
    −log p(x[scored] | x[kept])). stderr: its Monte-Carlo standard error (std over MC samples / sqrt(M); NaN when
    M = 1). num_tokens: number of scored positions per sequence.
    """

    nelbo: torch.Tensor
    stderr: torch.Tensor
    num_tokens: torch.Tensor


@torch.no_grad()
def conditional_nelbo(
    denoiser: Denoiser,
    x0: torch.Tensor,
    keep_mask: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    mc_samples: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    valid_vocab: Optional[torch.Tensor] = None,
    schedule=None,
    t_min: float = 1e-3,
    indices: Optional[torch.Tensor] = None,
    device=None,
) -> ConditionalNELBO:
    """Conditional NELBO of the non-kept positions given the kept ones (for loglikelihood requests).

    Positions in ``keep_mask`` (e.g. the context of an lm-eval request) are never corrupted and not scored; the
    remaining positions where ``attention_mask`` is True (default all) are corrupted with the forward process and
    scored with f_Duo. For each sequence the M = ``mc_samples`` times are stratified across the MC samples
    (``stratified_times(seed, _COND_STEP_OFFSET + index, range(M), M)``) and the corruption of MC sample j of
    sequence ``index`` comes from its own generator, so a sequence's result depends only on (seed, index, its
    content) and not on the batch it is in.

    Args:
        denoiser: denoiser callable (see :func:`nelbo_perplexity`).
        x0: ``Long[B, L]`` ids (context + continuation, padded). keep_mask: ``Bool[B, L]`` or ``[L]``.
        attention_mask: ``Bool[B, L]``; False = padding (neither scored nor corrupted).
        mc_samples: M ≥ 1. batch_size: rows (sequence × MC sample) per denoiser call.
        indices: ``Long[B]`` global ids of the sequences for the noise (default ``arange(B)``).

    Returns:
        :class:`ConditionalNELBO` ``(nelbo[B], stderr[B], num_tokens[B])``.
    """
    if x0.dim() == 1:
        x0 = x0[None]
    if x0.dim() != 2 or x0.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"x0 must be an integer tensor [B, L]; got {tuple(x0.shape)} {x0.dtype}")
    b, length = x0.shape
    keep_mask = torch.as_tensor(keep_mask, dtype=torch.bool)
    if keep_mask.dim() == 1:
        keep_mask = keep_mask[None].expand(b, -1)
    if tuple(keep_mask.shape) != (b, length):
        raise ValueError(f"keep_mask must be [B, L] = {[b, length]} (or [L]); got {tuple(keep_mask.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones(b, length, dtype=torch.bool)
    attention_mask = torch.as_tensor(attention_mask, dtype=torch.bool)
    if tuple(attention_mask.shape) != (b, length):
        raise ValueError(f"attention_mask must be [B, L] = {[b, length]}; got {tuple(attention_mask.shape)}")
    m = int(mc_samples)
    if m < 1 or int(batch_size) < 1:
        raise ValueError("mc_samples and batch_size must be >= 1")
    if indices is None:
        indices = torch.arange(b)
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    if indices.numel() != b:
        raise ValueError(f"indices must have one entry per sequence ({b})")
    dev, schedule, valid_vocab = _eval_setup(denoiser, device, schedule, valid_vocab)
    score = attention_mask & ~keep_mask

    # Flatten (sequence, mc sample) into rows.
    rows_seq = torch.arange(b).repeat_interleave(m)
    rows_j = torch.arange(m).repeat(b)
    times = torch.cat(
        [stratified_times(seed, _COND_STEP_OFFSET + int(i), range(m), m, t_min=t_min, dtype=torch.float64) for i in indices]
    )
    est = torch.zeros(b * m, dtype=torch.float64)
    for lo in range(0, b * m, int(batch_size)):
        sl = slice(lo, min(b * m, lo + int(batch_size)))
        seqs = rows_seq[sl]
        gens = [
            row_generators(seed, _COND_STEP_OFFSET + int(indices[s]), [int(j)], device=dev)[0]
            for s, j in zip(seqs.tolist(), rows_j[sl].tolist())
        ]
        est[sl] = sequence_nelbo(
            denoiser,
            x0[seqs].to(dev).long(),
            times[sl],
            gens,
            score_mask=score[seqs].to(dev),
            keep_mask=keep_mask[seqs].to(dev),
            padding_mask=attention_mask[seqs].to(dev),
            schedule=schedule,
            valid_vocab=valid_vocab,
        ).cpu()
    est = est.view(b, m)
    nelbo = est.mean(1)
    stderr = est.std(1, unbiased=True) / math.sqrt(m) if m >= 2 else torch.full((b,), float("nan"), dtype=torch.float64)
    return ConditionalNELBO(nelbo=nelbo, stderr=stderr, num_tokens=score.sum(1).long())
