"""Which noise process scores a model folder: one lookup from its metadata, used by every evaluation entry point.

A model folder records the objective it was trained with (``metadata.objective`` in ``duo_config.json``, written by
duo_pretrain / duo_distill). Evaluation needs the matching noise process:

=================  ==========================================================================================
objective          evaluation path
=================  ==========================================================================================
``duo``, ``udlm``,  ``uniform``: :class:`~duo_plugin.diffusion.process.UniformProcess` over the folder's
                   ``valid_vocab`` (f_Duo)
``dcd``, missing
``mdlm``           ``absorbing``: :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess` with the folder's
                   ``[MASK]`` id (``metadata.mask_id``, default the last embedding row)
``ar``             ``causal``: exact next-token log-likelihood (no noise process)
=================  ==========================================================================================

Recipes and backends call :func:`process_for` once and pass ``spec.process`` on; they never branch on the objective.
Every diffusion model gets a process object (``corrupt``, ``nelbo``, ``sigma``, ``prior_sample``, ``subs``); only
the causal kind has none (exact log-likelihood, no noise).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch

__all__ = ["EvalProcess", "OBJECTIVE_KINDS", "check_scorable", "process_for", "process_for_model"]

#: objective name (model-folder metadata) -> evaluation path
OBJECTIVE_KINDS = {"duo": "uniform", "udlm": "uniform", "dcd": "uniform", "mdlm": "absorbing", "ar": "causal",
                   "sedd_absorb": "sedd", "sedd_uniform": "sedd", "d3pm": "d3pm"}


class EvalProcess(NamedTuple):
    """``kind``: ``uniform`` | ``absorbing`` | ``sedd`` | ``d3pm`` | ``causal``; ``process``: the noise process passed
    as ``process=`` to ``eval.likelihood`` (None only for ``causal``); ``mask_id``: the [MASK] id (absorbing
    graphs only)."""

    kind: str
    process: Any = None
    mask_id: Optional[int] = None


def process_for(metadata: Optional[Mapping], *, vocab_size: int, valid_vocab: Optional[torch.Tensor] = None,
                causal: bool = False, schedule=None, where: str = "the model") -> EvalProcess:
    """The evaluation process of a model folder from its ``metadata`` (``model.duo_metadata``).

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
    meta = dict(metadata or {})
    objective = str(meta.get("objective") or "")
    if not objective:
        kind = "causal" if causal else "uniform"
    elif objective in OBJECTIVE_KINDS:
        kind = OBJECTIVE_KINDS[objective]
    else:
        raise ValueError(f"{where}: metadata objective={objective!r} has no evaluation path; known objectives: "
                         f"{sorted(OBJECTIVE_KINDS)} (fix metadata.objective in its duo_config.json)")
    if (kind == "causal") != bool(causal):
        raise ValueError(f"{where}: metadata says objective={objective or 'none'!r} but the model is "
                         f"{'' if causal else 'not '}causal; cannot score it")
    if kind == "causal":
        return EvalProcess(kind)
    if kind == "uniform":
        from duo_plugin.diffusion.process import UniformProcess

        return EvalProcess(kind, UniformProcess(int(vocab_size), valid_vocab, schedule))
    width = int(vocab_size)
    if objective == "sedd_uniform":
        from duo_plugin.diffusion.sedd import SEDDProcess

        return EvalProcess(kind, SEDDProcess(width, "uniform", valid_vocab=valid_vocab, schedule=schedule))
    mask_id = int(meta["mask_id"]) if meta.get("mask_id") is not None else width - 1
    if valid_vocab is not None and bool(valid_vocab[mask_id]):
        raise ValueError(f"{where}: the [MASK] id {mask_id} is a valid data id in valid_vocab; the model "
                         "folder's metadata.mask_id does not match its vocabulary")
    if kind == "sedd":
        from duo_plugin.diffusion.sedd import SEDDProcess

        return EvalProcess(kind, SEDDProcess(width, "absorb", mask_id, valid_vocab=valid_vocab, schedule=schedule),
                           mask_id)
    if kind == "d3pm":
        from duo_plugin.diffusion.d3pm import D3PMProcess

        steps = int(meta.get("d3pm_steps") or 1000)
        return EvalProcess(kind, D3PMProcess(width, mask_id, valid_vocab=valid_vocab, steps=steps), mask_id)
    from duo_plugin.diffusion.absorbing import AbsorbingProcess

    proc = AbsorbingProcess(width, mask_id, valid_vocab=valid_vocab, schedule=schedule)
    return EvalProcess("absorbing", proc, mask_id)


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
