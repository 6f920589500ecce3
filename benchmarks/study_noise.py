"""Gradient signal and noise of a ``duo_pretrain`` run at given steps: the measured cause of the unigram plateau.

Replays the run in-process (same config, seed, data order and noise: every draw is keyed by (seed, step, index))
up to each step ``s`` and, at the weights of step ``s``, computes the gradient of every sequence of the global
batches of steps ``s, s+1, ..., s+R-1`` (R independent batches: other texts, other times t, other noise) without
updating.  From the N = R x B per-sequence gradients g_j (each scaled so that a batch gradient is their mean):

* ``|G|^2``: the squared norm of the expected gradient, unbiased: ``|mean g|^2 - tr(S)/N``;
* ``tr(S)``: the per-sequence gradient variance (sum over parameters of the sample variance);
* ``B_noise = tr(S) / |G|^2``: the batch size at which a step's gradient noise equals its signal (the "simple noise
  scale" of McCandlish et al., 2018, "An Empirical Model of Large-Batch Training"); a batch much smaller than
  ``B_noise`` moves the weights mostly by noise;
* per parameter group (embedding, attention, MLP, adaLN, sigma map, output layer); a standard error of ``B_noise``
  from a bootstrap over the R batches (200 resamples).

    python benchmarks/study_noise.py OUTPUT_DIR --steps 200 400 [--batches 16] [--json out.json]

OUTPUT_DIR is a study run (replayed from its command, ``study_replay.run_config``; nothing is written there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS = (("embedding", ("vocab_embed",)), ("attention", ("attn_qkv", "attn_out")), ("mlp", (".mlp.",)),
          ("adaLN", ("adaLN_modulation",)), ("sigma_map", ("sigma_map",)), ("output", ("output_layer.linear",)))


def group_of(name: str) -> str:
    if "output_layer.adaLN" in name:  # the final layer's modulation is adaLN, not the output projection
        return "adaLN"
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


def group_ids(model) -> torch.Tensor:
    """For every entry of the flat parameter vector (``named_parameters`` order), the index of its group in
    ``GROUPS`` (-1: none)."""
    names = [g for g, _ in GROUPS]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.tensor([names.index(group_of(n)) if group_of(n) in names else -1 for n, _ in params])
    return torch.repeat_interleave(ids, torch.tensor([p.numel() for _, p in params]))


def per_sequence_grads(recipe, step: int) -> torch.Tensor:
    """``[B, P]`` flat gradients of the sequences of ``step``'s global batch (each of ``loss_j / mean tokens``) at the
    recipe's current weights, in ``named_parameters`` order."""
    from study_replay import global_batch

    x0, mask, pos = global_batch(recipe, step)
    params = [p for p in recipe.model.parameters() if p.requires_grad]
    rows, toks = [], []
    for i in range(x0.shape[0]):
        recipe.model.zero_grad(set_to_none=True)
        s, n, _ = recipe.objective(recipe.model, x0[i:i + 1], mask[i:i + 1], pos[i:i + 1], step)
        s.backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                               for p in params]))
        toks.append(int(n))
    recipe.model.zero_grad(set_to_none=True)
    return torch.stack(rows) / (sum(toks) / len(toks))


def noise_scale(g: torch.Tensor) -> dict:
    """``|G|^2`` (unbiased), ``tr(S)`` and ``B_noise`` of the rows of ``g``."""
    n = g.shape[0]
    mean = g.mean(0)
    tr_s = float(((g - mean) ** 2).sum() / (n - 1))
    g2 = float((mean ** 2).sum()) - tr_s / n
    return {"G2": g2, "trS": tr_s, "B_noise": tr_s / g2 if g2 > 0 else float("inf")}


def measure(out_dir: Path, steps: list[int], batches: int, boot: int = 200) -> list[dict]:
    from study_replay import replay, replay_recipe

    recipe = replay_recipe(out_dir, "study_noise_")
    gid = group_ids(recipe.model)
    res = []

    def at(step: int) -> None:
        per_batch = [per_sequence_grads(recipe, step + r) for r in range(batches)]
        allg = torch.cat(per_batch)
        row = {"step": step, "sequences": int(allg.shape[0]), "batches": batches,
               "phase": recipe.objective.phase(step), "all": noise_scale(allg)}
        gen = torch.Generator().manual_seed(0)
        bs = []
        for _ in range(boot):
            pick = torch.randint(0, batches, (batches,), generator=gen)
            bs.append(noise_scale(torch.cat([per_batch[int(i)] for i in pick]))["B_noise"])
        finite = torch.tensor([b for b in bs if b != float("inf")])
        row["all"]["B_noise_se"] = float(finite.std()) if len(finite) > 1 else None
        row["all"]["B_noise_boot_inf"] = len(bs) - len(finite)
        for k, (name, _) in enumerate(GROUPS):
            sel = gid == k
            if sel.any():
                row[name] = noise_scale(allg[:, sel])
        res.append(row)
        print(json.dumps(row), flush=True)

    replay(recipe, steps, at)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--batches", type=int, default=16, help="R independent global batches per step (default 16)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = measure(Path(a.output_dir), sorted(set(a.steps)), a.batches)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"run": str(a.output_dir), "steps": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
