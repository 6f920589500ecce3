"""Behaviour is unchanged by moving sampling code: same seeds, same samples (and trajectories, NFE), replayed from
golden_samples.json (see golden_cases.py for when each group was recorded):

* the uniform-state sampler, every option and posterior_impl, Ψ modes / time profiles, prompt guidance, block
  generation and EOS lengths;
* the absorbing (MDLM) sampler: noise-removal modes, filters, valid ids, the x_θ cache (NFE and denoiser calls),
  prompt and per-row infill clamps;
* ``duo_generate`` on Duo, MDLM (with and without time conditioning) and AR model folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from duo_plugin.sampling import sample, sample_blocks

_spec = importlib.util.spec_from_file_location("golden_cases", Path(__file__).with_name("golden_cases.py"))
_gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gc)
GOLDEN = _gc.GOLDEN

_RECORDED = json.loads(GOLDEN.read_text())
_CASES = list(_gc.cases())
_EXTRA = list(_gc.uniform_extra_cases())
_MDLM = list(_gc.mdlm_cases())
_GENERATE = list(_gc.generate_cases())


def test_every_case_was_recorded():
    names = [n for group in (_CASES, _EXTRA, _MDLM, _GENERATE) for n, _ in group]
    assert len(set(names)) == len(names)
    assert sorted(names) == sorted(_RECORDED)


@pytest.mark.parametrize("name,kw", _CASES, ids=[n for n, _ in _CASES])
def test_same_seed_same_samples(name, kw):
    assert _gc.run_case(sample, kw) == _RECORDED[name]


@pytest.mark.parametrize("name,kw", _EXTRA, ids=[n for n, _ in _EXTRA])
def test_psi_guidance_blocks_same_samples(name, kw):
    assert _gc.run_uniform_extra(sample, sample_blocks, kw) == _RECORDED[name]


@pytest.mark.parametrize("name,kw", _MDLM, ids=[n for n, _ in _MDLM])
def test_mdlm_same_samples(name, kw):
    from duo_plugin.sampling.mdlm import sample_mdlm

    assert _gc.run_mdlm_case(sample_mdlm, kw) == _RECORDED[name]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _gc.generate_folders(tmp_path_factory.mktemp("golden_generate"))


@pytest.mark.parametrize("name,over", _GENERATE, ids=[n for n, _ in _GENERATE])
def test_duo_generate_same_samples(folders, name, over):
    from duo_plugin.recipes.duo_generate import run

    assert _gc.run_generate_case(run, folders, over) == _RECORDED[name]
