"""D3PM absorbing, discrete time (diffusion/d3pm.py) against brute-force products of the T transition matrices
(Austin et al. 2021): marginals, posteriors q(x_{k−1} | x_k, x0), the x0-parametrised p_θ(x_{k−1} | x_k) and the
per-step KL; the clock → step map; and the sampler's law for L = 1."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.diffusion.d3pm import D3PMProcess

F64 = torch.float64
N, T = 3, 6  # data ids 0..2, [MASK] = 3; T steps
M = N


def step_matrix(k: int) -> torch.Tensor:
    """Q_k[a, b] = q(x_k = b | x_{k−1} = a) with β_k = 1/(T − k + 1) (Austin et al. absorbing schedule)."""
    beta = 1.0 / (T - k + 1)
    q = (1 - beta) * torch.eye(N + 1, dtype=F64)
    q[:, M] += beta
    q[M] = 0.0
    q[M, M] = 1.0
    return q


def cumulative(k: int) -> torch.Tensor:
    out = torch.eye(N + 1, dtype=F64)
    for i in range(1, k + 1):
        out = out @ step_matrix(i)
    return out


def p_theta(k: int, z: int, x0_probs: torch.Tensor) -> torch.Tensor:
    """p_θ(x_{k−1} | x_k = z) ∝ Σ_x̃ q(x_{k−1}, x_k = z | x̃) p̃(x̃), by matrices."""
    joint = torch.stack([cumulative(k - 1)[xt] * step_matrix(k)[:, z] for xt in range(N + 1)])  # [x̃, x_{k−1}]
    p = (x0_probs[:, None] * joint).sum(0)
    return p / p.sum()


def test_marginals_and_schedule_match_the_matrix_products():
    proc = D3PMProcess(N + 1, steps=T)
    for k in range(T + 1):
        u = torch.tensor(k / T, dtype=F64)
        a = float(proc.alpha(u)) if k else 1.0
        assert a == pytest.approx(1 - k / T, abs=1e-15)
        for x0 in range(N):
            ref = cumulative(k)[x0]
            x = torch.nn.functional.one_hot(torch.tensor(x0), N + 1).to(F64)
            assert torch.allclose(proc.marginal(x, a), ref, atol=1e-12)
    # the clock: stratified u over [0, 1) puts exactly equal mass on every step 1..T
    n = 12 * T
    u = (torch.arange(n, dtype=F64) + 0.37) / n
    counts = torch.bincount(proc.schedule.step(u), minlength=T + 1)
    assert counts[0] == 0 and bool((counts[1:] == n // T).all())
    assert proc.beta(1) == pytest.approx(1 / T) and proc.beta(T) == 1.0


def test_posterior_matches_bayes_on_the_matrices():
    proc = D3PMProcess(N + 1, steps=T)
    for k in range(1, T + 1):
        for x0 in range(N):
            for z in (x0, M):
                # q(x_{k−1} = y | x_k = z, x0) ∝ Q̄_{k−1}[x0, y] Q_k[y, z]
                ref = cumulative(k - 1)[x0] * step_matrix(k)[:, z]
                if ref.sum() == 0:
                    continue
                ref = ref / ref.sum()
                x = torch.nn.functional.one_hot(torch.tensor([[x0]]), N + 1).to(F64)
                got = proc.posterior(torch.tensor([[z]]), x, 1 - k / T, 1 - (k - 1) / T)[0, 0]
                assert torch.allclose(got, ref, atol=1e-12), (k, x0, z)


def test_per_step_kl_matches_brute_force():
    """nelbo / T = KL(q(x_{k−1} | x_k, x0) ‖ p_θ(x_{k−1} | x_k)) for k ≥ 2 and −log p_θ(x0 | x_1) for k = 1, with
    p_θ built from the network's distribution over data ids (its [MASK] mass dropped)."""
    proc = D3PMProcess(N + 1, steps=T)
    g = torch.Generator().manual_seed(0)
    for k in range(1, T + 1):
        logits = torch.randn(N + 1, generator=g, dtype=F64)
        x_tilde = torch.softmax(logits[:N], -1)
        x_tilde = torch.cat([x_tilde, torch.zeros(1, dtype=F64)])
        for x0 in range(N):
            for z in (x0, M):
                q = cumulative(k - 1)[x0] * step_matrix(k)[:, z]
                if q.sum() == 0:
                    continue
                q = q / q.sum()
                p = p_theta(k, z, x_tilde)
                if k == 1:
                    ref = -math.log(float(p[x0]))
                else:
                    ref = float(torch.where(q > 0, q * (q / p).log(), torch.zeros_like(q)).sum())
                got = proc.nelbo(torch.log_softmax(logits, -1)[None, None].float(), torch.tensor([[z]]),
                                 torch.tensor([[x0]]), torch.tensor(1 - k / T, dtype=F64), torch.tensor(-1.0))
                assert float(got) / T == pytest.approx(ref, rel=1e-5, abs=1e-7), (k, x0, z)


