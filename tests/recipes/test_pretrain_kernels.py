"""duo_pretrain with the fused kernel paths (`kernels:` config section): losses equal the dense computation
on the same counter-based noise stream, accumulation invariance, `auto` selection.  Tiny shapes, CPU."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from duo_plugin.recipes import duo_pretrain as dp


def _kcfg(make_cfg, name, cur, nel, **over):
    return make_cfg(name, **{"kernels.curriculum_input": cur, "kernels.nelbo": nel}, **over)


def test_auto_keeps_dense_at_small_sizes_and_selects_chunked_above_threshold(make_cfg):
    r = dp.DuoPretrainRecipe(make_cfg("auto"))
    r.setup()
    assert r.kernel_paths == {"curriculum_input": "dense", "nelbo": "dense"}
    r.cleanup()
    r = dp.DuoPretrainRecipe(make_cfg("auto2", **{"kernels.auto_min_row_elements": 16}))
    r.setup()
    assert r.kernel_paths == {"curriculum_input": "chunked", "nelbo": "chunked"}
    r.cleanup()


def test_bad_kernel_choices_are_config_errors(make_cfg):
    with pytest.raises(dp.ConfigError, match="kernels.nelbo"):
        dp.DuoPretrainRecipe(make_cfg("bad", **{"kernels.nelbo": "fast"}))
    r = dp.DuoPretrainRecipe(make_cfg("topk", **{"kernels.curriculum_input": "chunked", "curriculum.input": "topk"}))
    with pytest.raises(dp.ConfigError, match="topk"):
        r.setup()


def test_fused_curriculum_step_equals_dense_computation_on_the_same_noise(make_cfg):
    """Step 0 with the kernels' dense reference: z_t = argmax(w), soft input w/τ into the model, duo_nelbo — computed
    here independently from kernels.curriculum_latent_reference with the recipe's row seeds."""
    from duo_plugin import kernels
    from duo_plugin.diffusion.losses import duo_nelbo
    from duo_plugin.diffusion.schedules import gaussian_coefficients, stratified_times

    r = dp.DuoPretrainRecipe(_kcfg(make_cfg, "ref", "reference", "reference", max_steps=1))
    r.setup()
    pos = list(range(8))
    model0 = copy.deepcopy(r.model)
    x0 = r.train_set.batch(r.sampler.indices(0))["tokens"]
    t = stratified_times(3, 0, pos, 8, 1e-3, dtype=torch.float64)
    gamma = r.duality.gamma(t)
    at, st = gaussian_coefficients(gamma)
    w = kernels.curriculum_latent_reference(x0, at.float(), st.float(), kernels.row_seeds(3, 0, pos), r.vocab_size,
                                            r.valid_vocab)
    alpha, alpha_prime = r.duality.alpha(t), r.duality.alpha_prime(t)
    with torch.no_grad():
        log_x = model0(w / 1e-3, (-torch.log(alpha)).float())
    ref = float(duo_nelbo(log_x, w.argmax(-1), x0, alpha, alpha_prime, r.valid_vocab).sum() / x0.numel())
    assert r.train_step(0)["loss"] == pytest.approx(ref, rel=1e-5)
    r.cleanup()


@pytest.mark.parametrize("impl", ["chunked"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
def test_fused_paths_match_reference_paths_over_steps(make_cfg, impl):
    """Curriculum steps 0-1 and discrete step 2: fused (impl) == kernels' dense reference, same noise stream."""
    ref = dp.run(_kcfg(make_cfg, "r", "reference", "reference", max_steps=3))
    fused = dp.run(_kcfg(make_cfg, "f", impl, impl, max_steps=3))
    assert fused["phases"] == ["curriculum", "curriculum", "discrete"]
    assert fused["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)


def test_fused_paths_accumulation_invariant(make_cfg):
    a = dp.run(_kcfg(make_cfg, "a1", "chunked", "chunked", max_steps=3, gradient_accumulation_steps=1))
    b = dp.run(_kcfg(make_cfg, "a2", "chunked", "chunked", max_steps=3, gradient_accumulation_steps=2))
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5, abs=1e-6)
