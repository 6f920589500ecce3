"""Re-score a study run's checkpoints with evaluation draws that do not depend on the run's seed.

The recipe's validation draws one t (and the noise) per block keyed by the *training* seed, and the small-t tail of
the NELBO makes that draw matter: the same untrained (uniform) model reads 352 at seed 0 and 230 at seed 1 on the
same Book of Mormon blocks (docs/small-scale-training.md). Here every checkpoint (``checkpoint.every``; EMA weights,
as the recipe evaluates) is scored by the recipe's own estimator (``objective.validation_nll`` on the same blocks)
under the fixed evaluation seeds ``seeds`` (one pass each) and the passes are averaged: common random numbers
across runs, methods and seeds, with a standard error between passes.

    python benchmarks/study_rescore.py OUTPUT_DIR [--seeds 1000 1001 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

EVAL_SEEDS = tuple(range(1000, 1008))  # 8 passes (a 20-step model: 3 passes gave a standard error of 0.09 nats)


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for d in sorted((out / "checkpoints").glob("step_*")):
        if (d / "model").is_dir():
            found.append((int(d.name.split("_")[1]), d / "model"))
    return found


def run_config(out: Path):
    """The run's config as launched: the shipped config named in the first line of ``<out>.log`` (written by
    benchmarks/study.py: ``$ ... tune run duo_pretrain --config NAME k=v ...``) with its overrides. (The resolved
    ``torchtune_config.yaml`` carries defaults that a component objective rejects on re-validation.)"""
    from omegaconf import OmegaConf

    line = (out.parent / (out.name + ".log")).read_text().splitlines()[0]
    toks = line.split()
    i = toks.index("--config")
    name, overrides = toks[i + 1], toks[i + 2:]
    base = OmegaConf.load(Path(__file__).resolve().parents[1] / "duo_plugin" / "configs" / (name + ".yaml"))
    return OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))


def rescore(out: Path, seeds=EVAL_SEEDS) -> list[dict]:
    """``[{"step", "ppl", "nll", "stderr_nll", "passes"}]`` for every checkpoint of the run at ``out``."""
    import torch

    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.recipes.duo_pretrain import DuoPretrainRecipe

    cfg = run_config(out)
    tmp = tempfile.mkdtemp(prefix="study_rescore_")
    cfg.output_dir, cfg.metric_logger.log_dir = tmp, f"{tmp}/logs"
    cfg.checkpoint.every, cfg.progress_bar = 0, False
    recipe = DuoPretrainRecipe(cfg)
    recipe.setup()
    recipe.ema = None  # the checkpoint's EMA weights are loaded into the model itself
    rows = []
    try:
        for step, model_dir in _checkpoints(out):
            ema_model = load_pretrained(model_dir, weights="ema")
            with torch.no_grad():
                recipe.model.load_state_dict(ema_model.state_dict())
            nlls = []
            for s in seeds:
                recipe.objective.ctx.seed = int(s)
                nlls.append(recipe.evaluate()["val_nll"])
            nll = statistics.fmean(nlls)
            se = statistics.stdev(nlls) / math.sqrt(len(nlls)) if len(nlls) > 1 else float("nan")
            rows.append({"step": step, "ppl": math.exp(nll), "nll": nll, "stderr_nll": se, "passes": len(nlls)})
    finally:
        recipe.cleanup()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(EVAL_SEEDS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = rescore(Path(a.output_dir), a.seeds)
    text = json.dumps(rows, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
