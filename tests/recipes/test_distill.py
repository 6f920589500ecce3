"""duo_distill recipe: step-0 loss against an independent reference, teacher refresh and δ at the right steps
(student and EMA teacher), exact resume mid-round, the steps-vs-quality table (EMA student, Gen PPL scorer),
config validation and the shipped configs.  Tiny shapes on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.recipes import duo_distill as dd

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "duo_plugin" / "configs" / "duo"
L = 16


def _perturbed_dit(vocab, seed, causal=False):
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(seed)
    m = duo_dit_tiny(vocab, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, causal=causal)
    with torch.no_grad():  # the output layer is zero-initialised: make predictions non-uniform
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def models(tiny_assets, tmp_path_factory):
    """A tiny 'pretrained' Duo model dir (raw ≠ EMA weights) and an AR-objective DiT scorer dir."""
    from duo_plugin.data.tokenizers import check_vocab, load_tokenizer
    from duo_plugin.models.checkpoint import save_pretrained

    root = tmp_path_factory.mktemp("distill_models")
    tok = load_tokenizer(tiny_assets["tokenizer"])
    k = int(tok.vocab_size)
    vv = check_vocab(tok, k)
    base, ema = _perturbed_dit(k, 0), _perturbed_dit(k, 1)
    save_pretrained(base, root / "base", ema_state_dict=ema.state_dict(),
                    metadata={"valid_vocab": vv, "seq_len": L, "objective": "duo"})
    tok.save(root / "base" / "tokenizer")
    ar = _perturbed_dit(k, 2, causal=True)
    save_pretrained(ar, root / "ar", metadata={"valid_vocab": vv, "seq_len": L, "objective": "ar"})
    tok.save(root / "ar" / "tokenizer")
    return {"base": root / "base", "ar": root / "ar", "valid_vocab": vv, "k": k}


@pytest.fixture
def make_dcfg(tiny_assets, models, tmp_path):
    def make(name="run", **overrides):
        cfg = {
            "output_dir": str(tmp_path / name), "seed": 5, "device": "cpu", "init_from": str(models["base"]),
            "data": {"source": "files", "files": [str(tiny_assets["corpus"])], "seq_len": L, "packing": "wrap",
                     "val_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
            "global_batch_size": 8, "max_steps": 6,
            "distill": {"rounds": 3, "steps_per_round": 2, "delta0": 0.05, "gamma_min": -3.0, "gamma_max": 1.0,
                        "table_points": 65},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0},
            "lr_scheduler": {"warmup_steps": 1},
            "ema": {"decay": 0.9},
            "eval": {"every_round": False, "include_base": False, "steps": [4, 2], "num_samples": 2},
            "checkpoint": {"every": 0, "keep_last": 3},
            "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                              "log_dir": str(tmp_path / name / "logs")},
            "progress_bar": False,
        }
        c = OmegaConf.create(cfg)
        for k, v in overrides.items():
            OmegaConf.update(c, k, v, merge=False)
        return c

    return make


def _setup(cfg):
    r = dd.DuoDistillRecipe(cfg)
    r.setup()
    return r


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_step0_loss_matches_independent_reference(make_dcfg, models):
    """Teacher = student = base raw weights at step 0; times t = clip(strat + δ), s = t − δ; ONE ε per row drawn from
    row_generators(seed, 0, position); z_u = argmax over valid ids of α̃_u x + σ̃_u ε; σ_u = −log T_Keff(γ_u);
    loss = Σ_tokens KL(p_S(z_t) ‖ p_T(z_s)) / #tokens."""
    from duo_plugin.diffusion.duality import discrete_alpha
    from duo_plugin.diffusion.schedules import stratified_times
    from duo_plugin.models.checkpoint import load_pretrained

    r = _setup(make_dcfg("ref"))
    net = load_pretrained(models["base"], weights="model")
    vv = models["valid_vocab"]
    k, k_eff, n = models["k"], int(models["valid_vocab"].sum()), 8
    x0 = r.train_set.batch(r.sampler.indices(0))["tokens"]
    t = (stratified_times(5, 0, range(n), n, 1e-3, dtype=torch.float64) + 0.05).clamp(max=1.0)
    s = t - 0.05
    eps = torch.stack([torch.randn(L, k, generator=g) for g in dd_row_gens(5, 0, n)]).double()
    eps = eps.masked_fill(~vv, float("-inf"))
    onehot = torch.nn.functional.one_hot(x0, k).double()

    def z_and_sigma(u):
        g = -3.0 + u * 4.0
        a_t, s_t = torch.sigmoid(-g).sqrt()[:, None, None], torch.sigmoid(g).sqrt()[:, None, None]
        return (a_t * onehot + s_t * eps).argmax(-1), (-torch.log(discrete_alpha(g, k_eff))).float()

    (zt, sig_t), (zs, sig_s) = z_and_sigma(t), z_and_sigma(s)
    with torch.no_grad():
        ls, lt = net(zt, sig_t).double(), net(zs, sig_s).double()
    ref = float((ls.exp() * (ls - lt)).sum(-1).mean())
    m0 = r.train_step(0)
    assert ref > 0
    assert m0["loss"] == pytest.approx(ref, rel=1e-4)
    assert r.events == [{"step": 0, "round": 0, "delta": 0.05, "source": "student"}]


