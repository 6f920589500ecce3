"""Estimators whose numbers can be published: each test compares against a closed form / quadrature written here.

Reference: for a uniform denoiser (x_θ = 1/K everywhere) the UDLM integrand (docs/method.md §1.3, written out below
with explicit x̄ vectors, independent of ``duo_nelbo``) has the same expectation g(K) for every token, so the NELBO
of n tokens is n·g(K) and the per-token NELBO of any split is g(K) (≈ log K).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.eval.likelihood import conditional_nelbo, nelbo_perplexity, official_harness_nll, sequence_nelbo

EPS = 1e-3  # log-linear schedule epsilon and t_min


def udlm_f(xtheta: np.ndarray, i: int, m: int, a: float, a_prime: float) -> float:
    """f = α'/(Kα) [K/x̄_i − K/x̄θ_i − Σ_j (x̄_j/x̄_i) log(x̄θ_i x̄_j / (x̄θ_j x̄_i))]; z_t = i, x = m."""
    k = len(xtheta)
    x = np.zeros(k)
    x[m] = 1
    xb = k * a * x + (1 - a)
    xbt = k * a * xtheta + (1 - a)
    br = k / xb[i] - k / xbt[i] - np.sum((xb / xb[i]) * np.log(xbt[i] * xb / (xbt * xb[i])))
    return a_prime / (k * a) * br


def exact_uniform_token_nelbo(k: int) -> float:
    """E_{t~U[EPS,1]} E_{z~q_t(.|x)} f for a uniform x_θ (same for every token): composite Gauss-Legendre in t."""
    edges = np.unique(np.concatenate([np.geomspace(EPS, 1.0, 40), np.linspace(0.05, 1.0, 40)]))
    nodes, weights = np.polynomial.legendre.leggauss(12)
    xt = np.full(k, 1.0 / k)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        for u, w in zip((hi - lo) / 2 * nodes + (lo + hi) / 2, (hi - lo) / 2 * weights):
            a = 1 - (1 - EPS) * u
            q_same = a + (1 - a) / k
            val = q_same * udlm_f(xt, 0, 0, a, -(1 - EPS)) + (1 - q_same) * udlm_f(xt, 1, 0, a, -(1 - EPS))
            total += w * val
    return total / (1 - EPS)


class Uniform:
    """x_θ = 1/K everywhere; records every σ and z it is called with."""

    def __init__(self, k: int):
        self.vocab_size = k
        self.calls = []

    def __call__(self, z, sigma, padding_mask=None):
        self.calls.append((z.clone(), sigma.clone()))
        return torch.full((*z.shape, self.vocab_size), -math.log(self.vocab_size))


def test_exact_reference_is_log_k():
    assert exact_uniform_token_nelbo(50) == pytest.approx(math.log(50), abs=0.02)


# ------------------------------------------------------------------------------------------------ item 1: order
@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_nelbo_perplexity_sorted_heterogeneous_split_is_unbiased(order):
    """Half 4-token and half 32-token sequences in sorted order: the per-token NELBO must match the exact value within
    a few standard errors (a fixed sequence -> stratum map gives short sequences the small times: biased by ~1 nat)."""
    k, n_half, length = 50, 32, 32
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, k, (2 * n_half, length), generator=g)
    lens = [4] * n_half + [32] * n_half
    if order == "long_first":
        lens = lens[::-1]
    mask = torch.zeros(2 * n_half, length, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, :n] = True
    res = nelbo_perplexity(Uniform(k), blocks, mask, batch_size=16, mc_passes=8, seed=0, progress=False)
    exact = exact_uniform_token_nelbo(k)
    assert res["stderr_method"] == "between-pass" and 0 < res["stderr"] < 0.25
    assert abs(res["nll_per_token"] - exact) < 4 * res["stderr"], (res["nll_per_token"], res["stderr"], exact)
    # every sequence still gets one time per stratum per pass: t_n differ across passes
    res2 = nelbo_perplexity(Uniform(k), blocks, mask, batch_size=64, mc_passes=8, seed=0, progress=False)
    assert res2["per_pass_nll"] == pytest.approx(res["per_pass_nll"], rel=1e-6)  # batch-size independent


