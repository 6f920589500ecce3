"""lm-evaluation-harness backend ``duo``: :class:`DuoLM` scores text with Duo's conditional NELBO.

Usage (after ``pip install duo-plugin``; lm-eval 0.4.13)::

    lm_eval  --model duo --model_args pretrained=CKPT_DIR,mc_samples=32 --tasks duo_shakespeare_ppl \
             --include_path $(python -c "import duo_plugin.integrations.lm_eval as m; print(m.TASKS_DIR)")
    duo-eval --model duo --model_args pretrained=CKPT_DIR --tasks duo_shakespeare_ppl   # adds the bundled tasks

What is returned (the model is a uniform-state diffusion LM, so every log-likelihood is a *bound*):

* ``loglikelihood``: ``-NELBO(continuation | context)``, the conditional NELBO of the continuation tokens with the
  context tokens kept clean (never corrupted, not scored), **summed** over continuation tokens (docs/method.md §1.3,
  f_Duo = paper Eq. 17/50, log-linear α_t), averaged over ``mc_samples`` times t stratified over the MC samples
  (``time_sampling=stratified``, via :func:`duo_plugin.eval.likelihood.conditional_nelbo`) or drawn i.i.d.
  (``time_sampling=iid``). It is a Monte-Carlo estimate of a lower bound on log p(continuation | context); its MC
  standard error is recorded per request and summarised per task (logged, and written as JSON to
  ``mc_stderr_path`` when given; ``duo-eval --output_path`` sets it). Each sequence is ``[BOS] + context +
  continuation``; a too long context is truncated from the left (never scored as a free 0).
* ``is_greedy`` (``greedy_check``): ``onepass`` (default) = every continuation token is the argmax of the denoiser
  in **one** forward pass at t = 1 (α_1 = 1e-3) with the continuation replaced by uniform noise (seeded per request)
  and the context clean, the network conditioned on the clean fraction α_eff = (n_ctx + α_1 n_cont) / n -- i.e. the continuation equals the per-position mode of the model's prediction given the
  context alone (exact for single-token continuations, a mean-field approximation for longer ones, as in the Duo
  harness). ``off`` = always False (then lambada ``acc`` is meaningless).
* ``loglikelihood_rolling``: the document is cut into windows (:func:`rolling_windows`): each window is
  ``[BOS] + up to rolling_context clean preceding tokens + new tokens + [EOS]`` (the EOS clean and unscored, where
  training put it); every document token is scored exactly once,
  so the summed value is a lower bound on log p(document) and word/byte perplexity and bits per byte reported by
  lm-eval are **upper bounds**.
* ``generate_until``: :func:`duo_plugin.sampling.sample` (float64 ancestral sampler, ``gen_steps`` steps,
  ``noise_removal``) with ``[BOS] + context`` clamped as prompt, ``max_gen_toks`` new tokens, cut at EOS and at the
  first stop string in ``until``. ``do_sample: false`` or ``temperature: 0`` ask for greedy decoding, which a
  diffusion sampler has no exact analogue of: they select diffusion "greedy" decoding, the argmax of x_θ before each
  posterior step (nucleus with a vanishing ``top_p``) and a Greedy-Tail final noise removal -- not autoregressive
  greedy decoding (the posterior still mixes in the seeded uniform noise, so it is deterministic per request and
  seed, but not the sequence an AR argmax would give).

The noise process comes from the model folder's metadata through one lookup
(:func:`duo_plugin.eval.processes.process_for`): ``duo``/``udlm``/``dcd`` = the uniform-state process above, ``ar`` =
exact causal log-likelihood, ``mdlm`` = the absorbing process (MDLM baseline, docs/baselines.md): ``loglikelihood`` is
then ``-`` the MDLM NELBO of the continuation with only the continuation positions masked (context clean), an upper
bound on ``-log p(continuation | context)``; ``is_greedy`` masks every continuation position (deterministic, no noise)
and asks whether the argmax of x_θ (SUBS: never ``[MASK]``) equals the continuation at every position -- exact for a
single-token continuation, the per-position mode otherwise; ``loglikelihood_rolling`` uses the same windows with the
MDLM NELBO; ``generate_until`` and the ``official*`` likelihood modes are uniform-state only (a clear error).

Noise is seeded per request from a hash of its token ids (``seed`` model arg), so scores do not depend on the batch
composition, ``--limit`` or request order. Scoring packs the rows (request x MC sample) of all requests into calls of
``max_batch_tokens`` padded tokens (``--batch_size`` additionally caps the rows per call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lm_eval.models  # noqa: F401  -- MUST precede @register_model (else the registry is left holding only our entry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from duo_plugin._progress import progress_bar
from duo_plugin.eval.likelihood import log_probs_at, default_max_batch_tokens, pack_rows

log = logging.getLogger("duo_plugin.lm_eval")

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"

#: ``top_p`` used for lm-eval's greedy requests (``do_sample: false`` / ``temperature: 0``): the nucleus keeps only the
#: argmax of x_θ, so every posterior step uses the one-hot argmax of the denoiser's prediction.
GREEDY_TOP_P = 1e-9

#: ``likelihood`` modes: ``nelbo`` (our conditional NELBO, summed over the continuation), ``official`` (the official
#: harness' ``loss_avg_mode=full``: −mean f over the whole noised ``[BOS] + context + continuation + [EOS]``) and
#: ``official_suffix`` (its ``loss_avg_mode=suffix``).
LIKELIHOOD_MODES = ("nelbo", "official", "official_suffix")
#: What the network is told for the conditional NELBO (docs/evaluation.md has the measurement behind the default).
DEFAULT_CONDITIONING = "alpha_t"
#: Rows per sampler call in ``generate_until`` (and per official-mode call) when lm-eval passes its default batch
#: size of 1.
DEFAULT_BATCH_SIZE = 64

__all__ = ["DuoLM", "GREEDY_TOP_P", "TASKS_DIR", "LIKELIHOOD_MODES", "check_scorable", "parse_batch_size",
           "rolling_windows", "request_index", "truncate_left"]


def _as_bool(v) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {v!r}")
    return bool(v)


def check_scorable(model, name=None) -> bool:
    """``True`` for a causal (AR-objective) model, ``False`` for a diffusion denoiser; ``ValueError`` otherwise.

    The backend scores two kinds of model: a Duo denoiser ``model(z, sigma) -> log x_θ`` (bidirectional) and an
    AR-objective model built with ``causal=True`` (``model(x, 0)[i]`` = next-token distribution of position i).
    """
    what = f"{name}" if name is not None else type(model).__name__
    for attr in ("vocab_size", "max_seq_len"):
        if not isinstance(getattr(model, attr, None), int):
            raise ValueError(f"{what} is not a model the duo backend can score: it has no integer .{attr} (expected a "
                             "duo_plugin model directory: a Duo denoiser or an objective=ar DiT)")
    meta = getattr(model, "duo_metadata", None) or {}
    objective = str(meta.get("objective", "") or "")
    causal = bool(getattr(model, "causal", False))
    if objective == "ar" and not causal:
        raise ValueError(f"{what}: metadata says objective=ar but the model is not causal; cannot score it")
    if causal and objective not in ("", "ar"):
        raise ValueError(f"{what}: a causal model trained with objective={objective!r}; the duo backend scores "
                         "causal models only as AR (next-token) models")
    return causal


# ----------------------------------------------------------------------------------------------- pure helpers
def parse_batch_size(value, default: int = 32) -> int:
    """Parse lm-eval's ``--batch_size`` (it arrives as a string: ``'8'``, ``'auto'``, ``'auto:4'``).

    ``auto`` (and ``auto:N``) has no memory probe here: it falls back to ``default`` with a log line.
    """
    if value is None:
        return int(default)
    if isinstance(value, int) and not isinstance(value, bool):
        b = value
    else:
        s = str(value).strip().lower()
        if s.startswith("auto"):
            log.info("duo: batch_size=%r -> %d (no automatic batch-size search; pass an integer)", value, default)
            return int(default)
        try:
            b = int(float(s))
        except ValueError:
            raise ValueError(f"batch_size must be an integer or 'auto', got {value!r}") from None
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return b


def rolling_windows(
    n_tokens: int, max_len: int, prefix_len: int = 1, context: int = 0, first: int = 0
) -> List[Tuple[int, int, int]]:
    """Windows that score every token of ``seq[first:n_tokens]`` exactly once.

    Each window is ``(ctx_start, pred_start, pred_end)``: the model input is ``prefix (prefix_len tokens, e.g. BOS)
    + seq[ctx_start:pred_start] (kept clean, not scored) + seq[pred_start:pred_end] (scored)``, at most ``max_len``
    tokens. Every window takes up to ``context`` preceding tokens of ``seq`` as clean context (the first window
    has none when ``first == 0``). The ``pred`` ranges partition ``[first, n_tokens)`` in order.
    """
    if max_len - prefix_len < 1:
        raise ValueError(f"max_len={max_len} leaves no room after a prefix of {prefix_len} tokens")
    if not 0 <= first <= n_tokens:
        raise ValueError(f"first={first} must lie in [0, n_tokens={n_tokens}]")
    context = max(0, min(int(context), max_len - prefix_len - 1))
    out, start = [], int(first)
    while start < n_tokens:
        c = min(context, start)
        end = min(n_tokens, start + max_len - prefix_len - c)
        out.append((start - c, start, end))
        start = end
    return out


def truncate_left(ctx: Sequence[int], cont: Sequence[int], max_len: int, prefix_len: int = 1):
    """Fit ``prefix + ctx + cont`` into ``max_len`` by dropping context tokens from the left.

    Returns ``(ctx_kept, n_dropped)``. Raises if the continuation alone does not fit (callers then use
    :func:`rolling_windows` over the continuation instead).
    """
    room = max_len - prefix_len - len(cont)
    if room < 0:
        raise ValueError("continuation longer than the model window")
    drop = max(0, len(ctx) - room)
    return list(ctx[drop:]), drop


def request_index(ids: Sequence[int], extra: str = "") -> int:
    """Stable 40-bit index of a request (sha256 of its token ids), used to seed its noise."""
    h = hashlib.sha256((",".join(map(str, ids)) + "|" + extra).encode()).digest()
    return int.from_bytes(h[:5], "big")


# ----------------------------------------------------------------------------------------------- the backend
@register_model("duo")
class DuoLM(TemplateLM):
    """Duo (uniform-state diffusion) backend for lm-eval. See the module docstring for the semantics.

    Args (``--model_args``; lm-eval passes ``batch_size``/``max_batch_size``/``device`` when given):
        pretrained (alias ``checkpoint``): model directory for
            ``duo_plugin.models.checkpoint.load_pretrained`` (DiT or adapted decoder). Or pass ``model=`` (an
            ``nn.Module`` following the denoiser convention) programmatically.
        weights: ``ema`` (default) or ``model``.
        tokenizer: tokenizer path (default ``<pretrained>/tokenizer``), loaded by
            ``duo_plugin.data.tokenizers.load_tokenizer``; or a tokenizer object.
        device: ``cpu`` (default) / ``cuda`` / ``cuda:N``. dtype: ``float32`` (default) or ``bfloat16`` (autocast,
            CUDA only; the NELBO itself is fp32/fp64).
        mc_samples: Monte-Carlo times per request (default 128; docs/evaluation.md has the measurement). time_sampling: ``stratified`` | ``iid``.
        batch_size: at most this many rows (request x MC sample) per scoring forward (string from the CLI; ``auto``
            -> 32); unset (lm-eval's default 1): only ``max_batch_tokens`` caps a call.
        max_batch_tokens: padded tokens per scoring forward (default by device type,
            :data:`~duo_plugin.eval.likelihood.DEFAULT_MAX_BATCH_TOKENS`: 4,096 on CPU, 16,384 on CUDA): the rows of
            all requests are sorted by length and packed together up to this budget; scores do not depend on it.
        seed: noise seed (default 0). max_length: window (default and maximum: the model's ``max_seq_len``).
        rolling_context: clean preceding tokens per later rolling window (default ``max_length // 4``).
        greedy_check: ``onepass`` | ``off``. gen_steps: sampler steps for ``generate_until`` (default 64).
        noise_removal: ``greedy`` (default) | ``ancestral`` | ``none``. max_gen_toks: default 256.
        mc_stderr_path: JSON file for the per-task MC standard-error summary.
        predictor: ``ancestral`` (default) | ``psi`` for ``generate_until``; with ``psi`` the Ψ settings
            ``psi_high_mode``, ``psi_middle_mode``, ``psi_low_mode`` (default ``pure-posterior``), ``psi_high_frac``,
            ``psi_middle_frac`` (0.2 / 0.6), ``psi_time_profile`` (``linear``) (docs/sampling.md).
        guidance_weight: prompt guidance w for ``generate_until`` (1.0 = off). posterior_impl: sampler draw path.
        block_len: when set, a continuation that does not fit in the window is generated block by block
            (semi-autoregressive stride sampling, ``block_len`` new tokens per window with the rest of the window as
            clamped context); generation stops once every row of a batch has produced EOS.
        likelihood: ``nelbo`` (default) | ``official`` | ``official_suffix`` (the official harness' score,
            docs/evaluation.md). conditioning: ``alpha_t`` (default, measured slightly tighter) | ``clean_fraction``
            (σ = −log α_eff); the greedy check always uses the clean fraction.
        mc_target_stderr / mc_max_samples: adaptive MC (rounds of ``mc_samples`` until the per-request MC standard
            error is below the target, nats, at most ``mc_max_samples`` samples).
        window_eos: rolling windows end with a clean ``[EOS]`` (default true). progress: tqdm bar on a terminal.
        batch_size 1 (lm-eval's default) means "unset" (:data:`DEFAULT_BATCH_SIZE` rows per ``generate_until`` call).

    AR-objective (causal) checkpoints are scored exactly (causal log-likelihood, argmax greedy check, token-by-token
    generation); any other model is refused (:func:`check_scorable`).

    ``generate_until`` gen_kwargs: ``until``, ``max_gen_toks``, ``temperature`` (> 0; sampling on log x_θ),
    ``do_sample``. ``do_sample: false`` or ``temperature: 0`` (lm-eval's "greedy") select diffusion greedy decoding:
    ``noise_removal="greedy"`` and ``top_p`` = :data:`GREEDY_TOP_P` (the argmax of x_θ before every posterior step),
    whatever ``noise_removal`` was configured. This is *not* autoregressive greedy decoding: each reverse step still
    draws from the exact posterior (stay / x_θ / uniform mixture, seeded per request), so it is deterministic for a
    given request and seed but is not the AR argmax sequence. It is logged once per backend.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        *,
        checkpoint: Optional[str] = None,
        model: Optional[torch.nn.Module] = None,
        tokenizer=None,
        weights: str = "ema",
        device: Optional[str] = None,
        dtype: str = "float32",
        mc_samples: int = 128,
        time_sampling: str = "stratified",
        batch_size=None,
        max_batch_size=None,
        seed: int = 0,
        max_length: Optional[int] = None,
        rolling_context: Optional[int] = None,
        greedy_check: str = "onepass",
        gen_steps: int = 64,
        noise_removal: str = "greedy",
        max_gen_toks: int = 256,
        mc_stderr_path: Optional[str] = None,
        t_min: float = 1e-3,
        predictor: str = "ancestral",
        psi_high_mode: str = "pure-posterior",
        psi_middle_mode: str = "pure-posterior",
        psi_low_mode: str = "pure-posterior",
        psi_high_frac: float = 0.2,
        psi_middle_frac: float = 0.6,
        psi_time_profile: str = "linear",
        guidance_weight: float = 1.0,
        posterior_impl: str = "auto",
        block_len: Optional[int] = None,
        likelihood: str = "nelbo",
        conditioning: str = DEFAULT_CONDITIONING,
        mc_target_stderr: Optional[float] = None,
        mc_max_samples: Optional[int] = None,
        window_eos: bool = True,
        progress: bool = True,
        max_batch_tokens=None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown --model_args for duo: {sorted(unknown)}; valid: pretrained, weights, tokenizer, device, "
                "dtype, mc_samples, time_sampling, batch_size, seed, max_length, rolling_context, greedy_check, "
                "gen_steps, noise_removal, max_gen_toks, mc_stderr_path, predictor, psi_high_mode, psi_middle_mode, "
                "psi_low_mode, psi_high_frac, psi_middle_frac, psi_time_profile, guidance_weight, posterior_impl, "
                "block_len, likelihood, conditioning, mc_target_stderr, mc_max_samples, window_eos, progress, max_batch_tokens"
            )
        if pretrained is not None and checkpoint is not None and pretrained != checkpoint:
            raise ValueError("pass the checkpoint once: pretrained=DIR (checkpoint= is an alias)")
        pretrained = pretrained if pretrained is not None else checkpoint
        if (pretrained is None) == (model is None):
            raise ValueError("DuoLM needs exactly one of pretrained=CHECKPOINT_DIR (CLI) or model=nn.Module (Python)")
        if weights not in ("ema", "model"):
            raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
        if time_sampling not in ("stratified", "iid"):
            raise ValueError(f"time_sampling must be 'stratified' or 'iid', got {time_sampling!r}")
        if greedy_check not in ("onepass", "off"):
            raise ValueError(f"greedy_check must be 'onepass' or 'off', got {greedy_check!r}")
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if likelihood not in LIKELIHOOD_MODES:
            raise ValueError(f"likelihood must be one of {LIKELIHOOD_MODES}, got {likelihood!r}")
        if conditioning not in ("alpha_t", "clean_fraction"):
            raise ValueError(f"conditioning must be 'alpha_t' or 'clean_fraction', got {conditioning!r}")
        dt = {"float32": None, "fp32": None, "auto": None, "bfloat16": "bf16", "bf16": "bf16"}
        if str(dtype) not in dt:
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")

        dev = str(device or "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda by default; fall back like HFLM does
            log.warning("duo: device %r requested but CUDA is not available; using cpu", dev)
            dev = "cpu"
        self._device = torch.device(dev)
        if model is None:
            from duo_plugin.models.checkpoint import load_pretrained

            model = load_pretrained(pretrained, weights=weights, device=str(self._device))
        model = model.to(self._device).eval()
        self.model = model
        self.is_ar = check_scorable(model, pretrained)
        from duo_plugin.diffusion.schedules import LogLinearSchedule
        from duo_plugin.eval.processes import process_for_model

        self.schedule = LogLinearSchedule()
        # the noise process from the model folder's metadata (objective): uniform (process None, f_Duo), absorbing
        # (MDLM) or causal -- one lookup, no per-objective branches below
        self.process_spec = process_for_model(model, pretrained, schedule=self.schedule)
        self.process = self.process_spec.process
        self.schedule = getattr(self.process, "schedule", None) or self.schedule  # D3PM: its own discrete clock
        if self.process is not None and likelihood != "nelbo":
            raise ValueError(f"likelihood={likelihood!r} reproduces the official Duo (uniform-state) harness; this is "
                             f"a {self.process_spec.kind} ({type(self.process).__name__}) model: use likelihood=nelbo")
        if tokenizer is None:
            if pretrained is None:
                raise ValueError("pass tokenizer= (a DuoTokenizer or a path) together with model=")
            tokenizer = Path(pretrained) / "tokenizer"
            if not tokenizer.exists():
                raise FileNotFoundError(
                    f"{tokenizer} not found: the checkpoint has no tokenizer/ subdir; pass tokenizer=PATH in --model_args"
                )
        if isinstance(tokenizer, (str, os.PathLike)):
            import duo_plugin.integrations.torchtune_tokenizer  # noqa: F401  (registers the 'torchtune' descriptor)
            from duo_plugin.data.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer

        from duo_plugin.sampling import DenoiserFn

        self.denoiser = DenoiserFn(model, dt[str(dtype)])
        self.vocab_size = int(model.vocab_size)
        if int(tokenizer.vocab_size) > self.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model embeds only {self.vocab_size}; "
                "use the tokenizer the checkpoint was trained with"
            )
        vv = getattr(model, "valid_vocab", None)
        self.valid_vocab = vv.to(self._device).bool() if isinstance(vv, torch.Tensor) else None
        model_len = int(model.max_seq_len)
        self.max_length = int(max_length) if max_length is not None else model_len
        if not 2 <= self.max_length <= model_len:
            raise ValueError(f"max_length must be in [2, {model_len}] (the model's max_seq_len), got {max_length}")
        self.rolling_context = (
            self.max_length // 4 if rolling_context is None else int(rolling_context)
        )
        self.mc_samples = int(mc_samples)
        self.time_sampling = time_sampling
        self.likelihood = likelihood
        self.conditioning = conditioning
        self.mc_target_stderr = None if mc_target_stderr in (None, "", "none", "None") else float(mc_target_stderr)
        self.mc_max_samples = None if mc_max_samples in (None, "", "none", "None") else int(mc_max_samples)
        self.window_eos = _as_bool(window_eos)
        self.progress = _as_bool(progress)
        if batch_size in (None, 1, "1"):
            # lm-eval passes batch_size=1 unless told otherwise, which would be one row (request x MC sample) per
            # forward; scores do not depend on the batch size, so only the token budget caps the scoring calls.
            self.batch_size = DEFAULT_BATCH_SIZE
            self.max_rows: Optional[int] = None
        else:
            self.batch_size = parse_batch_size(batch_size)
            self.max_rows = self.batch_size
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, parse_batch_size(max_batch_size))
            self.max_rows = self.batch_size
        self.max_batch_tokens = (int(max_batch_tokens) if max_batch_tokens not in (None, "", "None")
                                 else default_max_batch_tokens(self._device))
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        log.info("duo: scoring calls hold at most %s padded tokens%s (scores do not depend on it; "
                 "max_batch_tokens=N / --batch_size N change it)", self.max_batch_tokens,
                 "" if self.max_rows is None else f" and {self.max_rows} rows")
        self.seed = int(seed)
        self.t_min = float(t_min)
        self.greedy_check = greedy_check
        self.gen_steps = int(gen_steps)
        self.noise_removal = noise_removal
        self.max_gen_toks = int(max_gen_toks)
        self.mc_stderr_path = mc_stderr_path
        if predictor not in ("ancestral", "psi"):
            raise ValueError(f"predictor must be 'ancestral' or 'psi', got {predictor!r}")
        from duo_plugin.sampling import PsiSchedule

        self.sampler_kwargs = {
            "predictor": predictor, "guidance_weight": float(guidance_weight), "posterior_impl": str(posterior_impl),
            "psi": PsiSchedule(str(psi_high_mode), str(psi_middle_mode), str(psi_low_mode), float(psi_high_frac),
                               float(psi_middle_frac), str(psi_time_profile)) if predictor == "psi" else None,
        }
        self.block_len = int(block_len) if block_len not in (None, "", "None", 0, "0") else None
        if self.block_len is not None and not 1 <= self.block_len < self.max_length - 1:
            raise ValueError(f"block_len must lie in [1, {self.max_length - 2}] for this model, got {block_len}")
        self._greedy_logged = False
        # per task: list of (nelbo, stderr, n_tokens) for every scored request/window
        self._mc_records: Dict[str, List[Tuple[float, float, int]]] = defaultdict(list)
        # per task: [decisions, decisions whose top-2 margin is within 1.96 MC standard errors of the difference]
        self._mc_decisions: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
        self._mc_used: List[int] = []

    # --- TemplateLM plumbing --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tokenizer.bos_id)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self.tokenizer.encode(string, add_bos=False, add_eos=False))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # --- scoring core ---------------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str, disable: bool = False):
        """A tqdm bar over requests/windows on a terminal (``progress=false`` or lm-eval's ``disable_tqdm`` off)."""
        return progress_bar(self.progress and not disable, total=total, desc=desc, unit="req", leave=False)

    def _score_windows(self, windows, disable_tqdm: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Conditional NELBO of each window ``(ids, n_keep, index, n_tail)``: positions ``< n_keep`` and the last
        ``n_tail`` positions (a window-closing ``[EOS]``) are kept clean and not scored.

        All windows are scored together: their rows (window × MC sample) are sorted by length and packed into
        denoiser calls of at most :attr:`max_batch_tokens` padded tokens (and ``batch_size`` rows when given), with
        the noise of every row drawn at its window's own length
        (:func:`duo_plugin.eval.likelihood.conditional_nelbo_ragged`), so a score does not depend on its batch
        neighbours. Returns float64 ``(nelbo[N], stderr[N])`` in the input order (+inf for a window with a token
        outside the model's vocabulary). AR models: exact causal NLL, stderr 0.
        """
        from duo_plugin.eval.likelihood import conditional_nelbo_ragged

        n = len(windows)
        if self.is_ar:
            return self._ar_windows_nll(windows), torch.zeros(n, dtype=torch.float64)
        seqs, keeps = [], []
        for ids, n_keep, _, n_tail in windows:
            keep = torch.zeros(len(ids), dtype=torch.bool)
            keep[:n_keep] = True
            keep[len(ids) - n_tail:] = True
            seqs.append(torch.tensor(ids, dtype=torch.long))
            keeps.append(keep)
        bar = self._bar(n * self.mc_samples, "duo: scoring (rows)", disable_tqdm)
        res = conditional_nelbo_ragged(
            self.denoiser, seqs, keeps, indices=[w[2] for w in windows], mc_samples=self.mc_samples,
            max_rows=self.max_rows, max_batch_tokens=self.max_batch_tokens, seed=self.seed,
            valid_vocab=self.valid_vocab, schedule=self.schedule, t_min=self.t_min, device=self._device,
            conditioning=self.conditioning, time_sampling=self.time_sampling, target_stderr=self.mc_target_stderr,
            max_mc_samples=self.mc_max_samples, on_batch=None if bar is None else bar.update, process=self.process)
        self._mc_used.extend(int(v) for v in res.mc_samples)
        if bar is not None:
            bar.close()
        return res.nelbo.to(torch.float64), res.stderr.to(torch.float64)

    def _ar_windows_nll(self, windows) -> torch.Tensor:
        """Exact causal NLL of the scored tokens of each window (float64 ``[N]``), batched under the token budget.

        The causal output at position p depends only on ``ids[: p + 1]``, so a window whose input ``ids[:-1]`` is a
        prefix of another window's ids is read off that window's forward (e.g. every single-token continuation of
        one context shares the context's pass), and windows of different lengths are right-padded together.
        """
        n = len(windows)
        out = torch.zeros(n, dtype=torch.float64)
        if n == 0:
            return out
        k = int(self.vocab_size)
        order = sorted(range(n), key=lambda i: (windows[i][0], -len(windows[i][0])), reverse=True)
        # host[i] = the window whose forward serves window i (longest first in lexicographic order: a prefix
        # sorts right after every sequence it is a prefix of)
        hosts: List[int] = []
        host_of = [0] * n
        for i in order:
            need = windows[i][0][:-1]
            if hosts and windows[hosts[-1]][0][: len(need)] == need and len(windows[hosts[-1]][0]) >= len(need):
                host_of[i] = hosts[-1]
            else:
                hosts.append(i)
                host_of[i] = i
        served: Dict[int, List[int]] = defaultdict(list)
        for i in range(n):
            served[host_of[i]].append(i)
        hosts.sort(key=lambda i: -len(windows[i][0]))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.eot_token_id
        for batch in pack_rows([len(windows[h][0]) for h in hosts], self.max_rows, self.max_batch_tokens):
            hs = [hosts[j] for j in batch]
            width = max(len(windows[h][0]) for h in hs)
            x = torch.full((len(hs), width), int(pad), dtype=torch.long)
            for r, h in enumerate(hs):
                x[r, : len(windows[h][0])] = torch.tensor(windows[h][0], dtype=torch.long)
            logp = self._ar_log_probs(x.clamp(0, k - 1)).cpu()
            for r, h in enumerate(hs):
                for i in served[h]:
                    ids, n_keep, _, n_tail = windows[i]
                    end = len(ids) - n_tail
                    tgt = torch.tensor(ids[n_keep:end], dtype=torch.long)
                    if tgt.numel() == 0:
                        continue
                    bad = (tgt < 0) | (tgt >= k)
                    tok = logp[r, n_keep - 1 : end - 1].gather(-1, tgt.clamp(0, k - 1)[:, None]).squeeze(-1)
                    tok = torch.where(bad, torch.full_like(tok, float("-inf")), tok)
                    out[i] = -tok.sum()
        return out

    @torch.no_grad()
    def _ar_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Causal model: ``log p(x_{i+1} | x_{≤i})`` at position i, float64 ``[B, L, K]`` (invalid ids at −inf)."""
        out = self.model(x.to(self._device), torch.zeros(x.shape[0], device=self._device))
        out = out.to(torch.float64)
        if self.valid_vocab is not None:
            out = out.masked_fill(~self.valid_vocab, float("-inf"))
        return torch.log_softmax(out, -1)

    def _window_room(self) -> int:
        """Tokens a loglikelihood window may hold (BOS included): ``max_length − 1`` for a diffusion model, which
        always saw ``[EOS]`` at the last position in training; ``max_length`` for an AR model."""
        return self.max_length if self.is_ar else self.max_length - 1

    def _windows_for(self, ctx: List[int], cont: List[int]) -> List[Tuple[List[int], int, int, int]]:
        """Windows scoring every token of ``cont`` once given ``[BOS] + ctx`` (left-truncated when too long)."""
        bos = [self.prefix_token_id]
        room = self._window_room()
        if len(cont) + 1 <= room:
            kept, dropped = truncate_left(ctx, cont, room, prefix_len=1)
            if dropped:
                log.debug("duo: truncated %d context tokens from the left", dropped)
            ids = bos + kept + cont
            return [(ids, 1 + len(kept), request_index(ids), 0)]
        # continuation alone exceeds the window: roll over it, each window conditioned on its preceding tokens
        return self._rolling(list(ctx) + list(cont), first=len(ctx), tag="")

    def _rolling(self, full: List[int], first: int, tag: str) -> List[Tuple[List[int], int, int, int]]:
        """Rolling windows over ``full[first:]``: ``[BOS] + clean context + scored tokens (+ clean [EOS])``.

        A diffusion model was trained on blocks ``[BOS] + (L − 2) tokens + [EOS]``, so with ``window_eos`` (default)
        every window ends with a clean, unscored ``[EOS]`` at most at position ``max_length − 1`` and no scored token
        sits where the model always saw ``[EOS]``. AR models use the whole window.
        """
        bos = [self.prefix_token_id]
        eos = [] if (self.is_ar or not self.window_eos) else [self.eot_token_id]
        room = self.max_length - len(eos) if (self.is_ar or self.window_eos) else self.max_length - 1
        out = []
        for cs, ps, pe in rolling_windows(len(full), room, 1, self.rolling_context, first=first):
            ids = bos + full[cs:pe] + eos
            out.append((ids, 1 + (ps - cs), request_index(ids, tag), len(eos)))
        return out

    def _record(self, task: str, nelbo: float, se: float, n_tok: int):
        self._mc_records[task or "unknown"].append((nelbo, se, n_tok))

    # --- loglikelihood --------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        new_reqs, tasks, docs = [], [], []
        for req in requests:
            context, continuation = req.args
            if context == "":
                ctx_enc, cont_enc = [], self.tok_encode(continuation)
            else:
                ctx_enc, cont_enc = self._encode_pair(context, continuation)
            new_reqs.append(((context, continuation), ctx_enc, cont_enc))
            tasks.append(getattr(req, "task_name", None))
            docs.append(getattr(req, "doc_id", None))
        if self.likelihood != "nelbo" and not self.is_ar:
            return self._official_loglikelihood(new_reqs, tasks, docs, disable_tqdm)
        return self._loglikelihood_tokens(new_reqs, task_names=tasks, doc_ids=docs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, task_names=None, doc_ids=None, disable_tqdm: bool = False, **kwargs):
        """``[((ctx_str, cont_str), ctx_ids, cont_ids)] -> [(-NELBO summed over cont, is_greedy)]``.

        ``ctx_ids`` excludes BOS (prepended here). An empty continuation scores exactly 0.0 (log 1).
        """
        task_names = task_names or [None] * len(requests)
        windows, owner = [], []
        for r, (_, ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                continue
            for w in self._windows_for(list(ctx), list(cont)):
                windows.append(w)
                owner.append(r)
        nelbo, se = self._score_windows(windows, disable_tqdm) if windows else (torch.zeros(0), torch.zeros(0))
        ll = [0.0] * len(requests)
        var = [0.0] * len(requests)
        for w, r in enumerate(owner):
            ll[r] -= float(nelbo[w])
            var[r] += float(se[w]) ** 2 if math.isfinite(float(se[w])) else float("nan")
        greedy = self._is_greedy(requests) if self.greedy_check == "onepass" else [False] * len(requests)
        for r, (_, _, cont) in enumerate(requests):
            if len(cont):
                self._record(task_names[r], -ll[r], math.sqrt(var[r]), len(cont))
        self._count_decisions(task_names, doc_ids, ll, [math.sqrt(v) for v in var])
        self._flush_mc_summary("loglikelihood")
        return [(ll[r], bool(greedy[r]) and math.isfinite(ll[r])) for r in range(len(requests))]

    def _official_loglikelihood(self, requests, task_names, doc_ids, disable_tqdm: bool = False):
        """``likelihood=official`` / ``official_suffix``: the official harness' score (see the class docstring)."""
        from duo_plugin.eval.likelihood import official_harness_nll

        mode = "full" if self.likelihood == "official" else "suffix"
        out, lls, ses, skipped = [], [], [], 0
        bar = self._bar(len(requests), "duo: scoring (official)", disable_tqdm)
        for r, (_, ctx, cont) in enumerate(requests):
            prefix = [self.prefix_token_id] + list(ctx)
            target = list(cont) + [self.eot_token_id]
            if len(prefix) + len(target) > self.max_length:
                skipped += 1  # the official harness scores these 0.0 / not greedy
                out.append((0.0, False))
                lls.append(0.0)
                ses.append(float("nan"))
            else:
                nll, se = official_harness_nll(
                    self.denoiser, prefix, target, mode=mode, mc_samples=self.mc_samples, batch_size=self.batch_size,
                    seed=self.seed, index=request_index(prefix + target, "official"), valid_vocab=self.valid_vocab,
                    schedule=self.schedule, t_min=self.t_min, device=self._device)
                greedy = self._official_is_greedy(prefix, target) if self.greedy_check == "onepass" else False
                out.append((-nll, bool(greedy) and math.isfinite(nll)))
                lls.append(-nll)
                ses.append(se)
                self._record(task_names[r], nll, se, len(target))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if skipped:
            log.warning("duo (likelihood=%s): %d request(s) longer than max_length=%d scored 0.0 as the official "
                        "harness does", self.likelihood, skipped, self.max_length)
        self._count_decisions(task_names, doc_ids, lls, ses)
        self._flush_mc_summary("loglikelihood")
        return out

    @torch.no_grad()
    def _official_is_greedy(self, prefix: List[int], target: List[int]) -> bool:
        """The official one-pass check: target replaced by uniform noise except its final [EOS], the network
        conditioned on the realised clean fraction, argmax at every target position."""
        from duo_plugin.diffusion.uniform import prior_sample, row_generators

        ids = torch.tensor(prefix + target, dtype=torch.long, device=self._device)
        gen = row_generators(self.seed, (1 << 42) + 1, [request_index(ids.tolist())], device=self._device)
        z = ids.clone()[None]
        z[0, len(prefix):] = prior_sample((1, len(target)), self.vocab_size, gen, valid_vocab=self.valid_vocab,
                                          device=self._device)[0]
        z[0, -1] = ids[-1]
        alpha = (z[0] == ids).to(torch.float64).mean()[None]
        logp = self.denoiser(z, (-torch.log(alpha)).to(torch.float32))
        if self.valid_vocab is not None:
            logp = logp.masked_fill(~self.valid_vocab, float("-inf"))
        return bool((logp[0, len(prefix):].argmax(-1) == ids[len(prefix):]).all())

    @torch.no_grad()
    def _is_greedy(self, requests) -> List[bool]:
        """Is the continuation the model's greedy choice? AR: argmax of the next-token distribution at every
        continuation position (exact). Diffusion: one pass at t = 1 with the continuation replaced by seeded uniform
        noise and the context clean; the network is conditioned on the effective clean fraction
        α_eff = (n_ctx + α_1 · n_cont) / n (see the module doc). The checks of all requests are packed into
        forwards of at most ``max_batch_tokens`` padded tokens (right padding, ``padding_mask``); each request's
        noise comes from its own generator, so the result does not depend on the batch."""
        from duo_plugin.diffusion.uniform import prior_sample, row_generators
        from duo_plugin.eval.likelihood import effective_alpha

        out = [True] * len(requests)
        t1 = torch.ones(1, dtype=torch.float64)
        alpha1 = self.schedule.alpha(t1)
        room = self._window_room()
        todo = []  # (request, ids Long[n], n_keep)
        for r, (_, ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                continue
            if len(cont) + 1 > room:
                out[r] = False  # cannot be produced in one window
                continue
            kept, _ = truncate_left(list(ctx), list(cont), room, 1)
            ids = torch.tensor([self.prefix_token_id] + kept + list(cont), dtype=torch.long)
            if bool((ids >= self.vocab_size).any()):
                out[r] = False
                continue
            todo.append((r, ids, 1 + len(kept)))
        if self.is_ar:
            windows = [(ids.tolist(), n_keep, 0, 0) for _, ids, n_keep in todo]
            preds = self._ar_argmax_windows(windows)
            for (r, ids, n_keep), ok in zip(todo, preds):
                out[r] = ok
            return out
        todo.sort(key=lambda e: -e[1].numel())
        for batch in pack_rows([e[1].numel() for e in todo], self.max_rows, self.max_batch_tokens):
            items = [todo[j] for j in batch]
            width = max(e[1].numel() for e in items)
            z = torch.zeros(len(items), width, dtype=torch.long)
            real = torch.zeros(len(items), width, dtype=torch.bool)
            n_keep = torch.tensor([e[2] for e in items])
            n_cont = torch.tensor([e[1].numel() - e[2] for e in items])
            for j, (r, ids, nk) in enumerate(items):
                gen = row_generators(self.seed, (1 << 42), [request_index(ids.tolist())], device=self._device)
                if self.process is not None:  # the process's own t = 1 draw (absorbing: every position [MASK])
                    noise = self.process.prior_sample((1, ids.numel() - nk), gen, device=self._device)
                else:
                    noise = prior_sample((1, ids.numel() - nk), self.vocab_size, gen, valid_vocab=self.valid_vocab,
                                         device=self._device)
                z[j, : ids.numel()] = ids
                z[j, nk : ids.numel()] = noise[0].cpu()
                real[j, : ids.numel()] = True
            sigma = (-torch.log(effective_alpha(alpha1, n_keep, n_cont))).to(torch.float32).to(self._device)
            cont = torch.zeros_like(real)
            for j, (r, ids, nk) in enumerate(items):
                cont[j, nk : ids.numel()] = True
            rr, pp = cont.nonzero(as_tuple=True)
            logp = log_probs_at(self.denoiser, z.to(self._device), sigma,
                                 None if bool(real.all()) else real.to(self._device), rr.to(self._device),
                                 pp.to(self._device))
            if self.process is not None:  # the process's parameterisation (MDLM SUBS: never [MASK], valid ids)
                logp = self.process.subs(logp[None], z[rr, pp].to(self._device)[None])[0]
            elif self.valid_vocab is not None:
                logp = logp.masked_fill(~self.valid_vocab, float("-inf"))
            hit = (logp.argmax(-1).cpu() == torch.cat([e[1][e[2]:] for e in items])).tolist()
            lo = 0
            for j, (r, ids, nk) in enumerate(items):
                out[r] = all(hit[lo : lo + ids.numel() - nk])
                lo += ids.numel() - nk
        return out

    @torch.no_grad()
    def _ar_argmax_windows(self, windows) -> List[bool]:
        """AR greedy check of each window ``(ids, n_keep, _, _)``: is every scored token the argmax of the causal
        next-token distribution? Batched with right padding under the token budget (exact for a causal model)."""
        k = int(self.vocab_size)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        res = [False] * len(windows)
        for batch in pack_rows([len(windows[i][0]) for i in order], self.max_rows, self.max_batch_tokens):
            idx = [order[j] for j in batch]
            width = max(len(windows[i][0]) for i in idx)
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(windows[i][0])] = torch.tensor(windows[i][0], dtype=torch.long)
            pred = self._ar_log_probs(x.clamp(0, k - 1)).argmax(-1).cpu()
            for r, i in enumerate(idx):
                ids, n_keep = windows[i][0], windows[i][1]
                res[i] = bool((pred[r, n_keep - 1 : len(ids) - 1] == torch.tensor(ids[n_keep:])).all())
        return res

    def _count_decisions(self, task_names, doc_ids, ll, se) -> None:
        """Multiple-choice decisions (requests sharing a task and ``doc_id``): count those whose top-2 margin is
        within 1.96 MC standard errors of the difference (the choice could flip with other MC noise)."""
        if doc_ids is None:
            return
        groups: Dict[Tuple[str, int], List[int]] = defaultdict(list)
        for r, d in enumerate(doc_ids):
            if d is not None:
                groups[(task_names[r] or "unknown", d)].append(r)
        for (task, _), rs in groups.items():
            if len(rs) < 2:
                continue
            top = sorted(rs, key=lambda r: -ll[r])[:2]
            margin = ll[top[0]] - ll[top[1]]
            noise = math.sqrt(se[top[0]] ** 2 + se[top[1]] ** 2)
            c = self._mc_decisions[task]
            c[0] += 1
            c[1] += int(math.isfinite(noise) and margin <= 1.96 * noise) if math.isfinite(margin) else 0

    # --- rolling --------------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Sum over rolling windows of ``-conditional NELBO``: every document token scored once (module doc)."""
        windows, owner, tasks = [], [], []
        for r, req in enumerate(requests):
            (text,) = req.args[:1]
            toks = self.tok_encode(text)
            tasks.append(getattr(req, "task_name", None))
            for w in self._rolling(toks, first=0, tag="rolling"):
                windows.append(w)
                owner.append(r)
        nelbo, se = self._score_windows(windows, disable_tqdm) if windows else (torch.zeros(0), torch.zeros(0))
        ll = [0.0] * len(requests)
        var = [0.0] * len(requests)
        ntok = [0] * len(requests)
        for w, r in enumerate(owner):
            ll[r] -= float(nelbo[w])
            var[r] += float(se[w]) ** 2
            ntok[r] += len(windows[w][0]) - windows[w][1] - windows[w][3]
        for r in range(len(requests)):
            self._record(tasks[r], -ll[r], math.sqrt(var[r]), ntok[r])
        self._flush_mc_summary("loglikelihood_rolling")
        return ll

    # --- generation -----------------------------------------------------------------------------------------
    def _decoding(self, do_sample, temperature) -> Tuple[float, float, str]:
        """``(temperature, top_p, noise_removal)`` for one request's gen_kwargs (see the class docstring)."""
        greedy = (do_sample is not None and not do_sample) or (temperature is not None and float(temperature) == 0.0)
        if greedy:
            if not self._greedy_logged:
                self._greedy_logged = True
                log.warning(
                    "duo: do_sample=false / temperature=0 requested: using diffusion 'greedy' decoding (argmax of "
                    "x_theta before each posterior step, top_p=%g, Greedy-Tail noise removal). This is NOT "
                    "autoregressive greedy decoding: the posterior still mixes in seeded uniform noise.", GREEDY_TOP_P)
            return 1.0, GREEDY_TOP_P, "greedy"
        temp = 1.0 if temperature is None else float(temperature)
        if not temp > 0:
            raise ValueError(f"generate_until: temperature must be >= 0, got {temperature!r}")
        return temp, 1.0, self.noise_removal

    @torch.no_grad()
    def _ar_generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """AR models: token-by-token decoding from ``[BOS] + context`` (greedy for ``do_sample: false`` /
        ``temperature: 0``, else float64 categorical sampling at ``temperature`` seeded per request), cut at EOS
        and at the first stop string."""
        from duo_plugin.diffusion.uniform import row_generators

        out = []
        bar = self._bar(len(requests), "duo: generating (AR)", disable_tqdm)
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if not 1 <= max_gen <= self.max_length - 1:
                raise ValueError(f"max_gen_toks={max_gen} must lie in [1, {self.max_length - 1}] for this model")
            do_sample, temperature = kw.pop("do_sample", None), kw.pop("temperature", None)
            greedy = (do_sample is not None and not do_sample) or (temperature is not None and float(temperature) == 0)
            temp = 1.0 if temperature is None or greedy else float(temperature)
            ctx = self.tok_encode(context) if context else []
            ctx = ctx[max(0, len(ctx) - (self.max_length - 1 - max_gen)):]
            ids = [self.prefix_token_id] + ctx
            gen = row_generators(self.seed, 1 << 44, [request_index(ids, f"ar{max_gen}")])[0]
            new: List[int] = []
            for _ in range(max_gen):
                logp = self._ar_log_probs(torch.tensor([ids + new]))[0, -1].cpu()
                if greedy:
                    nxt = int(logp.argmax())
                else:
                    nxt = int(torch.multinomial(torch.softmax(logp / temp, -1), 1, generator=gen))
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Sample continuations with the project's sampler; the prompt ``[BOS] + context`` is clamped."""
        from duo_plugin.diffusion.uniform import row_generators
        from duo_plugin.sampling import sample, sample_blocks

        if self.is_ar:
            return self._ar_generate_until(requests, disable_tqdm)
        if self.process is not None:
            raise ValueError(f"generate_until is not available for {self.process_spec.kind} ({type(self.process).__name__})"
                             " models in the duo backend (no prompt-clamped sampler); sample them with "
                             "duo_plugin.sampling.mdlm.sample_mdlm, score them with loglikelihood tasks")
        prepared = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if max_gen < 1 or (self.block_len is None and max_gen > self.max_length - 1):
                raise ValueError(f"max_gen_toks={max_gen} must lie in [1, {self.max_length - 1}] for this model "
                                 "(set block_len in --model_args to generate beyond the window)")
            decoding = self._decoding(kw.pop("do_sample", None), kw.pop("temperature", None))
            ctx = self.tok_encode(context) if context else []
            room = self.max_length - 1 - (max_gen if self.block_len is None else min(max_gen, self.block_len))
            ctx = ctx[max(0, len(ctx) - room):]
            prompt = [self.prefix_token_id] + ctx
            prepared.append((prompt, max_gen, until, decoding))
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[Tuple[int, int, Tuple[float, float, str]], List[int]] = defaultdict(list)
        for i, (prompt, g, _, decoding) in enumerate(prepared):
            groups[(len(prompt), g, decoding)].append(i)
        for (p_len, g, (temp, top_p, mode)), members in groups.items():
            chunk = max(1, self.batch_size)
            for lo in range(0, len(members), chunk):
                mem = members[lo : lo + chunk]
                prompts = torch.tensor([prepared[i][0] for i in mem], dtype=torch.long)
                gens = row_generators(
                    self.seed, 1 << 43, [request_index(prepared[i][0], f"gen{g}") for i in mem], device=self._device
                )
                kw = dict(batch_size=len(mem), vocab_size=self.vocab_size, steps=self.gen_steps, noise_removal=mode,
                          temperature=temp, top_p=top_p, prompt=prompts, valid_vocab=self.valid_vocab, generator=gens,
                          device=self._device, progress=False, **self.sampler_kwargs)
                if p_len + g <= self.max_length:
                    toks = sample(self.denoiser, self.schedule, seq_len=p_len + g, **kw)
                else:  # beyond the window: stride windows of block_len new tokens, stop when all rows hit EOS
                    n_blocks = -(-(p_len + g - self.max_length) // self.block_len)
                    toks = sample_blocks(self.denoiser, self.schedule, seq_len=self.max_length, n_blocks=n_blocks,
                                         block_len=self.block_len, eos_id=self.eot_token_id, **kw).tokens
                    toks = toks[:, : p_len + g]
                for r, i in enumerate(mem):
                    new = toks[r, p_len:].tolist()
                    if self.eot_token_id in new:
                        new = new[: new.index(self.eot_token_id)]
                    text = self.tok_decode(new)
                    for stop in prepared[i][2]:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[i] = text
        return results  # type: ignore[return-value]

    # --- MC standard error summary --------------------------------------------------------------------------
    def estimator(self) -> str:
        """One line naming the estimator behind every number this backend returns."""
        if self.is_ar:
            return "exact causal log-likelihood (AR model, no Monte Carlo)"
        if self.likelihood != "nelbo":
            return (f"official-harness score ({self.likelihood}: -mean per-token f_Duo), M={self.mc_samples} "
                    f"stratified times")
        m = (f"adaptive M (rounds of {self.mc_samples} until the MC stderr < {self.mc_target_stderr:g} nats, at most "
             f"{self.mc_max_samples or 32 * self.mc_samples})" if self.mc_target_stderr is not None
             else f"M={self.mc_samples}")
        integrand = "f_Duo" if self.process is None else f"{self.process_spec.kind} NELBO, {type(self.process).__name__}"
        return (f"-conditional NELBO ({integrand}, log-linear alpha, network conditioned on {self.conditioning}), {m} "
                f"{self.time_sampling} times per request")

    def mc_summary(self) -> Dict[str, dict]:
        """Per task: number of scored items, mean NELBO, mean / RMS / max MC standard error of the summed
        log-likelihoods, the standard error of the task's total (sqrt of the summed variances), in nats; the number
        of multiple-choice decisions and the fraction whose top-2 margin is within 1.96 MC standard errors of the
        difference; the estimator and the MC sample counts."""
        out = {}
        used = self._mc_used
        for task, rec in sorted(self._mc_records.items()):
            se = [s for _, s, _ in rec if math.isfinite(s)]
            dec = self._mc_decisions.get(task, [0, 0])
            out[task] = {
                "n": len(rec),
                "tokens": int(sum(n for _, _, n in rec)),
                "mean_nelbo": sum(v for v, _, _ in rec) / max(1, len(rec)),
                "mean_stderr": (sum(se) / len(se)) if se else float("nan"),
                "rms_stderr": math.sqrt(sum(s * s for s in se) / len(se)) if se else float("nan"),
                "max_stderr": max(se) if se else float("nan"),
                "total_stderr": math.sqrt(sum(s * s for s in se)) if se else float("nan"),
                "mc_samples": self.mc_samples,
                "mc_samples_mean": (sum(used) / len(used)) if used else (0 if self.is_ar else self.mc_samples),
                "mc_target_stderr": self.mc_target_stderr,
                "time_sampling": self.time_sampling,
                "conditioning": self.conditioning,
                "likelihood": "ar" if self.is_ar else self.likelihood,
                "estimator": self.estimator(),
                "decisions": dec[0],
                "decisions_within_noise": dec[1],
                "frac_decisions_within_noise": (dec[1] / dec[0]) if dec[0] else None,
            }
        return out

    def _flush_mc_summary(self, kind: str) -> None:
        summary = self.mc_summary()
        for task, s in summary.items():
            if self.is_ar:
                log.info("duo [%s] %s: n=%d, %s", kind, task, s["n"], s["estimator"])
                continue
            log.info(
                "duo MC stderr [%s] %s: n=%d mean=%.4g rms=%.4g max=%.4g nats (%s)",
                kind, task, s["n"], s["mean_stderr"], s["rms_stderr"], s["max_stderr"], s["estimator"],
            )
            if s["decisions"]:
                level = logging.WARNING if s["frac_decisions_within_noise"] > 0.05 else logging.INFO
                log.log(level,
                        "duo MC noise [%s] %s: %d of %d multiple-choice decisions (%.0f%%) have a top-2 margin within "
                        "1.96 MC standard errors of the difference (mean MC stderr %.3g nats, %s); raise mc_samples "
                        "or set mc_target_stderr", kind, task, s["decisions_within_noise"], s["decisions"],
                        100 * s["frac_decisions_within_noise"], s["mean_stderr"], s["estimator"])
        if self.mc_stderr_path:
            p = Path(self.mc_stderr_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(tmp, p)
