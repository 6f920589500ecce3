"""One entry point for the evaluation metrics of a model: :func:`compute_metrics` (docs/evaluation.md §6).

* **Gen PPL + entropy** of generated samples: the samples are passed in (``samples``) or drawn by a function passed
  in (``sample_fn``; evaluation never imports a sampler), re-tokenised and scored by a causal LM
  (:func:`~duo_plugin.eval.genppl.gen_ppl_and_entropy`); without a scorer only the unigram entropy is reported.
* **NELBO perplexity** of a split (:func:`~duo_plugin.eval.likelihood.nelbo_perplexity`) under the model's noise
  process.
* **MC summaries** of request scoring (a :class:`~duo_plugin.eval.scoring.RequestScorer` or
  :class:`~duo_plugin.eval.summary.MCRecorder`).

Recipes (``duo_eval``), the distillation quality table and the benchmarks call this one function with the parts
they need; each part's result is the dict its estimator returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["GenPPLSpec", "NelboSpec", "compute_metrics"]


@dataclass(frozen=True)
class GenPPLSpec:
    """How generated samples are scored: ``scorer(tokens Long[B, T]) -> logits`` (a causal LM), its tokenizer and
    EOS/BOS ids, the diffusion tokenizer that decodes the samples, rows per scorer call, the re-tokenised length cap
    and the scorer's label (None: only the entropy is computed)."""

    diffusion_tokenizer: Any
    scorer: Optional[Callable] = None
    scorer_tokenizer: Any = None
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    batch_size: Optional[int] = None
    max_len: int = 1024
    name: Optional[str] = None


@dataclass(frozen=True)
class NelboSpec:
    """A split to evaluate with :func:`~duo_plugin.eval.likelihood.nelbo_perplexity`: the denoiser, the blocks
    ``Long[N, L]`` (and ``attention_mask``), and the estimator's keyword options (``process``, ``batch_size``,
    ``mc_passes``, ``seed``, ``valid_vocab``, ``special_ids``, ``pad_mode``, ``progress`` ...)."""

    denoiser: Callable
    blocks: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    options: dict = field(default_factory=dict)


def _gen_ppl(samples: torch.Tensor, spec: GenPPLSpec) -> dict:
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, unigram_entropy

    if spec.scorer is None:
        ent = unigram_entropy(samples)
        return {"gen_ppl": None, "gen_nll": None, "entropy": float(ent.mean()), "entropy_per_sample": ent.tolist(),
                "n_samples": int(samples.shape[0]), "scorer": None, "estimator": "unigram entropy only (no scorer)"}
    if spec.scorer_tokenizer is None or spec.eos_id is None:
        raise ValueError("Gen PPL needs scorer_tokenizer and eos_id together with the scorer")
    return gen_ppl_and_entropy(samples, diffusion_tokenizer=spec.diffusion_tokenizer, scorer=spec.scorer,
                               scorer_tokenizer=spec.scorer_tokenizer, eos_id_scorer=int(spec.eos_id),
                               batch_size=spec.batch_size, max_len=int(spec.max_len), bos_id_scorer=spec.bos_id,
                               name=spec.name)


def compute_metrics(*, samples: Optional[torch.Tensor] = None, sample_fn: Optional[Callable[[], torch.Tensor]] = None,
                    genppl: Optional[GenPPLSpec] = None, nelbo: Optional[NelboSpec] = None,
                    mc: Optional[Any] = None) -> dict:
    """The requested metrics in one dict: ``gen`` (Gen PPL + entropy, with ``sample_seconds`` when ``sample_fn``
    drew the samples), ``nelbo`` (the split's NELBO perplexity dict), ``mc`` (per-task MC summaries).

    Args:
        samples: ``Long[N, L]`` generated ids; or ``sample_fn()`` returning them (timed). genppl: how to score them
            (required with samples). nelbo: a split to evaluate. mc: a ``RequestScorer`` / ``MCRecorder`` (its
            ``mc_summary()`` / ``summary()``) or an already computed summary dict.
    """
    if samples is not None and sample_fn is not None:
        raise ValueError("pass samples or sample_fn, not both")
    out: dict = {}
    if samples is not None or sample_fn is not None:
        if genppl is None:
            raise ValueError("Gen PPL needs genppl=GenPPLSpec(diffusion_tokenizer, scorer, ...)")
        t0 = time.perf_counter()
        ids = samples if samples is not None else sample_fn()
        drawn = time.perf_counter() - t0
        out["gen"] = _gen_ppl(torch.as_tensor(ids).cpu(), genppl)
        if sample_fn is not None:
            out["gen"]["sample_seconds"] = drawn
    if nelbo is not None:
        from duo_plugin.eval.likelihood import nelbo_perplexity

        out["nelbo"] = nelbo_perplexity(nelbo.denoiser, nelbo.blocks, nelbo.attention_mask, **nelbo.options)
    if mc is not None:
        out["mc"] = mc if isinstance(mc, dict) else (mc.mc_summary() if hasattr(mc, "mc_summary") else mc.summary())
    return out
