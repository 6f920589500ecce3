"""Sampler tests against an exact, independently computed reference.

The reference propagates the sampler's Markov chain over *all* K^L states in float64 (numpy): the posterior is
built by Bayes' rule from the forward kernels, q(z_s | z_t, x_θ) ∝ Σ_x x_θ(x) q(z_t | z_s) q(z_s | x) (not from
the closed form Eq. 4 used by the implementation), nucleus / temperature are re-implemented here, and the final
distribution is compared with the empirical frequencies of many batched samples (chi-square and 4-SE checks).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

import duo_plugin.sampling.schedulers as samplers_mod
from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.sampling import Clamp, DenoiserFn, SampleResult, nucleus_filter, sample


# ------------------------------------------------------------------------------------------------------------------
# A tiny denoiser with a known x_θ(z, σ): logits[l, k] = Σ_m A[l, m, z_m, k] + c[l, k] σ
# ------------------------------------------------------------------------------------------------------------------
class TableDenoiser:
    def __init__(self, K: int, L: int, seed: int = 0, scale: float = 1.5):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(L, L, K, K, generator=g, dtype=torch.float64) * scale
        self.c = torch.randn(L, K, generator=g, dtype=torch.float64)
        self.K, self.L = K, L
        self.calls = 0
        self.inputs = []

    def logits(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        B, L = z.shape
        out = self.c[None] * sigma.double()[:, None, None]
        for l in range(L):
            for m in range(L):
                out[:, l] = out[:, l] + self.A[l, m][z[:, m]]
        return out

    def __call__(self, z, sigma):
        self.calls += 1
        self.inputs.append((z.clone(), sigma.clone()))
        return torch.log_softmax(self.logits(z, sigma), -1).float()


def ref_filter(p: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Independent temperature + nucleus: p^(1/T) renormalised; keep the greedy prefix reaching mass top_p."""
    q = p ** (1.0 / temperature)
    q = q / q.sum()
    if top_p >= 1.0:
        return q
    order = np.argsort(-q, kind="stable")
    keep = np.zeros_like(q, dtype=bool)
    mass = 0.0
    for j in order:
        keep[j] = True
        mass += q[j]
        if mass >= top_p:
            break
    q = np.where(keep, q, 0.0)
    return q / q.sum()


def ref_posterior(zt: int, xprob: np.ndarray, a_t: float, a_s: float, valid: np.ndarray) -> np.ndarray:
    """q(z_s | z_t, x_θ) by Bayes over x with the forward kernels restricted to the valid ids."""
    K = len(xprob)
    Ke = valid.sum()
    u = valid / Ke
    a_ts = a_t / a_s
    q_s_given_x = a_s * np.eye(K) + (1 - a_s) * u[None, :]  # [x, z_s]
    q_t_given_s = a_ts * np.eye(K) + (1 - a_ts) * u[None, :]  # [z_s, z_t]
    num = np.einsum("x,xs,s->s", xprob, q_s_given_x, q_t_given_s[:, zt])
    return num / num.sum()


