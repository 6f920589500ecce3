"""benchmarks/bench_curriculum.topk_approximation (the measured "top-k soft input ≈ dense soft input" numbers in
docs/kernels.md) against brute force, and tied to the recipe's sparse input adapt.topk_curriculum_inputs."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_curriculum import topk_approximation

from duo_plugin.diffusion.losses import gaussian_latent
from duo_plugin.models.dit import SoftTopK, embed_inputs
from duo_plugin.training.adapt import topk_curriculum_inputs


def _brute(w_row, tau, k, E):
    """Plain Python: sort ids by w, dense softmax, mass of ids ranked ≥ k, L1 of the two embeddings."""
    vals = [float(v) for v in w_row]
    order = sorted(range(len(vals)), key=lambda j: -vals[j])
    top = order[:k]
    m = max(vals)
    ex = [math.exp((v - m) / tau) if v != -math.inf else 0.0 for v in vals]
    z = sum(ex)
    p = [e / z for e in ex]
    mass_out = sum(p[j] for j in order[k:])
    zt = sum(ex[j] for j in top)
    q = {j: ex[j] / zt for j in top}
    d = E.shape[1]
    dense = [sum(p[j] * float(E[j, c]) for j in range(len(vals))) for c in range(d)]
    sparse = [sum(q[j] * float(E[j, c]) for j in top) for c in range(d)]
    return mass_out, sum(abs(a - b) for a, b in zip(dense, sparse))


@pytest.mark.parametrize("tau,k", [(1.0, 1), (0.3, 5), (0.1, 11), (1.0, 19)])
def test_topk_approximation_matches_brute_force(tau, k):
    K, d, n = 20, 6, 7
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, K, generator=g, dtype=torch.float64)
    w[0, [3, 7]] = -math.inf  # invalid ids (valid_vocab) carry no mass and never enter the top-k first
    E = torch.randn(K, d, generator=g, dtype=torch.float64)
    s = topk_approximation(w, tau, k, E)
    for i in range(n):
        mass, l1 = _brute(w[i], tau, k, E)
        assert float(s["mass_out"][i]) == pytest.approx(mass, rel=1e-9, abs=1e-15)
        assert float(s["l1"][i]) == pytest.approx(l1, rel=1e-7, abs=1e-12)


def test_log_mass_exact_where_mass_underflows_and_zero_when_nothing_outside():
    w = torch.tensor([[1.0, 0.9, 0.0, -math.inf]], dtype=torch.float64)
    E = torch.eye(4, dtype=torch.float64)
    s = topk_approximation(w, 1e-3, 2, E)  # outside mass = exp(-1000) / (1 + exp(-100) + exp(-1000)) underflows
    assert float(s["log_mass_out"][0]) == pytest.approx(-1000.0, abs=1e-9)
    s = topk_approximation(w, 1e-3, 3, E)  # only the invalid id is outside
    assert float(s["log_mass_out"][0]) == -math.inf and float(s["l1"][0]) == 0.0


def test_dense_latent_metric_agrees_with_recipe_topk_input_at_k_eff():
    """At k = K_eff the recipe's SoftTopK is the full dense softmax (re-ordered): rebuilding its latent as τ·log q
    (softmax-invariant up to a constant), the metric at k = K_eff − 1 equals its smallest weight, and the top-(K_eff−1)
    embedding equals the renormalised embedding_bag of its first K_eff − 1 entries. On a dense-path latent
    (gaussian_latent, invalid ids −inf) the outside mass is non-increasing in k and 0 at k = K_eff."""
    K, d, tau = 12, 5, 1.0
    vv = torch.ones(K, dtype=torch.bool)
    vv[[0, 11]] = False
    k_eff = int(vv.sum())
    x0 = torch.tensor([[1, 4, 9, 10]])
    E = torch.randn(K, d, generator=torch.Generator().manual_seed(4))
    z, soft = topk_curriculum_inputs(x0, -2.0, tau, K, K, torch.Generator().manual_seed(5), valid_vocab=vv)
    assert soft.ids.shape[-1] == k_eff and bool(vv[soft.ids].all())
    q = soft.weights.double()[0]  # [L, k_eff], descending, sums to 1
    assert torch.allclose(q.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.equal(z[0], soft.ids[0, :, 0])
    w_hat = torch.full((4, K), -math.inf, dtype=torch.float64).scatter(-1, soft.ids[0], tau * q.log())
    s = topk_approximation(w_hat, tau, k_eff - 1, E)
    assert torch.allclose(s["mass_out"], q[:, -1], rtol=1e-5)
    assert bool((s["mass_out"] > 0).all())
    s_full = topk_approximation(w_hat, tau, k_eff, E)
    assert bool((s_full["mass_out"] == 0).all())
    # the full-k recipe input embeds to the dense soft embedding of w_hat (what the dense path would feed)
    dense_emb = embed_inputs((w_hat / tau).float()[None], E)[0]
    sparse_emb = embed_inputs(soft, E)[0]
    assert torch.allclose(dense_emb, sparse_emb, atol=1e-5)
    # top-(k_eff - 1) embedding = renormalised bag of the first k_eff - 1 recipe entries
    ids, qq = soft.ids[0, :, :-1], q[:, :-1] / q[:, :-1].sum(-1, keepdim=True)
    bag = embed_inputs(SoftTopK(ids[None], qq.float()[None]), E)[0].double()
    assert torch.allclose((dense_emb.double() - bag).abs().sum(-1), s["l1"], atol=1e-5)
    # and on a dense-path latent (the benchmark's sample): masses are probabilities, non-increasing in k
    wd = gaussian_latent(x0, -2.0, K, torch.Generator().manual_seed(6), vv)[0]
    m = [topk_approximation(wd, 0.1, kk, E)["mass_out"] for kk in (1, 3, k_eff)]
    assert bool((m[0] >= m[1]).all()) and bool((m[1] >= m[2]).all()) and bool((m[2] == 0).all())
