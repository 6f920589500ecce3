"""fairseq2 0.8.1 integration for duo-plugin (optional extra ``duo-plugin[fairseq2]``).

* ``setup_duo_extension(container)``: the ``fairseq2.extension`` entry point. Registers the ``duo`` model
  family (our :class:`duo_plugin.models.dit.DiT`, factory, state-dict converter), the named architectures
  ``duo_tiny`` / ``duo_small`` / ``duo_medium`` / ``duo_small_owt`` / ``duo_small_lm1b`` and asset cards
  for local checkpoints (YAML cards under the directories in ``$DUO_FAIRSEQ2_ASSET_DIRS``; ``model.write_asset_card``).
* ``python -m duo_plugin.integrations.fairseq2.train OUTPUT_DIR --config-file CFG.yaml``: Duo pretraining on
  fairseq2's recipe runner / trainer (see :mod:`.recipe`), exporting native model dirs our sampler loads.

Importing this package does **not** import fairseq2: everything that needs fairseq2 lives in the submodules
(``extension``, ``model``, ``data``, ``recipe``, ``train``), so the entry point is harmless without it.
fairseq2 itself only reads the entry point when it is installed (it requires torch 2.9.1; see
docs/fairseq2.md for the separate environment built by ``scripts/test-fairseq2``).
"""

from __future__ import annotations

from .config import ARCHS, DuoConfig, config_from_builder_kwargs, config_to_builder_kwargs

__all__ = [
    "ARCHS",
    "DuoConfig",
    "config_from_builder_kwargs",
    "config_to_builder_kwargs",
    "setup_duo_extension",
]


def setup_duo_extension(container) -> None:
    """``fairseq2.extension`` entry point (called by ``init_fairseq2()`` and the recipe CLIs)."""
    from .extension import setup_duo_extension as _setup

    _setup(container)
