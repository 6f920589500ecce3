"""NELBO perplexity / conditional NELBO against the exact NELBO of a toy model.

Reference: for L = 1 (or a fully-known context), E_t E_{z ~ q_t(.|x)} f(x_θ(z), z, x, α_t) with t ~ U[t_min, 1] is
computed by enumerating z and integrating over t with scipy.quad, using the UDLM form of f written out here from
docs/method.md §1.3 (independent of the f_Duo implementation in duo_plugin.diffusion.losses).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from duo_plugin.eval.likelihood import conditional_nelbo, nelbo_perplexity

T_MIN = 1e-3
EPS = 1e-3  # log-linear schedule


def alpha(t):
    return 1 - (1 - EPS) * t


def udlm_f(xtheta: np.ndarray, i: int, m: int, a: float, a_prime: float) -> float:
    """f = α'/(Kα) [K/x̄_i − K/x̄θ_i − Σ_j (x̄_j/x̄_i) log(x̄θ_i x̄_j / (x̄θ_j x̄_i))]; z_t = i, x = m."""
    K = len(xtheta)
    x = np.zeros(K)
    x[m] = 1
    xb = K * a * x + (1 - a)
    xbt = K * a * xtheta + (1 - a)
    br = K / xb[i] - K / xbt[i] - np.sum((xb / xb[i]) * np.log(xbt[i] * xb / (xbt * xb[i])))
    return a_prime / (K * a) * br


class ToyDenoiser:
    """x_θ(z, σ)[l] = softmax(Σ_m A[l, m, z_m] + c[l] σ); records its inputs."""

    def __init__(self, K, L, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(L, L, K, K, generator=g, dtype=torch.float64)
        self.c = 3 * torch.randn(L, K, generator=g, dtype=torch.float64)
        self.vocab_size = K
        self.inputs = []

    def probs(self, z, sigma):
        out = self.c[None] * sigma.double()[:, None, None]
        out = out.clone()
        for l in range(z.shape[1]):
            for m in range(z.shape[1]):
                out[:, l] += self.A[l, m][z[:, m]]
        return torch.softmax(out, -1)

    def __call__(self, z, sigma, padding_mask=None):
        self.inputs.append((z.clone(), padding_mask))
        return torch.log(self.probs(z, sigma)).float()


def exact_token_nelbo(den, x: list, pos: int, K: int) -> float:
    """E_{t~U[t_min,1]} E_{z_pos ~ q_t(.|x_pos)} f at position pos, other positions clean (as given in x).

    The t-integral uses composite Gauss-Legendre quadrature (geometric panels, dense near t_min); the z expectation
    is an exact sum over the K values of z_pos.
    """
    edges = np.unique(np.concatenate([np.geomspace(T_MIN, 1.0, 40), np.linspace(0.05, 1.0, 40)]))
    nodes, weights = np.polynomial.legendre.leggauss(12)
    ts, ws = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        ts.append((b - a) / 2 * nodes + (a + b) / 2)
        ws.append((b - a) / 2 * weights)
    ts, ws = np.concatenate(ts), np.concatenate(ws)
    alphas = alpha(ts)
    sigma = torch.tensor(-np.log(alphas), dtype=torch.float32)
    total = np.zeros_like(ts)
    for zi in range(K):
        z = torch.tensor([x[:pos] + [zi] + x[pos + 1 :]] * len(ts))
        xt = den.probs(z, sigma.double())[:, pos].float().double().numpy()
        for n, a in enumerate(alphas):
            q = a * (zi == x[pos]) + (1 - a) / K
            total[n] += q * udlm_f(xt[n], zi, x[pos], a, -(1 - EPS))
    return float((total * ws).sum() / (1 - T_MIN))


def test_nelbo_perplexity_matches_exact_single_token():
    K, N = 4, 3000
    den = ToyDenoiser(K, 1, seed=1)
    blocks = (torch.arange(N) % 3).view(N, 1)  # ids 0,1,2 equally often
    exact = np.mean([exact_token_nelbo(den, [v], 0, K) for v in range(3)])
    res = nelbo_perplexity(den, blocks, batch_size=512, seed=0, progress=False)
    assert res["tokens"] == N and res["passes"] == 1 and res["stderr_method"] == "per-sequence"
    assert abs(res["nll_per_token"] - exact) < 4 * res["stderr"], (res, exact)
    assert res["stderr"] < 0.05 * exact  # the check is not vacuous
    assert math.isclose(res["ppl"], math.exp(res["nll_per_token"]))
    lo, hi = res["ppl_ci"]
    assert lo < res["ppl"] < hi

    res8 = nelbo_perplexity(den, blocks, batch_size=1000, mc_passes=6, seed=3, progress=False)
    assert res8["stderr_method"] == "between-pass" and len(res8["per_pass_nll"]) == 6
    assert abs(res8["nll_per_token"] - exact) < 5 * res8["stderr"], (res8, exact)


def test_nelbo_perplexity_is_batch_size_independent_and_masks_padding():
    K, L, N = 5, 3, 20
    den = ToyDenoiser(K, L, seed=2)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, K, (N, L), generator=g)
    am = torch.ones(N, L, dtype=torch.bool)
    am[-1, 2] = False  # a remainder block
    a = nelbo_perplexity(den, blocks, am, batch_size=3, mc_passes=2, seed=5, progress=False)
    b = nelbo_perplexity(den, blocks, am, batch_size=20, mc_passes=2, seed=5, progress=False)
    assert a["tokens"] == N * L - 1
    assert math.isclose(a["nll_per_token"], b["nll_per_token"], rel_tol=1e-6)
    # the padded position was passed through unchanged with a padding mask
    pads = [(z, pm) for z, pm in den.inputs if pm is not None]
    assert pads and all(int(z[pm.logical_not()].ne(blocks[-1, 2]).sum()) == 0 for z, pm in pads)
    c = nelbo_perplexity(den, blocks, am, batch_size=20, mc_passes=2, seed=6, progress=False)
    assert c["nll_per_token"] != a["nll_per_token"]
    with pytest.raises(ValueError, match="empty"):
        nelbo_perplexity(den, blocks[:0], batch_size=2)


