"""The shipped LLM-adaptation configs run with their OWN settings (activation checkpointing, EMA, fused AdamW, cosine
LR, top-k curriculum, bf16 request -> fp32 on CPU, accumulation) through a checkpoint save and an exact resume, on
tiny locally written Llama-3.2 / Qwen-2.5 HF checkpoints.  Only sizes (steps, batch, sequence length, table points),
paths and the device are changed; the architecture comes from the checkpoint's config.json (no model.* override)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.recipes import duo_pretrain as dp

CONFIG_DIR = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
K = 384
SHAPE = dict(vocab_size=K, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
             max_seq_len=32)


def write_tiny_hf(family: str, out: Path, seed: int = 0) -> Path:
    """A random tiny decoder saved as an HF checkpoint dir with a complete config.json (as HF writes it)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    if family == "llama":
        from torchtune.models.convert_weights import tune_to_hf
        from torchtune.models.llama3_2 import llama3_2

        dec = llama3_2(**SHAPE)
        hf = tune_to_hf(dec.state_dict(), num_heads=4, num_kv_heads=2, dim=32)
        extra = {"model_type": "llama", "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                 "rope_scaling": {"factor": 32.0, "rope_type": "llama3"}}
    else:
        from torchtune.models.qwen2 import qwen2
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        dec = qwen2(**SHAPE, tie_word_embeddings=True)
        hf = qwen2_tune_to_hf(dec.state_dict(), num_heads=4, num_kv_heads=2, dim=32, tie_word_embeddings=True)
        extra = {"model_type": "qwen2", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "vocab_size": K, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 32, "tie_word_embeddings": True,
        **extra}))
    return out


def shipped_cfg(stem: str, hf_dir: Path, assets: dict, out: Path, **overrides):
    """The shipped YAML with only sizes, paths and the device changed (model: section untouched)."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{stem}.yaml")
    upd = {
        "output_dir": str(out), "device": "cpu", "init_from": str(hf_dir), "tokenizer.path": str(assets["tokenizer"]),
        "data.files": [str(assets["corpus"])], "data.seq_len": 16, "data.sample_by": "paragraph",
        "data.val_fraction": 0.1, "global_batch_size": 8, "eval_batch_size": 8, "max_steps": 4,
        "eval_every": 0, "eval_max_batches": 1, "checkpoint.every": 2, "checkpoint.keep_last": 3,
        "curriculum.steps": 2, "curriculum.table_points": 129,
        "curriculum.table_cache": str(out.parent / "duality_cache"), "progress_bar": False, "log_every": 1,
    }
    upd.update(overrides)
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def _run_checked(cfg, family: str) -> dict:
    r = dp.DuoPretrainRecipe(cfg)
    try:
        r.setup()
        names = [n for n, _ in r.model.named_parameters()]
        if cfg.enable_activation_checkpointing:  # the shipped setting is really on
            assert any("_checkpoint_wrapped_module" in n for n in names)
        assert r.ema is not None and r.ema.decay == float(OmegaConf.load(CONFIG_DIR / "llama3_2_1b_adapt.yaml").ema.decay)
        # architecture from config.json although the YAML names the 1B / 0.5B builder
        assert len(r.model.decoder.layers) == 2 and r.model.vocab_size == K
        assert r.model.decoder.tok_embeddings.weight.shape == (K, 32)
        return r.train()
    finally:
        r.cleanup()


def _check_save_and_resume(stem: str, family: str, tiny_assets, tmp_path):
    hf = write_tiny_hf(family, tmp_path / f"hf_{family}")
    full = _run_checked(shipped_cfg(stem, hf, tiny_assets, tmp_path / "full"), family)
    step2 = tmp_path / "full" / "checkpoints" / "step_00000002"
    assert (step2 / "model" / "ema").is_dir() and (tmp_path / "full" / "final" / "config.json").is_file()
    resumed = _run_checked(shipped_cfg(stem, hf, tiny_assets, tmp_path / "resumed", resume=str(step2)), family)
    assert resumed["losses"] == full["losses"]  # bit-exact continuation from the step-2 checkpoint
    from duo_plugin.models.checkpoint import load_pretrained

    a = load_pretrained(tmp_path / "full" / "final", weights="ema").state_dict()
    b = load_pretrained(tmp_path / "resumed" / "final", weights="ema").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stem,family", [("llama3_2_1b_adapt", "llama"), ("qwen2_5_0_5b_adapt", "qwen")])
def test_shipped_adapt_config_saves_and_resumes(stem, family, tiny_assets, tmp_path):
    cfg = OmegaConf.load(CONFIG_DIR / f"{stem}.yaml")
    assert cfg.enable_activation_checkpointing is True and cfg.ema.decay  # what the crash needed
    _check_save_and_resume(stem, family, tiny_assets, tmp_path)


@pytest.mark.parametrize("stem,family", [("llama3_2_1b_lora_adapt", "llama"), ("qwen2_5_0_5b_lora_adapt", "qwen")])
def test_shipped_lora_adapt_config_saves_and_resumes(stem, family, tiny_assets, tmp_path):
    _check_save_and_resume(stem, family, tiny_assets, tmp_path)


def test_architecture_from_config_json_and_family_check():
    from duo_plugin.errors import UserError
    from duo_plugin.training.adapt import architecture_from_hf_config

    q = {"model_type": "qwen2", "vocab_size": 10, "num_hidden_layers": 3, "num_attention_heads": 2,
         "num_key_value_heads": 1, "hidden_size": 8, "intermediate_size": 16, "rms_norm_eps": 1e-6,
         "rope_theta": 1e6, "tie_word_embeddings": False}
    assert architecture_from_hf_config(q) == dict(vocab_size=10, num_layers=3, num_heads=2, num_kv_heads=1,
                                                  embed_dim=8, intermediate_dim=16, norm_eps=1e-6, rope_base=1e6,
                                                  tie_word_embeddings=False)
    with pytest.raises(UserError, match=r"model_type='qwen2' .*set model._component_=duo_plugin.models.duo_qwen2_5"):
        architecture_from_hf_config(q, component="duo_plugin.models.duo_llama3_2_1b")
    with pytest.raises(UserError, match=r"duo_lora_qwen2_5"):
        architecture_from_hf_config(q, component="duo_plugin.models.duo_lora_llama3_2")


def _dit_cfg(stem: str, assets: dict, out: Path, **overrides):
    """A shipped DiT config shrunk in size only (tiny DiT, L=16, 4 steps), CPU, local files."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{stem}.yaml")
    upd = {
        "output_dir": str(out), "device": "cpu", "tokenizer": {"path": str(assets["tokenizer"])},
        "data": {"source": "files", "files": [str(assets["corpus"])], "seq_len": 16, "packing": "wrap",
                 "sample_by": "paragraph", "val_fraction": 0.1, "cache_dir": str(out.parent / "cache")},
        "model": {"_component_": "duo_plugin.models.dit.duo_dit_tiny", "dropout": float(cfg.model.get("dropout", 0.0)),
                  "dim": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},  # tiny DiT, the shipped dropout
        "global_batch_size": 8, "eval_batch_size": 8, "max_steps": 4, "eval_every": 0, "eval_max_batches": 1,
        "checkpoint.every": 2, "checkpoint.keep_last": 3, "curriculum.steps": 2, "curriculum.table_points": 65,
        "curriculum.gamma_min": None, "curriculum.gamma_max": None, "lr_scheduler.warmup_steps": 2,
        "progress_bar": False, "log_every": 1,
    }
    upd.update(overrides)
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_dit_with_activation_checkpointing_saves_and_resumes(tiny_assets, tmp_path):
    """Activation checkpointing is available for the DiT too: EMA + AC through a save and an exact resume."""
    full = _run_dit(_dit_cfg("tiny_cpu", tiny_assets, tmp_path / "full", enable_activation_checkpointing=True))
    step2 = tmp_path / "full" / "checkpoints" / "step_00000002"
    resumed = _run_dit(_dit_cfg("tiny_cpu", tiny_assets, tmp_path / "res", enable_activation_checkpointing=True,
                                resume=str(step2)))
    assert resumed["losses"] == full["losses"]


