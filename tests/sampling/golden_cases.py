"""Fixed-seed sampler cases whose outputs were recorded from the sampler *before* it was split into a scheduler
(``golden_samples.json``, written by ``python tests/sampling/golden_cases.py --record`` at that commit).
``test_golden.py`` replays them: the ancestral family must keep producing the same samples for the same seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden_samples.json")
K, L, B = 11, 6, 5


class GoldenDenoiser:
    """Deterministic x_θ(z, σ): logits[l, k] = Σ_m A[l, m, z_m, k] + c[l, k] σ (float64 tables from a fixed seed)."""

    def __init__(self, k: int = K, length: int = L, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(length, length, k, k, generator=g, dtype=torch.float64) * 1.5
        self.c = torch.randn(length, k, generator=g, dtype=torch.float64)

    def __call__(self, z, sigma):
        out = self.c[None] * sigma.double()[:, None, None]
        for l in range(z.shape[1]):
            for m in range(z.shape[1]):
                out[:, l] = out[:, l] + self.A[l, m][z[:, m]]
        return torch.log_softmax(out, -1).float()


def cases():
    """(name, kwargs for sample(...)) for every option of the ancestral family and each posterior_impl."""
    valid = torch.ones(K, dtype=torch.bool)
    valid[K - 1] = False  # e.g. BOS outside the uniform process
    infill_mask = torch.tensor([False, True, False, True, True, False])
    infill_vals = torch.tensor([0, 3, 0, 10, 7, 0])
    opts = {
        "ancestral": {},
        "greedy": {"noise_removal": "greedy"},
        "none": {"noise_removal": "none"},
        "top_p": {"top_p": 0.8},
        "temperature": {"temperature": 0.7},
        "top_p_temperature_greedy": {"top_p": 0.9, "temperature": 1.3, "noise_removal": "greedy"},
        "prompt": {"prompt": torch.tensor([10, 2])},
        "prompt_rows": {"prompt": torch.tensor([[10, 2], [10, 3], [10, 4], [10, 5], [10, 6]])},
        "infill": {"clamp_mask": infill_mask, "clamp_values": infill_vals},
        "valid_vocab_prompt": {"valid_vocab": valid, "prompt": torch.tensor([10]), "top_p": 0.95},
        "chunked_batch": {"chunk_size": 2},
        "generator": {"generator": "shared"},
        "row_generators": {"generator": "rows", "chunk_size": 3},
    }
    for impl in ("dense", "chunked", "mixture", "auto"):
        for name, kw in opts.items():
            kw = dict(kw)
            yield f"{impl}/{name}", dict(kw, posterior_impl=impl)


def run_case(sample_fn, kw):
    kw = dict(kw)
    gen = kw.pop("generator", None)
    if gen == "shared":
        kw["generator"] = torch.Generator().manual_seed(123)
    elif gen == "rows":
        kw["generator"] = [torch.Generator().manual_seed(200 + i) for i in range(B)]
    else:
        kw["seed"] = 7
    res = sample_fn(GoldenDenoiser(), None, batch_size=B, seq_len=L, vocab_size=K, steps=5, progress=False,
                    return_trajectory=True, **kw)
    return {"tokens": res.tokens.tolist(), "trajectory": res.trajectory.tolist(), "nfe": res.nfe}


if __name__ == "__main__" and "--record" in sys.argv:
    from duo_plugin.sampling import sample

    GOLDEN.write_text(json.dumps({name: run_case(sample, kw) for name, kw in cases()}))
    print(f"wrote {GOLDEN}")