def exact_final_distribution(den, K, L, steps, t_eps, mode, valid, temperature=1.0, top_p=1.0, clamp=None):
    """Exact law of the sampler's output over all K^L states (dict state -> prob), in float64."""
    sched = LogLinearSchedule()
    grid = np.linspace(1.0, t_eps, steps + 1)
    alphas = sched.alpha(torch.tensor(grid, dtype=torch.float64)).numpy()
    valid = np.asarray(valid, dtype=np.float64)
    clamp = clamp or {}
    free_vals = [list(np.nonzero(valid)[0]) for _ in range(L)]
    for pos, val in clamp.items():
        free_vals[pos] = [val]
    states = list(itertools.product(*free_vals))
    dist = {s: 1.0 / len(states) for s in states}

    def xprobs(state, a):
        z = torch.tensor([state])
        sigma = torch.tensor([-math.log(a)], dtype=torch.float32)
        p = torch.softmax(torch.log_softmax(den.logits(z, sigma.double()), -1).float().double(), -1)[0].numpy()
        out = []
        for l in range(L):
            pl = p[l] * valid
            out.append(ref_filter(pl / pl.sum(), temperature, top_p))
        return out

    def step(dist, a_t, a_s):
        new = {}
        for s, w in dist.items():
            xp = xprobs(s, a_t)
            per_pos = []
            for l in range(L):
                if l in clamp:
                    per_pos.append({clamp[l]: 1.0})
                else:
                    pp = ref_posterior(s[l], xp[l], a_t, a_s, valid)
                    per_pos.append({v: pp[v] for v in range(K) if pp[v] > 0})
            for combo in itertools.product(*[list(d.items()) for d in per_pos]):
                ns = tuple(v for v, _ in combo)
                new[ns] = new.get(ns, 0.0) + w * float(np.prod([pr for _, pr in combo]))
        return new

    for i in range(steps):
        dist = step(dist, alphas[i], alphas[i + 1])
    if mode == "ancestral":
        dist = step(dist, alphas[-1], 1.0)
    elif mode == "greedy":
        new = {}
        for s, w in dist.items():
            xp = xprobs(s, alphas[-1])
            ns = tuple(clamp[l] if l in clamp else int(np.argmax(xp[l])) for l in range(L))
            new[ns] = new.get(ns, 0.0) + w
        dist = new
    return dist


def compare(samples: torch.Tensor, dist: dict, n_se: float = 4.0):
    n = samples.shape[0]
    counts = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= {s for s, p in dist.items() if p > 0}, "sampler produced a state of probability 0"
    assert abs(sum(dist.values()) - 1) < 1e-10
    states = sorted(dist)
    obs = np.array([counts.get(s, 0) for s in states], dtype=np.float64)
    exp = np.array([dist[s] * n for s in states])
    for o, e, s in zip(obs, exp, states):
        p = e / n
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(o / n - p) <= n_se * se + 1e-12, (s, o / n, p)
    big = exp >= 5
    o2 = np.append(obs[big], obs[~big].sum())
    e2 = np.append(exp[big], exp[~big].sum())
    if e2[-1] == 0:
        o2, e2 = o2[:-1], e2[:-1]
    if len(o2) > 1:
        assert stats.chisquare(o2, e2).pvalue > 1e-4


N = 12000
IMPLS = ("dense", "chunked", "mixture", "auto")


@pytest.mark.parametrize("impl", IMPLS[:3])
@pytest.mark.parametrize(
    "K,L,steps,mode,temperature,top_p",
    [
        (3, 2, 3, "ancestral", 1.0, 1.0),
        (3, 2, 2, "greedy", 1.0, 1.0),
        (3, 1, 4, "none", 1.0, 1.0),
        (3, 2, 2, "ancestral", 0.7, 0.8),
    ],
)
def test_marginals_match_exact_chain(K, L, steps, mode, temperature, top_p, impl):
    den = TableDenoiser(K, L, seed=K + L + steps)
    out = sample(den, LogLinearSchedule(), batch_size=N, seq_len=L, vocab_size=K, steps=steps, noise_removal=mode,
                 temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(1), progress=False,
                 posterior_impl=impl)
    dist = exact_final_distribution(den, K, L, steps, 1e-5, mode, np.ones(K), temperature, top_p)
    compare(out, dist)


@pytest.mark.parametrize("impl", IMPLS[:3])
@pytest.mark.parametrize("mode,temperature,top_p", [("ancestral", 1.0, 1.0), ("greedy", 1.3, 0.85)])
def test_marginals_with_valid_vocab_and_clamp(impl, mode, temperature, top_p):
    # K=4, id 3 invalid (e.g. BOS); position 0 clamped to the invalid id 3 (a prompt), position 1 free.
    K, L, steps = 4, 2, 3
    den = TableDenoiser(K, L, seed=7)
    valid = torch.tensor([True, True, True, False])
    res = sample(den, None, batch_size=N, seq_len=L, vocab_size=K, steps=steps, prompt=torch.tensor([3]),
                 valid_vocab=valid, generator=torch.Generator().manual_seed(3), progress=False, return_trajectory=True,
                 noise_removal=mode, temperature=temperature, top_p=top_p, posterior_impl=impl)
    assert bool((res.trajectory[:, :, 0] == 3).all())
    assert not bool((res.trajectory[:, :, 1] == 3).any())
    dist = exact_final_distribution(den, K, L, steps, 1e-5, mode, valid.double().numpy(), temperature, top_p,
                                    clamp={0: 3})
    compare(res.tokens, dist)