def dd_row_gens(seed, step, n):
    from duo_plugin.diffusion.uniform import row_generators

    return row_generators(seed, step, range(n))


def test_teacher_refresh_and_delta_at_round_boundaries(make_dcfg):
    r = _setup(make_dcfg("refresh"))
    before = {}
    deltas = []
    for step in range(6):
        before[step] = _params(r.model)
        deltas.append(r.train_step(step)["delta"])
        teacher = _params(r.teacher)
        # The teacher holds the student's weights from the start of the current round (steps 0, 2, 4).
        assert _same(teacher, before[step - step % 2]), step
        assert not _same(teacher, _params(r.model))
    assert deltas == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.2, 0.2])
    assert [e["step"] for e in r.events] == [0, 2, 4]
    assert all(not p.requires_grad for p in r.teacher.parameters())


def test_ema_teacher_option_and_ema_init_from_checkpoint(make_dcfg, models):
    from duo_plugin.models.checkpoint import load_pretrained

    r = _setup(make_dcfg("emat", **{"distill.teacher": "ema", "max_steps": 3}))
    base_ema = load_pretrained(models["base"], weights="ema").state_dict()
    assert all(torch.equal(r.ema.shadow[k], base_ema[k]) for k in r.ema.shadow)  # EMA starts from the base EMA
    assert not _same(_params(r.model), {k: base_ema[k] for k in _params(r.model)})  # student from raw weights
    r.train_step(0)
    assert all(torch.equal(r.teacher.state_dict()[k], base_ema[k]) for k in r.ema.shadow)
    r.train_step(1)
    shadow = {k: v.clone() for k, v in r.ema.shadow.items()}
    r.train_step(2)  # round 2 starts: teacher <- EMA after step 1
    assert all(torch.equal(r.teacher.state_dict()[k], shadow[k]) for k in shadow)


def test_resume_mid_round_continues_exactly(make_dcfg):
    full = dd.run(make_dcfg("full"))
    first = dd.run(make_dcfg("part", max_steps=3))  # step 3 is the middle of round 2
    assert first["losses"] == full["losses"][:3]
    resumed = dd.run(make_dcfg("part", max_steps=6, resume=True))
    assert resumed["losses"][:3] == first["losses"]
    assert resumed["losses"][3:] == pytest.approx(full["losses"][3:], rel=1e-6, abs=1e-9)
    assert [e["step"] for e in resumed["events"]] == [0, 2, 4]
    with pytest.raises(ValueError, match="distill"):
        dd.run(make_dcfg("part", max_steps=7, resume=True, **{"distill.delta0": 0.02}))


