"""MDLMObjective called directly: the loss against an inline reference (masking re-drawn from the documented stream,
SUBS and the −1/t weight written out), the [MASK]-row check, and validation through eval.likelihood."""

from __future__ import annotations

import pytest
import torch

from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.objectives import ObjectiveContext
from duo_plugin.objectives.mdlm import MDLMObjective

K_TOK, L, B, SEED = 40, 12, 4, 5
W = K_TOK + 1  # + the [MASK] row
VALID = torch.zeros(W, dtype=torch.bool)
VALID[:K_TOK - 2] = True  # two special ids and the mask row are not data


def _model():
    torch.manual_seed(0)
    m = duo_dit_tiny(W, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def _ctx(gbs=B, valid=VALID):
    return ObjectiveContext(seed=SEED, global_batch_size=gbs, vocab_size=W, valid_vocab=valid, seq_len=L,
                            device=torch.device("cpu"))


def test_mdlm_loss_equals_inline_reference_on_a_padded_batch():
    model = _model()
    obj = MDLMObjective(alpha_eps=1e-3, t_min=1e-3)
    obj.setup(model, _ctx(gbs=2 * B))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, K_TOK - 2, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[2, 8:] = False
    pos, step = [4, 5, 6, 7], 3
    with torch.no_grad():
        loss, n, metrics = obj(model, x0, mask, pos, step)
    # reference: t stratified over the global batch; one uniform per position from the row generator; keep if u < α
    t = stratified_times(SEED, step, pos, 2 * B, 1e-3, dtype=torch.float64)
    alpha = 1 - (1 - 1e-3) * t
    u = torch.stack([torch.rand(L, generator=gen, dtype=torch.float64) for gen in row_generators(SEED, step, pos)])
    z = torch.where((u < alpha[:, None]) | ~mask, x0, torch.full_like(x0, K_TOK))
    with torch.no_grad():
        logits = torch.log(model(z, (-torch.log(alpha)).float(), padding_mask=mask).double().exp())
    ref = 0.0
    for b in range(B):
        for i in range(L):
            if mask[b, i] and z[b, i] == K_TOK:
                lse = torch.logsumexp(logits[b, i][VALID], 0)
                ref += (1.0 / t[b]) * (lse - logits[b, i, x0[b, i]])  # −α'/(1−α) = 1/t for the log-linear schedule
    assert metrics["phase"] == "mdlm" and n == int(mask.sum())
    assert int((z == K_TOK).sum()) > 0
    torch.testing.assert_close(loss.double(), torch.as_tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_mdlm_needs_a_mask_row_outside_the_tokenizer():
    valid = VALID.clone()
    valid[-1] = True
    with pytest.raises(ValueError, match="vocab_size"):
        MDLMObjective().setup(_model(), _ctx(valid=valid))


def test_mdlm_validation_nll_is_the_absorbing_nelbo():
    from duo_plugin.diffusion.absorbing import AbsorbingProcess
    from duo_plugin.eval.likelihood import nelbo_perplexity

    model = _model()
    obj = MDLMObjective()
    obj.setup(model, _ctx())
    blocks = torch.randint(0, K_TOK - 2, (6, L), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(6, L, dtype=torch.bool)
    with torch.no_grad():
        got = obj.validation_nll(model, blocks, mask, batch_size=4, nelbo_perplexity=nelbo_perplexity)
        ref = nelbo_perplexity(model, blocks, mask, batch_size=6, seed=SEED, progress=False,
                               process=AbsorbingProcess(W, K_TOK, valid_vocab=VALID))["nll_per_token"]
    assert got["nll"] == pytest.approx(ref, rel=1e-6) and got["nll_all"] == pytest.approx(ref, rel=1e-6)  # batch-size independent up to fp32 rounding


def test_shipped_baseline_configs_validate():
    """duo/mdlm_tiny_cpu and duo/udlm_tiny_cpu: same data/model/budget as duo/tiny_cpu; MDLM gets the [MASK] row."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from duo_plugin.objectives import objective_from_config
    from duo_plugin.recipes import duo_pretrain as dp

    cfg_dir = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
    base = dp.validate_config(OmegaConf.load(cfg_dir / "tiny_cpu.yaml"))
    for name in ("mdlm_tiny_cpu", "udlm_tiny_cpu"):
        cfg = dp.validate_config(OmegaConf.load(cfg_dir / f"{name}.yaml"))
        for key in ("data", "optimizer", "lr_scheduler", "global_batch_size", "max_steps", "tokenizer", "ema"):
            a, b = cfg[key], base[key]
            if OmegaConf.is_config(a):
                a, b = OmegaConf.to_container(a), OmegaConf.to_container(b)
            assert a == b, (name, key)
        obj = objective_from_config(OmegaConf.to_container(cfg, resolve=False))
        if name == "mdlm_tiny_cpu":
            assert isinstance(obj, MDLMObjective)
            assert int(cfg.model.vocab_size) == int(cfg.tokenizer.train.vocab_size) + 1
        else:
            assert obj.name == "duo" and obj.curriculum_steps == 0
