"""The ancestral family is unchanged by the scheduler split: same seeds, same samples and trajectories, for every
option and posterior_impl (recorded from the pre-split sampler in golden_samples.json; see golden_cases.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from duo_plugin.sampling import sample

_spec = importlib.util.spec_from_file_location("golden_cases", Path(__file__).with_name("golden_cases.py"))
_gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gc)
GOLDEN, cases, run_case = _gc.GOLDEN, _gc.cases, _gc.run_case

_RECORDED = json.loads(GOLDEN.read_text())
_CASES = list(cases())


def test_every_case_was_recorded():
    assert sorted(n for n, _ in _CASES) == sorted(_RECORDED)


@pytest.mark.parametrize("name,kw", _CASES, ids=[n for n, _ in _CASES])
def test_same_seed_same_samples(name, kw):
    assert run_case(sample, kw) == _RECORDED[name]
