"""SEDD (absorb, uniform) and D3PM end to end: a few ``tune run duo_pretrain --config duo/<baseline>_tiny_cpu`` steps
(shrunk), the folder's metadata, ``duo_eval`` (the process found from the metadata) vs ``nelbo_perplexity`` with the
process built by hand, a finite NELBO perplexity, and samples from the baseline's scheduler."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
BASELINES = {"sedd_absorb": 1, "sedd_uniform": 0, "d3pm": 1}  # config stem -> extra [MASK] rows


def train(name: str, tiny_assets, out: Path, k: int) -> Path:
    cmd = ["tune", "run", "duo_pretrain", "--config", f"duo/{name}_tiny_cpu", f"output_dir={out}",
           f"tokenizer.path={tiny_assets['tokenizer']}", "data.source=files", f"data.files=[{tiny_assets['corpus']}]",
           "data.seq_len=16", f"data.cache_dir={out / 'cache'}", f"model.vocab_size={k + BASELINES[name]}",
           "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16", "global_batch_size=8",
           "eval_batch_size=16", "max_steps=4", "eval_every=2", "eval_max_batches=1", "checkpoint.every=0",
           "progress_bar=false", "log_every=1"]
    if name == "d3pm":
        cmd.append("objective.steps=50")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    exe = Path(sys.executable).with_name("tune")
    cmd[0] = str(exe) if exe.exists() else "tune"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "final"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_trains_evaluates_and_samples(name, tiny_assets, tmp_path):
    from duo_plugin.data import text as data_text
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.diffusion.d3pm import D3PMProcess
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.diffusion.sedd import SEDDProcess
    from duo_plugin.eval.likelihood import nelbo_perplexity
    from duo_plugin.eval.processes import process_for_model
    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.recipes.duo_eval import run
    from duo_plugin.sampling import DenoiserFn
    from duo_plugin.sampling import sample, scheduler_for_model
    from duo_plugin.sampling.d3pm import D3PMScheduler
    from duo_plugin.sampling.sedd import SEDDScheduler

    k = int(load_tokenizer(tiny_assets["tokenizer"]).vocab_size)
    final = train(name, tiny_assets, tmp_path / "run", k)
    model = load_pretrained(final)
    meta = model.duo_metadata
    assert meta["objective"] == name
    assert meta.get("mask_id") == (k if BASELINES[name] else None)
    if name == "d3pm":
        assert meta["d3pm_steps"] == 50 and model.time_conditioning is False
    tok = load_tokenizer(final / "tokenizer")

    cfg = OmegaConf.load(CONFIGS / "eval_ppl.yaml")
    for key, v in {"checkpoint": str(final), "output_dir": str(tmp_path / "ev"), "progress_bar": False,
                   "mc_passes": 2, "batch_size": 8, "dataset.source": "files",
                   "dataset.files": [str(tiny_assets["corpus"])], "dataset.val_fraction": 0.1,
                   "dataset.cache_dir": str(tmp_path / "c")}.items():
        OmegaConf.update(cfg, key, v, force_add=True)
    m = run(cfg)
    got = m["sets"]["files"]
    assert m["process"] == ("d3pm" if name == "d3pm" else "sedd")
    assert math.isfinite(got["ppl"]) and got["ppl"] > 1
    # reference: the same blocks and the process built by hand (not through eval.processes)
    docs = data_text.load_tokenized([str(tiny_assets["corpus"])], tok, sample_by="paragraph")
    _, held = data_text.split_heldout(docs, fraction=0.1)
    blocks, mask = data_text.wrap_blocks(held, 16, tok.bos_id, tok.eos_id, drop_remainder=False, return_mask=True)
    width = int(model.vocab_size)
    if name == "d3pm":
        proc = D3PMProcess(width, k, valid_vocab=model.valid_vocab, steps=50)
    elif name == "sedd_absorb":
        proc = SEDDProcess(width, "absorb", k, valid_vocab=model.valid_vocab, schedule=LogLinearSchedule(1e-3))
    else:
        proc = SEDDProcess(width, "uniform", valid_vocab=model.valid_vocab, schedule=LogLinearSchedule(1e-3))
    ref = nelbo_perplexity(DenoiserFn(model), blocks, mask, batch_size=5, mc_passes=2, seed=0,
                           valid_vocab=model.valid_vocab, t_min=1e-3, progress=False, schedule=proc.schedule,
                           special_ids=(tok.bos_id, tok.eos_id, tok.pad_id), process=proc)
    assert got["tokens"] == ref["tokens"] and got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)

    # samples from the baseline's scheduler, picked from the folder's metadata (sampling.scheduler_for_model)
    sched = scheduler_for_model(model)
    assert isinstance(sched, D3PMScheduler if name == "d3pm" else SEDDScheduler)
    assert type(sched.process).__name__ == type(process_for_model(model).process).__name__
    res = sample(DenoiserFn(model), sched, batch_size=3, seq_len=16, steps=8, seed=0, noise_removal="ancestral",
                 progress=False, return_trajectory=True)
    assert res.tokens.shape == (3, 16) and res.nfe == 9
    assert bool(model.valid_vocab[res.tokens].all())  # data ids only: no [MASK] left, no invalid id

    # duo_generate samples the folder with the same scheduler (no process branch in the recipe)
    from duo_plugin.recipes.duo_generate import run as generate_run

    gcfg = OmegaConf.load(CONFIGS / "generate.yaml")
    for key, v in {"checkpoint": str(final), "output_dir": str(tmp_path / "gen"), "num_samples": 2, "batch_size": 2,
                   "steps": 8, "progress_bar": False}.items():
        OmegaConf.update(gcfg, key, v, force_add=True)
    gm = generate_run(gcfg)
    assert gm["process"] == m["process"]
    assert (tmp_path / "gen" / "samples.jsonl").exists()