def test_quality_table_after_each_round_uses_ema_student(make_dcfg, models):
    from duo_plugin.eval.genppl import unigram_entropy
    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.sampling.samplers import DenoiserFn, sample

    cfg = make_dcfg("table", max_steps=4, **{"eval.every_round": True, "eval.include_base": True,
                                             "eval.scorer": {"type": "dit", "path": str(models["ar"])}})
    out = dd.run(cfg)
    rows = out["quality_rows"]
    assert [(r["model"], r["sampler"], r["steps"]) for r in rows[:4]] == [
        ("base", "ancestral", 4), ("base", "greedy", 4), ("base", "ancestral", 2), ("base", "greedy", 2)]
    assert {r["model"] for r in rows} == {"base", "round1", "round2"} and len(rows) == 12
    assert all(r["gen_ppl"] is not None and math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 for r in rows)
    md = (Path(cfg.output_dir) / "quality_table.md").read_text()
    assert "| round2 | 2 |" in md and json.loads((Path(cfg.output_dir) / "quality_table.json").read_text())["rows"]
    # The last rows are the EMA student after round 2 == the final model dir's EMA weights (same seed → same samples).
    student = load_pretrained(out["model_dir"], weights="ema")
    toks = sample(DenoiserFn(student), batch_size=2, seq_len=L, vocab_size=models["k"], steps=2,
                  noise_removal="greedy", valid_vocab=models["valid_vocab"], seed=0, progress=False)
    last = [r for r in rows if r["model"] == "round2" and r["sampler"] == "greedy" and r["steps"] == 2][0]
    assert last["entropy"] == pytest.approx(float(unigram_entropy(toks).mean()))
    base = load_pretrained(models["base"], weights="ema")  # and the base row uses the base EMA
    toks_b = sample(DenoiserFn(base), batch_size=2, seq_len=L, vocab_size=models["k"], steps=2,
                    noise_removal="greedy", valid_vocab=models["valid_vocab"], seed=0, progress=False)
    assert rows[3]["entropy"] == pytest.approx(float(unigram_entropy(toks_b).mean()))
    # evaluate_only: the command form writes the table for any model dir without training.
    ev = dd.run(make_dcfg("evalonly", evaluate_only=True, init_from=out["model_dir"], **{"eval.steps": [2]}))
    assert [(r["model"], r["steps"]) for r in ev["rows"]] == [("base", 2), ("base", 2)]


def test_config_errors_name_the_fix(make_dcfg):
    with pytest.raises(dd.ConfigError, match="did you mean 'distill.steps_per_round'"):
        dd.validate_config(make_dcfg("x", **{"distill.steps_per_rnd": 3}))
    with pytest.raises(dd.ConfigError, match="init_from is required"):
        dd.validate_config(make_dcfg("x", init_from=None))
    with pytest.raises(dd.ConfigError, match="'bwd'"):
        dd.validate_config(make_dcfg("x", **{"distill.kl": "kl-bwd"}))
    with pytest.raises(FileNotFoundError, match="duo model directory"):
        _setup(make_dcfg("x", init_from="/nonexistent/model"))


@pytest.mark.parametrize("name", ["distill_owt_small", "distill_tiny_cpu"])
def test_shipped_configs_validate(name, models):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg.init_from = str(models["base"])
    if name == "distill_owt_small":  # '???' marks what the user must set: the paper's scorer, GPT-2 Large, by path
        assert cfg.eval.scorer.type == "hf" and OmegaConf.is_missing(cfg.eval.scorer, "path")
        cfg.eval.scorer.path = "/ckpt/gpt2-large"
    merged = dd.validate_config(cfg)
    if name == "distill_owt_small":  # the paper's settings
        d = merged.distill
        assert (d.rounds, d.steps_per_round, d.delta0, d.gamma_min, d.gamma_max) == (5, 10000, 1 / 512, -4.0, -1.0)
        assert merged.global_batch_size == 128 and merged.optimizer.lr == 6e-5
        assert merged.lr_scheduler.warmup_steps == 500 and d.kl == "bwd" and d.teacher == "student"


