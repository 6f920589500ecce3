"""The ``duo`` lm-eval backend's scores are unchanged by the move of evaluation into a library and by the packing of
requests and Monte Carlo samples: same seeds, same per-request values (recorded before the move in
``lm_eval_goldens.json``; see ``lm_eval_golden_cases.py``) for Duo, UDLM, MDLM and AR models.

Tolerance: the greedy flags must be identical; a log-likelihood may differ by 1e-6 relative. Every row keeps its
time and corruption noise (keyed by seed, request and sample), so the only legitimate change is floating-point
rounding: which rows share a forward (and at what padded width) changes the float32 reduction order of the batched
matmuls inside the network (about 1e-7 relative on x_θ), and the float64 sums over positions / windows then differ
in the last digits. A change of noise, time, window or integrand moves a value by far more (at M = 8 the MC standard
errors here are nats).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

_spec = importlib.util.spec_from_file_location("lm_eval_golden_cases",
                                               Path(__file__).with_name("lm_eval_golden_cases.py"))
_gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gc)

_RECORDED = json.loads(_gc.GOLDEN.read_text())
_CASES = _gc.cases()
REL = 1e-6


def test_every_case_was_recorded():
    assert sorted(n for n, *_ in _CASES) == sorted(_RECORDED)


@pytest.mark.parametrize("name,kind,options,rolling", _CASES, ids=[c[0] for c in _CASES])
def test_same_seed_same_scores(name, kind, options, rolling):
    got, want = _gc.run_case(kind, options, rolling), _RECORDED[name]
    assert sorted(got) == sorted(want)
    assert [g for _, g in got["loglikelihood"]] == [g for _, g in want["loglikelihood"]]
    for key in got:
        a = [v[0] if isinstance(v, list) else v for v in got[key]]
        b = [v[0] if isinstance(v, list) else v for v in want[key]]
        bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if not math.isclose(x, y, rel_tol=REL, abs_tol=1e-9)]
        assert len(a) == len(b) and not bad, f"{name} {key}: (index, now, recorded) {bad}"
