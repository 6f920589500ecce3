"""Catalogue of bad inputs (a new user's mistakes, corrupt files, hostile model folders): each must stop with a
non-zero exit and ONE line naming the key / file and the fix, and must leave an earlier run's outputs unchanged.
Plus the cases that must NOT stop: a corrupt latest checkpoint falls back to the previous good one with a warning."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.errors import user_errors
from duo_plugin.recipes import duo_distill as dd
from duo_plugin.recipes import duo_generate as dg
from duo_plugin.recipes import duo_pretrain as dp

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "duo_plugin" / "configs" / "duo"


def _cfg(root: Path, assets: dict, name: str, **overrides):
    cfg = OmegaConf.create({
        "output_dir": str(root / name), "seed": 3, "device": "cpu",
        "tokenizer": {"path": str(assets["tokenizer"])},
        "data": {"source": "files", "files": [str(assets["corpus"])], "seq_len": 16, "packing": "wrap",
                 "val_fraction": 0.1, "cache_dir": str(root / "cache")},
        "model": {"_component_": "duo_plugin.models.dit.duo_dit_tiny", "dropout": 0.0, "dim": 32, "n_layers": 1,
                  "n_heads": 2, "cond_dim": 16},
        "global_batch_size": 8, "eval_batch_size": 16, "max_steps": 4,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.0},
        "lr_scheduler": {"name": "constant_with_warmup", "warmup_steps": 2}, "ema": {"decay": 0.9},
        "curriculum": {"steps": 2, "tau": 1e-3, "table_points": 65}, "eval_every": 0,
        "checkpoint": {"every": 2, "keep_last": 3},
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(root / name / "logs")},
        "progress_bar": False,
    })
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False, force_add=True)
    return cfg


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".duo_run.lock"}


@pytest.fixture(scope="module")
def world(tiny_assets, tmp_path_factory):
    """One completed run (the 'existing outputs'), an unrelated tokenizer, a binary file and corrupt checkpoints."""
    from duo_plugin.data.tokenizers import train_sentencepiece

    root = tmp_path_factory.mktemp("bad_inputs")
    summary = dp.run(_cfg(root, tiny_assets, "good"))
    good = root / "good"
    other = root / "other_corpus.txt"
    other.write_text("\n\n".join(f"Zebra {i} quixotic yodel {i * 7} vortex." for i in range(200)))
    train_sentencepiece([other], 300, root / "other_tok", hard_vocab_limit=False)
    (root / "random.bin").write_bytes(random.Random(0).randbytes(30000))

    def corrupt(name: str, how: str) -> Path:
        d = root / name
        shutil.copytree(good / "checkpoints" / "step_00000002", d / "checkpoints" / "step_00000002")
        if how == "truncate_model":
            f = d / "checkpoints" / "step_00000002" / "model" / "model.safetensors"
            f.write_bytes(f.read_bytes()[:200])
        elif how == "truncate_state":
            f = d / "checkpoints" / "step_00000002" / "training_state.pt"
            f.write_bytes(f.read_bytes()[:500])
        elif how == "nan":
            from safetensors.torch import load_file, save_file

            f = d / "checkpoints" / "step_00000002" / "model" / "model.safetensors"
            sd = load_file(str(f))
            k = next(k for k, v in sd.items() if v.is_floating_point())
            sd[k] = torch.full_like(sd[k], float("nan"))
            save_file(sd, str(f))
        return d

    hostile = root / "hostile_model"
    shutil.copytree(good / "final", hostile)
    shutil.rmtree(hostile / "tokenizer")
    meta = json.loads((hostile / "duo_config.json").read_text())
    meta.setdefault("metadata", {})["tokenizer"] = {
        "type": "torchtune", "component": "subprocess.check_output", "kwargs": {"args": ["touch", str(root / "pwn")]}}
    (hostile / "duo_config.json").write_text(json.dumps(meta))
    return {"root": root, "good": good, "summary": summary, "assets": tiny_assets, "corrupt": corrupt,
            "hostile": hostile}


def _pre(w, name, **o):
    return lambda: dp.run(_cfg(w["root"], w["assets"], name, **o))


def _gen(w, name, **o):
    cfg = OmegaConf.load(CONFIGS / "generate.yaml")
    upd = {"checkpoint": str(w["good"] / "final"), "output_dir": str(w["root"] / name), "steps": 2,
           "num_samples": 1, "batch_size": 1, "progress_bar": False, **o}
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False, force_add=True)
    return lambda: dg.run(cfg)


def _held_lock(w):
    from duo_plugin.training.run_dir import RunDirLock

    def go():
        d = w["root"] / "locked"
        d.mkdir(exist_ok=True)
        with RunDirLock(d):  # another writer holds output_dir (flock is per open file: same process works too)
            dp.run(_cfg(w["root"], w["assets"], "locked", resume="auto"))
    return go


# (id, prog, factory(world) -> callable, substrings the one line must contain)
CATALOGUE = [
    ("rerun_into_existing_output_dir", "duo_pretrain", lambda w: _pre(w, "good"),
     ["output_dir=", "good is not empty", "resume=true", "overwrite=true"]),
    ("resume_true_without_checkpoint", "duo_pretrain", lambda w: _pre(w, "empty", resume=True),
     ["resume=true but", "holds no checkpoint", "resume=auto"]),
    ("concurrent_writer", "duo_pretrain", _held_lock, ["in use by another run", "locked"]),
    ("max_steps_abc", "duo_pretrain", lambda w: _pre(w, "b1", max_steps="abc"),
     ["config key 'max_steps' must be an integer, got 'abc'"]),
    ("optimizer_lr_fast", "duo_pretrain", lambda w: _pre(w, "b2", **{"optimizer.lr": "fast"}),
     ["config key 'optimizer.lr' must be a number, got 'fast'"]),
    ("global_batch_size_31_9", "duo_pretrain", lambda w: _pre(w, "b3", global_batch_size=31.9),
     ["config key 'global_batch_size' must be an integer, got 31.9"]),
    ("random_bytes_as_data", "duo_pretrain", lambda w: _pre(w, "b4", **{"data.files": [str(w["root"] / "random.bin")]}),
     ["random.bin is not UTF-8 text"]),
    ("safetensors_as_data", "duo_pretrain",
     lambda w: _pre(w, "b5", **{"data.files": [str(w["good"] / "final" / "model.safetensors")]}),
     ["model.safetensors is not UTF-8 text"]),
    ("init_from_with_unrelated_tokenizer", "duo_pretrain",
     lambda w: _pre(w, "b6", init_from=str(w["good"] / "final"), **{"tokenizer.path": str(w["root"] / "other_tok")}),
     ["does not match the one init_from=", "tokenizer.path=", "final/tokenizer"]),
    ("init_from_seq_len_too_long", "duo_pretrain",
     lambda w: _pre(w, "b7", init_from=str(w["good"] / "final"), **{"data.seq_len": 64}),
     ["data.seq_len=64", "lower data.seq_len to <= 16", "init_from="]),
    ("output_dir_is_a_file", "duo_pretrain", lambda w: _pre(w, "good/summary.json"),
     ["summary.json exists and is not a directory"]),
    ("output_dir_not_writable", "duo_pretrain", lambda w: _pre(w, "good/summary.json/sub"),
     ["sub is not writable"]),
    ("init_from_missing", "duo_pretrain", lambda w: _pre(w, "b8", init_from=str(w["root"] / "nope")),
     ["init_from=", "nope does not exist"]),
    ("truncated_model_safetensors", "duo_pretrain",
     lambda w: (lambda d: _pre(w, d.name, resume=True))(w["corrupt"]("c1", "truncate_model")),
     ["model.safetensors: cannot read the weights", "truncated or corrupt"]),
    ("truncated_training_state", "duo_pretrain",
     lambda w: (lambda d: _pre(w, d.name, resume=True))(w["corrupt"]("c2", "truncate_state")),
     ["training_state.pt cannot be read", "truncated or corrupt"]),
    ("nan_weights_in_checkpoint", "duo_pretrain",
     lambda w: (lambda d: _pre(w, d.name, resume=True))(w["corrupt"]("c3", "nan")),
     ["holds NaN/Inf values", "checkpoint is corrupt"]),
    ("distill_global_batch_size_31_9", "duo_distill",
     lambda w: (lambda: dd.run(OmegaConf.merge(OmegaConf.load(CONFIGS / "distill_tiny_cpu.yaml"), {
         "init_from": str(w["good"] / "final"), "output_dir": str(w["root"] / "d1"), "global_batch_size": 31.9}))),
     ["config key 'global_batch_size' must be an integer, got 31.9"]),
    ("generate_top_p_0", "duo_generate", lambda w: _gen(w, "g1", top_p=0), ["top_p must be in (0, 1]", "got 0"]),
    ("generate_temperature_0", "duo_generate", lambda w: _gen(w, "g2", temperature=0),
     ["temperature must be > 0", "noise_removal=greedy"]),
    ("generate_infill_mask_x", "duo_generate", lambda w: _gen(w, "g3", infill="The king [MASK:x] the queen"),
     ["infill marker '[MASK:x]'", "malformed"]),
    ("generate_infill_unclosed", "duo_generate", lambda w: _gen(w, "g4", infill="The king [MASK:3 the queen"),
     ["infill marker '[MASK:3 the queen'", "closed with ']'"]),
    ("generate_infill_mask_0", "duo_generate", lambda w: _gen(w, "g5", infill="The king [MASK:0] the queen"),
     ["'[MASK:0]'", "0 positions"]),
    ("generate_hostile_tokenizer_descriptor", "duo_generate",
     lambda w: _gen(w, "g6", checkpoint=str(w["hostile"])), ["refusing tokenizer builder 'subprocess.check_output'"]),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_one_line_nonzero_exit_outputs_unchanged(case, world, capsys, monkeypatch):
    name, prog, factory, must = case
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    fn = factory(world)
    before = _snapshot(world["good"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        with user_errors(prog):
            fn()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for s in must:
        assert s in lines[0], (s, lines[0])
    assert _snapshot(world["good"]) == before, "an existing run's outputs changed"
    assert not (world["root"] / "pwn").exists()


def test_overwrite_true_replaces_and_resume_auto_starts_fresh(world):
    root, assets = world["root"], world["assets"]
    d = root / "ow"
    shutil.copytree(world["good"], d, ignore=shutil.ignore_patterns(".duo_run.lock", "logs"))
    s = dp.run(_cfg(root, assets, "ow", overwrite=True, max_steps=2, **{"checkpoint.every": 0}))
    assert s["steps"] == 2 and [p.name for p in (d / "checkpoints").iterdir() if p.is_dir()] == ["step_00000002"]
    s2 = dp.run(_cfg(root, assets, "auto_fresh", resume="auto", max_steps=2))
    assert s2["losses"] == world["summary"]["losses"][:2]


def test_corrupt_latest_checkpoint_falls_back_to_previous(world, caplog):
    """step_4's training state is truncated: resume=true warns and continues from step_2, reproducing the
    uninterrupted losses exactly (the previous good checkpoint is used, nothing is lost but two steps)."""
    root, good = world["root"], world["good"]
    d = root / "fallback"
    shutil.copytree(good / "checkpoints", d / "checkpoints")
    f = d / "checkpoints" / "step_00000004" / "training_state.pt"
    f.write_bytes(f.read_bytes()[:400])
    import logging

    with caplog.at_level(logging.WARNING):
        s = dp.run(_cfg(root, world["assets"], "fallback", resume=True))
    assert s["losses"] == world["summary"]["losses"]
    assert any("step_00000004 is unusable" in r.getMessage() and "falling back" in r.getMessage()
               and "step_00000002" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_cli_user_error_is_one_line_and_debug_shows_traceback(world, tmp_path):
    """Through the real entry point: exit status 2, one 'error:' line and no traceback; DUO_DEBUG=1 shows it."""
    cfg = _cfg(world["root"], world["assets"], "cli", max_steps="abc")
    path = tmp_path / "c.yaml"
    OmegaConf.save(cfg, path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DUO_DEBUG", None)
    cmd = [sys.executable, "-m", "duo_plugin.recipes.duo_pretrain", "--config", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 2, p.stderr[-3000:]
    errs = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errs) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "config key 'max_steps' must be an integer, got 'abc'" in errs[0]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "DUO_DEBUG": "1"}, timeout=300,
                       cwd=str(tmp_path))
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr


def test_cleanup_after_failed_setup_keeps_the_real_error(world):
    r = dp.DuoPretrainRecipe(_cfg(world["root"], world["assets"], "good/summary.json"))
    with pytest.raises(ValueError, match="not a directory"):
        r.setup()
    r.cleanup()  # on main: AttributeError: ... has no attribute 'metric_logger'


def test_readme_states_the_measured_1_vs_n_agreement():
    """The README must not claim bit-identical 1-vs-N-process losses: measured equal to ~2e-7 relative."""
    text = " ".join((REPO / "README.md").read_text().split())
    assert "2e-7 relative, not bit-identical" in text
    assert "N processes, any gradient accumulation and any resume point give the same losses" not in text


def test_generate_keeps_explicit_zero_values():
    """A value the user sets is never replaced by a default: guidance_weight=0 (unconditional) stays 0."""
    assert dg.sampler_options(OmegaConf.create({"guidance_weight": 0}))["guidance_weight"] == 0.0
    assert dg.sampler_options(OmegaConf.create({}))["guidance_weight"] == 1.0
    p = dg.sampling_params(OmegaConf.create({"steps": 4, "num_samples": 2, "top_p": 0.5, "temperature": "0.7"}))
    assert (p["top_p"], p["temperature"], p["steps"]) == (0.5, 0.7, 4)