def test_conditional_nelbo_matches_exact_and_never_corrupts_context():
    K, L, M = 3, 2, 600
    den = ToyDenoiser(K, L, seed=4)
    x0 = torch.tensor([[0, 2], [1, 1], [2, 0]])
    keep = torch.tensor([True, False])
    res = conditional_nelbo(den, x0, keep, mc_samples=M, batch_size=256, seed=1)
    assert res.num_tokens.tolist() == [1, 1, 1]
    for b in range(3):
        exact = exact_token_nelbo(den, x0[b].tolist(), 1, K)
        assert abs(float(res.nelbo[b]) - exact) < 4 * float(res.stderr[b]), (b, res, exact)
        assert float(res.stderr[b]) < 0.2 * exact
    for z, _ in den.inputs:
        assert bool((z[:, 0].view(-1, 1) == x0[:, 0].view(1, -1)).any(1).all())  # kept column is a clean context
    # per-sequence reproducibility: the same sequence alone (same global index) gives the same value
    one = conditional_nelbo(den, x0[1:2], keep, mc_samples=M, batch_size=37, seed=1, indices=torch.tensor([1]))
    assert math.isclose(float(one.nelbo[0]), float(res.nelbo[1]), rel_tol=1e-9)


def test_conditional_nelbo_scores_only_unkept_real_tokens():
    K, L = 4, 4
    den = ToyDenoiser(K, L, seed=8)
    x0 = torch.tensor([[1, 2, 3, 0]])
    keep = torch.tensor([[True, True, False, False]])
    am = torch.tensor([[True, True, True, False]])
    res = conditional_nelbo(den, x0, keep, attention_mask=am, mc_samples=4, seed=0)
    assert res.num_tokens.tolist() == [1]
    # changing x_θ at unscored positions (0, 1, 3) must not change the value
    class Perturbed(ToyDenoiser):
        def __call__(self, z, sigma, padding_mask=None):
            out = super().__call__(z, sigma, padding_mask)
            out[:, [0, 1, 3]] = torch.log_softmax(torch.randn(out[:, [0, 1, 3]].shape), -1)
            return out
    pert = Perturbed(K, L, seed=8)
    res2 = conditional_nelbo(pert, x0, keep, attention_mask=am, mc_samples=4, seed=0)
    assert torch.allclose(res.nelbo, res2.nelbo)
    for z, pm in pert.inputs:
        assert z[0, :2].tolist() == [1, 2] and z[0, 3] == 0 and pm is not None
    single = conditional_nelbo(den, x0, keep, mc_samples=1)
    assert torch.isnan(single.stderr).all()
