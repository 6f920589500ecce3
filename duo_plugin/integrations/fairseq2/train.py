"""``python -m duo_plugin.integrations.fairseq2.train OUTPUT_DIR --config-file CFG.yaml [--config k=v ...]``

Duo pretraining through fairseq2's recipe CLI (``--dump-config`` prints the full default config). See
:mod:`duo_plugin.integrations.fairseq2.recipe` and docs/fairseq2.md.
"""

from __future__ import annotations


def main() -> None:
    from fairseq2.recipe.cli import main as recipe_main

    from .recipe import DuoTrainRecipe

    recipe_main(DuoTrainRecipe())


if __name__ == "__main__":
    main()
