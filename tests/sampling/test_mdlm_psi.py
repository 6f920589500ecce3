"""Ψ-samplers for the absorbing (MDLM) process (ReMDM-style remasking), against references computed here
independently: Bayes' rule over the absorbing forward kernels (numpy, float64, the joint of x ~ x_θ, z_s, z_t), the
official κ formulas written out in plain Python, an exact Markov chain over all states, and Monte Carlo with 4.5-SE /
chi-square checks (as the uniform-state Ψ tests in test_psi_guidance_blocks.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from duo_plugin.diffusion.absorbing import AbsorbingProcess
from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.sampling import (
    AbsorbingPsiScheduler,
    AbsorbingScheduler,
    PsiSchedule,
    SamplerOptions,
    StepNoise,
    sample,
    scheduler_for_process,
)

EPS = 1e-3
W = 6  # data ids 0..4 (id 4 invalid), [MASK] = 5
MASK = W - 1
VALID = torch.tensor([True, True, True, True, False, False])


def alpha(t: float) -> float:
    return 1.0 - (1.0 - EPS) * t


def fwd(a: float) -> np.ndarray:
    """q_a(z | x) as a matrix [x, z] over all W ids: a data id stays w.p. a, else becomes [MASK]; [MASK] stays."""
    m = a * np.eye(W)
    m[:, MASK] += 1 - a
    m[MASK] = 0.0
    m[MASK, MASK] = 1.0
    return m


def bayes_posterior(zt: int, x: np.ndarray, a_t: float, a_s: float) -> np.ndarray:
    """q(z_s | z_t) under the joint x ~ x, z_s ~ q_{a_s}(· | x), z_t ~ q_{a_t / a_s}(· | z_s), by Bayes' rule."""
    joint = np.einsum("x,xs,s->s", x, fwd(a_s), fwd(a_t / a_s)[:, zt])
    return joint / joint.sum() if joint.sum() > 0 else joint  # z_t unreachable (an invalid id): a zero row


def exact_psi_law(zt, x, a_t, a_s, kappa):
    post_s = bayes_posterior(zt, x, a_t, a_s)
    post_0 = bayes_posterior(zt, x, a_t, 1.0)  # q(x | z_t, x_θ)
    return kappa * post_s + (1 - kappa) * post_0 @ fwd(a_s)


def ref_kappa(mode: str, a_t: float, a_s: float) -> float:
    """The official κ rules, written out for one (α_t, α_s) pair."""
    if mode == "pure-posterior":
        return 1.0
    if mode == "pure-pc":
        return 0.0
    eta = float(mode.rsplit("-", 1)[1])
    if mode.startswith("constant-remdm-"):
        sigma = eta
    elif mode.startswith("max-capped-"):
        sigma = min(eta, (1 - a_s) / a_t)
    elif mode.startswith("max-rescale-"):
        sigma = eta * min(eta, (1 - a_s) / a_t)
    else:  # constant-η
        return eta
    return min(1.0, max(0.0, 1 - sigma / (1 - a_s)))


def counts_match(samples: np.ndarray, probs: np.ndarray, n_se: float = 4.5):
    n = len(samples)
    obs = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    assert obs[probs == 0].sum() == 0, "an id of probability 0 was drawn"
    for o, p in zip(obs, probs):
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(o / n - p) <= n_se * se + 1e-12, (o / n, p)
    big = probs * n >= 5
    if big.sum() > 1:
        e = probs[big] * n
        o = obs[big]
        assert stats.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-4


