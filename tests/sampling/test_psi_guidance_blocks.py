"""Ψ-samplers, prompt guidance, block (stride) generation and variable-length output, against references computed
here independently: Bayes' rule over the forward kernels (numpy, float64), the official κ formulas re-derived in
plain Python, exact Markov chains over all states, and Monte Carlo with 4-SE / chi-square checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.sampling import Clamp, PsiSchedule, StepNoise, UniformProcess, sample, sample_blocks, trim_at_eos
from duo_plugin.sampling.schedulers import PsiScheduler, guided_posterior

EPS = 1e-3  # LogLinearSchedule default: α_t = 1 − (1 − 1e-3) t


def alpha(t: float) -> float:
    return 1.0 - (1.0 - EPS) * t


def fwd_matrix(a: float, valid: np.ndarray) -> np.ndarray:
    """q_a(z | x) as a matrix [x, z] over the valid ids."""
    u = valid / valid.sum()
    return a * np.eye(len(valid)) + (1 - a) * u[None, :]


def bayes_posterior(zt: int, x: np.ndarray, a_t: float, a_s: float, valid: np.ndarray) -> np.ndarray:
    """q(z_s | z_t, x) ∝ Σ_x x(x) q_{a_s}(z_s | x) q_{a_t/a_s}(z_t | z_s)."""
    num = np.einsum("x,xs,s->s", x, fwd_matrix(a_s, valid), fwd_matrix(a_t / a_s, valid)[:, zt])
    return num / num.sum()


def exact_psi_law(zt, x, a_t, a_s, kappa, valid):
    post_s = bayes_posterior(zt, x, a_t, a_s, valid)
    post_0 = bayes_posterior(zt, x, a_t, 1.0, valid)  # q(x | z_t, x_θ)
    return kappa * post_s + (1 - kappa) * post_0 @ fwd_matrix(a_s, valid)


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
        e = e * o.sum() / e.sum()
        assert stats.chisquare(o, e).pvalue > 1e-4


MODES = ["pure-posterior", "pure-pc", "constant-0.3", "constant-remdm-0.2", "max-capped-0.3", "max-rescale-0.5"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["dense", "chunked", "mixture"])
def test_psi_one_step_law_matches_exact(mode, impl):
    K, N, steps, i = 5, 20000, 4, 1
    valid_t = torch.tensor([True, True, True, True, False])
    valid = valid_t.double().numpy()
    g = torch.Generator().manual_seed(3)
    x = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, -1)
    proc = UniformProcess(K, valid_t, LogLinearSchedule())
    sch = PsiScheduler(proc, PsiSchedule(high_mode=mode, middle_mode=mode, low_mode=mode, high_frac=0.0,
                                         middle_frac=0.0), posterior_impl=impl)
    grid = sch.timesteps(steps, 1e-5)
    t, s = float(grid[i]), float(grid[i + 1])
    assert (t, s) == pytest.approx((0.75, 0.5), abs=1e-5)
    kappa = ref_kappa(mode, alpha(t), alpha(s))
    assert sch.kappa(i) == pytest.approx(kappa, abs=1e-15)
    if mode not in ("pure-posterior", "pure-pc"):
        assert 0.05 < kappa < 0.95  # a real mixture of the two moves
    xv = x.numpy() * valid / (x.numpy() * valid).sum()
    lx = x.log().float()[None, None].expand(N, 1, K).contiguous()
    for zt in (0, 2):
        exact = exact_psi_law(zt, xv, alpha(t), alpha(s), kappa, valid)
        law = sch.law(torch.full((1, 1), zt), x.log()[None, None], proc.alpha(t), proc.alpha(s), sch.kappa(i))
        np.testing.assert_allclose(law[0, 0].numpy(), exact, rtol=0, atol=1e-12)
        gen = torch.Generator().manual_seed(10 + zt)
        seeds = torch.randint(0, 2**62, (N,), generator=gen)
        out = sch.step(lx, grid[i], grid[i + 1], torch.full((N, 1), zt), StepNoise(gen, seeds, i))
        counts_match(out[:, 0].numpy(), exact)


def test_psi_kappas_phases_and_time_profiles():
    sched = PsiSchedule(high_mode="pure-pc", middle_mode="constant-remdm-0.1", low_mode="max-capped-0.05",
                        high_frac=0.25, middle_frac=0.5)
    proc = UniformProcess(7, schedule=LogLinearSchedule())
    grid = sched.time_grid(7, 1e-5, proc)
    np.testing.assert_allclose(grid.numpy(), np.linspace(1, 1e-5, 8), atol=1e-15)
    kap = sched.kappas(grid, proc.alpha).numpy()
    g = grid.numpy()
    # 8 points: round(0.25·8) = 2 high, round(0.5·8) = 4 middle, 2 low; each phase's last point has κ = 1 in the
    # schedule-dependent modes (the official code's pairwise rule)
    expect = [0.0, 0.0]
    expect += [ref_kappa("constant-remdm-0.1", alpha(g[j]), alpha(g[j + 1])) for j in (2, 3, 4)] + [1.0]
    expect += [ref_kappa("max-capped-0.05", alpha(g[6]), alpha(g[7])), 1.0]
    np.testing.assert_allclose(kap, expect, atol=1e-14)

    lcl = PsiSchedule(high_mode="pure-posterior", middle_mode="constant-remdm-0.05", low_mode="pure-posterior",
                      high_frac=0.45, middle_frac=0.5, time_profile="linear-constant-linear-0.9-inv")
    grid = lcl.time_grid(39, 1e-5, proc).numpy()  # 40 points: 18 high, 20 middle, 2 low
    c = (1 - 0.9) / (1 - EPS)  # the time where α_t = 0.9
    assert len(grid) == 40 and grid[0] == 1.0 and abs(grid[-1] - 1e-5) < 1e-15
    np.testing.assert_allclose(grid[:18], np.linspace(1, c, 18), atol=1e-9)
    np.testing.assert_allclose(grid[18:39], c, atol=1e-9)
    plain = PsiSchedule(high_frac=0.5, middle_frac=0.25, time_profile="linear-constant-linear-0.3").time_grid(
        7, 1e-5, proc).numpy()
    np.testing.assert_allclose(plain, np.r_[np.linspace(1, 0.3, 4), [0.3, 0.3], np.linspace(0.3, 1e-5, 2)])


@pytest.mark.parametrize("bad", [dict(high_mode="max-capped"), dict(low_mode="remdm-0.1"),
                                 dict(high_frac=0.7, middle_frac=0.6), dict(time_profile="cosine")])
def test_psi_schedule_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="Ψ"):
        PsiSchedule(**bad)


class FixedX:
    """x_θ independent of z and σ: the whole chain is then an exact K-state Markov chain per position."""

    def __init__(self, logp: torch.Tensor, L: int):
        self.logp, self.L, self.calls = logp, L, 0

    def __call__(self, z, sigma):
        self.calls += 1
        return self.logp.float()[None, None].expand(z.shape[0], z.shape[1], -1).contiguous()


@pytest.mark.parametrize("impl", ["dense", "chunked", "mixture"])
def test_psi_full_chain_law_and_nfe(impl):
    K, steps, N = 4, 3, 16000
    x = torch.softmax(torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64) * 2, -1)
    den = FixedX(x.log(), 1)
    mode = "max-capped-0.2"
    res = sample(den, None, batch_size=N, seq_len=1, vocab_size=K, steps=steps, seed=1, progress=False,
                 predictor="psi", psi=PsiSchedule(high_mode=mode, middle_mode=mode, low_mode=mode, high_frac=0.0,
                                                  middle_frac=0.0), posterior_impl=impl, return_trajectory=True)
    assert res.nfe == steps + 1 and den.calls == steps + 1
    valid = np.ones(K)
    xv = x.numpy()
    grid = np.linspace(1, 1e-5, steps + 1)
    dist = np.full(K, 1.0 / K)
    for i in range(steps):
        kap = ref_kappa(mode, alpha(grid[i]), alpha(grid[i + 1])) if i < steps else 1.0
        P = np.stack([exact_psi_law(z, xv, alpha(grid[i]), alpha(grid[i + 1]), kap, valid) for z in range(K)])
        dist = dist @ P
    P = np.stack([bayes_posterior(z, xv, alpha(grid[-1]), 1.0, valid) for z in range(K)])
    counts_match(res.tokens[:, 0].numpy(), dist @ P)


@pytest.mark.parametrize("impl", ["dense", "chunked", "mixture", "auto"])
def test_psi_pure_posterior_is_the_ancestral_sampler(impl):
    den = FixedX(torch.log_softmax(torch.randn(6, generator=torch.Generator().manual_seed(0)), -1), 5)
    kw = dict(batch_size=7, seq_len=5, vocab_size=6, steps=5, seed=4, progress=False, posterior_impl=impl,
              prompt=torch.tensor([2]), top_p=0.9)
    a = sample(den, None, **kw)
    b = sample(den, None, predictor="psi", psi=PsiSchedule(), **kw)
    assert torch.equal(a, b)
    c = sample(den, None, predictor="psi", psi=PsiSchedule("pure-pc", "pure-pc", "pure-pc"), **kw)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("impl", ["dense", "chunked", "mixture"])
def test_psi_clamps_prompt_and_infill_and_greedy_tail(impl):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    seen = []

    def den(z, sigma):
        seen.append(z.clone())
        out = torch.zeros(z.shape[0], 4, 6, dtype=torch.float64)
        for l in range(4):
            for m in range(4):
                out[:, l] += A[l, m][z[:, m]]
        return torch.log_softmax(out, -1).float()

    mask = torch.tensor([True, False, True, False])
    vals = torch.tensor([5, 0, 1, 0])
    psi = PsiSchedule(high_mode="pure-pc", middle_mode="constant-0.5", low_mode="max-rescale-0.2")
    res = sample(den, None, batch_size=32, seq_len=4, vocab_size=6, steps=6, seed=0, progress=False,
                 predictor="psi", psi=psi, clamp=Clamp(mask, vals), posterior_impl=impl,
                 noise_removal="greedy", return_trajectory=True, valid_vocab=torch.tensor([True] * 5 + [False]))
    for z in list(res.trajectory) + seen:
        assert bool((z[:, mask] == vals[mask]).all())
    last = seen[-1]
    out = torch.zeros(32, 4, 6, dtype=torch.float64)
    for l in range(4):
        for m in range(4):
            out[:, l] += A[l, m][last[:, m]]
    out[..., 5] = -math.inf
    expect = torch.where(mask, vals, out.argmax(-1))
    assert torch.equal(res.tokens, expect)


# ------------------------------------------------------------------------------------------------------ guidance
class PromptDenoiser:
    """logits[l] = A[l, z_0] + B[l, z_1]: position 1's prediction depends on the prompt at position 0."""

    def __init__(self, K, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(2, K, K, generator=g, dtype=torch.float64) * 2
        self.B = torch.randn(2, K, K, generator=g, dtype=torch.float64) * 0.5
        self.calls = 0

    def probs(self, z0: int, z1: int, pos: int) -> np.ndarray:
        return torch.softmax(torch.log_softmax(self.A[pos, z0] + self.B[pos, z1], -1).float().double(), -1).numpy()

    def __call__(self, z, sigma):
        self.calls += 1
        out = torch.stack([self.A[l][z[:, 0]] + self.B[l][z[:, 1]] for l in range(2)], 1)
        return torch.log_softmax(out, -1).float()


def ref_guided(c: np.ndarray, u: np.ndarray, w: float) -> np.ndarray:
    out = np.zeros_like(c)
    ok = (c > 0) & (u > 0)
    out[ok] = np.exp(w * np.log(c[ok]) + (1 - w) * np.log(u[ok]))
    if out.sum() == 0:
        return c / c.sum()
    return out / out.sum()


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("w", [2.0, 0.5])
def test_guided_one_step_law(impl, w):
    # L = 2, position 0 is the prompt (id 3), one step from t = 1 with no noise removal: z_1 ~ U, the uncond input
    # replaces the prompt by prior noise n ~ U; law of the output = E_{z_1, n}[guided(post_cond, post_uncond(n))].
    K, N, prompt = 4, 16000, 3
    den = PromptDenoiser(K)
    out = sample(den, None, batch_size=N, seq_len=2, vocab_size=K, steps=1, noise_removal="none", seed=2,
                 progress=False, prompt=torch.tensor([prompt]), guidance_weight=w, posterior_impl=impl,
                 return_trajectory=True)
    assert out.nfe == 2 and den.calls == 2
    a_t, a_s = alpha(1.0), alpha(1e-5)
    valid = np.ones(K)
    law = np.zeros(K)
    for z1 in range(K):
        cond = bayes_posterior(z1, den.probs(prompt, z1, 1), a_t, a_s, valid)
        for n in range(K):
            unc = bayes_posterior(z1, den.probs(n, z1, 1), a_t, a_s, valid)
            law += ref_guided(cond, unc, w) / K**2
    counts_match(out.tokens[:, 1].numpy(), law)
    assert bool((out.tokens[:, 0] == prompt).all())


@pytest.mark.parametrize("impl", ["dense", "chunked", "mixture", "auto"])
@pytest.mark.parametrize("predictor", ["ancestral", "psi"])
def test_guidance_weight_one_is_conditional_sampling(impl, predictor):
    den = PromptDenoiser(5, seed=1)
    kw = dict(batch_size=64, seq_len=2, vocab_size=5, steps=4, seed=9, progress=False, prompt=torch.tensor([1]),
              posterior_impl=impl, predictor=predictor, top_p=0.95)
    if predictor == "psi":
        kw["psi"] = PsiSchedule(high_mode="max-capped-0.1", middle_mode="max-capped-0.1", low_mode="max-capped-0.1")
    base = sample(den, None, **kw)
    calls = den.calls
    assert torch.equal(sample(den, None, guidance_weight=1.0, **kw), base)
    assert den.calls == 2 * calls  # w = 1 never calls the unconditional model
    if impl in ("dense", "chunked"):
        assert not torch.equal(sample(den, None, guidance_weight=3.0, **kw), base)


def test_guided_posterior_zero_probability_handling():
    c = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7], [0.2, 0.3, 0.5, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    for w in (0.5, 2.0, -1.0):
        got = guided_posterior(c, u, w).numpy()
        for r in range(3):
            np.testing.assert_allclose(got[r], ref_guided(c[r].numpy(), u[r].numpy(), w), atol=1e-14)
    assert torch.equal(guided_posterior(c, u, 1.0), c)
    np.testing.assert_allclose(guided_posterior(c, u, 2.0)[1].numpy(), [0, 0, 0.3, 0.7])  # disjoint: conditional


def test_guidance_rejects_mixture_impl():
    with pytest.raises(ValueError, match="guidance_weight"):
        sample(PromptDenoiser(3), None, batch_size=2, seq_len=2, vocab_size=3, steps=2, seed=0, progress=False,
               prompt=torch.tensor([1]), guidance_weight=2.0, posterior_impl="mixture")


# ------------------------------------------------------------------------------------------------------ blocks
class SpyTable:
    def __init__(self, K, L, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(L, L, K, K, generator=g, dtype=torch.float64)
        self.inputs = []

    def __call__(self, z, sigma):
        self.inputs.append(z.clone())
        out = torch.zeros(*z.shape, self.A.shape[-1], dtype=torch.float64)
        for l in range(z.shape[1]):
            for m in range(z.shape[1]):
                out[:, l] += self.A[l, m][z[:, m]]
        return torch.log_softmax(out, -1).float()


@pytest.mark.parametrize("predictor", ["ancestral", "psi"])
def test_block_generation_beyond_context_keeps_context_clamped(predictor):
    K, L, n_blocks, block_len, steps = 7, 6, 3, 2, 3
    den = SpyTable(K, L)
    kw = dict(batch_size=4, seq_len=L, vocab_size=K, steps=steps, progress=False, predictor=predictor,
              prompt=torch.tensor([6, 1]))
    res = sample_blocks(den, None, n_blocks=n_blocks, block_len=block_len, seed=5, return_trajectory=True, **kw)
    assert res.tokens.shape == (4, L + n_blocks * block_len)
    assert res.nfe == (n_blocks + 1) * (steps + 1) and len(den.inputs) == res.nfe
    assert torch.equal(res.trajectory[0], sample(den, None, seed=5, **kw))  # window 0 = plain sampling
    assert bool((res.tokens[:, :2] == torch.tensor([6, 1])).all())
    ctx = L - block_len
    calls = steps + 1
    for j in range(1, n_blocks + 1):
        context = res.tokens[:, j * block_len: j * block_len + ctx]
        assert torch.equal(res.trajectory[j][:, :ctx], context)
        for z in den.inputs[j * calls:(j + 1) * calls]:  # every denoiser input of window j holds the context
            assert torch.equal(z[:, :ctx], context)
        assert torch.equal(res.trajectory[j][:, ctx:], res.tokens[:, L + (j - 1) * block_len: L + j * block_len])


def test_variable_length_stops_at_eos():
    K, L, eos = 5, 6, 4

    def den(z, sigma):  # EOS is certain at position 3 and later, free before
        lp = torch.full((*z.shape, K), -30.0)
        lp[:, :3, :] = 0.0
        lp[:, 3:, eos] = 0.0
        return torch.log_softmax(lp, -1)

    res = sample_blocks(den, None, batch_size=3, seq_len=L, vocab_size=K, steps=4, seed=0, progress=False,
                        n_blocks=5, block_len=2, eos_id=eos, noise_removal="greedy", prompt=torch.tensor([1]))
    assert res.tokens.shape == (3, L)  # every row hit EOS in window 0: no further block
    first = [(row[1:] == eos).nonzero()[0].item() + 1 for row in res.tokens]
    assert res.lengths.tolist() == first and max(first) <= 3
    one = sample(den, None, batch_size=3, seq_len=L, vocab_size=K, steps=4, seed=0, progress=False, eos_id=eos,
                 noise_removal="greedy", prompt=torch.tensor([1]))
    assert torch.equal(one.lengths, res.lengths)


def test_trim_at_eos_against_python():
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 4, (50, 9), generator=g)
    start = torch.randint(0, 4, (50,), generator=g)
    rows, lengths = trim_at_eos(toks, 3, start=start)
    for r, n, row, st in zip(rows, lengths.tolist(), toks.tolist(), start.tolist()):
        cut = next((i for i in range(st, 9) if row[i] == 3), 9)
        assert n == cut and r == row[:cut]


def test_guided_psi_law_guides_both_posteriors():
    K = 5
    valid = np.ones(K)
    g = torch.Generator().manual_seed(8)
    lc, lu = (torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64) * 2, -1) for _ in range(2))
    proc = UniformProcess(K, schedule=LogLinearSchedule())
    sch = PsiScheduler(proc, PsiSchedule(), guidance_weight=1.7, posterior_impl="dense")
    a_t, a_s, kap = alpha(0.6), alpha(0.4), 0.35
    for zt in range(K):
        got = sch.law(torch.full((1, 1), zt), lc[None, None], torch.tensor(a_t, dtype=torch.float64),
                      torch.tensor(a_s, dtype=torch.float64), kap, lu[None, None])[0, 0].numpy()
        c, u = lc.exp().numpy(), lu.exp().numpy()
        gs = ref_guided(bayes_posterior(zt, c, a_t, a_s, valid), bayes_posterior(zt, u, a_t, a_s, valid), 1.7)
        g0 = ref_guided(bayes_posterior(zt, c, a_t, 1.0, valid), bayes_posterior(zt, u, a_t, 1.0, valid), 1.7)
        np.testing.assert_allclose(got, kap * gs + (1 - kap) * g0 @ fwd_matrix(a_s, valid), atol=1e-12)


@pytest.mark.parametrize("impl", ["dense", "chunked", "mixture"])
def test_psi_linear_constant_linear_profile_runs_with_t_equal_s_steps(impl):
    den = SpyTable(6, 4, seed=3)
    psi = PsiSchedule(high_mode="pure-posterior", middle_mode="constant-remdm-0.05", low_mode="pure-posterior",
                      high_frac=0.45, middle_frac=0.5, time_profile="linear-constant-linear-0.9-inv")
    res = sample(den, None, batch_size=6, seq_len=4, vocab_size=6, steps=19, seed=0, progress=False,
                 predictor="psi", psi=psi, posterior_impl=impl, prompt=torch.tensor([5]), return_trajectory=True)
    assert res.nfe == 20 and len(den.inputs) == 20
    c = (1 - 0.9) / (1 - EPS)
    assert res.times[9:19].tolist() == pytest.approx([c] * 10)
    assert bool((res.trajectory[:, :, 0] == 5).all())
    # in the constant phase (t = s) the ancestral part stays put: every move there comes from re-noising
    moved = (res.trajectory[10:20] != res.trajectory[9:19]).any()
    assert bool(moved)
