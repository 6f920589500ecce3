"""``data.pad_mode``: what padded rows (LM1B without packing) mean to the Duo / MDLM objectives and to validation.

``clean_masked`` (default): pads stay clean, are masked from attention and are not scored. ``official`` (the
official Duo code, read from its trainer: ``q_xt`` on the whole row, a DiT without attention mask, the loss times
the tokenizer's attention mask): pads are noised and attended to, only the loss and its count skip them. The
references below are built inline from the diffusion primitives.
"""

from __future__ import annotations

import pytest
import torch

from duo_plugin.diffusion import LogLinearSchedule, corrupt, duo_nelbo
from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators, valid_ids
from duo_plugin.eval.likelihood import nelbo_perplexity, stratum_permutation
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.objectives import DuoObjective, ObjectiveContext
from duo_plugin.objectives.mdlm import MDLMObjective

K, L, B, SEED = 41, 12, 4, 7
VALID = torch.ones(K, dtype=torch.bool)
VALID[-3:] = False
PAD = K - 4  # a valid id used as the pad


def _model(k=K):
    torch.manual_seed(0)
    m = duo_dit_tiny(k, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def _batch():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, K - 4, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 7:] = False
    mask[3, 4:] = False
    x0 = torch.where(mask, x0, torch.full_like(x0, PAD))
    return x0, mask


def _ctx(pad_mode, valid=VALID):
    return ObjectiveContext(seed=SEED, global_batch_size=B, vocab_size=valid.numel(), valid_vocab=valid, seq_len=L,
                            device=torch.device("cpu"), pad_mode=pad_mode)


def _record(model):
    """Forward inputs the objective hands the network: list of (ids, kwargs)."""
    calls = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append((args[0].clone(), dict(kwargs))),
                                    with_kwargs=True)
    return calls


@pytest.mark.parametrize("pad_mode", ["clean_masked", "official"])
def test_duo_discrete_loss_pads_per_mode_against_inline_reference(pad_mode):
    model = _model()
    obj = DuoObjective(curriculum_steps=0, table_points=None, kernels_curriculum_input="dense", kernels_nelbo="dense")
    obj.setup(model, _ctx(pad_mode))
    calls = _record(model)
    x0, mask = _batch()
    pos, step = list(range(B)), 3
    with torch.no_grad():
        loss, n, _ = obj(model, x0, mask, pos, step)
    t = stratified_times(SEED, step, pos, B, 1e-3, dtype=torch.float64)
    sched = LogLinearSchedule(1e-3)
    alpha = sched.alpha(t)
    z = corrupt(x0, alpha, row_generators(SEED, step, pos), VALID)
    pads = ~mask
    (seen, kw), = calls
    if pad_mode == "official":
        # pads receive noise and the network attends to every position (no mask at all = an all-ones mask)
        assert bool((z[pads] != x0[pads]).any())
        assert torch.equal(seen, z)
        assert "padding_mask" not in kw
        with torch.no_grad():
            logp = model(z, (-torch.log(alpha)).float())
    else:
        z = torch.where(mask, z, x0)
        assert torch.equal(seen[pads], x0[pads])  # untouched
        assert torch.equal(seen, z)
        assert torch.equal(kw["padding_mask"], mask)
        with torch.no_grad():
            logp = model(z, (-torch.log(alpha)).float(), padding_mask=mask)
    f = duo_nelbo(logp, z, x0, alpha, sched.alpha_prime(t), VALID)
    assert n == int(mask.sum())  # the loss counts real tokens only in both modes
    torch.testing.assert_close(loss, torch.where(mask, f, torch.zeros(())).sum(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pad_mode", ["clean_masked", "official"])
def test_mdlm_pads_per_mode(pad_mode):
    valid = torch.ones(K + 1, dtype=torch.bool)
    valid[-1] = False  # the [MASK] row
    model = _model(K + 1)
    obj = MDLMObjective()
    obj.setup(model, _ctx(pad_mode, valid))
    calls = _record(model)
    x0, mask = _batch()
    with torch.no_grad():
        obj(model, x0, mask, list(range(B)), 5)
    (seen, kw), = calls
    pads = ~mask
    if pad_mode == "official":
        assert bool((seen[pads] == K).any()) and "padding_mask" not in kw  # some pads masked, full attention
    else:
        assert torch.equal(seen[pads], x0[pads]) and torch.equal(kw["padding_mask"], mask)


def _reference_nelbo_ppl(model, x0, mask, pad_mode, seed=3):
    """Brute-force NELBO per counted token: each row's time from its stratum, the row's uniforms then replacement
    ids at full length from ``row_generators(seed, 0, [i])``; official = noised, attended pads; clean = kept, masked."""
    n = x0.shape[0]
    sched = LogLinearSchedule(1e-3)
    t = stratified_times(seed, 0, stratum_permutation(seed, 0, n), n, t_min=1e-3, dtype=torch.float64)
    ids = valid_ids(K, VALID)
    total = 0.0
    for i in range(n):
        g = row_generators(seed, 0, [i])[0]
        u = torch.rand((L,), generator=g, dtype=torch.float64)
        draw = torch.randint(0, int(ids.numel()), (L,), generator=g)
        a = sched.alpha(t[i:i + 1])
        z = torch.where(u < a, x0[i], ids[draw])
        kw = {}
        if pad_mode == "clean_masked" and not bool(mask[i].all()):
            z = torch.where(mask[i], z, x0[i])
            kw = {"padding_mask": mask[i:i + 1]}
        with torch.no_grad():
            logp = model(z[None], (-torch.log(a)).float(), **kw)
        f = duo_nelbo(logp, z[None], x0[i:i + 1], a, sched.alpha_prime(t[i:i + 1]).expand(1), VALID)[0]
        total += float(f[mask[i]].double().sum())
    return total / int(mask.sum())


def test_validation_nelbo_per_pad_mode_matches_brute_force():
    model = _model()
    x0, mask = _batch()
    got = {m: nelbo_perplexity(model, x0, mask, batch_size=3, seed=3, valid_vocab=VALID, progress=False,
                               pad_mode=m)["nll_per_token"] for m in ("clean_masked", "official")}
    for m, v in got.items():
        assert v == pytest.approx(_reference_nelbo_ppl(model, x0, mask, m), rel=1e-5), m
    assert got["official"] != pytest.approx(got["clean_masked"], rel=1e-4)  # the modes are different estimators
    with pytest.raises(ValueError, match="pad_mode"):
        nelbo_perplexity(model, x0, mask, valid_vocab=VALID, progress=False, pad_mode="noisy")


def test_pad_mode_key_is_checked_and_the_paper_config_uses_the_official_mode():
    from omegaconf import OmegaConf

    from duo_plugin.recipes.common import pad_mode_of
    from duo_plugin.training.recipe_utils import ConfigError

    assert pad_mode_of(OmegaConf.create({"data": {}})) == "clean_masked"
    with pytest.raises(ConfigError, match="data.pad_mode"):
        pad_mode_of(OmegaConf.create({"data": {"pad_mode": "masked"}}))
    from pathlib import Path

    import duo_plugin

    cfg = OmegaConf.load(Path(duo_plugin.__file__).parent / "configs/duo/lm1b_small.yaml")
    assert cfg.data.packing == "pad" and cfg.data.pad_mode == "official"
