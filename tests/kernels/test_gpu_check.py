"""scripts/gpu-check: skips cleanly without CUDA (summary files, exit 0) and its sections run end to end on the CPU
at tiny sizes (--cpu-dry-run, chunked kernels checked against the dense references)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


def _run(tmp_path, *extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *extra], capture_output=True,
                          text=True, env=env, timeout=600)


def test_skips_cleanly_without_cuda(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "gpu-check: skipped" in r.stdout
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["status"] == "skipped" and "CUDA" in summary["reason"] and summary["sections"] == {}
    assert "status: **skipped**" in (tmp_path / "gpu-check.md").read_text()


@pytest.mark.slow
def test_cpu_dry_run_exercises_every_section(tmp_path):
    r = _run(tmp_path, "--cpu-dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path / "gpu-check.json").read_text())
    assert s["status"] == "ok" and s["impl"] == "chunked"
    assert set(s["sections"]) == {"cuda_tests", "kernels_vs_reference", "train_owt_small_bf16", "benchmarks",
                                  "generation"}
    gen = s["sections"]["generation"]
    assert {r["method"] for r in gen["records"]} >= {"duo-ancestral", "mdlm", "ar-kv"}
    assert all(r["nfe"] == 8 for r in gen["records"] if r["method"] == "ar-kv")  # AR: L = 8 calls
    k = s["sections"]["kernels_vs_reference"]
    assert k["nelbo"]["grad_max_abs_err"] < 1e-4 and k["curriculum_tau0.001"]["argmax_equal"] == 1.0
    t = s["sections"]["train_owt_small_bf16"]
    assert t["tokens_per_s"] > 0 and t["mfu"] is None
    assert s["sections"]["benchmarks"]["nelbo"]["time_ratio"] > 0
    md = (tmp_path / "gpu-check.md").read_text()
    assert "## benchmarks: ok" in md
