"""Training objectives as library components (docs/method.md §7; docs/architecture.md "Adding an objective").

``objective(model, x0, mask, positions, step) -> (loss_sum, n_tokens, metrics)`` after ``objective.setup(model,
ctx)`` (:mod:`duo_plugin.objectives.base`). Recipes and the fairseq2 TrainUnit call the same objects.

* :class:`DiffusionObjective` — the shared diffusion path (times → corrupt → pad rule → σ → forward →
  ``process.nelbo`` → masked sum) over a noise process; :class:`MDLMObjective` (absorbing process) and
  :class:`DuoObjective` are instances (:mod:`duo_plugin.objectives.diffusion`);
* :class:`DuoObjective` — curriculum → discrete uniform-state NELBO (the paper's Duo; UDLM without curriculum);
* :class:`MDLMObjective` — the MDLM baseline (absorbing process, SUBS);
* :class:`ARObjective` — the autoregressive baseline;
* :class:`DCDObjective` — discrete consistency distillation against a teacher.

:func:`objective_from_config` turns a recipe config into one of these (``objective: {_component_: ...}`` or the
short form ``objective: duo | ar`` with the ``schedule:``/``curriculum:``/``kernels:``/``adapt:`` sections).
No torchtune imports here.
"""

from __future__ import annotations

from .ar import ARObjective, ar_token_nll
from .base import Objective, ObjectiveContext, masked_token_sum
from .config import objective_from_config
from .dcd import DCDObjective
from .diffusion import DenseNelbo, DiffusionObjective, NoisyBatch, PadView, pad_rule
from .duo import DuoObjective
from .mdlm import MDLMObjective

__all__ = ["Objective", "ObjectiveContext", "DiffusionObjective", "NoisyBatch", "DenseNelbo", "PadView", "pad_rule",
           "DuoObjective", "MDLMObjective", "ARObjective", "DCDObjective", "objective_from_config", "masked_token_sum",
           "ar_token_nll"]