def test_content_token_perplexity_excludes_specials_from_the_count():
    k = 20
    blocks = torch.randint(2, k, (6, 10), generator=torch.Generator().manual_seed(1))
    blocks[:, 0], blocks[:, -1] = 0, 1  # BOS, EOS
    res = nelbo_perplexity(Uniform(k), blocks, batch_size=4, mc_passes=2, progress=False, special_ids=(0, 1))
    assert res["tokens"] == 6 * 8 and res["tokens_all"] == 60
    assert res["nll_per_token"] * res["tokens"] == pytest.approx(res["nll_per_token_all"] * res["tokens_all"])
    assert res["ppl"] > res["ppl_all_tokens"] and "pass" in res["estimator"]


# ------------------------------------------------------------------------------------------------ item 2: conditioning
def test_clean_fraction_conditioning_is_the_stated_formula():
    k = 7
    x0 = torch.tensor([[0, 3, 4, 5, 2, 6, 1, 1], [0, 2, 2, 3, 1, 1, 1, 1]])
    keep = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[1] * 7 + [0], [1] * 5 + [0] * 3], dtype=torch.bool)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    den = Uniform(k)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    sequence_nelbo(den, x0, t, gens, score_mask=real & ~keep, keep_mask=keep, padding_mask=real,
                   conditioning="clean_fraction")
    sigma = den.calls[-1][1].double()
    for b, (n_ctx, n) in enumerate([(3, 7), (1, 5)]):
        a = 1 - (1 - EPS) * float(t[b])
        assert float(sigma[b]) == pytest.approx(-math.log((n_ctx + a * (n - n_ctx)) / n), rel=1e-5)
    # alpha_t conditioning: sigma = -log alpha_t
    sequence_nelbo(den, x0, t, gens, score_mask=real & ~keep, keep_mask=keep, padding_mask=real)
    assert den.calls[-1][1].double().tolist() == pytest.approx([-math.log(1 - (1 - EPS) * v) for v in t.tolist()],
                                                               rel=1e-5)


# ------------------------------------------------------------------------------------------------ item 3: adaptive MC
def test_adaptive_mc_sizes_fresh_samples_from_the_pilot_and_stays_unbiased():
    k = 30
    x0 = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11], [0, 4, 4, 4, 4, 4, 4, 4], [0, 3, 9, 12, 2, 2, 2, 2]])
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, :2] = True
    fixed = conditional_nelbo(Uniform(k), x0, keep, mc_samples=8, batch_size=64)
    target = 0.6
    assert bool((fixed.stderr > target).any())  # 8 samples are not enough here
    ad = conditional_nelbo(Uniform(k), x0, keep, mc_samples=8, batch_size=64, target_stderr=target,
                           max_mc_samples=1024)
    # the fixed estimator's samples are the pilot: M = clip(ceil(s^2 / target^2), 8, 1024) fresh samples
    want = [max(8, min(1024, math.ceil(float(se) ** 2 * 8 / target**2))) for se in fixed.stderr]
    assert ad.mc_samples.tolist() == want and max(want) > 8
    exact = exact_uniform_token_nelbo(k) * 6
    for v, se in zip(ad.nelbo.tolist(), ad.stderr.tolist()):
        assert abs(v - exact) < 4.5 * se, (v, se, exact)
    # the pilot is discarded: with a target every pilot meets, 8 fresh samples, not the fixed estimator's 8
    one = conditional_nelbo(Uniform(k), x0, keep, mc_samples=8, batch_size=64, target_stderr=1e9)
    assert one.mc_samples.tolist() == [8, 8, 8]
    assert all(a != b for a, b in zip(one.nelbo.tolist(), fixed.nelbo.tolist()))


