"""duo_pretrain recipe: loss wiring against independent references, phase switch, exact resume, accumulation and
multi-process invariance, bad-input errors, shipped configs.  Tiny shapes; fp32 on CPU; dropout 0."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.recipes import duo_pretrain as dp

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "duo_plugin" / "configs" / "duo"


def _setup(cfg):
    r = dp.DuoPretrainRecipe(cfg)
    r.setup()
    return r


def _udlm_nelbo(log_x_theta, z_t, x0, alpha, alpha_prime, valid):
    """Per-token UDLM NELBO (docs/method.md §1.3, the K-dim x̄ form), written independently of duo_nelbo:
    f = α'/(Kα) [K/x̄_i − K/(x̄_θ)_i − Σ_j (x̄_j/x̄_i) log((x̄_θ)_i x̄_j / ((x̄_θ)_j x̄_i))] over the valid ids."""
    ids = valid.nonzero().squeeze(-1)
    k = ids.numel()
    remap = torch.full((valid.numel(),), -1, dtype=torch.long)
    remap[ids] = torch.arange(k)
    lp = log_x_theta.double()[..., ids]
    x_theta = torch.softmax(lp, dim=-1)  # renormalised over the valid ids
    a = alpha.double()[:, None, None]
    ap = alpha_prime.double()[:, None]
    x_onehot = torch.nn.functional.one_hot(remap[x0], k).double()
    zi = remap[z_t]
    xbar = k * a * x_onehot + (1 - a)
    xbar_theta = k * a * x_theta + (1 - a)
    xbar_i = xbar.gather(-1, zi[..., None]).squeeze(-1)
    xbar_theta_i = xbar_theta.gather(-1, zi[..., None]).squeeze(-1)
    inner = (xbar / xbar_i[..., None]) * torch.log(
        xbar_theta_i[..., None] * xbar / (xbar_theta * xbar_i[..., None]))
    bracket = k / xbar_i - k / xbar_theta_i - inner.sum(-1)
    return ap / (k * alpha.double()[:, None]) * bracket


# ------------------------------------------------------------------------------------------------ pure helpers
def test_lr_multiplier_matches_closed_forms():
    # Constant with warm-up (HF get_constant_schedule_with_warmup evaluated at step+1 optimizer steps).
    got = [dp.lr_multiplier(s, name="constant_with_warmup", warmup_steps=4, max_steps=10) for s in range(6)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # Cosine: 0.5 (1 + cos(pi p)) after warm-up, p = (s - w) / (S - w).
    for s in range(4, 10):
        p = (s - 4) / 6
        assert dp.lr_multiplier(s, name="cosine", warmup_steps=4, max_steps=10) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * p)))


def test_ar_token_nll_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    x0 = torch.randint(0, 7, (2, 5), generator=g)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), x0[:, 1:].reshape(-1), reduction="none")
    got = dp.ar_token_nll(torch.log_softmax(logits, -1), x0)
    torch.testing.assert_close(got.reshape(-1), ref)