def x_theta(seed: int = 3) -> torch.Tensor:
    """A fixed x_θ over the W ids with mass on the invalid id and on [MASK] (both must be dropped)."""
    return torch.softmax(torch.randn(W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5, -1)


def data_law(x: torch.Tensor) -> np.ndarray:
    xv = x.numpy() * VALID.double().numpy()
    return xv / xv.sum()


MODES = ["pure-posterior", "pure-pc", "constant-0.3", "constant-remdm-0.2", "max-capped-0.3", "max-rescale-0.5"]


@pytest.mark.parametrize("mode", MODES)
def test_absorbing_psi_one_step_law_matches_bayes(mode):
    N, steps, i = 20000, 4, 1
    x = x_theta()
    proc = AbsorbingProcess(W, MASK, VALID, LogLinearSchedule())
    sch = AbsorbingPsiScheduler(proc, PsiSchedule(mode, mode, mode, 0.0, 0.0))
    grid = sch.timesteps(steps, 1e-5)
    t, s = float(grid[i]), float(grid[i + 1])
    assert (t, s) == pytest.approx((0.75, 0.5), abs=1e-5)
    kappa = ref_kappa(mode, alpha(t), alpha(s))
    assert sch.kappa(i) == pytest.approx(kappa, abs=1e-15)
    if mode not in ("pure-posterior", "pure-pc"):
        assert 0.05 < kappa < 0.95  # a real mixture of the two moves
    lx = x.log().float()[None, None].expand(N, 1, W).contiguous()
    for zt in (MASK, 0, 2):
        exact = exact_psi_law(zt, data_law(x), alpha(t), alpha(s), kappa)
        law = sch.law(torch.full((1, 1), zt), x.log()[None, None], proc.alpha(grid[i]), proc.alpha(grid[i + 1]),
                      sch.kappa(i))
        np.testing.assert_allclose(law[0, 0].numpy(), exact, rtol=0, atol=1e-12)
        if zt != MASK:  # ReMDM remasking: a decoded token is re-masked w.p. (1 − κ)(1 − α_s)
            assert exact[MASK] == pytest.approx((1 - kappa) * (1 - alpha(s)), abs=1e-12)
        gen = [torch.Generator().manual_seed(10 * zt + r) for r in range(1)]
        out = sch.step(lx, grid[i], grid[i + 1], torch.full((N, 1), zt), StepNoise(gen[0], None, i))
        counts_match(out[:, 0].numpy(), exact)


def test_guided_absorbing_psi_law_is_the_geometric_mix_of_bayes_posteriors():
    """With prompt guidance both posteriors (time s and time 0) are guided before the Ψ mixture."""
    w, mode = 2.0, "constant-0.4"
    xc, xu = data_law(x_theta(3)), data_law(x_theta(4))
    proc = AbsorbingProcess(W, MASK, VALID, LogLinearSchedule())
    sch = AbsorbingPsiScheduler(proc, PsiSchedule(mode, mode, mode, 0.0, 0.0), guidance_weight=w)
    grid = sch.timesteps(4, 1e-5)
    a_t, a_s = alpha(float(grid[1])), alpha(float(grid[2]))

    def guided(p, q):
        both = (p > 0) & (q > 0)
        g = np.zeros_like(p)
        g[both] = p[both] ** w * q[both] ** (1 - w)
        return g / g.sum()

    for zt in (MASK, 1):
        post_s = guided(bayes_posterior(zt, xc, a_t, a_s), bayes_posterior(zt, xu, a_t, a_s))
        post_0 = guided(bayes_posterior(zt, xc, a_t, 1.0), bayes_posterior(zt, xu, a_t, 1.0))
        exact = 0.4 * post_s + 0.6 * post_0 @ fwd(a_s)
        law = sch.law(torch.full((1, 1), zt), x_theta(3).log()[None, None], proc.alpha(grid[1]),
                      proc.alpha(grid[2]), sch.kappa(1), x_theta(4).log()[None, None])
        np.testing.assert_allclose(law[0, 0].numpy(), exact, rtol=0, atol=1e-12)


class FixedX:
    """x_θ independent of z and σ: the whole chain is then an exact W-state Markov chain per position."""

    def __init__(self, logp: torch.Tensor):
        self.logp, self.calls = logp, 0

    def __call__(self, z, sigma):
        self.calls += 1
        return self.logp.float()[None, None].expand(z.shape[0], z.shape[1], -1).contiguous()


@pytest.mark.parametrize("reuse", [False, True])
def test_absorbing_psi_full_chain_law(reuse):
    """A 3-step max-capped chain from all-[MASK] plus the ancestral noise removal, through sample(): the final law
    equals the exact Markov chain; reusing x_θ (a σ-independent denoiser) changes the NFE, never the law."""
    steps, N, mode = 3, 16000, "max-capped-0.3"
    x = x_theta(5)
    den = FixedX(x.log())
    sch = scheduler_for_process(AbsorbingProcess(W, MASK, VALID, LogLinearSchedule()), reuse_x_theta=reuse,
                                predictor="psi", psi=PsiSchedule(mode, mode, mode, 0.0, 0.0))
    res = sample(den, sch, batch_size=N, seq_len=1, seed=1, options=sch.options.replace(steps=steps, progress=False),
                 return_trajectory=True)
    assert res.nfe == den.calls and (res.nfe == steps + 1 if not reuse else 1 <= res.nfe <= steps + 1)
    grid = np.linspace(1, 1e-5, steps + 1)
    dist = np.zeros(W)
    dist[MASK] = 1.0
    xv = data_law(x)
    for i in range(steps):
        kap = ref_kappa(mode, alpha(grid[i]), alpha(grid[i + 1]))
        dist = dist @ np.stack([exact_psi_law(z, xv, alpha(grid[i]), alpha(grid[i + 1]), kap) for z in range(W)])
    final = dist @ np.stack([bayes_posterior(z, xv, alpha(grid[-1]), 1.0) for z in range(W)])
    assert final[MASK] == 0.0 and final[4] == 0.0
    counts_match(res.tokens[:, 0].numpy(), final)


def test_pure_posterior_psi_is_the_ancestral_sampler_and_remasking_changes_samples():
    den = FixedX(x_theta(6).log())
    proc = AbsorbingProcess(W, MASK, VALID, LogLinearSchedule())
    kw = dict(batch_size=7, seq_len=5, seed=4, options=SamplerOptions(steps=6, progress=False),
              prompt=torch.tensor([4, 1]))  # id 4 is no data id: a clamp value such as BOS
    a = sample(den, AbsorbingScheduler(proc), **kw)
    b = sample(den, AbsorbingPsiScheduler(proc, PsiSchedule()), **kw)
    assert torch.equal(a, b)
    c = sample(den, AbsorbingPsiScheduler(proc, PsiSchedule("pure-pc", "pure-pc", "pure-pc")), **kw)
    assert not torch.equal(a, c)
    for out in (a, c):
        assert (out[:, :2] == torch.tensor([4, 1])).all() and not (out == MASK).any()


def test_absorbing_scheduler_refuses_uniform_draw_paths_and_mask_clamps():
    proc = AbsorbingProcess(W, MASK, VALID)
    with pytest.raises(ValueError, match="posterior_impl=auto"):
        AbsorbingScheduler(proc, posterior_impl="mixture")
    with pytest.raises(ValueError, match="other than the \\[MASK\\] id"):
        sample(FixedX(x_theta().log()), AbsorbingScheduler(proc), batch_size=1, seq_len=3, seed=0,
               options=SamplerOptions(steps=2, progress=False), prompt=torch.tensor([MASK]))