# ------------------------------------------------------------------------------------------------ item 4: OOV tokens
def test_tokens_outside_the_vocabulary_get_infinite_nelbo_or_a_clear_error():
    k = 8
    valid = torch.ones(k, dtype=torch.bool)
    valid[7] = False  # e.g. a pad / special id the model never produces
    x0 = torch.tensor([[0, 3, 4, 5], [0, 3, 7, 5], [0, 3, 4, 5]])
    keep = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    res = conditional_nelbo(Uniform(k), x0, keep, mc_samples=4, valid_vocab=valid, indices=[5, 6, 5])
    assert math.isfinite(float(res.nelbo[0])) and float(res.nelbo[1]) == math.inf
    assert float(res.nelbo[2]) == pytest.approx(float(res.nelbo[0]))  # its neighbour is unaffected
    big = torch.tensor([[0, 3, 4, 99]])  # id >= K in the scored part
    assert float(conditional_nelbo(Uniform(k), big, keep, mc_samples=2).nelbo[0]) == math.inf
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        conditional_nelbo(Uniform(k), torch.tensor([[0, 99, 4, 5]]), keep, mc_samples=2)  # unembeddable context
    with pytest.raises(ValueError, match="outside the model's valid vocabulary"):
        nelbo_perplexity(Uniform(k), x0, valid_vocab=valid, progress=False)


# ------------------------------------------------------------------------------------------------ item 5: official mode
def test_official_harness_full_and_suffix_modes():
    k = 12
    prefix, target = [0, 3, 4, 5, 6], [7, 8, 1]
    den = Uniform(k)
    nll, se = official_harness_nll(den, prefix, target, mode="full", mc_samples=256, batch_size=64)
    g = exact_uniform_token_nelbo(k)
    assert abs(nll - g) < 4 * se + 1e-9  # the mean over all 8 positions of the per-token NELBO
    ids = torch.tensor(prefix + target)
    zs = torch.cat([z for z, _ in den.calls])
    assert zs.shape[1] == 8 and bool((zs[:, :5] != ids[:5]).any())  # the prefix is noised too
    den2 = Uniform(k)
    official_harness_nll(den2, prefix, target, mode="suffix", mc_samples=64, batch_size=64)
    for z, sigma in den2.calls:
        assert bool((z[:, :5] == ids[:5]).all())  # prefix clean
        frac = (z == ids).double().mean(-1).clamp(max=1 - (1 - EPS) * EPS)
        assert sigma.double().tolist() == pytest.approx((-torch.log(frac)).tolist(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ item 7: configs
def test_paper_configs_are_paper_faithful():
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
    for name in ("owt_small", "lm1b_small"):
        assert OmegaConf.load(d / f"{name}.yaml").model.dropout == 0.1
    dist = OmegaConf.load(d / "distill_owt_small.yaml")
    assert dist.ema.decay == 0.9999 and dist.ema.init == "checkpoint"
    for name in ("llama3_2_1b_lora_adapt", "qwen2_5_0_5b_lora_adapt"):
        assert OmegaConf.load(d / f"{name}.yaml").model.time_conditioning is True


# ------------------------------------------------------------------------------------------------ item 8: duo_eval pad
def test_duo_eval_pad_packing_keeps_overlong_sentences():
    from duo_plugin.recipes.duo_eval import _heldout_blocks

    class Tok:
        bos_id, eos_id, pad_id = 0, 1, 2

    docs = [[5, 6, 7], list(range(3, 30)), [8, 9]]
    blocks, mask = _heldout_blocks(docs, Tok(), 10, 0.0, "pad", "split")
    content = mask & (blocks != 0) & (blocks != 1)
    assert int(content.sum()) == sum(len(d) for d in docs)  # nothing dropped
    info = {}
    blocks, mask = _heldout_blocks(docs, Tok(), 10, 0.0, "pad", "truncate", info)
    assert info["overlong_docs"] == 1 and blocks.shape[0] == 3


def test_quality_table_names_the_gen_ppl_scorer():
    from duo_plugin.training.distill import quality_table_markdown

    rows = [{"model": "base", "steps": 8, "sampler": "ancestral", "gen_ppl": 50.0, "entropy": 4.0,
             "sample_seconds": 1.0, "gen_ppl_scorer": "hf:gpt2-large"}]
    assert "Gen PPL scorer: hf:gpt2-large" in quality_table_markdown(rows)
