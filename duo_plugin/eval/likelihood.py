"""Likelihood evaluation: NELBO perplexity over a split and the conditional NELBO (docs/method.md §1.3 and §8).

Both use the continuous-time USDM NELBO integrand f_Duo (paper Eq. 17/50, ``duo_plugin.diffusion.losses.duo_nelbo``)
with the log-linear schedule α_t = 1 − (1 − 1e-3) t, t ∈ [1e-3, 1], no prior and no reconstruction term (as the
paper's code): for one sequence x, ``NELBO(x) = E_t E_{z_t ~ q_t(·|x)} Σ_ℓ f_Duo(x_θ(z_t), z_t^ℓ, x^ℓ, α_t)`` with
t ~ U[t_min, 1] (the (1 − t_min) interval factor is part of the paper's estimator, not applied here either).

Noise is reproducible and batch-size independent. :func:`nelbo_perplexity` draws, for every pass, a fresh seeded
permutation of the sequence → stratum map (so each sequence's t is marginally uniform whatever the order of the
split) and corruption from ``row_generators(seed, pass, index)``. :func:`conditional_nelbo` stratifies the M times of
one sequence over its MC samples. docs/evaluation.md describes the estimators, their standard errors and the modes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from duo_plugin._progress import Eta
from duo_plugin.diffusion import streams
from duo_plugin.diffusion.process import UniformProcess
from duo_plugin.diffusion.schedules import LogLinearSchedule, sigma_from_alpha, stratified_times
from duo_plugin.diffusion.uniform import row_generators, stable_seed
from duo_plugin.models.denoiser import log_probs_at
from duo_plugin.eval.mc import MCPolicy, mean_and_stderr, plan_samples

__all__ = [
    "nelbo_perplexity",
    "conditional_nelbo",
    "conditional_nelbo_ragged",
    "pack_rows",
    "log_probs_at",
    "ConditionalNELBO",
    "NelboOptions",
    "resolve_process",
    "sequence_nelbo",
    "official_harness_nll",
    "stratum_permutation",
    "effective_alpha",
    "CONDITIONING_MODES",
    "DEFAULT_MAX_BATCH_TOKENS",
    "default_max_batch_tokens",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The (seed, step) streams of the estimators (registered in diffusion/streams.py).
_COND_STEP_OFFSET = streams.EVAL_COND
_IID_STEP_OFFSET = streams.EVAL_IID
_ROUND_STRIDE = streams.EVAL_STAGE  # adaptive MC: stage r >= 1 of request i: times at step offset + i + r * stride
_PERM_TAG = streams.EVAL_PERM

#: Padded tokens (rows x longest row) per evaluation forward when rows of different requests / samples are packed
#: together (lm-eval scoring, the Gen PPL scorer), per device type: on CPU larger calls were slower (cache), on CUDA
#: the budget bounds the K-wide tensors at the scored positions. docs/performance.md has the measurement.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


def default_max_batch_tokens(device=None) -> int:
    """The default token budget of an evaluation forward on ``device`` (:data:`DEFAULT_MAX_BATCH_TOKENS`)."""
    kind = torch.device(device).type if device is not None else "cpu"
    return DEFAULT_MAX_BATCH_TOKENS.get(kind, DEFAULT_MAX_BATCH_TOKENS["cuda"])

#: ``alpha_t``: the network sees σ = −log α_t (every position noised at α_t; the training condition).
#: ``clean_fraction``: the network sees σ = −log α_eff with α_eff = (n_ctx + α_t · n_cont) / n, the expected
#: fraction of clean positions when n_ctx of the n real positions are kept clean (the bound still uses α_t, α'_t).
CONDITIONING_MODES = ("alpha_t", "clean_fraction")


def _model_device(denoiser) -> torch.device:
    m = getattr(denoiser, "model", denoiser)
    if isinstance(m, torch.nn.Module):
        for p in m.parameters():
            return p.device
    return torch.device("cpu")


def _eval_setup(denoiser, device, schedule, valid_vocab):
    """The device (``device`` or the denoiser's), the schedule (as given) and ``valid_vocab`` on it."""
    dev = torch.device(device) if device is not None else _model_device(denoiser)
    if valid_vocab is not None:
        valid_vocab = valid_vocab.to(dev)
    return dev, schedule, valid_vocab


def stratum_permutation(seed: int, mc_pass: int, n: int) -> torch.Tensor:
    """The seeded permutation of ``range(n)`` giving sequence i its stratum ``perm[i]`` in pass ``mc_pass``.

    A fresh permutation per pass makes every sequence's time marginally U[t_min, 1] (the strata are still each
    used once per pass), so the estimate does not depend on the order of the split.
    """
    g = torch.Generator().manual_seed(stable_seed(seed, mc_pass, _PERM_TAG) % (1 << 63))
    return torch.randperm(int(n), generator=g)


def effective_alpha(alpha: torch.Tensor, n_clean: torch.Tensor, n_noised: torch.Tensor) -> torch.Tensor:
    """α_eff = (n_clean + α · n_noised) / (n_clean + n_noised): the expected clean fraction of the sequence."""
    n_clean = n_clean.to(torch.float64)
    n_noised = n_noised.to(torch.float64)
    return (n_clean + alpha.to(torch.float64) * n_noised) / (n_clean + n_noised).clamp_min(1.0)


def _vocab_check(x0: torch.Tensor, scored: torch.Tensor, k: int, valid_vocab: Optional[torch.Tensor]):
    """``(x0_safe, row_oov)``: ids outside the model's vocabulary in scored positions make their row +∞.

    A token the model cannot produce (an id ≥ K, or one outside ``valid_vocab``) has probability 0 under the model,
    so its NELBO (and −log p) is +∞: such a *scored* id is replaced by a valid id for the forward pass (the value is
    +∞ whatever the network says) and the row is flagged. An *unscored* id that the model embeds (< K) is left as
    it is even when it is outside ``valid_vocab`` -- a BOS, a kept context token, or an LM1B ``[PAD]`` / ``[UNK]`` in
    the official pad mode: the network sees it exactly as in training and in the official code (the noise of the
    process still never produces it). Unscored ids ≥ K cannot be embedded: ``ValueError``.
    """
    unembeddable = (x0 < 0) | (x0 >= k)
    bad = unembeddable.clone()
    if valid_vocab is not None:
        bad = bad | ~valid_vocab[x0.clamp(0, k - 1)]
    bad &= scored
    if bool((unembeddable & ~scored).any()):
        r, c = (int(v) for v in (unembeddable & ~scored).nonzero()[0])
        raise ValueError(
            f"token id {int(x0[r, c])} at row {r}, position {c} is outside the model's vocabulary (K={k}) and is "
            "not scored (context): use the tokenizer the checkpoint was trained with"
        )
    if not bool(bad.any()):
        return x0, None
    fill = int(valid_vocab.nonzero()[0]) if valid_vocab is not None else 0
    return torch.where(bad, torch.full_like(x0, fill), x0), bad.any(-1)


def resolve_process(denoiser, process, valid_vocab: Optional[torch.Tensor], schedule=None):
    """``(process, schedule, K)`` of an estimator call: ``process`` as given (e.g. ``AbsorbingProcess`` for MDLM, what
    :func:`~duo_plugin.eval.processes.process_for` returns for every model folder), or, when None, the uniform-state
    process over ``valid_vocab`` (or the denoiser's ``vocab_size``) with ``schedule``. ``schedule`` defaults to the
    process's own (log-linear). K is the model's output width."""
    if process is None:
        k = int(valid_vocab.numel()) if valid_vocab is not None else getattr(denoiser, "vocab_size", None)
        if k is None:
            raise ValueError("the denoiser has no .vocab_size attribute; pass valid_vocab=BoolTensor[K] (all True "
                             "is fine)")
        process = UniformProcess(int(k), valid_vocab, schedule or LogLinearSchedule())
    schedule = schedule or getattr(process, "schedule", None) or LogLinearSchedule()
    k_model = int(valid_vocab.numel()) if valid_vocab is not None else int(process.vocab_size)
    return process, schedule, k_model


def _integrand_name(process) -> str:
    """``f_Duo`` for the uniform-state process, else the process class (as the estimator lines have said)."""
    return "f_Duo" if isinstance(process, UniformProcess) else type(process).__name__


def _network_sigma(alpha: torch.Tensor, kept: torch.Tensor, real: torch.Tensor, conditioning: str) -> torch.Tensor:
    """The σ the network is told (float64 ``[B]``): −log α_t, or −log α_eff over the real positions."""
    if conditioning == "clean_fraction":
        alpha = effective_alpha(alpha, (kept & real).sum(-1), (~kept & real).sum(-1))
    return sigma_from_alpha(alpha.to(torch.float64))


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
    conditioning: str = "alpha_t",
    process=None,
) -> torch.Tensor:
    """One-sample NELBO estimate per sequence: ``Σ_ℓ score_mask · f_Duo`` at the given times (float64 ``[B]``).

    Args:
        x0: ``Long[B, L]`` clean ids. t: ``Float[B]`` times in (0, 1]. generators: one ``torch.Generator`` per row.
        score_mask: ``Bool[B, L]`` positions summed (default all). keep_mask: ``Bool[B, L]`` positions never
            corrupted (they stay clean in z_t; the caller usually also excludes them from ``score_mask``).
        padding_mask: ``Bool[B, L]`` True = real token; padding is neither corrupted nor (if the caller masks it)
            scored, and is passed to the denoiser as ``padding_mask=`` when any position is padding.
        conditioning: what the network is told (see :data:`CONDITIONING_MODES`): ``alpha_t`` (σ = −log α_t) or
            ``clean_fraction`` (σ = −log α_eff, α_eff = (n_kept + α_t n_noised)/n over the real positions). f_Duo
            always uses α_t and α'_t, so the bound is valid either way.
        process: a noise process with ``corrupt(x0, alpha_t, generators)`` and ``nelbo(log_x, z_t, x0, alpha_t,
            alpha_prime_t)`` (e.g. ``diffusion.absorbing.AbsorbingProcess`` for MDLM); ``None`` = the uniform-state
            process with ``valid_vocab`` (f_Duo).  With a process, ``schedule`` defaults to the process's own.

    A scored id the model cannot produce (≥ K or outside ``valid_vocab``) makes its row's value +∞ (its probability
    under the model is 0).
    """
    if conditioning not in CONDITIONING_MODES:
        raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
    process, schedule, k_model = resolve_process(denoiser, process, valid_vocab, schedule)
    dev = x0.device
    t64 = t.to(device=dev, dtype=torch.float64)
    alpha = schedule.alpha(t64).to(dev)
    alpha_prime = schedule.alpha_prime(t64).to(dev)
    if alpha_prime.dim() == 0:
        alpha_prime = alpha_prime.expand_as(alpha)
    real = padding_mask.to(dev).bool() if padding_mask is not None else torch.ones_like(x0, dtype=torch.bool)
    scored = (score_mask.to(dev).bool() if score_mask is not None else torch.ones_like(real)) & real
    x0, row_oov = _vocab_check(x0, scored, k_model, valid_vocab)
    z = process.corrupt(x0, alpha, generators)
    kept = torch.zeros_like(real) if keep_mask is None else keep_mask.to(dev).bool()
    z = torch.where(kept | ~real, x0, z)  # kept positions and padding stay as they are
    sigma = _network_sigma(alpha, kept, real, conditioning).to(torch.float32)
    if padding_mask is not None and not bool(real.all()):
        log_x = denoiser(z, sigma, padding_mask=real)
    else:
        log_x = denoiser(z, sigma)
    k = log_x.shape[-1]
    if valid_vocab is not None and valid_vocab.numel() != k:
        raise ValueError(f"valid_vocab has {valid_vocab.numel()} entries but the denoiser outputs K={k}")
    f = process.nelbo(log_x.float(), z, x0, alpha, alpha_prime).to(torch.float64)
    summed = score_mask.to(dev).bool() if score_mask is not None else torch.ones_like(real)
    out = torch.where(summed, f, torch.zeros_like(f)).sum(-1)  # unsummed ids (e.g. pads) may have no finite f
    if row_oov is not None:
        out = torch.where(row_oov, torch.full_like(out, float("inf")), out)
    return out


