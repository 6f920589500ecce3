"""MDLM ancestral sampler against an exact chain: all (K+1)^L states propagated in float64 with a posterior built
by Bayes' rule from the forward kernels (not the closed form), compared with many samples (chi-square, 4 SE)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from duo_plugin.diffusion import absorbing
from duo_plugin.diffusion.absorbing import AbsorbingProcess
from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.sampling import Clamp
from duo_plugin.sampling.mdlm import sample_mdlm
from duo_plugin.sampling.samplers import time_grid


class TableDenoiser:
    """logits[l, k] = Σ_m A[l, m, z_m, k] + c[l, k] σ over width W = K + 1 (inputs may be [MASK])."""

    def __init__(self, W, L, seed=0, time_coef=1.0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(L, L, W, W, generator=g, dtype=torch.float64) * 1.5
        self.c = torch.randn(L, W, generator=g, dtype=torch.float64) * time_coef
        self.L, self.calls = L, 0

    def __call__(self, z, sigma):
        self.calls += 1
        out = self.c[None] * sigma.double()[:, None, None]
        for l in range(self.L):
            for m in range(self.L):
                out[:, l] = out[:, l] + self.A[l, m][z[:, m]]
        return torch.log_softmax(out, -1).float()


def ref_filter(x, temperature, top_p):
    """Independent temperature + nucleus over the data ids: x^(1/T) renormalised, keep the greedy prefix of mass p."""
    q = x ** (1.0 / temperature)
    q = q / q.sum()
    if top_p >= 1.0:
        return q
    keep, mass = np.zeros_like(q, dtype=bool), 0.0
    for j in np.argsort(-q, kind="stable"):
        keep[j] = True
        mass += q[j]
        if mass >= top_p:
            break
    q = np.where(keep, q, 0.0)
    return q / q.sum()


def exact_final_distribution(den, K, L, steps, noise_removal, t_eps=1e-5, temperature=1.0, top_p=1.0, init=None):
    W, mask = K + 1, K
    alphas = LogLinearSchedule().alpha(time_grid(steps, t_eps)).numpy()
    states = list(itertools.product(range(W), repeat=L))
    index = {s: i for i, s in enumerate(states)}

    def xtheta(s, alpha):  # float64 x_θ over data ids (mask dropped), [L, K]
        lp = den(torch.tensor([s]), torch.tensor([-np.log(alpha)], dtype=torch.float32))[0].double().exp().numpy()
        x = lp[:, :K]
        return np.stack([ref_filter(r / r.sum(), temperature, top_p) for r in x])

    def pos_post(zt, x, a_t, a_s):  # Bayes: q(z_s | z_t, x) ∝ Σ_x x(x) q(z_t|z_s) q(z_s|x)
        out = np.zeros(W)
        if zt != mask:  # an unmasked token is the data token (x_θ's carry-over): it stays
            out[zt] = 1.0
            return out
        for zs in range(W):
            if zs == mask:
                lik = float(zt == mask)
                prior = sum(x[v] * (1 - a_s) for v in range(K))
            else:
                lik = (a_t / a_s) * (zt == zs) + (1 - a_t / a_s) * (zt == mask)
                prior = x[zs] * a_s
            out[zs] = lik * prior
        return out / out.sum()

    dist = np.zeros(len(states))
    dist[index[tuple(init) if init is not None else (mask,) * L]] = 1.0
    grid = list(alphas) + ([1.0] if noise_removal == "ancestral" else [])
    for i in range(len(grid) - 1):
        new = np.zeros_like(dist)
        for s, ps in zip(states, dist):
            if ps == 0:
                continue
            x = xtheta(s, grid[i])
            per = [pos_post(s[l], x[l], grid[i], grid[i + 1]) for l in range(L)]
            for s2 in states:
                new[index[s2]] += ps * np.prod([per[l][s2[l]] for l in range(L)])
        dist = new
    if noise_removal == "greedy":
        new = np.zeros_like(dist)
        for s, ps in zip(states, dist):
            if ps == 0:
                continue
            x = xtheta(s, alphas[-1])
            s2 = tuple(int(np.argmax(x[l])) if s[l] == mask else s[l] for l in range(L))
            new[index[s2]] += ps
        dist = new
    return states, dist


@pytest.mark.parametrize("noise_removal,time_conditioned,K,temperature,top_p", [
    ("ancestral", True, 2, 1.0, 1.0), ("greedy", True, 2, 1.0, 1.0), ("none", True, 2, 1.0, 1.0),
    ("ancestral", False, 2, 1.0, 1.0), ("greedy", False, 2, 1.0, 1.0), ("none", False, 2, 1.0, 1.0),
    ("ancestral", True, 3, 0.7, 0.8),
])
def test_sampler_matches_exact_chain(noise_removal, time_conditioned, K, temperature, top_p):
    L, steps, N = 3, 4, 6000
    den = TableDenoiser(K + 1, L, seed=1, time_coef=1.0 if time_conditioned else 0.0)
    states, dist = exact_final_distribution(den, K, L, steps, noise_removal, temperature=temperature, top_p=top_p)
    z = sample_mdlm(den, AbsorbingProcess(K + 1, K), batch_size=N, seq_len=L, steps=steps,
                    noise_removal=noise_removal, time_conditioned=time_conditioned, temperature=temperature,
                    top_p=top_p, generator=torch.Generator().manual_seed(7))
    if noise_removal != "none":
        assert int((z == K).sum()) == 0
    index = {s: i for i, s in enumerate(states)}
    counts = np.zeros(len(states))
    for row in z.tolist():
        counts[index[tuple(row)]] += 1
    support = dist > 0
    assert counts[~support].sum() == 0
    big = dist * N >= 5  # 4-SE per state where the normal approximation holds; rare states are lumped
    freq = np.append(counts[big], counts[~big].sum()) / N
    ref = np.append(dist[big], dist[~big].sum())
    se = np.sqrt(ref * (1 - ref) / N)
    assert np.all(np.abs(freq - ref) <= 4 * se + 1e-12)
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(dist[big] * N, dist[~big].sum() * N)
    keep = exp > 0
    assert stats.chisquare(obs[keep], exp[keep]).pvalue > 1e-3


@pytest.mark.parametrize("noise_removal", ["ancestral", "greedy"])
def test_clamped_start_matches_exact_chain_from_that_state(noise_removal):
    """Prompt / infill conditioning: positions clamped to data ids never change, and the draws follow the exact
    chain started from the partially masked state (middle position clamped to id 1)."""
    K, L, steps, N = 2, 3, 4, 6000
    den = TableDenoiser(K + 1, L, seed=3)
    init = (K, 1, K)
    states, dist = exact_final_distribution(den, K, L, steps, noise_removal, init=init)
    cm = torch.tensor([False, True, False])
    cv = torch.tensor([0, 1, 0])
    z = sample_mdlm(den, AbsorbingProcess(K + 1, K), batch_size=N, seq_len=L, steps=steps,
                    noise_removal=noise_removal, generator=torch.Generator().manual_seed(11), clamp=Clamp(cm, cv))
    assert bool((z[:, 1] == 1).all()) and int((z == K).sum()) == 0
    index = {s: i for i, s in enumerate(states)}
    counts = np.zeros(len(states))
    for row in z.tolist():
        counts[index[tuple(row)]] += 1
    assert counts[dist == 0].sum() == 0
    big = dist * N >= 5
    freq, ref = counts[big] / N, dist[big]
    assert np.all(np.abs(freq - ref) <= 4 * np.sqrt(ref * (1 - ref) / N) + 1e-12)
    with pytest.raises(ValueError, match="MASK"):
        sample_mdlm(den, AbsorbingProcess(K + 1, K), batch_size=1, seq_len=L, steps=2, seed=0, clamp=Clamp(cm, torch.tensor([0, K, 0])))


def test_cache_skips_calls_without_changing_draws():
    K, L, steps = 3, 4, 64
    den_a = TableDenoiser(K + 1, L, seed=2, time_coef=0.0)
    den_b = TableDenoiser(K + 1, L, seed=2, time_coef=0.0)
    za, nfe_a = sample_mdlm(den_a, AbsorbingProcess(K + 1, K), batch_size=1, seq_len=L, steps=steps,
                            time_conditioned=True, seed=3, return_nfe=True)
    zb, nfe_b = sample_mdlm(den_b, AbsorbingProcess(K + 1, K), batch_size=1, seq_len=L, steps=steps,
                            time_conditioned=False, seed=3, return_nfe=True)
    assert torch.equal(za, zb)
    assert nfe_a == steps + 1 == den_a.calls
    # with 4 positions at most 4 steps change z, so at most 5 distinct inputs (+1 for the first call)
    assert nfe_b == den_b.calls <= L + 1 < nfe_a


def test_sampler_rejects_bad_arguments():
    den = TableDenoiser(3, 2)
    with pytest.raises(ValueError, match="noise_removal"):
        sample_mdlm(den, AbsorbingProcess(3, 2), batch_size=1, seq_len=2, steps=2, noise_removal="x", seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        sample_mdlm(den, AbsorbingProcess(3, 2), batch_size=1, seq_len=2, steps=2)
    with pytest.raises(ValueError, match="shape"):
        sample_mdlm(den, AbsorbingProcess(4, 2), batch_size=1, seq_len=2, steps=2, seed=0)
