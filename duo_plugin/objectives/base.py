"""What every training objective provides (docs/method.md §7 "Objectives"; docs/architecture.md "Where things go").

An objective is a callable built from config (``objective: {_component_: duo_plugin.objectives.DuoObjective, ...}``,
like torchtune's ``loss:``). The recipe (or the fairseq2 TrainUnit) calls, in order:

1. ``objective.setup(model, ctx)`` once the model, tokenizer and data are known (:class:`ObjectiveContext`);
2. per global step and micro-batch, ``objective(model, x0, mask, positions, step) -> (loss_sum, n_tokens,
   metrics)``: ``loss_sum`` = Σ over this micro-batch's scored tokens of the per-token loss (fp32 scalar,
   differentiable), ``n_tokens`` = ``objective.count_tokens(mask)``. ``positions`` are the samples' places
   ``0..N-1`` in the global batch of ``step``: every random draw is keyed by (seed, step, position)
   (docs/method.md §6), so the loss does not depend on world size, accumulation split or resume point;
3. ``objective.count_tokens(mask)`` before the micro-batches (the recipe normalises by the GLOBAL token count);
4. ``objective.phase(step)`` (a name for logs) and ``objective.validation_nll(model, blocks, mask, *, batch_size,
   special_ids, nelbo_perplexity) -> {"nll": per content token, ["nll_all": per token]}`` (held-out NLL; the
   caller passes the evaluation function, ``eval.likelihood.nelbo_perplexity``: objectives never import ``eval``).

No torchtune and no I/O here: objectives sit on ``diffusion/`` and ``kernels/`` and are used by recipes and
integrations alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from duo_plugin.diffusion.losses import masked_token_sum

__all__ = ["PAD_MODES", "ObjectiveContext", "Objective", "masked_token_sum", "nullcontext_factory", "vocab_options"]


def nullcontext_factory():
    return contextlib.nullcontext()


PAD_MODES = ("clean_masked", "official")


def vocab_options(pad_mode: str, include_pad: bool | None = None, include_special: bool | None = None
                  ) -> tuple[bool, bool]:
    """``(include_pad, include_special)`` for ``data.tokenizers.check_vocab`` under ``data.pad_mode``.

    ``clean_masked``: both default to False (pads and specials other than BOS/EOS are never noise nor data).
    ``official``: both default to True — the official Duo/MDLM code treats every tokenizer id as an ordinary id
    (K = len(tokenizer): BERT's ``[PAD]`` and ``[UNK]`` are noised, produced by the noise, predicted, and the
    curriculum's Gaussian latent gives PAD its α̃ like any token); only the loss skips pads. ``include_pad: false``
    contradicts it (ValueError naming the keys); ``include_special: false`` is honoured.
    """
    if pad_mode == "official":
        if include_pad is not None and not include_pad:
            raise ValueError("data.valid_vocab.include_pad: false contradicts data.pad_mode: official (pads are "
                             "ordinary ids there, as in the official code); remove include_pad or set "
                             "data.pad_mode: clean_masked")
        return True, True if include_special is None else bool(include_special)
    return bool(include_pad or False), bool(include_special or False)


@dataclass
class ObjectiveContext:
    """Run facts an objective needs besides its own config.

    Attributes:
        seed: the run seed (first element of every noise key).
        global_batch_size: N, the number of sequences per optimizer step over all ranks and micro-batches.
        vocab_size: K, the model's embedding rows.
        valid_vocab: ``Bool[K]`` on ``device``: the ids uniform noise may produce.
        seq_len: L of the training blocks.
        device: where the model runs.
        autocast: zero-argument factory of the forward's autocast context (bf16 on CUDA, else a null context).
        log: ``print``-like callable for one-line setup reports (``None``: silent).
        extra: free-form (e.g. ``teacher`` for :class:`~duo_plugin.objectives.DCDObjective`).
        pad_mode: what padded rows (``mask`` False) mean, from ``data.pad_mode``: ``clean_masked`` (default: pads
            stay clean, are masked from attention and not scored; the model knows each row's length) or
            ``official`` (the official Duo/MDLM code: pads are noised and attended to like any token, and only the
            loss and its token count skip them). See docs/evaluation.md.
        tokenizer: the run's tokenizer (``encode``/``special_ids``), or None; e.g. MDLM resolves ``mask_id:
            "[MASK]"`` (a tokenizer's own mask token) with it.
    """

    seed: int
    global_batch_size: int
    vocab_size: int
    valid_vocab: torch.Tensor
    seq_len: int
    device: torch.device
    autocast: Callable[[], Any] = nullcontext_factory
    log: Callable[..., None] | None = None
    extra: dict = field(default_factory=dict)
    pad_mode: str = "clean_masked"
    tokenizer: Any = None

    @property
    def k_eff(self) -> int:
        return int(self.valid_vocab.sum())


@runtime_checkable
class Objective(Protocol):
    name: str  # saved in model metadata ("duo", "ar", "dcd", ...)

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None: ...

    def phase(self, step: int) -> str: ...

    def count_tokens(self, mask: torch.Tensor) -> int: ...

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, mask: torch.Tensor, positions, step: int
                 ) -> tuple[torch.Tensor, int, dict]: ...
