"""SEDDObjective and D3PMObjective called directly: the D3PM loss against an inline reference (clock, masking and the
T/k weight re-derived from the documented streams, SUBS written out, + λ CE), the SEDD loss = Σ of the process's
per-token NELBO at the documented draws, micro-batch split invariance, refusals, and the shipped configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.objectives import ObjectiveContext
from duo_plugin.objectives.d3pm import D3PMObjective
from duo_plugin.objectives.sedd import SEDDObjective

K_TOK, L, B, SEED = 40, 12, 4, 5
W = K_TOK + 1
VALID = torch.zeros(W, dtype=torch.bool)
VALID[:K_TOK - 2] = True
CFG = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"


def _model(width=W, time_conditioning=True):
    torch.manual_seed(0)
    m = duo_dit_tiny(width, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, dropout=0.0,
                     time_conditioning=time_conditioning)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def _ctx(gbs=B, valid=VALID):
    return ObjectiveContext(seed=SEED, global_batch_size=gbs, vocab_size=valid.numel(), valid_vocab=valid, seq_len=L,
                            device=torch.device("cpu"))


def test_d3pm_loss_equals_inline_reference():
    model = _model(time_conditioning=False)
    big_t, lam = 20, 0.01
    obj = D3PMObjective(steps=big_t, hybrid_weight=lam)
    obj.setup(model, _ctx(gbs=2 * B))
    x0 = torch.randint(0, K_TOK - 2, (B, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 9:] = False
    pos, step = [4, 5, 6, 7], 3
    with torch.no_grad():
        loss, n, _ = obj(model, x0, mask, pos, step)
    u = stratified_times(SEED, step, pos, 2 * B, 0.0, dtype=torch.float64)
    k = torch.ceil(u * big_t - 1e-6).clamp(1, big_t)
    alpha = 1 - k / big_t
    draws = torch.stack([torch.rand(L, generator=g, dtype=torch.float64) for g in row_generators(SEED, step, pos)])
    z = torch.where((draws < alpha[:, None]) | ~mask, x0, torch.full_like(x0, K_TOK))
    with torch.no_grad():
        lp = model(z, torch.zeros(B), padding_mask=mask).double()
    ref = 0.0
    for b in range(B):
        for i in range(L):
            if mask[b, i] and z[b, i] == K_TOK:
                nll = float(torch.logsumexp(lp[b, i][VALID], 0) - lp[b, i, x0[b, i]])
                ref += big_t / float(k[b]) * nll + lam * nll
    assert n == int(mask.sum()) and int((z == K_TOK).sum()) > 0
    assert float(loss) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_sedd_loss_is_the_process_nelbo_at_the_documented_draws(graph):
    width = W if graph == "absorb" else K_TOK
    valid = VALID if graph == "absorb" else VALID[:K_TOK].clone()
    model = _model(width)
    obj = SEDDObjective(graph=graph, noise="geometric" if graph == "uniform" else "loglinear")
    obj.setup(model, _ctx(gbs=2 * B, valid=valid))
    assert obj.name == f"sedd_{graph}"
    x0 = torch.randint(0, K_TOK - 2, (B, L), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, L, dtype=torch.bool)
    pos, step = [0, 2, 5, 7], 1
    with torch.no_grad():
        loss, _, _ = obj(model, x0, mask, pos, step)
        halves = [obj(model, x0[i:i + 2], mask[i:i + 2], pos[i:i + 2], step)[0] for i in (0, 2)]
    t = stratified_times(SEED, step, pos, 2 * B, 1e-3, dtype=torch.float64)
    alpha, alpha_prime = obj.schedule.alpha(t), obj.schedule.alpha_prime(t)
    if graph == "absorb":
        assert torch.allclose(alpha, 1 - (1 - 1e-3) * t)
    else:
        sig = 1e-4 * (20.0 / 1e-4) ** t
        assert torch.allclose(alpha, torch.exp(-sig))
    z = obj.process.corrupt(x0, alpha, row_generators(SEED, step, pos))
    with torch.no_grad():
        out = model(z, (-torch.log(alpha)).float())
        ref = obj.process.nelbo(out, z, x0, alpha, alpha_prime).double().sum()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5) and math.isfinite(float(loss)) and float(loss) > 0
    assert float(sum(halves)) == pytest.approx(float(loss), rel=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match="time_conditioning"):
        D3PMObjective().setup(_model(), _ctx())
    valid = VALID.clone()
    valid[-1] = True
    with pytest.raises(ValueError, match="vocab_size"):
        SEDDObjective(graph="absorb").setup(_model(), _ctx(valid=valid))
    with pytest.raises(ValueError, match="graph"):
        SEDDObjective(graph="masked")
    with pytest.raises(ValueError, match="mask_id"):
        SEDDObjective(graph="uniform", mask_id=3)


def test_shipped_baseline_configs_validate():
    from duo_plugin.objectives import objective_from_config
    from duo_plugin.recipes import duo_pretrain as dp

    base = dp.validate_config(OmegaConf.load(CFG / "tiny_cpu.yaml"))
    for name, width in (("sedd_absorb_tiny_cpu", 1), ("sedd_uniform_tiny_cpu", 0), ("d3pm_tiny_cpu", 1)):
        cfg = dp.validate_config(OmegaConf.load(CFG / f"{name}.yaml"))
        for key in ("data", "optimizer", "lr_scheduler", "global_batch_size", "max_steps", "tokenizer", "ema"):
            a, b = cfg[key], base[key]
            if OmegaConf.is_config(a):
                a, b = OmegaConf.to_container(a), OmegaConf.to_container(b)
            assert a == b, (name, key)
        assert int(cfg.model.vocab_size) == int(cfg.tokenizer.train.vocab_size) + width
        obj = objective_from_config(OmegaConf.to_container(cfg, resolve=False))
        assert obj.name == name[: -len("_tiny_cpu")]
    for data, k in (("owt", 50258), ("lm1b", 30522)):
        ref = dp.validate_config(OmegaConf.load(CFG / f"{data}_small.yaml"))
        for stem, width in (("sedd_absorb", 1), ("sedd_uniform", 0), ("d3pm", 1)):
            cfg = dp.validate_config(OmegaConf.load(CFG / f"{stem}_{data}.yaml"))
            assert int(cfg.model.vocab_size) == k + width
            for key in ("data", "optimizer", "lr_scheduler", "global_batch_size", "max_steps", "ema"):
                assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(ref[key]) \
                    if OmegaConf.is_config(cfg[key]) else cfg[key] == ref[key], (stem, data, key)
            assert objective_from_config(OmegaConf.to_container(cfg, resolve=False)).name == stem
            assert bool(cfg.model.get("time_conditioning", True)) == (stem != "d3pm")