def test_quality_table_scores_with_a_local_hf_causal_lm(make_dcfg, models, tmp_path):
    """``eval.scorer.type: hf`` (as ``duo_generate genppl.scorer=hf``): a tiny GPT-2 written locally scores the table;
    the value equals the Gen PPL protocol applied by hand to the same samples and the row names the scorer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models as tk_models, pre_tokenizers

    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, load_hf_scorer
    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.sampling.samplers import DenoiserFn, sample

    chars = ["<eos>", "<unk>"] + [chr(c) for c in range(32, 127)]
    tk = Tokenizer(tk_models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    d = tmp_path / "gpt2-chars"
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(chars), n_positions=64, n_embd=16,
                                                                n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    gpt2.eval().save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>").save_pretrained(d)

    cfg = make_dcfg("hfscore", evaluate_only=True, **{"eval.steps": [2], "eval.samplers": ["greedy"],
                                                      "eval.scorer": {"type": "hf", "path": str(d)}})
    (row,) = dd.run(cfg)["rows"]
    assert row["gen_ppl_scorer"] == "hf:gpt2-chars" and math.isfinite(row["gen_ppl"])
    base = load_pretrained(models["base"], weights="ema")
    toks = sample(DenoiserFn(base), batch_size=2, seq_len=L, vocab_size=models["k"], steps=2,
                  noise_removal="greedy", valid_vocab=models["valid_vocab"], seed=0, progress=False)
    scorer = load_hf_scorer(d)
    ref = gen_ppl_and_entropy(toks, diffusion_tokenizer=load_tokenizer(models["base"] / "tokenizer"), scorer=scorer,
                              scorer_tokenizer=scorer.tokenizer, eos_id_scorer=0, max_len=64)
    assert row["gen_ppl"] == pytest.approx(ref["gen_ppl"], rel=1e-6)
    assert "hf:gpt2-chars" in (Path(cfg.output_dir) / "quality_table.md").read_text()
    with pytest.raises(dd.ConfigError, match="eval.scorer.path"):
        dd.run(make_dcfg("hfnopath", evaluate_only=True, **{"eval.scorer": {"type": "hf"}}))


def test_distill_config_names_its_scorer_and_says_so_when_absent(make_dcfg, models, tmp_path):
    """The paper config names the GPT-2 Large-compatible HF scorer it needs; without it the run stops at once with one
    line naming eval.scorer.path and the fix (validation: path unset; setup, before any step: path not a model dir)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = OmegaConf.load(CONFIG_DIR / "distill_owt_small.yaml")
    cfg.init_from = str(models["base"])
    with pytest.raises(dd.ConfigError, match=r"^eval.scorer.path is required for eval.scorer.type=hf: a GPT-2 "
                                             r"Large-compatible local Hugging Face causal-LM dir.*eval.scorer.type=none"):
        dd.validate_config(cfg)
    cfg.eval.scorer.type = "none"  # entropy only: no path needed
    assert dd.validate_config(cfg).eval.scorer.path is None

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    for kind, marker in (("hf", "config.json"), ("dit", "duo_config.json")):
        bad = make_dcfg(f"bad_{kind}", **{"eval.include_base": True,
                                          "eval.scorer": {"type": kind, "path": str(empty)}})
        with pytest.raises(dd.ConfigError, match=rf"eval.scorer.path={empty} is not .*\(no {marker} there\)"):
            dd.run(bad)
        assert not (tmp_path / f"bad_{kind}").exists()  # stopped before the run dir (and any step)

    # the tiny CPU config keeps its AR-DiT scorer (type dit; scored end to end by the quality-table test above)
    assert OmegaConf.load(CONFIG_DIR / "distill_tiny_cpu.yaml").eval.scorer.type == "dit"

    # the CLI: exit 2, one line naming the key (no traceback)
    exe = Path(sys.executable).with_name("tune")
    p = subprocess.run([str(exe) if exe.exists() else "tune", "run", "duo_distill", "--config", "duo/distill_owt_small",
                        f"init_from={models['base']}", f"output_dir={tmp_path / 'cli'}"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", DUO_DEBUG="0"))
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "eval.scorer.path is required" in err[0] and "Traceback" not in p.stderr