@pytest.mark.parametrize("impl", IMPLS[:3])
def test_marginals_with_infill_clamp_and_per_sequence_generators(impl):
    # L=3, middle position clamped (infilling); one generator per sequence; seed 4 for the TableDenoiser.
    K, L, steps = 3, 3, 2
    den = TableDenoiser(K, L, seed=4)
    n = 6000
    gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    out = sample(den, None, batch_size=n, seq_len=L, vocab_size=K, steps=steps,
                 clamp=Clamp(torch.tensor([False, True, False]), torch.tensor([0, 2, 0])), generator=gens, progress=False, posterior_impl=impl,
                 chunk_size=2500)
    dist = exact_final_distribution(den, K, L, steps, 1e-5, "ancestral", np.ones(K), clamp={1: 2})
    compare(out, dist)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_clamped_positions_never_change_and_are_seen_by_the_denoiser(impl, top_p):
    K, L = 6, 7
    den = TableDenoiser(K, L, seed=2)
    mask = torch.tensor([False, True, False, False, True, True, False])
    vals = torch.tensor([0, 5, 0, 0, 2, 4, 0])
    valid = torch.tensor([True, True, True, True, False, True])  # clamped ids 4 (and prompt 1) may be invalid
    vals[5] = 4
    res = sample(den, None, batch_size=5, seq_len=L, vocab_size=K, steps=6, clamp=Clamp(mask, vals),
                 prompt=torch.tensor([[1]] * 5), seed=0, progress=False, return_trajectory=True, valid_vocab=valid,
                 posterior_impl=impl, top_p=top_p)
    assert not bool((res.trajectory[:, :, ~mask][:, :, 1:] == 4).any())
    assert res.trajectory.shape == (6 + 2, 5, L)
    for z in res.trajectory:  # including the initial prior sample
        assert bool((z[:, mask] == vals[mask]).all()) and bool((z[:, 0] == 1).all())
    for z, _ in den.inputs:
        assert bool((z[:, mask] == vals[mask]).all()) and bool((z[:, 0] == 1).all())
    # the free positions do move
    assert bool((res.trajectory[0][:, ~mask][:, 1:] != res.tokens[:, ~mask][:, 1:]).any())


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_tail_is_argmax_of_x_theta_at_final_call(impl):
    K, L, steps = 7, 5, 4
    den = TableDenoiser(K, L, seed=5, scale=0.3)  # flat-ish x_θ: the exact final posterior would mostly keep z
    res = sample(den, None, batch_size=64, seq_len=L, vocab_size=K, steps=steps, noise_removal="greedy", seed=3,
                 progress=False, return_trajectory=True, posterior_impl=impl)
    z_last, sigma_last = den.inputs[-1]
    assert torch.equal(z_last, res.trajectory[-2])
    assert torch.allclose(sigma_last.double(), -torch.log(LogLinearSchedule().alpha(torch.tensor(1e-5))).expand(64).double())
    expected = den.logits(z_last, sigma_last.double()).argmax(-1)
    assert torch.equal(res.tokens, expected)
    assert not torch.equal(res.tokens, z_last)  # it is not "keep z" (the behaviour of the final posterior's mode)


def test_posterior_and_categorical_are_float64(monkeypatch):
    seen = []
    orig = samplers_mod.sample_categorical

    def spy(probs, generator):
        seen.append(probs.dtype)
        return orig(probs, generator)

    monkeypatch.setattr(samplers_mod, "sample_categorical", spy)
    den = TableDenoiser(5, 3)
    sample(den, None, batch_size=4, seq_len=3, vocab_size=5, steps=3, seed=0, progress=False, top_p=0.9,
           posterior_impl="dense")
    assert len(seen) == 4 and all(d == torch.float64 for d in seen)


