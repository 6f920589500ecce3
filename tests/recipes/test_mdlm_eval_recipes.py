"""A tiny MDLM model trained here (``tune run duo_pretrain --config duo/mdlm_tiny_cpu``, shrunk) evaluated through
``duo_eval`` (vs ``nelbo_perplexity(process=AbsorbingProcess)`` on independently built blocks) and through lm-eval's
``simple_evaluate`` on the bundled offline tasks (vs ``conditional_nelbo(process=...)`` for one request)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"


@pytest.fixture(scope="module")
def mdlm_dir(tiny_assets, tmp_path_factory):
    from duo_plugin.data.tokenizers import load_tokenizer

    out = tmp_path_factory.mktemp("mdlm")
    k = int(load_tokenizer(tiny_assets["tokenizer"]).vocab_size)
    cmd = ["tune", "run", "duo_pretrain", "--config", "duo/mdlm_tiny_cpu", f"output_dir={out}",
           f"tokenizer.path={tiny_assets['tokenizer']}", "data.source=files", f"data.files=[{tiny_assets['corpus']}]",
           "data.seq_len=16", f"data.cache_dir={out / 'cache'}", f"model.vocab_size={k + 1}", "model.dim=32",
           "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16", "global_batch_size=8", "eval_batch_size=16",
           "max_steps=6", "eval_every=0", "checkpoint.every=0", "progress_bar=false", "log_every=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    exe = Path(sys.executable).with_name("tune")
    cmd[0] = str(exe) if exe.exists() else "tune"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "final", k


@pytest.mark.slow
def test_duo_eval_and_lm_eval_score_a_trained_mdlm_model(mdlm_dir, tiny_assets, tmp_path):
    pytest.importorskip("lm_eval")
    from duo_plugin.data import text as data_text
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.diffusion.absorbing import AbsorbingProcess
    from duo_plugin.eval.likelihood import conditional_nelbo, nelbo_perplexity
    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.recipes.duo_eval import run
    from duo_plugin.sampling import DenoiserFn

    final, k = mdlm_dir
    model = load_pretrained(final)
    assert model.duo_metadata["objective"] == "mdlm" and model.duo_metadata["mask_id"] == k
    tok = load_tokenizer(final / "tokenizer")

    # duo_eval picks the absorbing process from the folder's metadata
    cfg = OmegaConf.load(CONFIGS / "eval_ppl.yaml")
    for key, v in {"checkpoint": str(final), "output_dir": str(tmp_path / "ev"), "progress_bar": False,
                   "mc_passes": 2, "batch_size": 8, "dataset.source": "files",
                   "dataset.files": [str(tiny_assets["corpus"])], "dataset.val_fraction": 0.1,
                   "dataset.cache_dir": str(tmp_path / "c")}.items():
        OmegaConf.update(cfg, key, v, force_add=True)
    m = run(cfg)
    got = m["sets"]["files"]
    assert m["process"] == "absorbing" and "AbsorbingProcess" in got["estimator"]
    # reference: blocks from the low-level text functions, the process built by hand
    docs = data_text.load_tokenized([str(tiny_assets["corpus"])], tok, sample_by="paragraph")
    _, held = data_text.split_heldout(docs, fraction=0.1)
    blocks, mask = data_text.wrap_blocks(held, 16, tok.bos_id, tok.eos_id, drop_remainder=False, return_mask=True)
    proc = AbsorbingProcess(k + 1, k, valid_vocab=model.valid_vocab)
    ref = nelbo_perplexity(DenoiserFn(model), blocks, mask, batch_size=5, mc_passes=2, seed=0,
                           valid_vocab=model.valid_vocab, t_min=1e-3, progress=False,
                           special_ids=(tok.bos_id, tok.eos_id, tok.pad_id), process=proc)
    assert got["tokens"] == ref["tokens"] and got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    uni = nelbo_perplexity(DenoiserFn(model), blocks, mask, batch_size=8, mc_passes=2, seed=0,
                           valid_vocab=model.valid_vocab, progress=False,
                           special_ids=(tok.bos_id, tok.eos_id, tok.pad_id))
    assert abs(uni["nll_per_token"] - got["nll_per_token"]) > 1e-3  # a different process gives another number

    # lm-eval: simple_evaluate on the bundled offline tasks (loglikelihood + rolling)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from duo_plugin.integrations import lm_eval as dl

    lm = dl.DuoLM(pretrained=str(final), mc_samples=4, batch_size="16")
    assert lm.process_spec.kind == "absorbing" and lm.process_spec.mask_id == k
    tm = TaskManager(include_path=str(dl.TASKS_DIR), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["duo_shakespeare_ppl", "duo_shakespeare_lastword"], task_manager=tm,
                          limit=3, bootstrap_iters=0)["results"]
    assert math.isfinite(res["duo_shakespeare_ppl"]["word_perplexity,none"])
    assert res["duo_shakespeare_ppl"]["word_perplexity,none"] > 1
    assert res["duo_shakespeare_lastword"]["perplexity,none"] > 1
    assert 0 <= res["duo_shakespeare_lastword"]["acc,none"] <= 1
    # one request against the library's conditional MDLM NELBO with the same noise keys
    ctx, cont = tok.encode("the king", add_bos=False, add_eos=False), tok.encode(" rode", add_bos=False, add_eos=False)
    (ll, _), = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    ids = torch.tensor([[tok.bos_id] + ctx + cont])
    keep = torch.arange(ids.shape[1]) < 1 + len(ctx)
    c = conditional_nelbo(DenoiserFn(model), ids, keep, mc_samples=4, seed=0,
                          indices=[dl.request_index(ids[0].tolist())], process=proc, t_min=1e-3)
    assert -ll == pytest.approx(float(c.nelbo[0]), rel=1e-5)
