"""Moved to :mod:`duo_plugin.objectives.adapt` (top-k curriculum input, attention annealing); re-exported here."""

from duo_plugin.objectives.adapt import (  # noqa: F401
    anneal_progress,
    annealed_attention_mask,
    describe_valid_vocab,
    top_order_statistics,
    topk_curriculum_inputs,
)

__all__ = ["topk_curriculum_inputs", "top_order_statistics", "anneal_progress", "annealed_attention_mask",
           "describe_valid_vocab"]