@pytest.mark.parametrize("impl", ["chunked", "mixture"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_kernel_paths_use_float64(monkeypatch, impl, top_p):
    import duo_plugin.kernels.sampler as KS

    seen = []
    for name in ("posterior", "_probs", "_unit_uniforms"):
        orig = getattr(KS, name)

        def spy(*a, _orig=orig, **k):
            out = _orig(*a, **k)
            seen.append(out.dtype)
            return out

        monkeypatch.setattr(KS, name, spy)
    den = TableDenoiser(5, 3)
    sample(den, None, batch_size=4, seq_len=3, vocab_size=5, steps=3, seed=0, progress=False, top_p=top_p,
           temperature=0.8, posterior_impl=impl)
    assert seen and all(d == torch.float64 for d in seen)


@pytest.mark.parametrize("mode,nfe", [("ancestral", 6), ("greedy", 6), ("none", 5)])
def test_nfe(mode, nfe):
    den = TableDenoiser(4, 3)
    res = sample(den, None, batch_size=2, seq_len=3, vocab_size=4, steps=5, noise_removal=mode, seed=0,
                 progress=False, return_trajectory=True)
    assert isinstance(res, SampleResult) and res.nfe == nfe and den.calls == nfe


def test_nfe_with_chunks_and_denoiserfn():
    class M(torch.nn.Module):
        vocab_size = 4

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Embedding(4, 4)

        def forward(self, x, sigma):
            assert not torch.is_grad_enabled() and not self.training
            return self.lin(x)  # raw logits: DenoiserFn renormalises

    fn = DenoiserFn(M().train())
    out = sample(fn, None, batch_size=5, seq_len=3, vocab_size=4, steps=3, chunk_size=2, seed=0, progress=False)
    assert out.shape == (5, 3) and fn.nfe == 3 * 4  # 3 chunks x (steps + 1)


def test_denoiserfn_restores_the_models_previous_mode():
    """The forward runs in eval mode, but sampling mid-training must leave the live model (and each submodule, e.g. a
    deliberately frozen eval-mode part) in the mode it had; an eval-mode model stays in eval mode."""
    seen = []

    class M(torch.nn.Module):
        vocab_size = 4

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Embedding(4, 4)
            self.drop = torch.nn.Dropout(0.5)
            self.frozen = torch.nn.Linear(4, 4)

        def forward(self, x, sigma):
            seen.append((self.training, self.drop.training, self.frozen.training))
            return self.drop(self.lin(x))

    m = M().train()
    m.frozen.eval()
    fn = DenoiserFn(m)
    out = sample(fn, None, batch_size=2, seq_len=3, vocab_size=4, steps=2, seed=0, progress=False)
    assert out.shape == (2, 3) and seen and all(s == (False, False, False) for s in seen)
    assert m.training and m.lin.training and m.drop.training and not m.frozen.training

    class Boom(M):
        def forward(self, x, sigma):
            raise RuntimeError("boom")

    b = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        DenoiserFn(b)(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1))
    assert b.training and b.drop.training  # restored even when the forward raises

    e = M().eval()
    DenoiserFn(e)(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1))
    assert not any(mod.training for mod in e.modules())


