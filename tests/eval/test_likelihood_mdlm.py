"""NELBO perplexity through eval.likelihood with the absorbing (MDLM) process: with x_θ = the exact conditional of a
toy distribution the NELBO is tight, so the per-token NLL must match −log p(x) / L (brute force) within MC error."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from duo_plugin.diffusion.absorbing import AbsorbingProcess, mask_vocab
from duo_plugin.eval.likelihood import nelbo_perplexity

K, L = 3, 3
W, MASK = mask_vocab(K)


def toy():
    rng = np.random.default_rng(1)
    states = list(itertools.product(range(K), repeat=L))
    p = rng.dirichlet(np.ones(len(states)))
    return states, p


class Linear:
    """α_t = 1 − t (ε = 0: at t = 1 everything is masked, so no prior term is missing)."""

    def alpha(self, t):
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def alpha_prime(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), -1.0)


class ExactDenoiser:
    """log p(x_l | visible tokens of z) by enumeration; the mask column gets a large (ignored by SUBS) logit."""

    def __init__(self, states, p):
        self.table = {}
        for z in itertools.product(range(W), repeat=L):
            out = np.full((L, W), 1e-300)
            cons = [(s, q) for s, q in zip(states, p) if all(z[m] == MASK or z[m] == s[m] for m in range(L))]
            tot = sum(q for _, q in cons)
            for s, q in cons:
                for l in range(L):
                    out[l, s[l]] += q / tot
            out[:, MASK] = 5.0  # garbage mass on [MASK]: SUBS must remove it
            self.table[z] = torch.tensor(np.log(out / out.sum(-1, keepdims=True)))

    def __call__(self, z, sigma):
        return torch.stack([self.table[tuple(r)] for r in z.tolist()]).float()


def test_mdlm_nelbo_perplexity_is_tight_with_exact_conditionals():
    states, p = toy()
    den = ExactDenoiser(states, p)
    proc = AbsorbingProcess(W, schedule=Linear())
    for i in (0, 13):
        x = torch.tensor([states[i]] * 32)
        res = nelbo_perplexity(den, x, batch_size=32, mc_passes=96, seed=i, t_min=1e-6, process=proc, progress=False)
        expected = -math.log(p[i]) / L
        assert abs(res["nll_per_token"] - expected) < 4 * res["stderr"] + 2e-3, (res, expected)


def test_mdlm_nelbo_perplexity_of_a_uniform_model_is_log_k():
    states, p = toy()
    proc = AbsorbingProcess(W, schedule=Linear())

    def uniform_model(z, sigma):
        return torch.full((z.shape[0], L, W), -math.log(W))

    x = torch.tensor([states[5]] * 16)
    res = nelbo_perplexity(uniform_model, x, batch_size=16, mc_passes=4, t_min=1e-6, process=proc, progress=False)
    # x_θ uniform over the K data ids (SUBS drops the mask): each masked token costs log K / t and E[#masked] = L t,
    # so E[NELBO] = L log K > −log p(x) on average over p (here checked for one x with −log p(x) < L log K)
    assert abs(res["nll_per_token"] - math.log(K)) < 4 * res["stderr"] + 1e-9
    assert -math.log(p[5]) / L < math.log(K)
