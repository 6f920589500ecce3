"""Replaying a study run in-process (benchmarks/study_{noise,probe,spikes}.py): its config as given, a recipe that
writes nothing into the run, and the training loop with a hook at chosen steps.  Every draw of a run is keyed by
(seed, step, index), so the replay reproduces the run's weights step for step."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def run_config(out_dir: Path):
    """The run's config as it was given: the shipped YAML named by ``--config`` plus the ``key=value`` overrides of
    the command on the first line of the study's ``<OUTPUT_DIR>.log`` (the resolved ``torchtune_config.yaml`` carries
    defaults that the recipe refuses on input for a ``_component_`` objective); without that log, the resolved one."""
    from omegaconf import OmegaConf

    log = out_dir.parent / (out_dir.name + ".log")
    if not log.is_file():
        return OmegaConf.load(out_dir / "torchtune_config.yaml")
    toks = log.read_text().splitlines()[0].split()
    i = toks.index("--config")
    name = toks[i + 1]
    path = Path(name) if name.endswith(".yaml") else REPO / "duo_plugin" / "configs" / f"{name}.yaml"
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(toks[i + 2:]))


def replay_recipe(out_dir: Path, prefix: str):
    """A set-up ``DuoPretrainRecipe`` of the run in ``out_dir`` that evaluates, checkpoints and logs nothing there
    (its output goes to a fresh temporary folder)."""
    from duo_plugin.recipes.duo_pretrain import DuoPretrainRecipe

    cfg = run_config(out_dir)
    tmp = tempfile.mkdtemp(prefix=prefix)
    cfg.output_dir, cfg.metric_logger.log_dir = tmp, f"{tmp}/logs"
    cfg.eval_every, cfg.checkpoint.every, cfg.progress_bar = 0, 0, False
    recipe = DuoPretrainRecipe(cfg)
    recipe.setup()
    return recipe


def global_batch(recipe, step: int):
    """``(x0, mask, pos)`` of ``step``'s global batch, exactly as the run trained on it (one rank, no accumulation)."""
    from duo_plugin.training import loop

    micro, _ = loop.fetch_micro_batches(recipe.train_set, recipe.sampler, step, rank=0, world_size=1, accum=1,
                                        device=recipe.device, count_tokens=recipe.objective.count_tokens)
    (batch,) = micro
    return batch


def replay(recipe, steps: list[int], before: Callable[[int], None],
           after: Callable[[int, dict], None] | None = None) -> None:
    """Train from step 0 through ``max(steps)``; at each of ``steps`` call ``before(step)`` at the weights before the
    update and ``after(step, metrics)`` after it. The recipe is cleaned up at the end."""
    try:
        for step in range(max(steps) + 1):
            if step in steps:
                before(step)
            m = recipe.train_step(step)
            recipe.step = step + 1
            if step in steps and after is not None:
                after(step, m)
    finally:
        recipe.cleanup()
