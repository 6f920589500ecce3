"""Which noise process a model folder was trained with: one lookup from its metadata, below every user of it
(sampling's ``scheduler_for_model``; evaluation's ``process_for`` can read the same table).

A model folder records its training objective (``metadata.objective`` in ``duo_config.json``):

=========================  ====================================================================================
objective                  process
=========================  ====================================================================================
``duo``, ``udlm``, ``dcd``  ``uniform``: :class:`~duo_plugin.diffusion.process.UniformProcess`
missing                    ``uniform`` (``causal`` when the model is causal: older AR folders)
``mdlm``                   ``absorbing``: :class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess` with the
                           folder's ``[MASK]`` id (``metadata.mask_id``, default the last embedding row)
``sedd_absorb``,            ``sedd``: :class:`~duo_plugin.diffusion.sedd.SEDDProcess` on that graph (absorb: with
``sedd_uniform``           the folder's ``[MASK]`` id as for MDLM)
``d3pm``                   ``d3pm``: :class:`~duo_plugin.diffusion.d3pm.D3PMProcess` (T = ``metadata.d3pm_steps``,
                           default 1000; its own discrete schedule)
``ar``                     ``causal``: no noise process (left-to-right decoding)
=========================  ====================================================================================

A new process adds a row to :data:`OBJECTIVE_KINDS` and a branch in :func:`process_for_metadata`. The folder is
data: nothing it names is imported or called.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch

__all__ = ["ModelProcess", "OBJECTIVE_KINDS", "process_for_metadata"]

#: objective name (model-folder metadata) -> process kind
OBJECTIVE_KINDS = {"duo": "uniform", "udlm": "uniform", "dcd": "uniform", "mdlm": "absorbing", "ar": "causal",
                   "sedd_absorb": "sedd", "sedd_uniform": "sedd", "d3pm": "d3pm"}


class ModelProcess(NamedTuple):
    """``kind``: ``uniform`` | ``absorbing`` | ``causal``; ``process``: the noise-process object (None for
    ``causal``); ``objective``: the metadata's objective (``""`` when absent)."""

    kind: str
    process: Any
    objective: str


def process_for_metadata(metadata: Optional[Mapping], *, vocab_size: int, valid_vocab: Optional[torch.Tensor] = None,
                         causal: bool = False, schedule=None, where: str = "the model") -> ModelProcess:
    """The noise process of a model folder from its ``metadata`` (``model.duo_metadata``).

    Args:
        vocab_size: the model's output width W. valid_vocab: ``Bool[W]`` ids the data may hold (or None).
        causal: the model was built causal. schedule: α_t (default log-linear, ε = 1e-3).
    Raises:
        ValueError (one line naming the folder's key and the fix) for an unknown objective, a causal flag that
        contradicts the objective, or an MDLM ``mask_id`` that is a data id or outside the width.
    """
    from .absorbing import AbsorbingProcess
    from .process import UniformProcess

    meta = dict(metadata or {})
    objective = str(meta.get("objective") or "")
    if not objective:
        kind = "causal" if causal else "uniform"
    elif objective in OBJECTIVE_KINDS:
        kind = OBJECTIVE_KINDS[objective]
    else:
        raise ValueError(f"{where}: metadata objective={objective!r} has no noise process; known objectives: "
                         f"{sorted(OBJECTIVE_KINDS)} (fix metadata.objective in its duo_config.json)")
    if (kind == "causal") != bool(causal):
        raise ValueError(f"{where}: metadata says objective={objective or 'none'!r} but the model is "
                         f"{'' if causal else 'not '}causal (fix metadata.objective in its duo_config.json)")
    width = int(vocab_size)
    if kind == "causal":
        return ModelProcess(kind, None, objective)
    if kind == "uniform":
        return ModelProcess(kind, UniformProcess(width, valid_vocab, schedule), objective)
    if objective == "sedd_uniform":
        from .sedd import SEDDProcess

        return ModelProcess(kind, SEDDProcess(width, "uniform", valid_vocab=valid_vocab, schedule=schedule), objective)
    mask_id = int(meta["mask_id"]) if meta.get("mask_id") is not None else width - 1
    if not 0 <= mask_id < width:
        raise ValueError(f"{where}: metadata.mask_id={mask_id} is outside the model width {width} (fix mask_id in "
                         "its duo_config.json)")
    if valid_vocab is not None and bool(valid_vocab[mask_id]):
        raise ValueError(f"{where}: the MDLM [MASK] id {mask_id} is a valid data id in valid_vocab; the model "
                         "folder's metadata.mask_id does not match its vocabulary")
    if kind == "sedd":
        from .sedd import SEDDProcess

        return ModelProcess(kind, SEDDProcess(width, "absorb", mask_id, valid_vocab=valid_vocab, schedule=schedule),
                            objective)
    if kind == "d3pm":
        from .d3pm import D3PMProcess

        steps = int(meta.get("d3pm_steps") or 1000)
        return ModelProcess(kind, D3PMProcess(width, mask_id, valid_vocab=valid_vocab, steps=steps), objective)
    return ModelProcess(kind, AbsorbingProcess(width, mask_id, valid_vocab=valid_vocab, schedule=schedule), objective)
