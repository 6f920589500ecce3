"""`python benchmarks/reproduce.py --quick`: the whole reproduction pipeline at toy size, through `tune run`.

Checks that every stage produced numbers (not that the claims hold: the quick models are barely trained) and that
the report and its figures are written. The baselines SEDD (absorbing, uniform) and D3PM train for 4 steps only
(``QUICK.baseline_steps``) and are sampled at T = 8: enough to run every path (training, validation, zero-shot
``duo_eval``, ``duo_generate``) through the folder's process lookup.  About 6 minutes on 2 busy cores (345 s at load
5-6, against 195 s for the pipeline without the three baselines; many `tune run` start-ups)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_reproduce_quick(tmp_path):
    work, report = tmp_path / "work", tmp_path / "report" / "reproduction.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--quick", "--work", str(work),
                           "--report", str(report)], env=env, capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=2300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((work / "results.json").read_text())
    for key in ("ar_s0", "udlm_s0", "duo_s0"):
        ppl = res["train"][key]["summary"]["final_val_ppl"]
        assert math.isfinite(ppl) and 1 < ppl < 600, (key, ppl)  # K = 256: an untrained model is near 256
    assert res["train"]["duo_s0"]["summary"]["curriculum_steps"] == 10
    assert res["train"]["udlm_s0"]["summary"]["curriculum_steps"] == 0
    for key, objective in (("sedd_absorb_s0", "sedd_absorb"), ("sedd_uniform_s0", "sedd_uniform"),
                           ("d3pm_s0", "d3pm")):
        summ = res["train"][key]["summary"]
        assert summ["objective"] == objective and summ["steps"] == 4, (key, summ)
        assert math.isfinite(summ["final_val_ppl"]) and summ["final_val_ppl"] > 1, (key, summ)
    assert (work / "runs" / "duo_dcd" / "final").is_dir()
    v = res["variance"]
    assert v["curriculum"]["batches"] == v["discrete"]["batches"] == 3
    for lab in ("Duo (ancestral)", "Duo (greedy-tail)", "Duo+DCD (ancestral)"):
        for steps in ("8", "16"):
            r = res["genppl"][lab][steps]
            # (greedy-tail samples of a 40-step model may be one repeated token: entropy 0)
            assert math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 and 0 <= r["entropy"] < 10, (lab, steps, r)
    # sampled by duo_generate itself, with the process of the folder's objective
    for lab, kind in (("MDLM (greedy)", "absorbing"), ("SEDD-absorb (ancestral)", "sedd"),
                      ("SEDD-uniform (ancestral)", "sedd"), ("D3PM (ancestral)", "d3pm")):
        r = res["genppl"][lab]["8"]
        assert r["process"] == kind and math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1, (lab, r)
    assert "16" not in res["genppl"]["D3PM (ancestral)"]  # the baselines are sampled at QUICK.baseline_gen_steps
    zs = res["zeroshot"]
    for key in ("duo_s0", "udlm_s0", "ar_s0"):
        assert math.isfinite(zs[key]["ppl"]), key
    # every diffusion folder through duo_eval, its process found from its metadata, on the same content tokens
    kinds = {"duo_s0": "uniform", "duo_dcd": "uniform", "udlm_s0": "uniform", "mdlm_s0": "absorbing",
             "sedd_absorb_s0": "sedd", "sedd_uniform_s0": "sedd", "d3pm_s0": "d3pm"}
    for key, kind in kinds.items():
        assert zs[key]["process"] == kind and math.isfinite(zs[key]["ppl"]) and zs[key]["ppl"] > 1, (key, zs[key])
        assert zs[key]["tokens"] == zs["duo_s0"]["tokens"] > 0, (key, zs[key]["tokens"])
    ad = res["adapt"]
    assert ad["hf_checkpoint"]["architectures"] == ["LlamaForCausalLM"]
    for name in ("adapted", "scratch"):
        assert math.isfinite(ad[name]["final_val_ppl"])
    # the adapted run starts from the AR weights: far below the from-scratch model's initial PPL
    assert ad["adapted"]["first_val_ppl"] < ad["scratch"]["first_val_ppl"]
    text = report.read_text()
    for row in ("| SEDD-absorb |", "| SEDD-uniform |", "| D3PM |", "| sedd_absorb_s0 | sedd |", "| d3pm_s0 | d3pm |"):
        assert row in text, row
    for heading in ("(a) Validation NELBO perplexity", "(b) Gen PPL", "(c) Zero-shot", "(d) Adapting",
                    "Reading of the paper's claims", "## Commands"):
        assert heading in text
    figs = report.parent / "reproduction_figures"
    for png in ("training_vs_steps.png", "training_vs_wall.png", "genppl_vs_steps.png", "genppl_vs_entropy.png",
                "adaptation.png"):
        assert (figs / png).read_bytes()[:4] == b"\x89PNG", png


def _reproduce_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_under_test", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_full_plan_gives_every_method_the_same_budget():
    """The baseline table compares methods at equal budget: in the full plan every method (SEDD and D3PM included)
    trains ``steps`` steps and every Gen PPL row samples at every ``gen_steps``; only ``--quick`` shortens the
    baselines. Every method's config ships, and every Gen PPL row samples a model the plan trains."""
    rp = _reproduce_module()
    full = rp.Plan()
    assert {"sedd_absorb", "sedd_uniform", "d3pm"} <= set(rp.METHODS)
    for method, (config, _) in rp.METHODS.items():
        assert rp.config_available(config), config
        assert rp.train_steps(full, method) == full.steps == 1600, method
        assert rp.train_steps(rp.QUICK, method) == (4 if method in rp.BASELINES else rp.QUICK.steps), method
    trained = {f"{m}_s{s}" for m in rp.METHODS for s in (0, 1, 2)} | {"duo_dcd"}
    for label, key, _ in rp.GEN_RUNS:
        assert key in trained, (label, key)
        assert rp._gen_steps(full, key) == full.gen_steps, label
    assert set(rp.QUICK.gen_labels) <= {lab for lab, _, _ in rp.GEN_RUNS}