@pytest.mark.slow
def test_shipped_owt_small_settings_with_compile_save_and_resume(tiny_assets, tmp_path):
    """owt_small's own settings (compile: true, resume: auto, EMA, accumulation 2, dropout 0.1) shrunk in size: a
    save, then the same command again resumes (resume: auto) and continues the uninterrupted losses (the RNG state is
    part of the checkpoint, so dropout masks repeat)."""
    ref = _run_dit(_dit_cfg("owt_small", tiny_assets, tmp_path / "ref", max_steps=4))
    part = _run_dit(_dit_cfg("owt_small", tiny_assets, tmp_path / "run", max_steps=2))
    assert part["losses"] == ref["losses"][:2]
    again = _run_dit(_dit_cfg("owt_small", tiny_assets, tmp_path / "run", max_steps=4))  # same dir, resume: auto
    assert again["losses"] == pytest.approx(ref["losses"], rel=1e-6)


def _run_dit(cfg) -> dict:
    r = dp.DuoPretrainRecipe(cfg)
    try:
        r.setup()
        assert r.ema is not None
        if cfg.enable_activation_checkpointing:
            assert any("_checkpoint_wrapped_module" in n for n, _ in r.model.named_parameters())
        return r.train()
    finally:
        r.cleanup()


@pytest.mark.slow
def test_shipped_adapt_config_fsdp2_two_processes_saves_and_resumes(tiny_assets, tmp_path):
    """The same under FSDP2 (2 gloo processes): activation checkpointing + EMA through a step-2 checkpoint, then a
    2-process resume from it continues the 2-process losses; both agree with one process to float summation order."""
    import os
    import subprocess
    import sys

    hf = write_tiny_hf("llama", tmp_path / "hf")
    gb = {"global_batch_size": 16}  # 2 ranks x the shipped 8 accumulation steps
    single = dp.run(shipped_cfg("llama3_2_1b_adapt", hf, tiny_assets, tmp_path / "single", **gb))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("DUO_DEBUG", None)

    def torchrun(name: str, **over) -> dict:
        path = tmp_path / f"{name}.yaml"
        OmegaConf.save(shipped_cfg("llama3_2_1b_adapt", hf, tiny_assets, tmp_path / name, **gb, **over), path)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                               "-m", "duo_plugin.recipes.duo_pretrain", "--config", str(path)],
                              cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads((tmp_path / name / "summary.json").read_text())

    full = torchrun("dist")
    assert full["world_size"] == 2 and (tmp_path / "dist" / "checkpoints" / "step_00000002" / "model" / "ema").is_dir()
    assert full["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)
    resumed = torchrun("dist_resumed", resume=str(tmp_path / "dist" / "checkpoints" / "step_00000002"))
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-7)