@pytest.mark.parametrize("impl", IMPLS)
def test_determinism_and_chunk_independence(impl):
    den = TableDenoiser(5, 4)
    kw = dict(batch_size=9, seq_len=4, vocab_size=5, steps=4, progress=False, posterior_impl=impl, top_p=0.95)
    a = sample(den, None, seed=11, **kw)
    b = sample(den, None, seed=11, chunk_size=4, **kw)
    c = sample(den, None, seed=12, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1 = sample(den, None, generator=torch.Generator().manual_seed(4), **kw)
    g2 = sample(den, None, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="exactly one of generator"):
        sample(den, None, **kw)
    # per-sequence generators: a row depends only on its own generator (batch composition, chunking)
    gens = lambda ids: [torch.Generator().manual_seed(50 + i) for i in ids]  # noqa: E731
    full = sample(den, None, generator=gens(range(9)), **dict(kw, chunk_size=2))
    part = sample(den, None, generator=gens([3, 7]), **dict(kw, batch_size=2))
    assert torch.equal(full[[3, 7]], part)
    # seed=: rows keyed by their index, so a larger batch extends a smaller one
    assert torch.equal(sample(den, None, seed=11, **dict(kw, batch_size=4)), a[:4])


def test_impls_differ_in_stream_and_auto_is_mixture():
    den = TableDenoiser(5, 4)
    kw = dict(batch_size=16, seq_len=4, vocab_size=5, steps=4, progress=False, seed=2)
    outs = {i: sample(den, None, posterior_impl=i, **kw) for i in IMPLS}
    assert torch.equal(outs["auto"], outs["mixture"])
    assert not torch.equal(outs["dense"], outs["mixture"]) and not torch.equal(outs["dense"], outs["chunked"])
    with pytest.raises(ValueError, match="posterior_impl"):
        sample(den, None, posterior_impl="triton", **kw)


def _brute_nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest subset (by size, then larger mass) with mass >= top_p, by enumeration of all subsets."""
    K = len(p)
    best = None
    for r in range(1, K + 1):
        for sub in itertools.combinations(range(K), r):
            m = p[list(sub)].sum()
            if m >= top_p - 1e-15 and (best is None or m > p[list(best)].sum()):
                best = sub
        if best is not None:
            break
    out = np.zeros(K)
    out[list(best)] = p[list(best)]
    return out / out.sum()


def test_nucleus_filter_against_subset_enumeration():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, -1)
        top_p = float(torch.rand(1, generator=g, dtype=torch.float64)) * 0.98 + 0.01
        got = nucleus_filter(p, top_p).numpy()
        np.testing.assert_allclose(got, _brute_nucleus(p.numpy(), top_p), atol=1e-12)
    p = torch.softmax(torch.randn(2, 3, 6, generator=g), -1)
    assert torch.equal(nucleus_filter(p, 1.0), p.double())


@pytest.mark.parametrize("impl", IMPLS)
def test_top_p_one_is_no_filter_and_tiny_top_p_is_argmax(impl):
    K, L = 6, 4
    den = TableDenoiser(K, L, seed=9, scale=0.8)
    kw = dict(batch_size=32, seq_len=L, vocab_size=K, steps=4, progress=False, posterior_impl=impl)
    base = sample(den, None, seed=5, **kw)
    assert torch.equal(sample(den, None, seed=5, top_p=1.0, **kw), base)

    class ArgmaxDenoiser:  # x_θ replaced by the one-hot of its argmax
        def __call__(self, z, sigma):
            idx = den.logits(z, sigma.double()).argmax(-1)
            lp = torch.full((*z.shape, K), -1e30)
            return lp.scatter(-1, idx[..., None], 0.0)

    tiny = sample(den, None, seed=5, top_p=1e-9, **kw)
    assert torch.equal(tiny, sample(ArgmaxDenoiser(), None, seed=5, **kw))
    assert not torch.equal(tiny, base)


def test_bad_inputs_raise_clear_errors():
    den = TableDenoiser(3, 2)
    kw = dict(batch_size=2, seq_len=2, vocab_size=3, steps=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="noise_removal"):
        sample(den, None, noise_removal="argmax", **kw)
    with pytest.raises(ValueError, match="top_p"):
        sample(den, None, top_p=0.0, **kw)
    with pytest.raises(ValueError, match="prompt has 3 tokens"):
        sample(den, None, prompt=torch.tensor([0, 1, 2]), **kw)
    with pytest.raises(ValueError, match="Clamp.values"):
        sample(den, None, clamp=Clamp(torch.tensor([True, False]), None), **kw)
    with pytest.raises(ValueError, match="expected"):
        sample(lambda z, s: torch.zeros(*z.shape, 3), None, batch_size=2, seq_len=2, vocab_size=2, steps=2, seed=0,
               progress=False)
