"""Evaluation: NELBO perplexity (with standard error), conditional NELBO, request scoring without lm-eval, MC
policies, Gen PPL + entropy, one metrics entry point (``compute_metrics``), zero-shot sets.

No torchtune / lm_eval imports here (the torchtune-based Gen PPL scorer lives in
``duo_plugin.integrations.torchtune_scorer``).
"""

from duo_plugin.eval.genppl import DiTScorer, causal_nll, gen_ppl_and_entropy, load_dit_scorer, unigram_entropy
from duo_plugin.eval.likelihood import (
    ConditionalNELBO,
    NelboOptions,
    conditional_nelbo,
    nelbo_perplexity,
    sequence_nelbo,
)
from duo_plugin.eval.mc import MCPolicy
from duo_plugin.eval.metrics import GenPPLSpec, NelboSpec, compute_metrics
from duo_plugin.eval.processes import EvalProcess, process_for, process_for_model
from duo_plugin.eval.scoring import RequestScorer, ScoringConfig
from duo_plugin.eval.windows import WindowSpec
from duo_plugin.eval.zeroshot import PAPER_SETS, ZERO_SHOT_SETS, load_zeroshot_texts, zeroshot_blocks

__all__ = [
    "ConditionalNELBO",
    "NelboOptions",
    "MCPolicy",
    "GenPPLSpec",
    "NelboSpec",
    "compute_metrics",
    "RequestScorer",
    "ScoringConfig",
    "WindowSpec",
    "conditional_nelbo",
    "nelbo_perplexity",
    "sequence_nelbo",
    "EvalProcess",
    "process_for",
    "process_for_model",
    "DiTScorer",
    "causal_nll",
    "gen_ppl_and_entropy",
    "load_dit_scorer",
    "unigram_entropy",
    "PAPER_SETS",
    "ZERO_SHOT_SETS",
    "load_zeroshot_texts",
    "zeroshot_blocks",
]
