"""Benchmark: building the duality table T(γ) (and dT/dγ) for a large vocabulary, against the direct integral.

Prints JSON: the wall time of ``duo-duality build`` (in-process) for K = 151,936 over a γ range, the lookup error of
the table against the direct integral at random γ, and the speed ratio of table lookup vs. the direct integral —
both measured in the same run.

    python benchmarks/bench_duality.py [--vocab-size 151936] [--gamma-min -5] [--gamma-max 1] [--num-points 4001]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from duo_plugin.diffusion.duality import DualityTable, discrete_alpha, discrete_alpha_prime, main as duality_main


def run(vocab_size: int, gamma_min: float, gamma_max: float, num_points: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "table.pt"
        t0 = time.perf_counter()
        rc = duality_main(["build", "--vocab-size", str(vocab_size), "--gamma-min", str(gamma_min),
                           "--gamma-max", str(gamma_max), "--num-points", str(num_points), "--out", str(out)])
        build_s = time.perf_counter() - t0
        assert rc in (0, None), f"duo-duality build exited with {rc}"
        table = DualityTable.load(out)
    g = torch.Generator().manual_seed(0)
    gammas = gamma_min + (gamma_max - gamma_min) * torch.rand(256, generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    direct_a = discrete_alpha(gammas, vocab_size)
    direct_ap = discrete_alpha_prime(gammas, vocab_size)
    direct_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        tab_a, tab_ap = table.alpha(gammas), table.alpha_prime(gammas)
    lookup_s = (time.perf_counter() - t0) / 10
    return {
        "benchmark": "duality_table",
        "vocab_size": vocab_size,
        "gamma_range": [gamma_min, gamma_max],
        "num_points": num_points,
        "build_seconds": round(build_s, 3),
        "build_under_60s": build_s < 60.0,
        "max_abs_err_alpha": float((tab_a - direct_a).abs().max()),
        "max_rel_err_alpha_prime": float(((tab_ap - direct_ap).abs() / direct_ap.abs().clamp_min(1e-300)).max()),
        "direct_integral_seconds_256": round(direct_s, 4),
        "table_lookup_seconds_256": round(lookup_s, 6),
        "lookup_speedup_vs_direct": round(direct_s / max(lookup_s, 1e-9), 1),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--gamma-min", type=float, default=-5.0)
    p.add_argument("--gamma-max", type=float, default=1.0)
    p.add_argument("--num-points", type=int, default=4001)
    a = p.parse_args()
    print(json.dumps(run(a.vocab_size, a.gamma_min, a.gamma_max, a.num_points), indent=2))