def test_elbo_is_the_exact_nll_for_the_true_denoiser():
    """Σ_k E_{q(x_k|x0)} L_k = −log p(x0) for L = 1 and p̃ = the data law (tight), by enumeration."""
    p = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    proc = D3PMProcess(N + 1, steps=T)
    out = torch.log(torch.cat([p, torch.tensor([1e-3], dtype=F64)]))
    for x0 in range(N):
        total = 0.0
        for k in range(1, T + 1):
            qk = cumulative(k)[x0]
            for z in (x0, M):
                f = proc.nelbo(out[None, None].float(), torch.tensor([[z]]), torch.tensor([[x0]]),
                               torch.tensor(1 - k / T, dtype=F64), torch.tensor(-1.0))
                total += float(qk[z]) * float(f) / T
        assert total == pytest.approx(-math.log(float(p[x0])), rel=1e-6)


def test_off_grid_alpha_is_refused():
    proc = D3PMProcess(N + 1, steps=T)
    with pytest.raises(ValueError, match="not on the D3PM grid"):
        proc.corrupt(torch.tensor([[0, 1]]), torch.tensor(0.55, dtype=F64), torch.Generator())


def test_sampler_full_chain_draws_the_data_law():
    from duo_plugin.sampling import sample
    from duo_plugin.sampling.d3pm import D3PMScheduler

    p = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    proc = D3PMProcess(N + 1, steps=T)
    sched = D3PMScheduler(proc)
    assert torch.equal(torch.round(sched.timesteps(T - 1) * T).long(), torch.arange(T, 0, -1))
    with pytest.raises(ValueError, match="steps"):
        sched.timesteps(T)
    out = torch.log(torch.cat([p, torch.tensor([0.5], dtype=F64)])).float()
    m = 6000
    res = sample(lambda z, s: out.expand(z.shape[0], z.shape[1], N + 1), sched, batch_size=m, seq_len=2, steps=3,
                 seed=0, noise_removal="ancestral", progress=False, return_trajectory=True)
    toks, nfe = res.tokens, res.nfe
    assert nfe == 4 and int((toks == M).sum()) == 0
    freq = torch.bincount(toks.flatten(), minlength=N + 1).double()[:N] / toks.numel()
    assert bool(((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / toks.numel())).all()), freq


def test_ids_outside_the_data_ids_contribute_zero():
    valid = torch.tensor([True, True, False, False])  # id 2 = PAD, id 3 = [MASK]
    proc = D3PMProcess(N + 1, valid_vocab=valid, steps=T)
    out = torch.log_softmax(torch.randn(1, 2, N + 1, generator=torch.Generator().manual_seed(0)), -1)
    f = proc.nelbo(out, torch.tensor([[M, M]]), torch.tensor([[0, 2]]), torch.tensor(0.5, dtype=F64),
                   torch.tensor(-1.0))
    assert bool(torch.isfinite(f).all()) and float(f[0, 1]) == 0.0 and float(f[0, 0]) > 0
