"""`benchmarks/bench_compile.py --shapes unit`: the compiled blocks give the eager numbers (the first 3 train losses,
the sampled ids, the eval log-probs within fp32 rounding) and the JSON carries a ratio per task. Slow: Inductor
compiles three graphs (train, no-grad eval, sampler) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_unit_compile_matches_eager():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_compile.py"), "--shapes", "unit",
                           "--rounds", "1"], env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = json.loads(proc.stdout)["results"]
    if "error" in res:
        pytest.skip(f"torch.compile is not usable here: {res['error']}")
    assert res["train_loss_max_rel_diff"] <= 1e-6
    assert res["sampler_tokens_equal"] == 1.0
    assert res["eval_max_abs_diff"] <= 1e-5
    for task in ("train", "sampler", "eval"):
        assert res[task]["ratio"] > 0 and res[task]["eager_cpu_s"] > 0
