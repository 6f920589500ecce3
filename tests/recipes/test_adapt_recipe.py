"""End-to-end LLM adaptation: the shipped duo/*_adapt configs, run on tiny locally written Llama-3.2- and
Qwen-2.5-shaped HF checkpoints (embedding rows K = 384 > tokenizer ids 320, like Qwen's padded rows) with a tiny
SentencePiece tokenizer. Checks: weights arrive through torchtune's checkpointer, validation NELBO falls, no input id
outside valid_vocab ever reaches the model, LoRA trains only adapters, saved dirs round-trip through load_pretrained
and torchtune's FullModelHFCheckpointer, and 2-process FSDP2 reproduces the single-process losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.models.dit import SoftTopK
from duo_plugin.recipes import duo_pretrain as dp

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "duo_plugin" / "configs" / "duo"
K = 384  # embedding rows; the tokenizer has 320 ids -> 64 padded rows that must never be sampled
SHAPE = dict(vocab_size=K, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
             max_seq_len=32)


def _tiny_decoder(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        from torchtune.models.llama3_2 import llama3_2

        dec = llama3_2(**SHAPE)
    else:
        from torchtune.models.qwen2 import qwen2

        dec = qwen2(**SHAPE, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return dec


def _write_hf(dec, family: str, out: Path) -> Path:
    from safetensors.torch import save_file

    dims = dict(num_heads=SHAPE["num_heads"], num_kv_heads=SHAPE["num_kv_heads"], dim=SHAPE["embed_dim"])
    sd = {k: v.clone() for k, v in dec.state_dict().items()}
    if family == "llama":
        from torchtune.models.convert_weights import tune_to_hf

        hf = tune_to_hf(sd, **dims)
    else:
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(sd, tie_word_embeddings=True, **dims)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "num_attention_heads": SHAPE["num_heads"], "num_key_value_heads": SHAPE["num_kv_heads"],
        "hidden_size": SHAPE["embed_dim"], "tie_word_embeddings": True, "vocab_size": K}))
    return out


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in ("llama", "qwen"):
        dec = _tiny_decoder(fam)
        out[fam] = (_write_hf(dec, fam, root / fam), {k: v.clone() for k, v in dec.state_dict().items()})
    return out


def _model_override(family: str, lora: bool, **extra) -> dict:
    m = {k: v for k, v in SHAPE.items() if k != "vocab_size" or lora}
    if family == "qwen":
        m["tie_word_embeddings"] = True
    m.update(shift=True, time_conditioning=False)
    if lora:
        m.update(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
        comp = "duo_lora_llama3_2" if family == "llama" else "duo_lora_qwen2_5"
    else:
        comp = "duo_llama3_2" if family == "llama" else "duo_qwen2_5"
    m["_component_"] = f"duo_plugin.models.{comp}"
    m.update(extra)
    return m


def adapt_cfg(name: str, family: str, lora: bool, hf_dir: Path, assets: dict, out: Path, **overrides):
    """The SHIPPED config with only paths, tiny shapes, CPU and a short schedule overridden."""
    stem = {"llama": "llama3_2_1b", "qwen": "qwen2_5_0_5b"}[family] + ("_lora" if lora else "") + "_adapt"
    cfg = OmegaConf.load(CONFIG_DIR / f"{stem}.yaml")
    upd = {
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "init_from": str(hf_dir),
        "tokenizer.path": str(assets["tokenizer"]),
        "data.files": [str(assets["corpus"])], "data.seq_len": 16, "data.val_fraction": 0.1,
        "data.cache_dir": str(out.parent / "cache"), "data.sample_by": "paragraph",
        "model": _model_override(family, lora),
        "global_batch_size": 8, "gradient_accumulation_steps": 1, "eval_batch_size": 16, "max_steps": 10,
        "optimizer.lr": 1e-2 if not lora else 2e-2, "optimizer.fused": False, "optimizer.betas": [0.9, 0.99],
        "lr_scheduler.warmup_steps": 1, "ema.decay": 0.5,
        "curriculum.steps": 5, "curriculum.topk": 8, "curriculum.table_points": 129,
        "curriculum.table_cache": str(out.parent / "duality_cache"),
        "eval_every": 10, "eval_max_batches": 2, "checkpoint.every": 0, "enable_activation_checkpointing": False,
        "progress_bar": False, "log_every": 1,
    }
    upd.update(overrides)
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


@pytest.fixture
def spy(monkeypatch):
    """Record every id fed to the embedding and the model right after setup (before any step)."""
    seen = {"ids": [], "soft": 0, "setup_state": None, "trainable": None, "model": None}
    orig = dp.DuoPretrainRecipe._setup_model

    def wrapped(self):
        orig(self)
        m = self.model
        seen["model"] = m
        seen["setup_state"] = {k: v.detach().clone() for k, v in m.decoder.state_dict().items()}
        seen["trainable"] = {n for n, p in m.named_parameters() if p.requires_grad}
        seen["valid"] = self.valid_vocab.cpu().clone()

        def hook(_mod, args):
            x = args[0]
            if isinstance(x, SoftTopK):
                seen["soft"] += 1
                seen["ids"].append(x.ids.detach().flatten().cpu())
            elif not x.is_floating_point():
                seen["ids"].append(x.detach().flatten().cpu())

        m.decoder.tok_embeddings.register_forward_pre_hook(hook)

    monkeypatch.setattr(dp.DuoPretrainRecipe, "_setup_model", wrapped)
    return seen


def _hf_reload_state(model_dir: Path, model_type: str) -> dict:
    from torchtune.training import FullModelHFCheckpointer

    out = model_dir.parent / f"tt_out_{model_dir.name}"
    ck = FullModelHFCheckpointer(checkpoint_dir=str(model_dir), checkpoint_files=["model.safetensors"],
                                 model_type=model_type, output_dir=str(out))
    return ck.load_checkpoint()["model"]


def _check_common(summary, spy, tiny_assets, hf_state, model_type, out):
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.models.checkpoint import load_pretrained

    # 1. the pretrained weights came through the HF checkpointer unchanged (LoRA keys aside)
    for k, v in hf_state.items():
        assert torch.equal(spy["setup_state"][k], v), k
    # 2. the schedule: curriculum (top-k sparse input) then discrete; validation NELBO falls
    assert summary["phases"] == ["curriculum"] * 5 + ["discrete"] * 5
    assert spy["soft"] >= 5
    assert summary["final_val"]["val_nll"] < summary["first_val"]["val_nll"] - 0.05, (
        summary["first_val"], summary["final_val"])
    # 3. valid vocabulary: padded rows (>= 320), pad and unk never reach the model as noise or data
    tok = load_tokenizer(tiny_assets["tokenizer"])
    valid = spy["valid"]
    assert valid.numel() == K and not bool(valid[tok.vocab_size:].any()) and not bool(valid[tok.pad_id])
    ids = torch.cat(spy["ids"])
    assert bool(valid[ids].all())
    assert int(ids.unique().numel()) > 100  # noise really spread over the valid ids
    # 4. round trips: load_pretrained (ours) and torchtune's FullModelHFCheckpointer
    final = Path(summary["model_dir"])
    m = load_pretrained(final, weights="model")
    assert m.vocab_size == K and torch.equal(m.valid_vocab, valid)
    tt_sd = _hf_reload_state(final, model_type)
    own = m.decoder.state_dict()
    assert set(tt_sd) == set(own) and all(torch.equal(tt_sd[k], own[k].to(tt_sd[k].dtype)) for k in tt_sd)
    ema = load_pretrained(final, weights="ema")
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(ema(x, torch.zeros(2))).all()
    return m


def test_llama_full_adapt_single_process(spy, hf_ckpts, tiny_assets, tmp_path):
    hf_dir, hf_state = hf_ckpts["llama"]
    cfg = adapt_cfg("llama", "llama", False, hf_dir, tiny_assets, tmp_path / "llama")
    summary = dp.run(cfg)
    assert spy["trainable"] == {n for n, _ in spy["model"].named_parameters()}  # full fine-tuning
    m = _check_common(summary, spy, tiny_assets, hf_state, "LLAMA3_2", tmp_path)
    assert m.shift is True and m.time_conditioning is False
    # the T table was cached on disk keyed by (K_eff, range, points)
    cached = list((tmp_path / "duality_cache").glob("duality_K*_n129.pt"))
    assert len(cached) == 1 and f"K{int(spy['valid'].sum())}_" in cached[0].name


def test_qwen_lora_adapt_single_process(spy, hf_ckpts, tiny_assets, tmp_path):
    hf_dir, hf_state = hf_ckpts["qwen"]
    cfg = adapt_cfg("qwen", "qwen", True, hf_dir, tiny_assets, tmp_path / "qwen_lora")
    summary = dp.run(cfg)
    trainable = spy["trainable"]
    assert trainable and all("lora_" in n for n in trainable)
    m = _check_common(summary, spy, tiny_assets, hf_state, "QWEN2", tmp_path)
    # Saved merged: non-LoRA weights are bit-identical to the pretrained ones; LoRA-targeted ones moved.
    sd = m.decoder.state_dict()
    assert type(m.decoder.layers[0].attn.q_proj).__name__ == "Linear"  # reloads as the full (non-LoRA) model
    for k in ("tok_embeddings.weight", "layers.0.attn.k_proj.weight", "layers.1.sa_norm.scale", "norm.scale"):
        assert torch.equal(sd[k], hf_state[k]), k
    for k in ("layers.0.attn.q_proj.weight", "layers.1.mlp.w1.weight"):
        assert not torch.equal(sd[k], hf_state[k]), k


def test_time_conditioning_annealing_dense_input(spy, hf_ckpts, tiny_assets, tmp_path):
    """Options: adaLN-zero time conditioning + random attention annealing + the dense curriculum input."""
    hf_dir, _ = hf_ckpts["llama"]
    cfg = adapt_cfg("tc", "llama", False, hf_dir, tiny_assets, tmp_path / "tc", max_steps=4, eval_every=0,
                    model=_model_override("llama", False, time_conditioning=True),
                    **{"curriculum.steps": 2, "curriculum.input": "dense", "adapt.attn_anneal_steps": 3,
                       "adapt.attn_anneal_mode": "random"})
    seen_masks = []
    from duo_plugin.objectives import DuoObjective

    orig = DuoObjective.anneal_mask

    def rec(self, step, L):
        m = orig(self, step, L)
        seen_masks.append((step, None if m is None else m.clone()))
        return m

    DuoObjective.anneal_mask = rec
    try:
        summary = dp.run(cfg)
    finally:
        DuoObjective.anneal_mask = orig
    assert [s for s, _ in seen_masks] == [0, 1, 2, 3]
    assert torch.equal(seen_masks[0][1], torch.tril(torch.ones(16, 16, dtype=torch.bool)))
    assert seen_masks[3][1] is None  # annealed: no mask, flash-capable path
    assert spy["soft"] == 0  # dense logits, not SoftTopK
    from duo_plugin.models.checkpoint import load_pretrained

    final = Path(summary["model_dir"])
    assert (final / "duo_extra.safetensors").exists()
    m = load_pretrained(final, weights="model")
    assert m.time_conditioning and any(float(v.abs().sum()) > 0 for v in m.extra_state_dict().values())


def test_bad_adapt_options(hf_ckpts, tiny_assets, tmp_path):
    hf_dir, _ = hf_ckpts["llama"]
    with pytest.raises(dp.ConfigError, match="curriculum.input"):
        dp.run(adapt_cfg("b1", "llama", False, hf_dir, tiny_assets, tmp_path / "b1", **{"curriculum.input": "x"}))
    with pytest.raises(dp.ConfigError, match="LoRA model"):
        dp.run(adapt_cfg("b2", "llama", False, hf_dir, tiny_assets, tmp_path / "b2", **{"adapt.trainable": "lora"}))
    with pytest.raises(dp.ConfigError, match="attn_anneal"):
        dp.run(adapt_cfg("b3", "llama", False, hf_dir, tiny_assets, tmp_path / "b3",
                         **{"adapt.attn_anneal_mode": "sometimes"}))


#: The published config.json fields of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-0.5B that fix the architecture.
REAL_HF_CONFIGS = {
    "llama": {"model_type": "llama", "vocab_size": 128256, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "hidden_size": 2048, "intermediate_size": 8192, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": True,
              "rope_scaling": {"factor": 32.0, "rope_type": "llama3"}},
    "qwen": {"model_type": "qwen2", "vocab_size": 151936, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "hidden_size": 896, "intermediate_size": 4864, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("stem,n_params", [("llama3_2_1b_adapt", 1.236e9), ("qwen2_5_0_5b_adapt", 0.494e9),
                                           ("llama3_2_1b_lora_adapt", 1.236e9), ("qwen2_5_0_5b_lora_adapt", 0.494e9)])
def test_shipped_adapt_configs_instantiate(stem, n_params):
    """The real-size configs validate and build (meta device) with the published parameter counts (the pretrained
    decoder's own weights; time-conditioned configs add adaLN parameters outside it, and only those do)."""
    from torchtune import config as tt_config

    from duo_plugin.training.adapt import architecture_from_hf_config

    cfg = dp.validate_config(OmegaConf.load(CONFIG_DIR / f"{stem}.yaml"))
    assert cfg.curriculum.input == "topk" and cfg.model.shift is True
    vocab = 128256 if stem.startswith("llama") else 151936
    # the sizes come from the checkpoint's config.json (as published for these models), not from the YAML
    hf = REAL_HF_CONFIGS["llama" if stem.startswith("llama") else "qwen"]
    arch = architecture_from_hf_config(hf, component=cfg.model._component_)
    extra = {k: v for k, v in (("max_seq_len", int(cfg.data.seq_len)), *arch.items()) if cfg.model.get(k) is None}
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model, **extra)
    assert model.vocab_size == vocab
    named = [(n_, p) for n_, p in model.named_parameters() if "lora_" not in n_]
    n = sum(p.numel() for n_, p in named if not n_.startswith(("adaln.", "final_adaln.", "sigma_map.")))
    assert abs(n - n_params) / n_params < 0.01, n
    n_time = sum(p.numel() for n_, p in named if n_.startswith(("adaln.", "final_adaln.", "sigma_map.")))
    assert (n_time > 0) == bool(cfg.model.get("time_conditioning", False)), n_time


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("llama", False), ("qwen", True)])
def test_two_process_fsdp2_matches_single(family, lora, hf_ckpts, tiny_assets, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) on the shipped config gives the single-process losses."""
    hf_dir, _ = hf_ckpts[family]
    kw = dict(max_steps=4, eval_every=0, **{"curriculum.steps": 2})
    single = dp.run(adapt_cfg("s", family, lora, hf_dir, tiny_assets, tmp_path / "single", **kw))
    cfg = adapt_cfg("d", family, lora, hf_dir, tiny_assets, tmp_path / "dist", **kw)
    path = tmp_path / "dist.yaml"
    OmegaConf.save(cfg, path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "duo_plugin.recipes.duo_pretrain", "--config", str(path)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    dist_summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert dist_summary["world_size"] == 2
    assert dist_summary["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)
    from duo_plugin.models.checkpoint import load_pretrained

    a = load_pretrained(tmp_path / "dist" / "final", weights="model").state_dict()
    b = load_pretrained(tmp_path / "single" / "final", weights="model").state_dict()
    # Same weights up to float summation order (Adam amplifies it on rarely-hit embedding rows: ~1e-4 measured),
    # far below what the 4 steps moved them.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-4
    hf_state = hf_ckpts[family][1]
    moved = max(float((b["decoder." + k] - v).abs().max()) for k, v in hf_state.items())
    assert moved > 1e-2


def test_tune_run_cli_with_shipped_config_name(hf_ckpts, tiny_assets, tmp_path):
    """The user-facing command, verbatim apart from paths and tiny-shape overrides:
    ``tune run duo_pretrain --config duo/llama3_2_1b_lora_adapt init_from=... data.files=[...] model.*=...``."""
    import shutil

    tune = shutil.which("tune") or str(Path(sys.executable).parent / "tune")
    hf_dir, _ = hf_ckpts["llama"]
    out = tmp_path / "cli"
    m = _model_override("llama", True)
    args = [f"model.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in m.items()]
    cmd = [tune, "run", "duo_pretrain", "--config", "duo/llama3_2_1b_lora_adapt", f"init_from={hf_dir}",
           f"tokenizer.path={tiny_assets['tokenizer']}", f"data.files=[{tiny_assets['corpus']}]",
           "data.seq_len=16", "data.sample_by=paragraph", f"data.cache_dir={tmp_path / 'cache'}",
           f"output_dir={out}", "device=cpu", "dtype=fp32", "optimizer.fused=False", "global_batch_size=8",
           "gradient_accumulation_steps=1", "max_steps=3", "curriculum.steps=2", "curriculum.topk=8",
           "curriculum.table_points=65", f"curriculum.table_cache={tmp_path / 'tcache'}", "eval_every=0",
           "progress_bar=False", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"] == ["curriculum", "curriculum", "discrete"]
    from duo_plugin.models.checkpoint import load_pretrained

    assert load_pretrained(out / "final").vocab_size == K


def test_lora_resume_reproduces_uninterrupted_losses(hf_ckpts, tiny_assets, tmp_path):
    """`resume=true` on a LoRA adapt run: the checkpoint's model dir is saved MERGED (full model), so resume must
    restore the LoRA model's own (unmerged) weights, not load the merged full state dict into the LoRA model."""
    hf_dir, _ = hf_ckpts["qwen"]
    # constant LR: the 2-step run and the 4-step run then share one LR sequence (a cosine schedule decays over
    # max_steps, and resuming with a different max_steps is refused for it)
    kw = dict(eval_every=0, **{"curriculum.steps": 2, "lr_scheduler.name": "constant_with_warmup"})
    full = dp.run(adapt_cfg("qwen", "qwen", True, hf_dir, tiny_assets, tmp_path / "full", max_steps=4, **kw))
    dp.run(adapt_cfg("qwen", "qwen", True, hf_dir, tiny_assets, tmp_path / "part", max_steps=2, **kw))
    resumed = dp.run(adapt_cfg("qwen", "qwen", True, hf_dir, tiny_assets, tmp_path / "part", max_steps=4,
                               resume=True, **kw))
    assert resumed["losses"] == full["losses"]
