"""What does a model use at a given training step: its context, its noise level?  Replays a ``duo_pretrain`` run
in-process (same config and seed: the same trajectory) and at each given step probes the EMA-free training weights
on held-out blocks with a share ``p`` of the positions replaced by uniform noise:

* ``nll_context``: NLL (nats) of the true tokens at the noised positions, the rest of the block clean;
* ``nll_shuffled``: the same with the clean positions' tokens permuted within the block (the context destroyed, the
  unigram content kept);
* ``nll_no_context``: every other position replaced by uniform noise as well;
* ``nll_sigma``: ``nll_context`` with the σ input set to each of ``--sigmas`` instead of the matching ``-log(1-p)``
  (how much the prediction depends on the time conditioning);
* the norms of the token embedding, the output layer and the adaLN modulation weights.

A model that uses its context has ``nll_context`` clearly below ``nll_shuffled``.

    python benchmarks/study_probe.py OUTPUT_DIR --steps 100 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _nll_at(model, z, sigma, x, noised) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(z, sigma).float(), dim=-1)
    nll = -logp.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    return float(nll[noised].mean())


def probe(model, blocks: torch.Tensor, valid: torch.Tensor, p: float, sigmas: list[float], seed: int) -> dict:
    """The probe numbers of ``model`` on ``blocks`` (``valid``: the ids uniform noise draws from)."""
    g = torch.Generator().manual_seed(seed)
    x = blocks.clone()
    b, n = x.shape
    noised = torch.rand(b, n, generator=g) < p
    noised[:, 0] = False  # keep BOS
    noise = valid[torch.randint(len(valid), (b, n), generator=g)]
    z = torch.where(noised, noise, x)
    sig = torch.full((b,), -math.log(1 - p))
    out = {"p": p, "nll_context": _nll_at(model, z, sig, x, noised)}
    shuf = x.clone()
    for i in range(b):
        keep = (~noised[i]).nonzero().squeeze(-1)[1:]
        shuf[i, keep] = x[i, keep[torch.randperm(len(keep), generator=g)]]
    out["nll_shuffled"] = _nll_at(model, torch.where(noised, noise, shuf), sig, x, noised)
    all_noise = valid[torch.randint(len(valid), (b, n), generator=g)]
    all_noise[:, 0] = x[:, 0]
    out["nll_no_context"] = _nll_at(model, torch.where(noised, noise, all_noise), sig, x, noised)
    out["nll_sigma"] = {f"{s:g}": _nll_at(model, z, torch.full((b,), float(s)), x, noised) for s in sigmas}
    return out


def weight_norms(model) -> dict:
    norms = {"embedding": 0.0, "output": 0.0, "adaLN": 0.0}
    for name, prm in model.named_parameters():
        key = ("adaLN" if "adaLN" in name else "embedding" if "embed" in name.lower() and "output" not in name
               else "output" if ("output" in name or "final" in name) and prm.dim() == 2 else None)
        if key:
            norms[key] += float(prm.detach().float().pow(2).sum())
    return {k: round(math.sqrt(v), 4) for k, v in norms.items()}


def replay(out_dir: Path, steps: list[int], p: float, sigmas: list[float], n_blocks: int) -> list[dict]:
    from study_replay import replay as replay_run
    from study_replay import replay_recipe

    recipe = replay_recipe(out_dir, "study_probe_")
    blocks = recipe.val_set.blocks[:n_blocks]
    k = int(recipe.tokenizer.vocab_size)
    special = {int(i) for i in (recipe.tokenizer.bos_id, recipe.tokenizer.eos_id) if i is not None}
    valid = torch.tensor([i for i in range(k) if i not in special])
    found = []

    def at(step: int) -> None:
        recipe.model.eval()
        r = probe(recipe.model, blocks, valid, p, sigmas, seed=1234)
        recipe.model.train()
        r.update(step=step, phase=recipe.objective.phase(step), norms=weight_norms(recipe.model))
        found.append(r)
        print(json.dumps(r), flush=True)

    replay_run(recipe, steps, at)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--p", type=float, default=0.3, help="share of positions replaced by uniform noise")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.36, 1.2, 3.0, 6.9])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = replay(Path(a.output_dir), sorted(set(a.steps)), a.p, a.sigmas, a.blocks)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
