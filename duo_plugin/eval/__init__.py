"""Evaluation: NELBO perplexity (with standard error), conditional NELBO, Gen PPL + entropy, zero-shot sets.

Submodules are imported lazily by users (``from duo_plugin.eval.likelihood import nelbo_perplexity``); the names
below are re-exported for convenience.
"""

from duo_plugin.eval.likelihood import ConditionalNELBO, conditional_nelbo, nelbo_perplexity, sequence_nelbo

__all__ = ["ConditionalNELBO", "conditional_nelbo", "nelbo_perplexity", "sequence_nelbo"]
