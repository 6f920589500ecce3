"""The statistics and verdict rules of benchmarks/reproduce_report.py against hand-computed values."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("reproduce_report_under_test",
                                                  REPO / "benchmarks" / "reproduce_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_steps_to_target_interpolates_in_log_ppl(rr):
    c = [(100, 200.0), (200, 100.0), (300, 50.0)]
    assert rr.steps_to_target(c, math.sqrt(200 * 100)) == pytest.approx(150.0)  # the log-midpoint
    assert rr.steps_to_target(c, 100.0) == pytest.approx(200.0)
    assert rr.steps_to_target(c, 80.0) == pytest.approx(200 + 100 * math.log(100 / 80) / math.log(2))
    assert rr.steps_to_target(c, 250.0) == 100.0  # already below at the first evaluation
    assert rr.steps_to_target(c, 49.0) is None
    assert rr.steps_to_target(list(reversed(c)), 100.0) == pytest.approx(200.0)  # order of the input is irrelevant


def test_sign_test_and_mean_se(rr):
    assert rr.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert rr.sign_test_p(0, 3) == pytest.approx(0.25)
    assert rr.sign_test_p(2, 1) == pytest.approx(1.0)
    assert rr.sign_test_p(5, 1) == pytest.approx(2 * 7 / 64)
    m, se, n = rr.mean_se([1.0, 2.0, 6.0, None, float("nan")])
    assert (m, n) == (3.0, 3) and se == pytest.approx(math.sqrt(7) / math.sqrt(3))
    assert rr.mean_se([4.0])[1] is None


def test_gap_share(rr):
    assert rr.gap_share(100.0, 10.0, 1.0) == pytest.approx(0.5)
    assert rr.gap_share(100.0, 100.0, 10.0) == pytest.approx(0.0)
    assert rr.gap_share(10.0, 5.0, 20.0) is None  # no gap: more steps were worse


def _train(final, se=0.01, curve=None):
    fixed = [[s, p, se] for s, p in (curve or [(100, final * 3), (200, final)])]
    return {"dir": "/x", "final_fixed": {"step": fixed[-1][0], "ppl": final, "stderr_nll": se}, "val_fixed": fixed,
            "unigram_ppl": 150.0}


def _data(duo_minus_udlm):
    corpora = {}
    for c, deltas in duo_minus_udlm.items():
        tr = {}
        for s, delta in enumerate(deltas):
            tr[f"udlm_s{s}"] = _train(50.0, curve=[(100, 150.0), (200, 100.0), (300, 50.0)])
            tr[f"duo_s{s}"] = _train(50.0 + delta)
            # reaches 50 at step 150 by log-interpolation between (100, 100) and (200, 25): speed-up 300 / 150
            tr[f"duo_c50_s{s}"] = _train(25.0, curve=[(100, 100.0), (200, 25.0)])
        corpora[c] = {"plan": {"seeds": list(range(len(deltas)))}, "train": tr}
    return {"corpora": corpora}


def test_verdicts_need_every_pair(rr):
    v = {x["id"]: x for x in rr.claims(_data({"a": [-1, -2, -3], "b": [-1, -1, -1]}))}
    assert v["duo_beats_udlm"]["verdict"].startswith("shown") and v["duo_beats_udlm"]["p"] == pytest.approx(2 / 64)
    v = {x["id"]: x for x in rr.claims(_data({"a": [-1, -2, 3], "b": [-1, -1, -1]}))}
    assert v["duo_beats_udlm"]["verdict"].startswith("not shown (5 of 6")
    sp = v["curriculum_speedup"]
    assert sp["verdict"] == "shown" and sp["n"] == 6
    assert sp["per_pair"][0]["duo_steps"] == pytest.approx(150.0) and sp["mean"] == pytest.approx(2.0)
    assert v["variance_vs_udlm"]["verdict"] == "not measured"  # no variance records: never a verdict
    # Duo higher in all 6 pairs: not shown, and the verdict says the reverse holds everywhere (p = 2 / 64)
    v = {x["id"]: x for x in rr.claims(_data({"a": [1, 2, 3], "b": [1, 1, 1]}))}
    assert v["duo_beats_udlm"]["verdict"] == "not shown: the opposite holds in every pair (6/6; sign test p = 0.0312)"
    assert rr.verdict_word(v["duo_beats_udlm"]["verdict"]) == "not shown"


def _gen_data(seeds):
    gen = {}
    for s in seeds:
        gen[f"duo|ancestral|s{s}"] = {"8": {"gen_ppl": 400.0, "gen_ppl_stderr": 5.0, "entropy": 4.0},
                                      "256": {"gen_ppl": 100.0, "gen_ppl_stderr": 2.0, "entropy": 4.0}}
        gen[f"duo_dcd|ancestral|s{s}"] = {"8": {"gen_ppl": 300.0 if s == 1 else 150.0, "entropy": 4.0}}
        gen[f"mdlm|greedy|s{s}"] = {"8": {"gen_ppl": 500.0, "entropy": 4.2}}
    return {"corpora": {"a": {"plan": {"seeds": list(seeds), "gen_steps": [8, 256]}, "genppl": gen, "train": {}}}}


def test_dcd_and_few_step_verdicts(rr):
    v = {x["id"]: x for x in rr.claims(_gen_data([0, 1, 2]))}
    assert v["sampler_limits_few_steps"]["verdict"] == "shown"
    shares = [x["share"] for x in v["dcd_gap_T8"]["per_pair"]]
    assert shares == pytest.approx([math.log(400 / 150) / math.log(4), math.log(400 / 300) / math.log(4),
                                    math.log(400 / 150) / math.log(4)])
    assert v["dcd_gap_T8"]["verdict"] == "not shown (2 of 3)"  # seed 1 closes only ~21 %
    assert v["duo_vs_mdlm_T8_ancestral"]["verdict"].startswith("shown (every pair: 3/3")
    # fewer than 3 pairs: no verdict either way, whatever the direction
    v2 = {x["id"]: x for x in rr.claims(_gen_data([0, 1]))}
    for cid in ("sampler_limits_few_steps", "dcd_gap_T8", "duo_vs_mdlm_T8_ancestral"):
        assert v2[cid]["verdict"].startswith("not measured enough (2 of the 3"), cid
        assert rr.verdict_word(v2[cid]["verdict"]) == "not measured"


def test_speedup_ladder_uses_levels_of_the_unigram(rr):
    """UDLM reaches 0.5 x unigram (75) at step 200 + 100 * ln(100/75)/ln 2; Duo (curriculum 50 %) at step 100 +
    100 * ln(100/75)/ln 4 (log-linear between the evaluations)."""
    data = _data({"a": [-1]})
    rows = {r["level"]: r for r in rr.speedup_ladder(data["corpora"], "duo_c50")}
    su = 200 + 100 * math.log(100 / 75) / math.log(2)
    sd = 100 + 100 * math.log(100 / 75) / math.log(4)
    assert rows[0.5]["mean"] == pytest.approx(su / sd) and rows[0.5]["reached_by_both"] == 1
    assert rows[0.25]["reached_by_both"] == 0 and rows[0.25]["mean"] is None  # 37.5: UDLM never gets there


def test_reading_tags_are_checked_against_the_verdicts(rr):
    verdicts = [{"id": "a", "verdict": "shown (every pair: 6/6; sign test p = 0.0312)"},
                {"id": "b", "verdict": "not shown (2 of 6 pairs; sign test p = 0.688)"},
                {"id": "c", "verdict": "lower Gen PPL but not at a comparable entropy (...)"}]
    ok = "Duo wins [claim a: shown]; no [claim b: not shown]; [claim c: mixed]."
    assert rr.check_reading(ok, verdicts) == []
    bad = rr.check_reading("[claim a: not shown] [claim zz: shown]", verdicts)
    assert len(bad) == 2 and "a: not shown" in bad[0] and "no such claim" in bad[1]
    # claim ids carry the step count in capitals (dcd_gap_T8): those tags are checked too
    few = [{"id": "dcd_gap_T8", "verdict": "not shown (3 of 6)"}]
    assert rr.check_reading("[claim dcd_gap_T8: not shown]", few) == []
    assert len(rr.check_reading("[claim dcd_gap_T8: shown]", few)) == 1


def test_the_committed_reading_agrees_with_the_committed_results(rr):
    """docs/reproduction/reading.md (hand-written) and docs/reproduction/results.json (generated): every claim the
    reading tags has the verdict the results give it."""
    import json

    results, reading = REPO / "docs" / "reproduction" / "results.json", REPO / "docs" / "reproduction" / "reading.md"
    if not (results.is_file() and reading.is_file()):
        pytest.skip("no committed reproduction results / reading")
    claims = json.loads(results.read_text())["claims"]
    text = reading.read_text()
    assert rr.READING_TAG.findall(text), "the reading tags no claim"
    assert rr.check_reading(text, claims) == []