@torch.no_grad()
def nelbo_perplexity(
    denoiser: Denoiser,
    blocks: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    batch_size: int = 16,
    mc_passes: int = 1,
    progress: bool = True,
    special_ids: Optional[Sequence[int]] = None,
    pad_mode: str = "clean_masked",
    options: Optional["NelboOptions"] = None,
    **kwargs,
) -> dict:
    """NELBO perplexity of a split (docs/method.md §8): PPL = exp(Σ NELBO / #tokens), an upper bound.

    Each pass draws a fresh seeded permutation π of the sequences (:func:`stratum_permutation`) and gives sequence
    n the time of stratum π(n) of [t_min, 1] (``stratified_times(seed, pass, π(n), N)``: each of the N strata holds
    one sequence, and every sequence's t is marginally uniform, whatever the order of the split) and corruption noise
    from ``row_generators(seed, pass, [n])``, so the result does not depend on ``batch_size``. The per-pass
    estimates are i.i.d. unbiased estimates of the NELBO, so their spread gives a standard error that covers the time
    assignment.

    Two normalisations of the same summed NELBO (the bound on −log p of every block, BOS/EOS included):

    * ``nll_per_token`` / ``ppl`` (headline): **content tokens**: Σ NELBO / #content tokens, where content tokens are
      the counted positions whose id is not in ``special_ids`` (e.g. BOS, EOS, pad). The BOS/EOS of every block are
      nearly free (~0 nats), so counting them in the denominator makes a perplexity look better than it is.
      It is an upper bound on the per-content-token perplexity (−log p(blocks) ≥ −log p(content tokens)).
    * ``nll_per_token_all`` / ``ppl_all_tokens``: Σ NELBO / #counted positions (every position, the paper's
      convention for wrapped OWT blocks). Without ``special_ids`` the two are equal.

    Args:
        denoiser: ``denoiser(z Long[B, L], sigma Float[B]) -> log x_θ Float[B, L, K]`` (e.g. ``DenoiserFn(model)``);
            needs ``.vocab_size`` unless ``valid_vocab`` is given.
        blocks: ``Long[N, L]`` token blocks. attention_mask: ``Bool[N, L]`` positions that count (and padding).
        special_ids: ids not counted as content (default none).
        options / keyword arguments: ``seed``, ``valid_vocab``, ``schedule``, ``t_min``, ``device`` and ``process``
            (the noise process; None = uniform-state, e.g. ``AbsorbingProcess`` for an MDLM denoiser) of
            :class:`NelboOptions` (its other fields are not used here).
        pad_mode: ``clean_masked`` (default: positions outside ``attention_mask`` stay clean, are masked from
            attention and not scored, so the bound is conditional on each row's length) or ``official`` (as the
            official Duo/MDLM code: they are noised and attended to like any token and only left out of the sum and
            the token count).

    Raises:
        ValueError when a counted content token is outside the model's vocabulary (its NELBO would be +∞). A
        special id (``special_ids``) outside ``valid_vocab`` (the model never produces it) is kept clean and not
        scored: a structural marker known in advance.

    Returns:
        dict with ``ppl``, ``nll_per_token`` (content tokens, nats), ``stderr`` (standard error of ``nll_per_token``:
        from the spread of the pass estimates when ``mc_passes >= 2``, else from the per-sequence estimates treated
        as independent, conservative), ``stderr_method``, ``ppl_ci`` ([lo, hi] = exp(nll ± 1.96 stderr)),
        ``ppl_all_tokens``, ``nll_per_token_all``, ``stderr_all``, ``tokens`` (content), ``tokens_all``,
        ``sequences``, ``passes``, ``per_pass_nll`` (list, content tokens), ``estimator`` (a one-line description).
    """
    o = NelboOptions.of(options, kwargs)
    blocks, attention_mask, attended, content = _split_masks(blocks, attention_mask, special_ids, pad_mode)
    n = blocks.shape[0]
    tokens_all, tokens = int(attention_mask.sum()), int(content.sum())
    if int(mc_passes) < 1 or int(batch_size) < 1:
        raise ValueError("mc_passes and batch_size must be >= 1")
    dev, schedule, valid_vocab = _eval_setup(denoiser, o.device, o.schedule, o.valid_vocab)
    process, schedule, k = resolve_process(denoiser, o.process, valid_vocab, schedule)
    structural = _structural_ids(blocks, attention_mask, content, k, valid_vocab)
    vv_cpu = None if valid_vocab is None else valid_vocab.cpu()
    prepared: dict = {}  # block -> _Seq (ids, kept, real, scored); padding and kept markers are neither noised nor scored
    per_seq = torch.zeros(int(mc_passes), n, dtype=torch.float64)
    # (pass, sequence) rows in pass-major order, batch_size rows per call: the passes of a small split share calls.
    # A row's time and noise depend only on (seed, pass, sequence), so the values do not depend on the batching.
    total = int(mc_passes) * n
    times = torch.stack([stratified_times(o.seed, p, stratum_permutation(o.seed, p, n), n, t_min=o.t_min,
                                          dtype=torch.float64) for p in range(int(mc_passes))])  # [P, N]
    bar = Eta(progress, (total + batch_size - 1) // batch_size, "nelbo ppl")
    try:
        for lo in range(0, total, batch_size):
            ps = [r // n for r in range(lo, min(total, lo + batch_size))]
            ns = [r % n for r in range(lo, min(total, lo + batch_size))]
            gens = [g for p, i in zip(ps, ns) for g in row_generators(o.seed, p, [i], device=dev)]
            # packed rows, output projection and the NELBO integrand only at counted positions (any process);
            # official pad mode: padding is noised and attended to (real) but not counted
            for i in ns:
                if i not in prepared:
                    keep = structural[i] if structural is not None else torch.zeros(blocks.shape[1], dtype=torch.bool)
                    prepared[i] = _prepare_seq(blocks[i], keep, attended[i], k, vv_cpu, counted=attention_mask[i])
            per_seq[torch.tensor(ps), torch.tensor(ns)] = _rows_nelbo(
                denoiser, prepared, ns, times[torch.tensor(ps), torch.tensor(ns)], gens, schedule=schedule,
                valid_vocab=valid_vocab, conditioning="alpha_t", dev=dev, process=process)
            bar.update(1)
    finally:
        bar.close()
    return _ppl_summary(per_seq, tokens, tokens_all, process)


def _split_masks(blocks, attention_mask, special_ids, pad_mode):
    """Checked ``(blocks, attention_mask, attended, content)`` on CPU: counted positions, positions noised and
    attended to (the counted ones, or every position in the official pad mode), content positions (counted and not
    a special id)."""
    if blocks.dim() != 2 or blocks.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"blocks must be an integer tensor [N, L]; got {tuple(blocks.shape)} {blocks.dtype}")
    n, length = blocks.shape
    if n == 0:
        raise ValueError("blocks is empty: nothing to evaluate (check the dataset/split and the block size)")
    if attention_mask is None:
        attention_mask = torch.ones(n, length, dtype=torch.bool)
    if tuple(attention_mask.shape) != (n, length):
        raise ValueError(f"attention_mask must have the shape of blocks {n, length}; got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.bool().cpu()
    if pad_mode not in ("clean_masked", "official"):
        raise ValueError(f"pad_mode must be 'clean_masked' or 'official', got {pad_mode!r}")
    attended = attention_mask if pad_mode == "clean_masked" else torch.ones_like(attention_mask)
    if int(attention_mask.sum()) == 0:
        raise ValueError("attention_mask selects no token")
    blocks = blocks.cpu()
    content = attention_mask.clone()
    for sid in special_ids or ():
        if sid is not None:
            content &= blocks != int(sid)
    if int(content.sum()) == 0:
        raise ValueError("the split has no content token (every counted position is a special id)")
    return blocks, attention_mask, attended, content


def _structural_ids(blocks, attention_mask, content, k: int, valid_vocab) -> Optional[torch.Tensor]:
    """Counted special ids the model cannot produce (kept clean: known markers, neither noised nor scored), or
    None; a counted content id outside the vocabulary is a ``ValueError`` (its NELBO would be +∞)."""
    invalid = (blocks < 0) | (blocks >= k)
    if valid_vocab is not None:
        invalid |= ~valid_vocab.cpu()[blocks.clamp(0, k - 1)]
    bad = invalid & content
    structural = None
    if bool((invalid & ~content & attention_mask).any()):
        structural = invalid & ~content & attention_mask & (blocks >= 0) & (blocks < k)
        bad |= invalid & ~content & attention_mask & ~structural
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"token id {int(blocks[r, c])} (block {r}, position {c}) is outside the model's valid vocabulary "
            f"(K={k}): its NELBO is +inf. Use the tokenizer the checkpoint was trained with (or mask the token)"
        )
    return structural


def _ppl_summary(per_seq: torch.Tensor, tokens: int, tokens_all: int, process) -> dict:
    """The result dict of :func:`nelbo_perplexity` from the per-(pass, sequence) NELBOs ``[P, N]``."""
    passes, n = per_seq.shape

    def summary(count: int):
        per_pass = per_seq.sum(1) / count  # [P]
        nll = float(per_pass.mean())
        if passes >= 2:
            se = float(per_pass.std(unbiased=True) / math.sqrt(passes))
            method = "between-pass"
        elif n >= 2:
            seq_est = per_seq.mean(0)  # [N]
            se = float(seq_est.std(unbiased=True) * math.sqrt(n) / count)
            method = "per-sequence"
        else:
            se, method = float("nan"), "none"
        return nll, se, method, per_pass

    nll, stderr, method, per_pass = summary(tokens)
    nll_all, stderr_all, _, _ = summary(tokens_all)
    lo_ci = math.exp(nll - 1.96 * stderr) if math.isfinite(stderr) else float("nan")
    hi_ci = math.exp(nll + 1.96 * stderr) if math.isfinite(stderr) else float("nan")
    return {
        "ppl": math.exp(nll),
        "nll_per_token": nll,
        "stderr": stderr,
        "stderr_method": method,
        "ppl_ci": [lo_ci, hi_ci],
        "ppl_all_tokens": math.exp(nll_all),
        "nll_per_token_all": nll_all,
        "stderr_all": stderr_all,
        "tokens": tokens,
        "tokens_all": tokens_all,
        "sequences": n,
        "passes": passes,
        "per_pass_nll": per_pass.tolist(),
        "estimator": (f"NELBO ({_integrand_name(process)}, log-linear alpha), one time per sequence per pass, "
                      f"stratified over the split with a fresh permutation per pass; {passes} pass(es); stderr "
                      f"{method}; per content token (all-token figure beside it)"),
    }


class ConditionalNELBO(NamedTuple):
    """Result of :func:`conditional_nelbo` (all ``[B]``, float64 / int64, on CPU).

    nelbo: NELBO summed over the scored positions, averaged over the MC samples (nats; an upper bound on
    −log p(x[scored] | x[kept]); +∞ when a scored token is outside the model's vocabulary). stderr: its Monte-Carlo
    standard error (std over MC samples / sqrt(M); NaN when M = 1). num_tokens: number of scored positions per
    sequence. mc_samples: the number of MC samples used for each sequence (adaptive mode: varies per sequence).
    """

    nelbo: torch.Tensor
    stderr: torch.Tensor
    num_tokens: torch.Tensor
    mc_samples: Optional[torch.Tensor] = None


def _round_times_and_gens(seed, index, r, m, t_min, time_sampling, device, start=None):
    """Times ``[m]`` and generators for MC stage ``r`` of sequence ``index`` (samples ``start … start + m − 1``,
    default ``start = r·m``).

    Stage 0 keeps the streams of the non-adaptive estimator: stratified times ``stratified_times(seed,
    _COND_STEP_OFFSET + index, range(m), m)`` (or i.i.d. times from a generator seeded by ``seed·1000003 + index``)
    and corruption generators ``row_generators(seed, offset + index, [j])``. Stage r ≥ 1 (the adaptive policy's
    fresh round) shifts the time stream by ``r · 2^48`` (its m times stratified among themselves) and continues the
    sample index j at ``start``, so its draws are independent of the pilot's.
    """
    index = int(index)
    start = r * m if start is None else int(start)
    if time_sampling == "stratified":
        times = stratified_times(seed, _COND_STEP_OFFSET + index + r * _ROUND_STRIDE, range(m), m, t_min=t_min,
                                 dtype=torch.float64)
        step = _COND_STEP_OFFSET + index
    else:
        g = torch.Generator().manual_seed((seed * streams.EVAL_IID_TIMES + index + r * _ROUND_STRIDE) % (1 << 63))
        times = t_min + (1 - t_min) * torch.rand(m, generator=g, dtype=torch.float64)
        step = _IID_STEP_OFFSET + index
    gens = row_generators(seed, step, range(start, start + m), device=device)
    return times, gens


@dataclasses.dataclass(frozen=True)
class NelboOptions:
    """Options of the conditional-NELBO estimators (:func:`conditional_nelbo`, :func:`conditional_nelbo_ragged`),
    passed as ``options=`` or as keyword arguments.

    Attributes:
        mc_samples: M (the pilot size with ``target_stderr``). seed: noise seed. valid_vocab: ``Bool[K]`` or None.
        schedule: α_t (default: the process's, log-linear). t_min: smallest time. device: where to run (default the
        denoiser's). conditioning: ``alpha_t`` | ``clean_fraction``. time_sampling: ``stratified`` | ``iid``.
        target_stderr / max_mc_samples: the two-stage adaptive policy (:mod:`duo_plugin.eval.mc`).
        max_rows / max_batch_tokens: caps of one denoiser call. on_batch: called with the rows of each call.
        process: the noise process (None = uniform-state over ``valid_vocab``).
    """

    mc_samples: int = 8
    seed: int = 0
    valid_vocab: Optional[torch.Tensor] = None
    schedule: object = None
    t_min: float = 1e-3
    device: object = None
    conditioning: str = "alpha_t"
    time_sampling: str = "stratified"
    target_stderr: Optional[float] = None
    max_mc_samples: Optional[int] = None
    max_rows: Optional[int] = None
    max_batch_tokens: Optional[int] = None
    on_batch: Optional[Callable[[int], None]] = None
    process: object = None

    @classmethod
    def of(cls, options: Optional["NelboOptions"], kwargs: dict) -> "NelboOptions":
        """``options`` updated by ``kwargs`` (an unknown key is a ``TypeError`` naming it)."""
        return dataclasses.replace(options, **kwargs) if options is not None else cls(**kwargs)


def _check_mc_options(m: int, time_sampling: str, conditioning: str, target_stderr, max_mc_samples) -> MCPolicy:
    """Validate the Monte Carlo options shared by the conditional-NELBO estimators; return the policy."""
    if conditioning not in CONDITIONING_MODES:
        raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
    return MCPolicy(int(m), None if target_stderr is None else float(target_stderr),
                    None if max_mc_samples is None else int(max_mc_samples), time_sampling)


def conditional_nelbo(
    denoiser: Denoiser,
    x0: torch.Tensor,
    keep_mask: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    indices: Optional[torch.Tensor] = None,
    batch_size: int = 32,
    options: Optional["NelboOptions"] = None,
    **kwargs,
) -> ConditionalNELBO:
    """Conditional NELBO of the non-kept positions given the kept ones (for loglikelihood requests).

    Positions in ``keep_mask`` (e.g. the context of an lm-eval request) are never corrupted and not scored; the
    remaining positions where ``attention_mask`` is True (default all) are corrupted with the forward process and
    scored with f_Duo. For each sequence the M = ``mc_samples`` times are stratified across the MC samples
    (``time_sampling="stratified"``: ``stratified_times(seed, _COND_STEP_OFFSET + index, range(M), M)``) or drawn
    i.i.d. (``"iid"``), and the corruption of MC sample j of sequence ``index`` comes from its own generator, so a
    sequence's result depends only on (seed, index, its content) and not on the batch it is in.

    Adaptive mode (``target_stderr`` set, the two-stage policy of :mod:`duo_plugin.eval.mc`): the first M samples
    of each sequence are a pilot; the sequence then gets ``clip(ceil(s²/target²), M, max_mc_samples)`` fresh samples
    (s² the pilot variance of its summed NELBO, nats²; default cap 32·M, times stratified among the fresh samples)
    and its value is their mean, the pilot discarded: unbiased, unlike stopping when the running standard error
    falls below the target (docs/evaluation.md).

    Args:
        denoiser: denoiser callable (see :func:`nelbo_perplexity`).
        x0: ``Long[B, L]`` ids (context + continuation, padded). keep_mask: ``Bool[B, L]`` or ``[L]``.
        attention_mask: ``Bool[B, L]``; False = padding (neither scored nor corrupted).
        indices: ``Long[B]`` global ids of the sequences for the noise (default ``arange(B)``).
        batch_size: rows (sequence × MC sample) per denoiser call.
        options / keyword arguments: :class:`NelboOptions` (``mc_samples`` M ≥ 1, the pilot size in adaptive mode;
            ``max_batch_tokens``; ``seed``; ``conditioning``; ``process`` -- with ``AbsorbingProcess`` (MDLM) only the
            non-kept positions are masked and the value is the MDLM NELBO of the continuation given the clean
            context, an upper bound on −log p(continuation | context); ...).

    Returns:
        :class:`ConditionalNELBO` ``(nelbo[B], stderr[B], num_tokens[B], mc_samples[B])``.
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
    o = NelboOptions.of(options, kwargs)
    if int(o.mc_samples) < 1 or int(batch_size) < 1:
        raise ValueError("mc_samples and batch_size must be >= 1")
    _check_mc_options(int(o.mc_samples), o.time_sampling, o.conditioning, o.target_stderr, o.max_mc_samples)
    if indices is None:
        indices = torch.arange(b)
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    if indices.numel() != b:
        raise ValueError(f"indices must have one entry per sequence ({b})")
    score = attention_mask & ~keep_mask
    reals = None if bool(attention_mask.all()) else [attention_mask[i] for i in range(b)]
    res = conditional_nelbo_ragged(denoiser, [x0[i] for i in range(b)], [keep_mask[i] for i in range(b)], reals=reals,
                                   indices=indices.tolist(), options=dataclasses.replace(o, max_rows=int(batch_size)))
    return res._replace(num_tokens=score.sum(1).long())


def pack_rows(lengths: Sequence[int], max_rows: Optional[int], max_tokens: Optional[int]) -> list[list[int]]:
    """Split rows (already in processing order) into consecutive batches of at most ``max_rows`` rows whose padded
    size ``rows × longest row`` stays within ``max_tokens`` (a row longer than the budget gets a batch of its own)."""
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i, n in enumerate(lengths):
        w = max(width, int(n))
        if cur and ((max_rows is not None and len(cur) >= max_rows)
                    or (max_tokens is not None and w * (len(cur) + 1) > max_tokens)):
            out.append(cur)
            cur, w = [], int(n)
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


class _Seq(NamedTuple):
    x0: torch.Tensor  # Long[L_i] (out-of-vocabulary scored ids replaced by a valid id)
    keep: torch.Tensor  # Bool[L_i]
    real: torch.Tensor  # Bool[L_i]
    score: torch.Tensor  # Bool[L_i]
    width: int  # L_i
    oov: bool  # a scored id the model cannot produce: the value is +inf


def _prepare_seq(x: torch.Tensor, keep: torch.Tensor, real: torch.Tensor, k_model: int,
                 valid_vocab: Optional[torch.Tensor], counted: Optional[torch.Tensor] = None) -> _Seq:
    """A sequence ready for :func:`_rows_nelbo`: scored = real & ~keep (& ``counted`` when given: real positions
    outside it are noised and attended to but not scored); ids the model cannot produce are replaced by a valid id
    for the network input (:func:`_vocab_check`, as :func:`sequence_nelbo` does) and flag the value +∞ when
    scored."""
    x, keep, real = x.long().cpu(), keep.bool().cpu(), real.bool().cpu()
    sc = real & ~keep
    if counted is not None:
        sc &= counted.bool().cpu()
    xs, oov = _vocab_check(x[None], sc[None], k_model, valid_vocab)
    return _Seq(xs[0], keep, real, sc, x.numel(), bool(oov is not None and bool(oov[0])))


def _corrupt_rows(process, seqs: Sequence[_Seq], rows, alpha: torch.Tensor, gens) -> torch.Tensor:
    """``z`` of each row ``[R, max width]`` (right-padded with the clean ids): row j drawn by ``process.corrupt`` at
    its own sequence's length from its own generator. Consecutive rows of equal length share one call: the draws of
    a row depend only on its generator and length, so they are those of the row alone."""
    z = pad_sequence([seqs[s].x0 for s in rows], batch_first=True, padding_value=0)
    lo = 0
    while lo < len(rows):
        w = seqs[rows[lo]].width
        hi = lo
        while hi < len(rows) and seqs[rows[hi]].width == w:
            hi += 1
        g = gens[lo]
        dev = g.device if isinstance(g, torch.Generator) else None
        x0 = torch.stack([seqs[s].x0 for s in rows[lo:hi]]).to(dev)
        z[lo:hi, :w] = process.corrupt(x0, alpha[lo:hi].to(dev), list(gens[lo:hi])).cpu()
        lo = hi
    return z


@torch.no_grad()
def _rows_nelbo(denoiser, seqs: Sequence[_Seq], rows, times, gens, *, schedule, valid_vocab, conditioning, dev,
                process) -> torch.Tensor:
    """One-sample NELBO of each row ``(sequence, time, generator)`` in **one** denoiser call (float64 ``[R]``).

    Each row is corrupted by ``process.corrupt`` at its sequence's own length from the row's generator
    (:func:`_corrupt_rows`: exactly :func:`sequence_nelbo`'s draw for that sequence alone), so the noise does not
    depend on the batch; rows of different lengths are right-padded and the network gets ``padding_mask``. The
    output projection and ``process.nelbo`` are evaluated only at the scored positions (:func:`log_probs_at`; both
    are per-position, so the values are those of the unbatched call).
    """
    r = len(rows)
    t64 = times.to(dtype=torch.float64)
    alpha = schedule.alpha(t64)
    alpha_prime = schedule.alpha_prime(t64)
    if alpha_prime.dim() == 0:
        alpha_prime = alpha_prime.expand_as(alpha)
    alpha, alpha_prime = alpha.cpu(), alpha_prime.cpu()

    def stack(vals, fill=0):  # right-pad rows of different lengths (batch padding: real = False there)
        return pad_sequence(vals, batch_first=True, padding_value=fill)

    x0 = stack([seqs[s].x0 for s in rows])
    real = stack([seqs[s].real for s in rows], False)
    score = stack([seqs[s].score for s in rows], False)
    kept = stack([seqs[s].keep for s in rows], False)
    z = torch.where(kept | ~real, x0, _corrupt_rows(process, seqs, rows, alpha, gens))
    sigma = _network_sigma(alpha, kept, real, conditioning).to(torch.float32).to(dev)
    out = torch.zeros(r, dtype=torch.float64)
    rr, pp = score.nonzero(as_tuple=True)
    if rr.numel():
        sel = log_probs_at(denoiser, z.to(dev), sigma, None if bool(real.all()) else real.to(dev), rr.to(dev),
                           pp.to(dev))[None]
        if valid_vocab is not None and valid_vocab.numel() != sel.shape[-1]:
            raise ValueError(f"valid_vocab has {valid_vocab.numel()} entries but the denoiser outputs K={sel.shape[-1]}")
        f = process.nelbo(sel, z[rr, pp][None].to(dev), x0[rr, pp][None].to(dev), alpha[rr][None].to(dev),
                          alpha_prime[rr][None].to(dev))
        out.index_add_(0, rr, f[0].to(torch.float64).cpu())
    oov = torch.tensor([seqs[s].oov for s in rows], dtype=torch.bool)
    return torch.where(oov, torch.full_like(out, float("inf")), out)


class _RowSetup(NamedTuple):
    """What every scored row of one estimator call shares (see :func:`_rows_nelbo`)."""

    schedule: object
    valid_vocab: Optional[torch.Tensor]
    conditioning: str
    dev: torch.device
    process: object
    seed: int
    t_min: float
    time_sampling: str
    max_rows: Optional[int]
    max_batch_tokens: Optional[int]


def _score_stage(denoiser, prepared, indices, plan: dict, stage: int, setup: _RowSetup, on_batch=None) -> dict:
    """One MC stage of every planned sequence: ``plan[s] = (n, start)`` draws ``n`` samples of sequence ``s`` from
    the stage's streams (:func:`_round_times_and_gens`); all rows are sorted by length and packed under the row and
    token caps. Returns ``{s: Float64[n]}``."""
    order = sorted(plan, key=lambda s: -prepared[s].width)  # stable: equal lengths keep their order
    tg = {s: _round_times_and_gens(setup.seed, indices[s], stage, plan[s][0], setup.t_min, setup.time_sampling,
                                   setup.dev, start=plan[s][1]) for s in order}
    rows = [(s, j) for s in order for j in range(plan[s][0])]
    est = {s: torch.zeros(plan[s][0], dtype=torch.float64) for s in order}
    for batch in pack_rows([prepared[s].width for s, _ in rows], setup.max_rows, setup.max_batch_tokens):
        rs = [rows[i] for i in batch]
        times = torch.stack([tg[s][0][j] for s, j in rs])
        gens = [tg[s][1][j] for s, j in rs]
        vals = _rows_nelbo(denoiser, prepared, [s for s, _ in rs], times, gens, schedule=setup.schedule,
                           valid_vocab=setup.valid_vocab, conditioning=setup.conditioning, dev=setup.dev,
                           process=setup.process)
        for (s, j), v in zip(rs, vals.tolist()):
            est[s][j] = v
        if on_batch is not None:
            on_batch(len(rs))
    return est


@torch.no_grad()
def conditional_nelbo_ragged(
    denoiser: Denoiser,
    seqs: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    *,
    reals: Optional[Sequence[torch.Tensor]] = None,
    indices: Optional[Sequence[int]] = None,
    options: Optional["NelboOptions"] = None,
    **kwargs,
) -> ConditionalNELBO:
    """:func:`conditional_nelbo` of sequences of **different lengths**, batched together.

    ``seqs[i]`` is ``Long[L_i]``, ``keeps[i]`` ``Bool[L_i]`` (kept clean, not scored), ``reals[i]`` ``Bool[L_i]``
    (False = padding; default all real). The rows (sequence × MC sample) of all sequences are sorted by length and
    packed into denoiser calls of at most ``max_rows`` rows and ``max_batch_tokens`` padded tokens. Times and
    corruption noise are those of :func:`conditional_nelbo` for the sequence alone (keyed by ``(seed, indices[i],
    sample)``, drawn at length ``L_i``), so every value is that of the one-sequence call up to floating-point
    rounding of the batched forward. ``on_batch(rows)`` is called after each denoiser call. The estimator options
    are a :class:`NelboOptions` (``options=``) or its fields as keyword arguments.

    With ``target_stderr`` the two-stage policy of :mod:`duo_plugin.eval.mc` applies: the first ``mc_samples``
    samples are a pilot that sizes each sequence's fresh round and is then discarded.
    """
    o = NelboOptions.of(options, kwargs)
    mc_samples, max_rows, max_batch_tokens, seed = o.mc_samples, o.max_rows, o.max_batch_tokens, o.seed
    valid_vocab, schedule, process = o.valid_vocab, o.schedule, o.process
    n = len(seqs)
    m = int(mc_samples)
    if len(keeps) != n or (reals is not None and len(reals) != n):
        raise ValueError("seqs, keeps (and reals) must have one entry per sequence")
    if m < 1:
        raise ValueError("mc_samples must be >= 1")
    if (max_rows is not None and int(max_rows) < 1) or (max_batch_tokens is not None and int(max_batch_tokens) < 1):
        raise ValueError("max_rows and max_batch_tokens must be >= 1")
    policy = _check_mc_options(m, o.time_sampling, o.conditioning, o.target_stderr, o.max_mc_samples)
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(indices) != n:
        raise ValueError(f"indices must have one entry per sequence ({n})")
    dev, schedule, valid_vocab = _eval_setup(denoiser, o.device, schedule, valid_vocab)
    process, schedule, k_model = resolve_process(denoiser, process, valid_vocab, schedule)
    on_batch = o.on_batch

    prepared = []
    for i in range(n):
        x = torch.as_tensor(seqs[i]).long().cpu().flatten()
        kp = torch.as_tensor(keeps[i], dtype=torch.bool).cpu().flatten()
        rl = torch.ones_like(kp) if reals is None else torch.as_tensor(reals[i], dtype=torch.bool).cpu().flatten()
        if not x.numel() == kp.numel() == rl.numel():
            raise ValueError(f"sequence {i}: ids, keep and real masks differ in length")
        prepared.append(_prepare_seq(x, kp, rl, k_model, None if valid_vocab is None else valid_vocab.cpu()))

    setup = _RowSetup(schedule, valid_vocab, o.conditioning, dev, process, seed, o.t_min, o.time_sampling,
                      max_rows, max_batch_tokens)
    samples = _score_stage(denoiser, prepared, indices, {s: (m, 0) for s in range(n)}, 0, setup, on_batch)
    if policy.adaptive:  # pilot discarded: fresh samples, as many as the pilot's variance asks for
        plan = {s: (plan_samples(samples[s], policy), m) for s in range(n)}
        fresh = _score_stage(denoiser, prepared, indices, {s: p for s, p in plan.items() if p[0] > 0}, 1, setup,
                             on_batch)
        samples = {s: fresh.get(s, torch.full((1,), float("inf"), dtype=torch.float64)) for s in range(n)}

    nelbo = torch.zeros(n, dtype=torch.float64)
    stderr = torch.full((n,), float("nan"), dtype=torch.float64)
    used = torch.zeros(n, dtype=torch.long)
    for s in range(n):
        nelbo[s], stderr[s] = mean_and_stderr(samples[s])
        used[s] = samples[s].numel() if bool(torch.isfinite(samples[s]).all()) else m
    ntok = torch.tensor([int(q.score.sum()) for q in prepared], dtype=torch.long)
    return ConditionalNELBO(nelbo=nelbo, stderr=stderr, num_tokens=ntok, mc_samples=used)


@torch.no_grad()
def official_harness_nll(
    denoiser: Denoiser,
    prefix: Sequence[int],
    target: Sequence[int],
    *,
    mode: str = "full",
    mc_samples: int = 1024,
    batch_size: int = 64,
    seed: int = 0,
    index: int = 0,
    valid_vocab: Optional[torch.Tensor] = None,
    schedule=None,
    t_min: float = 1e-3,
    device=None,
) -> tuple[float, float]:
    """The score of the official Duo lm-eval harness (``discrete_diffusion_harness.py``, main branch), for comparison
    with the Chapter II multiple-choice tables. Returns ``(mean per-token NELBO, its MC standard error)``; the
    official log-likelihood is the negative of the first value.

    ``prefix`` = ``[BOS] + context`` ids and ``target`` = ``continuation + [EOS]`` ids (the official tokenisation).
    With ``mode="full"`` (the official default, ``loss_avg_mode=full``) the whole ``prefix + target`` is noised at
    α_t, the network is conditioned on α_t and the value is the f_Duo mean over **all** positions. With
    ``mode="suffix"`` the prefix is kept clean, the network is conditioned on the realised clean fraction
    α̂ = mean(z_t = x), f is evaluated with α̂ in place of α_t (as the official code does; this is not a bound) and
    averaged over the target positions (α̂ is capped at α(t_min) so a draw with every position clean stays
    finite). Times are stratified over the ``mc_samples`` samples.
    """
    if mode not in ("full", "suffix"):
        raise ValueError(f"official harness mode must be 'full' or 'suffix', got {mode!r}")
    dev, schedule, valid_vocab = _eval_setup(denoiser, device, schedule, valid_vocab)
    ids = torch.tensor(list(prefix) + list(target), dtype=torch.long, device=dev)
    n_pre, length = len(prefix), ids.numel()
    process, schedule, k = resolve_process(denoiser, None, valid_vocab, schedule)  # the official Duo harness
    scored = torch.ones(1, length, dtype=torch.bool, device=dev)
    if mode == "suffix":
        scored[:, :n_pre] = False
    x_safe, oov = _vocab_check(ids[None], scored, k, valid_vocab)
    if oov is not None and bool(oov.any()):
        return float("inf"), 0.0
    m = int(mc_samples)
    times = stratified_times(seed, _COND_STEP_OFFSET + int(index), range(m), m, t_min=t_min, dtype=torch.float64)
    gens = row_generators(seed, _COND_STEP_OFFSET + int(index), range(m), device=dev)
    vals = []
    for lo in range(0, m, int(batch_size)):
        t = times[lo : lo + int(batch_size)].to(dev)
        bsz = t.numel()
        x0 = x_safe.expand(bsz, -1)
        alpha = schedule.alpha(t)
        alpha_prime = schedule.alpha_prime(t)
        if alpha_prime.dim() == 0:
            alpha_prime = alpha_prime.expand_as(alpha)
        z = process.corrupt(x0, alpha, gens[lo : lo + bsz])
        if mode == "suffix":
            z[:, :n_pre] = x0[:, :n_pre]
            # the realised clean fraction; capped at α(t_min) so that a fully clean draw stays finite
            alpha = (z == x0).to(torch.float64).mean(-1).clamp(max=float(schedule.alpha(torch.tensor(t_min))))
        sigma = sigma_from_alpha(alpha).to(torch.float32)
        log_x = denoiser(z, sigma)
        f = process.nelbo(log_x.float(), z, x0, alpha, alpha_prime).to(torch.float64)
        vals.append(f[:, n_pre:].mean(-1) if mode == "suffix" else f.mean(-1))
    v = torch.cat(vals).cpu()
    se = float(v.std(unbiased=True) / math.sqrt(m)) if m >= 2 else float("nan")
    return float(v.mean()), se
