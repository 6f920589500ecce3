"""`benchmarks/bench_generation.py --unit`: the JSON schema and the NFE of every method against its closed form
(Duo: T steps + the noise-removal call; MDLM with the x_θ cache: at most that; AR with the KV cache and GPT-2
``generate``: one call per generated token but the last, after the 1-token prompt = L)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_generation.py"


def test_unit_run_schema_and_nfe():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--unit"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    recs = out["records"]
    L, steps, batches = 8, (2, 4), (1, 2)
    has_hf = importlib.util.find_spec("transformers") is not None
    methods = {"duo-ancestral", "duo-greedy-tail", "duo-psi", "mdlm", "ar-kv"} | ({"hf-gpt2"} if has_hf else set())
    assert {r["method"] for r in recs} == methods
    assert len(recs) == len(batches) * (4 * len(steps) + len(methods) - 4)
    for r in recs:
        for key in ("tokens_per_s", "latency_s", "peak_mb", "cpu_s", "vs_ar"):
            assert isinstance(r[key], float) and r[key] >= 0, (key, r)
        assert isinstance(r["nfe"], int) and r["seq_len"] == L and r["batch"] in batches
        assert abs(r["tokens_per_s"] * r["latency_s"] - r["batch"] * L) <= 0.01 * r["batch"] * L + 0.01
        if r["method"].startswith("duo-"):
            assert r["nfe"] == r["T"] + 1, r
        elif r["method"] == "mdlm":
            assert 1 <= r["nfe"] <= r["T"] + 1, r
        else:
            assert r["T"] is None and r["nfe"] == L, r
    assert set(out["crossover"]) == {"unit/B=1", "unit/B=2"}


def test_crossover_from_records():
    spec = importlib.util.spec_from_file_location("bench_generation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    rec = lambda m, T, cpu, nfe: {"shape": "s", "batch": 1, "method": m, "T": T, "cpu_s": cpu, "nfe": nfe}  # noqa
    records = [rec("ar-kv", None, 10.0, 64), rec("duo-ancestral", 4, 2.5, 5), rec("duo-ancestral", 8, 4.5, 9),
               rec("duo-ancestral", 16, 8.5, 17), rec("duo-ancestral", 32, 16.5, 33)]
    cross, est = mod.crossovers(records)
    assert cross == {"s/B=1": 16}  # 8.5 s < 10 s at T = 16, 16.5 s > 10 s at T = 32
    assert est == {"s/B=1": 19.0}  # 0.5 s per NFE: (T + 1) * 0.5 = 10 at T = 19
    # a batch without Duo runs: estimated from the batch-1 seconds per NFE scaled by the batch size
    records.append({**rec("ar-kv", None, 40.0, 64), "batch": 4})
    assert mod.crossovers(records)[1]["s/B=4"] == "19.0 (batch-scaled)"  # 2 s per NFE: (T + 1) * 2 = 40