# ------------------------------------------------------------------------------------------------ loss wiring
def test_curriculum_then_discrete_losses_match_independent_reference(make_cfg):
    """Step 0 (curriculum): f at z_t = argmax(w), α = T(γ_t) by direct integration, α' = dT/dγ (γmax − γmin),
    soft input w/τ; step 2 (discrete): α = 1 − 0.999 t, hard z_t; both Σ over tokens / #tokens of the global batch."""
    from duo_plugin.diffusion.duality import discrete_alpha, discrete_alpha_prime, gamma_window
    from duo_plugin.diffusion.losses import curriculum_inputs
    from duo_plugin.diffusion.schedules import stratified_times
    from duo_plugin.diffusion.uniform import corrupt, row_generators

    cfg = make_cfg("wiring", max_steps=3, **{"curriculum.steps": 2})
    r = _setup(cfg)
    seed, n = 3, 8
    vv = r.valid_vocab
    k_eff = int(vv.sum())
    gmin, gmax = gamma_window(k_eff)
    pos = list(range(n))

    def batch(step):
        return r.train_set.batch(r.sampler.indices(step))["tokens"]

    # --- step 0: curriculum
    model0 = copy.deepcopy(r.model)
    x0 = batch(0)
    t = stratified_times(seed, 0, pos, n, 1e-3, dtype=torch.float64)
    gamma = gmin + t * (gmax - gmin)
    alpha = discrete_alpha(gamma, k_eff)
    alpha_prime = discrete_alpha_prime(gamma, k_eff) * (gmax - gmin)
    z_t, soft = curriculum_inputs(x0, gamma, 1e-3, r.vocab_size, row_generators(seed, 0, pos), vv)
    with torch.no_grad():
        log_x = model0(soft, (-torch.log(alpha)).float())
    ref0 = float(_udlm_nelbo(log_x, z_t, x0, alpha, alpha_prime, vv).sum() / x0.numel())
    m0 = r.train_step(0)
    assert m0["phase"] == "curriculum"
    assert m0["loss"] == pytest.approx(ref0, rel=2e-4)
    r.train_step(1)
    # --- step 2: discrete (the configured switch step)
    model2 = copy.deepcopy(r.model)
    x0 = batch(2)
    t = stratified_times(seed, 2, pos, n, 1e-3, dtype=torch.float64)
    alpha = 1 - 0.999 * t
    z_t = corrupt(x0, alpha, row_generators(seed, 2, pos), vv)
    with torch.no_grad():
        log_x = model2(z_t, (-torch.log(alpha)).float())
    ref2 = float(_udlm_nelbo(log_x, z_t, x0, alpha, torch.full_like(alpha, -0.999), vv).sum() / x0.numel())
    m2 = r.train_step(2)
    assert m2["phase"] == "discrete"
    assert m2["loss"] == pytest.approx(ref2, rel=1e-4)
    r.cleanup()


def test_ar_objective_loss_is_next_token_cross_entropy(make_cfg):
    cfg = make_cfg("ar", objective="ar", max_steps=1, **{"curriculum.steps": 0, "model.causal": True})
    r = _setup(cfg)
    x0 = r.train_set.batch(r.sampler.indices(0))["tokens"]
    with torch.no_grad():
        logits = r.model.output_projection(r.model.forward_hidden(x0, torch.zeros(8)))
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            x0[:, 1:].reshape(-1))
    assert r.train_step(0)["loss"] == pytest.approx(float(ref), rel=1e-5)
    r.cleanup()


# ------------------------------------------------------------------------------------------------ full runs
def test_phase_switch_summary_and_model_dir(make_cfg, tiny_assets):
    cfg = make_cfg("switch", max_steps=5, eval_every=5, **{"curriculum.steps": 3})
    s = dp.run(cfg)
    assert s["phases"] == ["curriculum"] * 3 + ["discrete"] * 2
    out = Path(cfg.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["tokens"] == 5 * 8 * 16
    assert math.isfinite(summary["final_val_ppl"])
    final = out / "final"
    assert (final / "duo_config.json").is_file() and (final / "tokenizer").is_dir()
    # The saved model dir reloads (EMA weights) and its tokenizer decodes.
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.models.checkpoint import load_pretrained

    m = load_pretrained(final, weights="ema")
    assert m.vocab_size == 320
    assert "king" in load_tokenizer(final / "tokenizer").decode(load_tokenizer(tiny_assets["tokenizer"]).encode("king"))


def test_resume_reproduces_uninterrupted_losses_exactly(make_cfg):
    full = dp.run(make_cfg("full", max_steps=6, eval_every=6, **{"checkpoint.every": 3}))
    part_cfg = make_cfg("part", max_steps=3, **{"checkpoint.every": 3})
    dp.run(part_cfg)
    resumed_cfg = make_cfg("part", max_steps=6, eval_every=6, resume=True, **{"checkpoint.every": 3})
    resumed = dp.run(resumed_cfg)
    assert resumed["losses"] == full["losses"]  # bit-identical: same weights, optimizer, EMA, batches, noise
    assert resumed["phases"] == full["phases"]
    assert resumed["final_val_ppl"] == full["final_val_ppl"]


def test_gradient_accumulation_is_invariant(make_cfg):
    a = dp.run(make_cfg("acc1", max_steps=3, gradient_accumulation_steps=1))
    b = dp.run(make_cfg("acc2", max_steps=3, gradient_accumulation_steps=2))
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5, abs=1e-6)


