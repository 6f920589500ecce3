"""Scoring text requests with a model folder's own process, without lm-eval (docs/evaluation.md §2-5).

:class:`RequestScorer` is the library behind ``lm_eval --model duo``: token-id requests in, scores out.

* :meth:`RequestScorer.loglikelihood`: ``[(context ids, continuation ids)] -> [(log-likelihood, is_greedy)]`` --
  ``-`` the conditional NELBO of the continuation given ``[BOS] + context`` (kept clean) under the model's noise
  process (:func:`~duo_plugin.eval.likelihood.conditional_nelbo_ragged`), the one-pass greedy check
  (:mod:`duo_plugin.eval.greedy`); exact causal scores for an AR model (:mod:`duo_plugin.eval.causal`); or the
  official Duo harness' score (``likelihood=official*``).
* :meth:`RequestScorer.loglikelihood_rolling`: a document's bound over rolling windows (every token once).

All windows of a call are scored together: their rows (window × MC sample) are sorted by length and packed into
forwards of at most ``max_batch_tokens`` padded tokens, each row's noise keyed by (seed, request hash, sample), so a
score does not depend on its batch neighbours. Progress: a bar on a terminal, else a line with an ETA every 30 s.
MC standard errors and multiple-choice decisions are recorded in an :class:`~duo_plugin.eval.summary.MCRecorder`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from duo_plugin._progress import Eta
from duo_plugin.eval.causal import ar_argmax_windows, ar_windows_nll
from duo_plugin.eval.greedy import official_onepass_greedy, onepass_greedy
from duo_plugin.eval.likelihood import (
    CONDITIONING_MODES,
    conditional_nelbo_ragged,
    default_max_batch_tokens,
    official_harness_nll,
)
from duo_plugin.eval.mc import MCPolicy
from duo_plugin.eval.summary import MCRecorder
from duo_plugin.eval.windows import Window, WindowSpec, request_index, truncate_left
from duo_plugin.models.denoiser import DenoiserFn

__all__ = ["ScoringConfig", "RequestScorer", "LIKELIHOOD_MODES", "GREEDY_CHECKS"]

log = logging.getLogger("duo_plugin.eval")

#: ``nelbo`` (the conditional NELBO summed over the continuation), ``official`` (the official harness'
#: ``loss_avg_mode=full``: −mean f over the whole noised ``[BOS] + context + continuation + [EOS]``),
#: ``official_suffix`` (its ``loss_avg_mode=suffix``).
LIKELIHOOD_MODES = ("nelbo", "official", "official_suffix")
GREEDY_CHECKS = ("onepass", "off")


@dataclass(frozen=True)
class ScoringConfig:
    """How requests are scored (every field has the lm-eval backend's default).

    Attributes:
        mc: the Monte Carlo policy (:class:`~duo_plugin.eval.mc.MCPolicy`: M, time sampling, two-stage target).
        likelihood: one of :data:`LIKELIHOOD_MODES`. conditioning: ``alpha_t`` | ``clean_fraction``.
        greedy_check: ``onepass`` | ``off``. seed: noise seed. t_min: smallest time.
        max_rows: rows per scoring forward (None = only the token budget caps a call).
        max_batch_tokens: padded tokens per forward (None = by device type). official_batch_size: rows per
            official-mode call. progress: bar / ETA lines. weights: label of the weights scored (``ema`` | ``raw``).
    """

    mc: MCPolicy = field(default_factory=MCPolicy)
    likelihood: str = "nelbo"
    conditioning: str = "alpha_t"
    greedy_check: str = "onepass"
    seed: int = 0
    t_min: float = 1e-3
    max_rows: Optional[int] = None
    max_batch_tokens: Optional[int] = None
    official_batch_size: int = 64
    progress: bool = True
    weights: str = "as given"

    def __post_init__(self):
        if self.likelihood not in LIKELIHOOD_MODES:
            raise ValueError(f"likelihood must be one of {LIKELIHOOD_MODES}, got {self.likelihood!r}")
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be 'alpha_t' or 'clean_fraction', got {self.conditioning!r}")
        if self.greedy_check not in GREEDY_CHECKS:
            raise ValueError(f"greedy_check must be 'onepass' or 'off', got {self.greedy_check!r}")
        if self.max_batch_tokens is not None and int(self.max_batch_tokens) < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")


class RequestScorer:
    """Scores token-id requests with one model (see the module docstring).

    Args:
        model: the loaded model (``vocab_size``, ``max_seq_len``; a denoiser or a causal model).
        process: the model folder's :class:`~duo_plugin.eval.processes.EvalProcess` (``process_for_model``).
        windows: the :class:`~duo_plugin.eval.windows.WindowSpec` (BOS/EOS ids, window, rolling context; its
            ``causal`` flag is set from ``process``).
        config: :class:`ScoringConfig`. pad_id: the id padding AR batches (default EOS). device: where to run.
        autocast: ``None`` | ``"bf16"`` (CUDA only).
    """

    def __init__(self, model, process, windows: WindowSpec, config: ScoringConfig = ScoringConfig(), *,
                 pad_id: Optional[int] = None, device=None, autocast=None):
        self.is_ar = process.kind == "causal"
        if windows.causal != self.is_ar:  # the windows follow the model (an AR model uses the whole window)
            windows = dataclasses.replace(windows, causal=self.is_ar)
        self.model, self.spec, self.windows, self.config = model, process, windows, config
        self.process = process.process
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.denoiser = DenoiserFn(model, autocast)
        self.vocab_size = int(model.vocab_size)
        vv = getattr(model, "valid_vocab", None)
        self.valid_vocab = vv.to(self.device).bool() if isinstance(vv, torch.Tensor) else None
        self.pad_id = int(windows.eos if pad_id is None else pad_id)
        self.max_batch_tokens = (int(config.max_batch_tokens) if config.max_batch_tokens is not None
                                 else default_max_batch_tokens(self.device))
        if self.process is not None and not self.is_ar and config.likelihood != "nelbo" and \
                self.spec.kind != "uniform":
            raise ValueError(f"likelihood={config.likelihood!r} reproduces the official Duo (uniform-state) harness; "
                             f"this is a {self.spec.kind} ({type(self.process).__name__}) model: use likelihood=nelbo")
        self.recorder = MCRecorder(self.labels(), causal=self.is_ar)

    # --- labels ---------------------------------------------------------------------------------------------
    def estimator(self) -> str:
        """One line naming the estimator behind every number returned."""
        c = self.config
        if self.is_ar:
            return "exact causal log-likelihood (AR model, no Monte Carlo)"
        if c.likelihood != "nelbo":
            return (f"official-harness score ({c.likelihood}: -mean per-token f_Duo), M={c.mc.samples} stratified "
                    f"times, {c.weights} weights")
        integrand = "f_Duo" if self.spec.kind == "uniform" else \
            f"{self.spec.kind} NELBO, {type(self.process).__name__}"
        return (f"-conditional NELBO ({integrand}, log-linear alpha, network conditioned on {c.conditioning}), "
                f"{c.mc.describe()}, {c.weights} weights")

    def labels(self) -> dict:
        c = self.config
        return {"mc_samples": c.mc.samples, "mc_target_stderr": c.mc.target_stderr,
                "mc_policy": "exact" if self.is_ar else ("two-stage" if c.mc.adaptive else "fixed"),
                "time_sampling": c.mc.time_sampling, "conditioning": c.conditioning,
                "likelihood": "ar" if self.is_ar else c.likelihood, "weights": c.weights,
                "estimator": self.estimator()}

    def mc_summary(self) -> dict:
        return self.recorder.summary()

    # --- windows ----------------------------------------------------------------------------------------------
    def score_windows(self, windows: Sequence[Window], progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(nelbo[N], stderr[N])`` float64 of each window: positions ``< n_keep`` and the last ``n_tail`` kept
        clean and not scored; all windows packed together. AR models: exact causal NLL, stderr 0."""
        c = self.config
        n = len(windows)
        if n == 0:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        if self.is_ar:
            nll = ar_windows_nll(self.model, windows, vocab_size=self.vocab_size, pad_id=self.pad_id,
                                 valid_vocab=self.valid_vocab, max_rows=c.max_rows,
                                 max_batch_tokens=self.max_batch_tokens)
            return nll, torch.zeros(n, dtype=torch.float64)
        seqs, keeps = [], []
        for w in windows:
            keep = torch.zeros(len(w.ids), dtype=torch.bool)
            keep[: w.n_keep] = True
            keep[len(w.ids) - w.n_tail:] = True
            seqs.append(torch.tensor(w.ids, dtype=torch.long))
            keeps.append(keep)
        eta = Eta(c.progress and progress, n * c.mc.samples * (2 if c.mc.adaptive else 1), "duo: scoring",
                  unit="row")
        try:
            res = conditional_nelbo_ragged(
                self.denoiser, seqs, keeps, indices=[w.index for w in windows], mc_samples=c.mc.samples,
                max_rows=c.max_rows, max_batch_tokens=self.max_batch_tokens, seed=c.seed,
                valid_vocab=self.valid_vocab, t_min=c.t_min, device=self.device, conditioning=c.conditioning,
                time_sampling=c.mc.time_sampling, target_stderr=c.mc.target_stderr, max_mc_samples=c.mc.max_samples,
                on_batch=eta.update, process=self.process)
        finally:
            eta.close()
        self.recorder.samples_used.extend(int(v) for v in res.mc_samples)
        return res.nelbo.to(torch.float64), res.stderr.to(torch.float64)

    # --- requests ---------------------------------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], tasks=None, doc_ids=None,
                      progress: bool = True) -> List[Tuple[float, bool]]:
        """``[(ctx ids, cont ids)] -> [(-NELBO summed over cont, is_greedy)]`` (BOS is prepended here; an empty
        continuation scores exactly 0.0)."""
        tasks = list(tasks) if tasks is not None else [None] * len(pairs)
        if self.config.likelihood != "nelbo" and not self.is_ar:
            return self._official(pairs, tasks, doc_ids, progress)
        windows, owner = [], []
        for r, (ctx, cont) in enumerate(pairs):
            for w in (self.windows.for_request(list(ctx), list(cont)) if len(cont) else []):
                windows.append(w)
                owner.append(r)
        nelbo, se = self.score_windows(windows, progress)
        ll, var = [0.0] * len(pairs), [0.0] * len(pairs)
        for w, r in enumerate(owner):
            ll[r] -= float(nelbo[w])
            var[r] += float(se[w]) ** 2 if math.isfinite(float(se[w])) else float("nan")
        greedy = self.greedy(pairs) if self.config.greedy_check == "onepass" else [False] * len(pairs)
        for r, (_, cont) in enumerate(pairs):
            if len(cont):
                self.recorder.record(tasks[r], -ll[r], math.sqrt(var[r]), len(cont))
        self.recorder.count_decisions(tasks, doc_ids, ll, [math.sqrt(v) for v in var])
        return [(ll[r], bool(greedy[r]) and math.isfinite(ll[r])) for r in range(len(pairs))]

    def loglikelihood_rolling(self, docs: Sequence[Sequence[int]], tasks=None, progress: bool = True) -> List[float]:
        """Sum over rolling windows of ``-conditional NELBO``: every document token scored once."""
        tasks = list(tasks) if tasks is not None else [None] * len(docs)
        windows, owner = [], []
        for r, toks in enumerate(docs):
            for w in self.windows.rolling(list(toks), first=0, tag="rolling"):
                windows.append(w)
                owner.append(r)
        nelbo, se = self.score_windows(windows, progress)
        ll, var, ntok = [0.0] * len(docs), [0.0] * len(docs), [0] * len(docs)
        for w, r in enumerate(owner):
            ll[r] -= float(nelbo[w])
            var[r] += float(se[w]) ** 2
            ntok[r] += windows[w].n_scored
        for r in range(len(docs)):
            self.recorder.record(tasks[r], -ll[r], math.sqrt(var[r]), ntok[r])
        return ll

    @torch.no_grad()
    def greedy(self, pairs) -> List[bool]:
        """Is each continuation the model's greedy choice? AR: argmax at every continuation position (exact).
        Diffusion: :func:`~duo_plugin.eval.greedy.onepass_greedy`."""
        out = [True] * len(pairs)
        room = self.windows.room
        todo = []  # (request, ids Long[n], n_keep)
        for r, (ctx, cont) in enumerate(pairs):
            if len(cont) == 0:
                continue
            if len(cont) + 1 > room:
                out[r] = False  # cannot be produced in one window
                continue
            kept, _ = truncate_left(list(ctx), list(cont), room, 1)
            ids = torch.tensor([self.windows.bos] + kept + list(cont), dtype=torch.long)
            if bool((ids >= self.vocab_size).any()):
                out[r] = False
                continue
            todo.append((r, ids, 1 + len(kept)))
        c = self.config
        if self.is_ar:
            res = ar_argmax_windows(self.model, [Window(ids.tolist(), nk, 0, 0) for _, ids, nk in todo],
                                    vocab_size=self.vocab_size, valid_vocab=self.valid_vocab, max_rows=c.max_rows,
                                    max_batch_tokens=self.max_batch_tokens)
        else:
            res = onepass_greedy(self.denoiser, self.process, [(ids, nk) for _, ids, nk in todo], seed=c.seed,
                                 device=self.device, max_rows=c.max_rows, max_batch_tokens=self.max_batch_tokens)
        for (r, _, _), ok in zip(todo, res):
            out[r] = ok
        return out

    def _official(self, pairs, tasks, doc_ids, progress: bool = True):
        """``likelihood=official`` / ``official_suffix``: the official harness' score, request by request."""
        c = self.config
        mode = "full" if c.likelihood == "official" else "suffix"
        out, lls, ses, skipped = [], [], [], 0
        eta = Eta(c.progress and progress, len(pairs), "duo: scoring (official)", unit="request")
        for r, (ctx, cont) in enumerate(pairs):
            prefix = [self.windows.bos] + list(ctx)
            target = list(cont) + [self.windows.eos]
            if len(prefix) + len(target) > self.windows.max_length:
                skipped += 1  # the official harness scores these 0.0 / not greedy
                out.append((0.0, False))
                lls.append(0.0)
                ses.append(float("nan"))
            else:
                nll, se = official_harness_nll(
                    self.denoiser, prefix, target, mode=mode, mc_samples=c.mc.samples,
                    batch_size=c.official_batch_size, seed=c.seed, index=request_index(prefix + target, "official"),
                    valid_vocab=self.valid_vocab, t_min=c.t_min, device=self.device)
                greedy = c.greedy_check == "onepass" and official_onepass_greedy(
                    self.denoiser, self.process, prefix, target, seed=c.seed, device=self.device)
                out.append((-nll, bool(greedy) and math.isfinite(nll)))
                lls.append(-nll)
                ses.append(se)
                self.recorder.record(tasks[r], nll, se, len(target))
            eta.update(1)
        eta.close()
        if skipped:
            log.warning("duo (likelihood=%s): %d request(s) longer than max_length=%d scored 0.0 as the official "
                        "harness does", c.likelihood, skipped, self.windows.max_length)
        self.recorder.count_decisions(tasks, doc_ids, lls, ses)
        return out
