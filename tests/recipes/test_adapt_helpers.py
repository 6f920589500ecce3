"""Unit tests of duo_plugin.training.adapt: the sparse top-k curriculum input against the dense Gaussian latent and
the duality operator T, and attention-mask annealing through a torchtune decoder."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.diffusion.duality import discrete_alpha
from duo_plugin.diffusion.losses import curriculum_inputs
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.training.adapt import (
    anneal_progress,
    annealed_attention_mask,
    top_order_statistics,
    topk_curriculum_inputs,
)

K = 9
VALID = torch.tensor([True, True, False, True, True, True, False, True, True])  # K_eff = 7, ids 2 and 6 invalid
K_EFF = int(VALID.sum())


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov–Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((fa - fb).abs().max())


def test_order_statistics_match_sorted_normals():
    """Top-3 of n=50 iid N(0,1) via Rényi spacings vs sorting 50 actual normals (KS per order statistic)."""
    g = torch.Generator().manual_seed(0)
    fast = top_order_statistics(50, 3, (20000,), g)
    ref = torch.randn(20000, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64).topk(3).values
    assert bool((fast[:, :-1] >= fast[:, 1:]).all())  # descending
    crit = 1.95 * math.sqrt(2 / 20000)  # ~0.1% level
    for j in range(3):
        assert _ks(fast[:, j], ref[:, j]) < crit, j
    # Far tail stays finite and ordered (K ~ 150K: the max is ~4.5 sigma).
    big = top_order_statistics(151_000, 8, (1000,), g)
    assert torch.isfinite(big).all() and 3.5 < float(big[:, 0].mean()) < 5.5


@pytest.mark.parametrize("gamma", [-3.0, -1.0])
def test_topk_argmax_marginal_matches_duality_and_dense(gamma):
    """z_t of the sparse path ~ Cat(T(γ) x + (1−T)/K_eff) over valid ids only, like the dense argmax."""
    n = 20000
    x0 = torch.full((n, 1), 4, dtype=torch.long)
    z_sparse, soft = topk_curriculum_inputs(x0, gamma, 1e-3, 3, K, torch.Generator().manual_seed(2), VALID)
    z_dense, _ = curriculum_inputs(x0, gamma, 1e-3, K, torch.Generator().manual_seed(3), VALID)
    T = float(discrete_alpha(torch.tensor(gamma, dtype=torch.float64), K_EFF))
    target = (1 - T) / K_EFF * VALID.double()
    target[4] += T
    emp_s = torch.bincount(z_sparse.flatten(), minlength=K).double() / n
    emp_d = torch.bincount(z_dense.flatten(), minlength=K).double() / n
    assert emp_s[~VALID].sum() == 0 and bool(VALID[soft.ids].all())
    assert _tv(emp_s, target) < 0.02, (emp_s, target)
    assert _tv(emp_d, target) < 0.02
    # z_t is the argmax of the kept values: the id of the largest soft weight.
    assert torch.equal(z_sparse, soft.ids.gather(-1, soft.weights.argmax(-1, keepdim=True)).squeeze(-1))


def test_topk_weights_match_dense_softmax_restricted_to_topk():
    """For k = K_eff − 1 (and k = 2) the sorted sparse weights have the law of the dense softmax over the
    dense top-k renormalised; compare weight on the clean token and the top weight by KS."""
    n, gamma, tau = 20000, -2.0, 0.3  # large tau so the weights are not all ~one-hot
    x0 = torch.full((n, 1), 1, dtype=torch.long)
    for k in (K_EFF - 1, 2):
        _, soft = topk_curriculum_inputs(x0, gamma, tau, k, K, torch.Generator().manual_seed(4), VALID)
        _, logits = curriculum_inputs(x0, gamma, tau, K, torch.Generator().manual_seed(5), VALID)
        tv, ti = logits.topk(k, dim=-1)
        dense_w = torch.softmax(tv, -1)
        assert torch.allclose(soft.weights.sum(-1), torch.ones(n, 1), atol=1e-5)
        crit = 1.95 * math.sqrt(2 / n)
        assert _ks(soft.weights.max(-1).values.flatten(), dense_w.max(-1).values.flatten()) < crit
        w_clean_s = (soft.weights * (soft.ids == 1)).sum(-1).flatten()
        w_clean_d = (dense_w * (ti == 1)).sum(-1).flatten()
        assert _ks(w_clean_s, w_clean_d) < crit
        # Non-clean ids are uniform over the other valid ids.
        others = soft.ids[soft.ids != 1]
        cnt = torch.bincount(others, minlength=K).double()
        assert cnt[~VALID].sum() == 0 and cnt[1] == 0
        frac = cnt[VALID & (torch.arange(K) != 1)] / cnt.sum()
        assert float((frac - 1 / (K_EFF - 1)).abs().max()) < 0.01
        assert bool((soft.ids.sort(-1).values.diff(dim=-1) > 0).all())  # distinct ids per token


def test_topk_per_row_generators_and_large_vocab_memory():
    """Row b depends only on generator b; a 151,936-wide valid set works without K-wide tensors."""
    x0 = torch.randint(0, 100, (3, 5))
    gens = lambda: row_generators(7, 0, [0, 1, 2])
    z1, s1 = topk_curriculum_inputs(x0, torch.tensor([-3.0, -2.0, -1.0]), 1e-3, 4, 151_936, gens())
    z2, s2 = topk_curriculum_inputs(x0[1:2], torch.tensor([-2.0]), 1e-3, 4, 151_936, gens()[1:2])
    assert torch.equal(z1[1:2], z2) and torch.equal(s1.ids[1:2], s2.ids)
    valid = torch.zeros(151_936, dtype=torch.bool)
    valid[:151_643] = True  # Qwen-like: padded rows and specials excluded
    z, s = topk_curriculum_inputs(x0, -1.0, 1e-3, 16, 151_936, torch.Generator().manual_seed(0), valid)
    assert s.ids.shape == (3, 5, 16) and int(s.ids.max()) < 151_643 and int(z.max()) < 151_643


def test_topk_rejects_bad_inputs():
    x0 = torch.tensor([[2]])
    with pytest.raises(ValueError, match="outside valid_vocab"):
        topk_curriculum_inputs(x0, -1.0, 1e-3, 2, K, torch.Generator(), VALID)
    with pytest.raises(ValueError, match="tau"):
        topk_curriculum_inputs(torch.tensor([[1]]), -1.0, 0.0, 2, K, torch.Generator(), VALID)


def test_annealed_mask_shapes():
    assert anneal_progress(0, 10) == 0.0 and anneal_progress(5, 10) == 0.5 and anneal_progress(20, 10) == 1.0
    assert anneal_progress(3, 0) == 1.0
    L = 8
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    assert torch.equal(annealed_attention_mask(L, 0.0), causal)
    m = annealed_attention_mask(L, 0.25)  # j <= i + 2
    i = torch.arange(L)
    assert torch.equal(m, (i[None] - i[:, None]) <= 2)
    assert annealed_attention_mask(L, 1.0) is None
    r = annealed_attention_mask(64, 0.5, mode="random", generator=torch.Generator().manual_seed(0))
    assert bool(r[torch.tril(torch.ones(64, 64, dtype=torch.bool))].all())
    fut = r[~torch.tril(torch.ones(64, 64, dtype=torch.bool))].double().mean()
    assert 0.45 < float(fut) < 0.55
    with pytest.raises(ValueError, match="window"):
        annealed_attention_mask(L, 0.5, mode="nope")


def test_annealed_mask_through_decoder_denoiser():
    """progress 0 → the bidirectional denoiser reproduces the stock causal decoder; the window mask hides the
    future beyond the window; no mask → full attention."""
    from torchtune.models.llama3_2 import llama3_2

    from duo_plugin.models import make_denoiser

    torch.manual_seed(0)
    shape = dict(vocab_size=32, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=16)
    causal = llama3_2(**shape).eval()
    den = make_denoiser(llama3_2(**shape)).eval()
    den.decoder.load_state_dict(causal.state_dict())
    x = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        ref = torch.log_softmax(causal(x).float(), -1)
        out = den(x, None, attn_mask=annealed_attention_mask(8, 0.0))
        assert torch.allclose(out, ref, atol=1e-5)
        x2 = x.clone()
        x2[:, 5] = (x2[:, 5] + 1) % 32
        m = annealed_attention_mask(8, 0.25)  # pos i sees j <= i + 2: pos 2 sees 5 through layer 2? (2 layers: 2+2+2)
        a, b = den(x, None, attn_mask=m), den(x2, None, attn_mask=m)
        assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)  # 0 reaches at most 4 in two layers
        assert not torch.allclose(a[:, 1], b[:, 1], atol=1e-6)  # 1 -> 3 -> 5
        # padding mask and annealing mask combine (pad keys hidden on top of the window).
        pm = torch.ones(2, 8, dtype=torch.bool)
        pm[:, 6:] = False
        c = den(x, None, padding_mask=pm, attn_mask=annealed_attention_mask(8, 0.9))
        x3 = x.clone()
        x3[:, 7] = (x3[:, 7] + 3) % 32
        d = den(x3, None, padding_mask=pm, attn_mask=annealed_attention_mask(8, 0.9))
        assert torch.allclose(c[:, :6], d[:, :6], atol=1e-6)