def test_padded_sentences_exclude_padding(make_cfg):
    """LM1B-style rows: the normaliser counts only real tokens; loss stays finite and the run completes."""
    s = dp.run(make_cfg("pad", max_steps=2, **{"data.packing": "pad", "data.seq_len": 64}))
    assert all(math.isfinite(x) for x in s["losses"])
    assert s["tokens"] < 2 * 8 * 64  # padding not counted


def test_pad_mode_official_reaches_the_objective_and_changes_the_loss(make_cfg):
    """``data.pad_mode=official`` (the paper's LM1B without packing): the objective gets it, the token count is the
    same (pads never counted) and the loss differs from the default (pads noised and attended to); a bad value is
    refused naming the key."""
    over = {"data.packing": "pad", "data.seq_len": 64, "curriculum.steps": 0, "lr_scheduler.warmup_steps": 0}
    clean = dp.run(make_cfg("pad_clean", max_steps=4, **over))
    off = dp.run(make_cfg("pad_official", max_steps=4, **over, **{"data.pad_mode": "official"}))
    rec = _setup(make_cfg("pad_ctx", max_steps=1, **over, **{"data.pad_mode": "official"}))
    assert rec.objective.ctx.pad_mode == "official"
    # official: every tokenizer id is an ordinary id (K_eff = len(tokenizer), pad and specials included), so the
    # NELBO's K differs from the default's from the first step on
    k_clean = int(_setup(make_cfg("pad_ctx_clean", max_steps=1, **over)).valid_vocab.sum())
    assert bool(rec.valid_vocab.all()) and rec.k_eff == rec.tokenizer.vocab_size > k_clean
    assert off["tokens"] == clean["tokens"] < 4 * 8 * 64
    assert off["losses"][-1] != pytest.approx(clean["losses"][-1], rel=1e-5), (off["losses"], clean["losses"])
    with pytest.raises(dp.ConfigError, match="data.pad_mode"):
        dp.DuoPretrainRecipe(make_cfg("pad_bad", **{"data.pad_mode": "noised"}))


