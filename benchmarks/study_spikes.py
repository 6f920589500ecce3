"""Where does a training-loss spike come from?  Replays a ``duo_pretrain`` run in-process (same config, seed, data
order, noise: every draw is keyed by (seed, step, index)) up to the given steps and, at each of them, before the
optimizer step, splits the batch loss into its sequences: per-sequence loss per token, its time t, its dataset
index, and the share of the batch loss it carries; then the same sequences re-scored at the batch's median t (is it
the sequence or its t?).  Used by docs/small-scale-training.md ("Loss spikes").

    python benchmarks/study_spikes.py OUTPUT_DIR --steps 111 136 161 [--top 4] [--json out.json]

OUTPUT_DIR is a finished (or running) study run, replayed from its command (``study_replay.run_config``; nothing is
written there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def per_sequence(recipe, step: int) -> dict:
    """Per-sequence loss of the global batch of ``step`` at the recipe's current weights (no update)."""
    from study_replay import global_batch

    from duo_plugin.diffusion.schedules import stratified_times

    x0, mask, pos = global_batch(recipe, step)
    obj = recipe.objective
    rows = []
    with torch.no_grad():
        for i in range(x0.shape[0]):
            s, n, _ = obj(recipe.model, x0[i:i + 1], mask[i:i + 1], pos[i:i + 1], step)
            rows.append((float(s), int(n)))
    n_all = sum(n for _, n in rows)
    t = stratified_times(recipe.seed, step, pos, recipe.global_batch_size, getattr(obj, "t_min", 1e-3),
                         dtype=torch.float64)
    idx = recipe.sampler.indices(step)
    return {"x0": x0, "mask": mask, "pos": pos, "t": t.tolist(), "idx": [int(i) for i in idx],
            "loss_sum": [s for s, _ in rows], "tokens": [n for _, n in rows],
            "batch_loss": sum(s for s, _ in rows) / n_all}


def rescore_at(recipe, x0, mask, pos, step: int, t_value: float) -> list[float]:
    """Per-token loss of each sequence with its time replaced by ``t_value`` (same noise generators)."""
    from duo_plugin.diffusion import schedules

    orig = schedules.stratified_times
    obj_mod = sys.modules[type(recipe.objective).__module__]
    saved = getattr(obj_mod, "stratified_times", None)

    def fixed(seed, step_, indices, n, t_min=1e-3, *, dtype=torch.float32, device=None):
        return torch.full((len(indices),), float(t_value), dtype=dtype, device=device)

    try:
        if saved is not None:
            obj_mod.stratified_times = fixed
        out = []
        with torch.no_grad():
            for i in range(x0.shape[0]):
                s, n, _ = recipe.objective(recipe.model, x0[i:i + 1], mask[i:i + 1], pos[i:i + 1], step)
                out.append(float(s) / max(n, 1))
        return out
    finally:
        if saved is not None:
            obj_mod.stratified_times = saved
        schedules.stratified_times = orig


def replay(out_dir: Path, steps: list[int], top: int) -> list[dict]:
    from study_replay import replay as replay_run
    from study_replay import replay_recipe

    recipe = replay_recipe(out_dir, "study_spikes_")
    found = []
    tok = recipe.tokenizer

    def before(step: int) -> None:
        r = per_sequence(recipe, step)
        per_tok = [s / max(n, 1) for s, n in zip(r["loss_sum"], r["tokens"])]
        order = sorted(range(len(per_tok)), key=lambda i: -r["loss_sum"][i])
        t_med = float(torch.tensor(r["t"]).median())
        at_med = rescore_at(recipe, r["x0"], r["mask"], r["pos"], step, t_med)
        total = sum(r["loss_sum"])
        tops = [{"row": i, "dataset_index": r["idx"][i], "t": round(r["t"][i], 5),
                 "loss_per_token": round(per_tok[i], 3), "share_of_batch_loss": round(r["loss_sum"][i] / total, 3),
                 "loss_per_token_at_median_t": round(at_med[i], 3),
                 "text": tok.decode([int(v) for v in r["x0"][i][r["mask"][i]].tolist()])[:160]}
                for i in order[:top]]
        med_tok = sorted(per_tok)[len(per_tok) // 2]
        found.append({"step": step, "batch_loss": round(r["batch_loss"], 4), "median_t": round(t_med, 4),
                      "median_sequence_loss": round(med_tok, 3), "top": tops,
                      "batch_loss_at_median_t": round(sum(a * n for a, n in zip(at_med, r["tokens"]))
                                                      / sum(r["tokens"]), 4)})

    def after(step: int, m: dict) -> None:
        found[-1]["grad_norm"] = m["grad_norm"]
        found[-1]["logged_loss"] = m["loss"]

    replay_run(recipe, steps, before, after)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = replay(Path(a.output_dir), sorted(set(a.steps)), a.top)
    text = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
