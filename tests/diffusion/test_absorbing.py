"""MDLM (absorbing process) maths against independent references: numpy per-token formulas, Bayes' rule from the
forward kernels, and a brute-force toy distribution on which the NELBO with the exact data posterior as x_θ must
equal −log p(x) (the continuous-time bound is tight for masked diffusion; Sahoo et al. 2024 / Ou et al. 2024)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from duo_plugin.diffusion import absorbing


def test_mask_vocab_appends_one_id():
    assert absorbing.mask_vocab(7) == (8, 7)
    with pytest.raises(ValueError):
        absorbing.mask_vocab(0)


def test_corrupt_marginal_and_generator_rows():
    K, mask = 5, 5
    x0 = torch.randint(0, K, (64, 200), generator=torch.Generator().manual_seed(0))
    alpha = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    z = absorbing.corrupt(x0, alpha, torch.Generator().manual_seed(1), mask)
    kept = z != mask
    assert torch.equal(z[kept], x0[kept])  # unmasked positions are the clean tokens
    freq = kept.double().mean(1)
    se = (alpha * (1 - alpha) / 200).sqrt()
    assert bool(((freq - alpha).abs() < 4 * se + 1e-12).all())
    # per-row generators: row b depends only on generator b
    gens = lambda: [torch.Generator().manual_seed(100 + b) for b in range(4)]
    z1 = absorbing.corrupt(x0[:4], 0.5, gens(), mask)
    z2 = absorbing.corrupt(x0[:4].flip(0), 0.5, gens()[::-1], mask).flip(0)
    assert torch.equal(z1, z2)
    with pytest.raises(ValueError, match="mask id"):
        absorbing.corrupt(torch.full((1, 3), mask), 0.5, torch.Generator(), mask)


def test_prior_is_all_mask():
    z = absorbing.prior_sample((2, 3), 9)
    assert torch.equal(z, torch.full((2, 3), 9))


def _np_log_softmax(v):
    m = v.max(-1, keepdims=True)
    return v - m - np.log(np.exp(v - m).sum(-1, keepdims=True))


def test_subs_log_probs_matches_numpy():
    g = torch.Generator().manual_seed(3)
    B, L, W, mask = 3, 5, 6, 5
    logits = torch.randn(B, L, W, generator=g, dtype=torch.float64)
    z = torch.randint(0, W, (B, L), generator=g)
    z[0, :2] = mask
    valid = torch.tensor([True, True, False, True, True, False])
    out = absorbing.subs_log_probs(logits, z, mask, valid_vocab=valid).numpy()
    lg, zn = logits.numpy(), z.numpy()
    for b in range(B):
        for l in range(L):
            if zn[b, l] == mask:
                keep = [0, 1, 3, 4]
                ref = np.full(W, -np.inf)
                ref[keep] = _np_log_softmax(lg[b, l, keep])
            else:
                ref = np.full(W, -np.inf)
                ref[zn[b, l]] = 0.0
            np.testing.assert_allclose(out[b, l], ref, rtol=0, atol=1e-12)


def test_nelbo_matches_independent_per_token_formula():
    g = torch.Generator().manual_seed(4)
    B, L, K = 4, 7, 9
    W, mask = absorbing.mask_vocab(K)
    x0 = torch.randint(0, K, (B, L), generator=g)
    t = torch.tensor([0.01, 0.3, 0.7, 0.999], dtype=torch.float64)
    eps = 1e-3
    alpha, alpha_p = 1 - (1 - eps) * t, torch.full_like(t, -(1 - eps))
    z = absorbing.corrupt(x0, alpha, g, mask)
    logits = torch.randn(B, L, W, generator=g, requires_grad=True)
    f = absorbing.mdlm_nelbo(absorbing.subs_log_probs(logits, z, mask), z, x0, alpha, alpha_p, mask)
    assert f.dtype == torch.float32 and f.shape == (B, L)
    lg = logits.detach().double().numpy()
    for b in range(B):
        for l in range(L):
            if int(z[b, l]) == mask:
                lse = np.log(np.exp(lg[b, l, :K]).sum())
                ref = (1.0 / t[b].item()) * (lse - lg[b, l, int(x0[b, l])])  # log-linear: weight = 1/t
            else:
                ref = 0.0
            assert abs(f[b, l].item() - ref) < 1e-4 * max(1.0, abs(ref))
    f.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[(z != mask)].abs().max() == 0  # carry-over: no gradient at unmasked positions
    assert logits.grad[..., mask].abs().max() == 0  # −∞ on the mask logit


def test_nelbo_is_tight_with_exact_posterior_on_a_toy_distribution():
    """E_t E_{z_t}[Σ_l f] with x_θ = p(x_l | visible tokens) equals −log p(x) exactly (eps = 0 schedule)."""
    K, L = 3, 3
    W, mask = absorbing.mask_vocab(K)
    rng = np.random.default_rng(0)
    states = list(itertools.product(range(K), repeat=L))
    p = rng.dirichlet(np.ones(len(states)) * 0.7)
    P = {s: p[i] for i, s in enumerate(states)}

    def conditional(z):  # exact p(x_l | z visible) for every position, brute force over states
        out = np.zeros((L, W))
        cons = [s for s in states if all(z[m] == mask or z[m] == s[m] for m in range(L))]
        tot = sum(P[s] for s in cons)
        for s in cons:
            for l in range(L):
                out[l, s[l]] += P[s] / tot
        return out

    nodes, weights = np.polynomial.legendre.leggauss(8)
    ts, ws = (nodes + 1) / 2, weights / 2  # Gauss–Legendre on [0, 1]; the integrand is a polynomial of degree L-1
    masks = list(itertools.product([False, True], repeat=L))
    entropy_bound = 0.0
    for x in states:
        rows_z, rows_lx, rows_a, rows_w = [], [], [], []
        for t, wt in zip(ts, ws):
            for M in masks:
                z = tuple(mask if M[l] else x[l] for l in range(L))
                prob_M = np.prod([t if M[l] else 1 - t for l in range(L)])
                rows_z.append(z)
                rows_lx.append(np.log(np.maximum(conditional(z), 1e-300)))
                rows_a.append(1 - t)
                rows_w.append(wt * prob_M)
        z = torch.tensor(rows_z)
        lx = absorbing.subs_log_probs(torch.tensor(np.array(rows_lx)), z, mask)
        x0 = torch.tensor([x] * len(rows_z))
        a_prime = torch.full((len(rows_z),), -1.0, dtype=torch.float64)
        f = absorbing.mdlm_nelbo(lx, z, x0, torch.tensor(rows_a), a_prime, mask)
        nelbo = float((f.double().sum(1) * torch.tensor(rows_w)).sum())
        assert nelbo == pytest.approx(-math.log(P[x]), rel=1e-5, abs=1e-5)
        entropy_bound += P[x] * nelbo
    assert entropy_bound == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)


def test_posterior_matches_bayes_rule_from_forward_kernels():
    g = torch.Generator().manual_seed(5)
    K = 4
    W, mask = absorbing.mask_vocab(K)
    B, L = 2, 6
    z = torch.randint(0, W, (B, L), generator=g)
    z[:, :3] = mask
    xprob = torch.softmax(torch.randn(B, L, W, generator=g, dtype=torch.float64), -1)
    a_t, a_s = 0.3, 0.65
    post = absorbing.posterior(z, xprob, a_t, a_s, mask).numpy()
    xp = xprob.numpy()[..., :K]
    xp = xp / xp.sum(-1, keepdims=True)

    def q_from_x(zs, x, a):  # q(z | x) at level a
        return a * (zs == x) + (1 - a) * (zs == mask)

    def q_step(zt, zs, a_ratio):  # q(z_t | z_s): keep w.p. α_t/α_s, mask otherwise (mask absorbing)
        if zs == mask:
            return float(zt == mask)
        return a_ratio * (zt == zs) + (1 - a_ratio) * (zt == mask)

    for b in range(B):
        for l in range(L):
            ref = np.zeros(W)
            for zs in range(W):
                ref[zs] = sum(xp[b, l, x] * q_step(int(z[b, l]), zs, a_t / a_s) * q_from_x(zs, x, a_s)
                              for x in range(K))
            ref /= ref.sum()
            np.testing.assert_allclose(post[b, l], ref, atol=1e-12)
    assert absorbing.posterior(z, xprob, a_t, a_s, mask).dtype == torch.float64
    with pytest.raises(ValueError, match="alpha"):
        absorbing.posterior(z, xprob, 0.7, 0.3, mask)


def test_sample_step_keeps_unmasked_and_reveals_at_the_posterior_rate():
    K = 3
    W, mask = absorbing.mask_vocab(K)
    N, L = 4000, 4
    z = torch.full((N, L), mask)
    z[:, 0] = 1
    logits = torch.tensor([0.0, 1.0, -1.0, 5.0], dtype=torch.float64).expand(N, L, W)
    lx = torch.log_softmax(logits, -1).float()
    zs = absorbing.sample_step(lx, z, 0.2, 0.6, torch.Generator().manual_seed(0), mask)
    assert bool((zs[:, 0] == 1).all())
    rev = zs[:, 1:] != mask
    p_rev = (0.6 - 0.2) / 0.8
    assert abs(rev.double().mean().item() - p_rev) < 4 * math.sqrt(p_rev * (1 - p_rev) / rev.numel())
    x = torch.softmax(logits[0, 0, :K], -1)
    vals = zs[:, 1:][rev]
    for k in range(K):
        f = (vals == k).double().mean().item()
        assert abs(f - x[k].item()) < 4 * math.sqrt(x[k].item() * (1 - x[k].item()) / vals.numel()) + 1e-9