@pytest.mark.slow
def test_two_processes_match_one_process(make_cfg, tmp_path):
    """FSDP2 over 2 gloo CPU processes (`tune run --nproc_per_node 2 duo_pretrain`) with the same global batch gives the single-process losses."""
    single = dp.run(make_cfg("single", max_steps=3))
    cfg = make_cfg("dist", max_steps=3, **{"checkpoint.every": 2})
    path = tmp_path / "dist.yaml"
    OmegaConf.save(cfg, path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # Exactly what a user types: plain `tune run --nproc_per_node 2 duo_pretrain` BY NAME (registered through the
    # start-up hook), run from a directory that is not the repo.
    tune = Path(sys.executable).parent / "tune"
    assert tune.exists(), "torchtune's `tune` console script is missing from the environment"
    proc = subprocess.run(
        [str(tune), "run", "--nproc_per_node", "2", "duo_pretrain", "--config", str(path)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    dist_summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert dist_summary["world_size"] == 2
    assert dist_summary["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    # The gathered full model dir reloads like a single-process one.
    from duo_plugin.models.checkpoint import load_pretrained

    load_pretrained(Path(cfg.output_dir) / "final", weights="ema")
    # The gathered FULL model/optimizer/EMA state of the 2-process step-2 checkpoint resumes in 1 process and gives
    # the single-process step-3 loss.
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000002"
    resumed = dp.run(make_cfg("dist", max_steps=3, resume=str(ckpt), **{"checkpoint.every": 2}))
    assert resumed["losses"][2] == pytest.approx(single["losses"][2], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------ bad input
def test_misspelled_key_suggests_the_closest(make_cfg):
    cfg = make_cfg("bad")
    cfg.max_step = 3
    with pytest.raises(dp.ConfigError, match="did you mean 'max_steps'"):
        dp.DuoPretrainRecipe(cfg)
    cfg = make_cfg("bad2")
    OmegaConf.update(cfg, "curriculum.tua", 1e-3, merge=True)
    with pytest.raises(dp.ConfigError, match="curriculum.tau"):
        dp.DuoPretrainRecipe(cfg)


def test_missing_data_file(make_cfg, tmp_path):
    cfg = make_cfg("nofile", **{"data.files": [str(tmp_path / "nope.txt")]})
    with pytest.raises(FileNotFoundError, match="data.files"):
        dp.run(cfg)


def test_empty_dataset(make_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty"):
        dp.run(make_cfg("empty", **{"data.files": [str(empty)]}))


def test_vocab_mismatch_and_seq_len_beyond_model(make_cfg):
    with pytest.raises(ValueError, match="model.vocab_size=320"):
        dp.run(make_cfg("vocab", **{"model.vocab_size": 100}))
    with pytest.raises(ValueError, match="max_seq_len"):
        dp.run(make_cfg("seqlen", **{"model.max_seq_len": 8}))


def test_global_batch_not_divisible(make_cfg):
    with pytest.raises(dp.ConfigError, match="gradient_accumulation_steps"):
        dp.DuoPretrainRecipe(make_cfg("div", gradient_accumulation_steps=3))


def test_nan_loss_stops_and_keeps_last_checkpoint(make_cfg):
    cfg = make_cfg("nan", max_steps=4, **{"checkpoint.every": 2})
    r = _setup(cfg)
    r.train()  # completes 4 steps, checkpoints at 2 and 4
    r.cleanup()
    good = Path(cfg.output_dir) / "checkpoints" / "step_00000004"
    assert good.is_dir()
    cfg2 = make_cfg("nan", max_steps=6, resume=True, **{"checkpoint.every": 2})
    r2 = _setup(cfg2)
    with torch.no_grad():
        next(r2.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step_00000004"):
        r2.train()
    r2.cleanup()
    from duo_plugin.training.checkpointing import latest_checkpoint

    assert latest_checkpoint(cfg.output_dir) == good
    assert (good / "model" / "model.safetensors").is_file()


def test_resume_from_incompatible_checkpoint(make_cfg):
    dp.run(make_cfg("incomp", max_steps=2, **{"checkpoint.every": 1}))
    with pytest.raises(ValueError, match="global_batch_size"):
        dp.run(make_cfg("incomp", max_steps=4, resume=True, global_batch_size=16))
    from duo_plugin.training.checkpointing import latest_checkpoint

    assert latest_checkpoint(make_cfg("incomp").output_dir).name == "step_00000002"


def test_resume_rejects_a_changed_training_split(make_cfg):
    """data.val_docs / data.sample_by change which blocks are trained on: a resume must not accept them silently."""
    dp.run(make_cfg("split", max_steps=1, **{"checkpoint.every": 1}))
    with pytest.raises(ValueError, match="data.val_docs"):
        dp.run(make_cfg("split", max_steps=2, resume=True, **{"data.val_docs": 3}))
    with pytest.raises(ValueError, match="data.sample_by"):
        dp.run(make_cfg("split", max_steps=2, resume=True, **{"data.sample_by": "line"}))


def test_resume_rejects_changed_kernels(make_cfg):
    """The fused curriculum input draws a different noise stream: changing kernels.* on resume must be refused."""
    assert "kernels" in dp.RESUME_KEYS
    dp.run(make_cfg("kern", max_steps=1, **{"checkpoint.every": 1, "kernels.curriculum_input": "dense"}))
    with pytest.raises(ValueError, match="kernels"):
        dp.run(make_cfg("kern", max_steps=2, resume=True, **{"kernels.curriculum_input": "reference"}))


def test_resume_cosine_refuses_changed_max_steps(make_cfg):
    """cosine decays over max_steps: a changed max_steps on resume changes the LR sequence and must be refused,
    naming the fix; the same max_steps resumes."""
    cos = {"lr_scheduler.name": "cosine", "checkpoint.every": 1}
    dp.run(make_cfg("cos", max_steps=1, **cos))  # checkpoint at step 1 saved with max_steps=1
    with pytest.raises(dp.ConfigError, match=r"max_steps.*set max_steps=1"):
        dp.run(make_cfg("cos", max_steps=2, resume=True, **cos))
    out = dp.run(make_cfg("cos2", max_steps=3, **cos))
    resumed = dp.run(make_cfg("cos2", max_steps=3, resume=True, **cos))  # same max_steps: accepted
    assert resumed["losses"] == out["losses"]


def test_resume_constant_schedule_allows_changed_max_steps(make_cfg):
    dp.run(make_cfg("const", max_steps=2, **{"checkpoint.every": 1}))
    out = dp.run(make_cfg("const", max_steps=3, resume=True, **{"checkpoint.every": 1}))
    assert len(out["losses"]) == 3


# ------------------------------------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("name", ["tiny_cpu", "owt_small", "lm1b_small"])
def test_shipped_configs_validate_and_instantiate(name):
    from torchtune import config as tt_config

    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg = dp.validate_config(cfg)
    vocab = int(cfg.tokenizer.train.vocab_size) if name == "tiny_cpu" else {"owt_small": 50258, "lm1b_small": 30522}[name]
    extra = {k: v for k, v in (("vocab_size", vocab), ("max_seq_len", int(cfg.data.seq_len)))
             if cfg.model.get(k) is None}
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model, **extra)
    assert model.vocab_size == vocab and model.max_seq_len >= int(cfg.data.seq_len)
    params = list(model.parameters())
    torch.optim.AdamW  # the optimizer component resolves with the model's params
    opt = tt_config.instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["lr"] == pytest.approx(float(cfg.optimizer.lr))
    if name == "owt_small":
        n = sum(p.numel() for p in params)
        assert 165e6 < n < 175e6  # paper: 169.6M at K = 50258
        assert cfg.curriculum.gamma_min == -3.55 and cfg.curriculum.gamma_max == -1.85
        assert cfg.global_batch_size == 512 and cfg.max_steps == 1_000_000
    if name == "lm1b_small":
        assert cfg.curriculum.gamma_min == -3.5 and cfg.curriculum.gamma_max == -1.75 and cfg.data.seq_len == 128


def _agree_worker(rank, port, out):
    import torch.distributed as tdist
    from duo_plugin.training.recipe_utils import all_ranks_agree

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # only rank 1's clock has passed max_wall_s: both ranks must stop together (else rank 0 hangs in a collective)
        out[rank] = all_ranks_agree(rank == 1, torch.device("cpu"))
    finally:
        tdist.destroy_process_group()


def test_max_wall_s_stop_is_agreed_across_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(port, out), nprocs=2, join=True)
    assert dict(out) == {0: True, 1: True}


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes(make_cfg, tmp_path):
    """A single-process step checkpoint resumes under FSDP2 on 2 processes and continues the uninterrupted losses."""
    single = dp.run(make_cfg("one", max_steps=4, **{"checkpoint.every": 2}))
    ckpt = Path(make_cfg("one").output_dir) / "checkpoints" / "step_00000002"
    assert ckpt.is_dir(), f"no step-2 checkpoint at {ckpt}"
    cfg = make_cfg("two", max_steps=4, resume=str(ckpt), **{"checkpoint.every": 2})
    path = tmp_path / "two.yaml"
    OmegaConf.save(cfg, path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run([str(tune), "run", "--nproc_per_node", "2", "duo_pretrain", "--config", str(path)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    resumed = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert resumed["world_size"] == 2
    assert resumed["losses"][-2:] == pytest.approx(single["losses"][2:4], rel=1e-5, abs=1e-6)
