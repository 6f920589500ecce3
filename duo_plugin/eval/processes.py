"""Which noise process scores a model folder: one lookup from its metadata, used by every evaluation entry point.

A model folder records the objective it was trained with (``metadata.objective`` in ``duo_config.json``, written by
duo_pretrain / duo_distill); the table objective → process is :mod:`duo_plugin.diffusion.model_process` (one table,
shared with sampling's ``scheduler_for_model``). Causal (``ar``) models have no noise process: their
log-likelihood is exact.

Recipes and backends call :func:`process_for` once and pass ``spec.process`` on; they never branch on the objective.
Every diffusion model gets a process object (``corrupt``, ``nelbo``, ``sigma``, ``prior_sample``, ``subs``); only
the causal kind has none (exact log-likelihood, no noise).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch

from duo_plugin.diffusion.model_process import OBJECTIVE_KINDS, process_for_metadata

__all__ = ["EvalProcess", "OBJECTIVE_KINDS", "check_scorable", "process_for", "process_for_model"]


class EvalProcess(NamedTuple):
    """``kind``: ``uniform`` | ``absorbing`` | ``sedd`` | ``d3pm`` | ``causal``; ``process``: the noise process passed
    as ``process=`` to ``eval.likelihood`` (None only for ``causal``); ``mask_id``: the [MASK] id (absorbing
    graphs only)."""

    kind: str
    process: Any = None
    mask_id: Optional[int] = None


def process_for(metadata: Optional[Mapping], *, vocab_size: int, valid_vocab: Optional[torch.Tensor] = None,
                causal: bool = False, schedule=None, where: str = "the model") -> EvalProcess:
    """The evaluation process of a model folder from its ``metadata`` (``model.duo_metadata``): the one table of
    :func:`duo_plugin.diffusion.model_process.process_for_metadata` (shared with sampling), with the [MASK] id.

    Args:
        metadata: the folder's metadata dict (``objective``, optionally ``mask_id``); None/empty = a uniform-state
            model (or causal when ``causal``).
        vocab_size: the model's output width W. valid_vocab: ``Bool[W]`` ids the data may hold (or None).
        causal: the model was built causal (``model.causal``). schedule: α_t of the process (default
            log-linear, ε = 1e-3).
    Raises:
        ValueError naming the objective when it has no evaluation path, or when the metadata and the model's causal
        flag disagree.
    """
    mp = process_for_metadata(metadata, vocab_size=vocab_size, valid_vocab=valid_vocab, causal=causal,
                              schedule=schedule, where=where)
    mask_id = getattr(mp.process, "mask_id", None)
    return EvalProcess(mp.kind, mp.process, None if mask_id is None else int(mask_id))


def process_for_model(model, where: Optional[str] = None, schedule=None) -> EvalProcess:
    """:func:`process_for` of a loaded model (``duo_metadata``, ``vocab_size``, ``valid_vocab``, ``causal``)."""
    vv = getattr(model, "valid_vocab", None)
    return process_for(getattr(model, "duo_metadata", None), vocab_size=int(model.vocab_size),
                       valid_vocab=vv if isinstance(vv, torch.Tensor) else None,
                       causal=bool(getattr(model, "causal", False)), schedule=schedule,
                       where=where or type(model).__name__)


def check_scorable(model, name=None) -> bool:
    """``True`` for a causal (AR-objective) model, ``False`` for a diffusion denoiser; ``ValueError`` for anything
    the evaluation cannot score (no integer ``vocab_size`` / ``max_seq_len``, or metadata contradicting the
    architecture)."""
    what = f"{name}" if name is not None else type(model).__name__
    for attr in ("vocab_size", "max_seq_len"):
        if not isinstance(getattr(model, attr, None), int):
            raise ValueError(f"{what} is not a model the duo backend can score: it has no integer .{attr} (expected a "
                             "duo_plugin model directory: a Duo denoiser or an objective=ar DiT)")
    objective = str((getattr(model, "duo_metadata", None) or {}).get("objective", "") or "")
    causal = bool(getattr(model, "causal", False))
    if objective == "ar" and not causal:
        raise ValueError(f"{what}: metadata says objective=ar but the model is not causal; cannot score it")
    if causal and objective not in ("", "ar"):
        raise ValueError(f"{what}: a causal model trained with objective={objective!r}; the duo backend scores "
                         "causal models only as AR (next-token) models")
    return causal
