"""SEDD (diffusion/sedd.py) against independent references: the score-entropy loss vs a brute-force sum over the
rate matrix and matrix exponentials of the CTMC; the DSE ELBO vs the exact NLL by enumeration (L = 1, exact scores);
the analytic reverse step vs Bayes' rule on matrix exponentials; the loop's samples vs the data law (L = 1)."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.diffusion.sedd import GeometricSchedule, SEDDProcess

F64 = torch.float64
P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)  # data law over N = 4 ids (L = 1)


def rate_matrix(graph: str, n: int) -> torch.Tensor:
    """R[a, b] = rate a → b (a ≠ b) of SEDD's graph over n data ids (+ the mask as the last state for absorb)."""
    if graph == "absorb":
        r = torch.zeros(n + 1, n + 1, dtype=F64)
        r[:n, n] = 1.0
    else:
        r = torch.full((n, n), 1.0 / n, dtype=F64)
        r.fill_diagonal_(0.0)
    return r


def transition(graph: str, n: int, sigma_bar: float) -> torch.Tensor:
    """exp(σ̄ G) with generator G = R − diag(R 1): row a is q(· | a) after noise σ̄."""
    r = rate_matrix(graph, n)
    g = r - torch.diag(r.sum(1))
    return torch.linalg.matrix_exp(sigma_bar * g)


def exact_output(graph: str, n: int, alpha: float) -> torch.Tensor:
    """A network output whose scores (docs: log s_y = ℓ_y − ℓ_z [+ c]) are the exact ratios p_t(y)/p_t(z) for P."""
    pt = P @ transition(graph, n, -math.log(alpha))[:n]
    ell = pt.log().clone()
    if graph == "absorb":
        ell[n] = ell[n] + math.log(alpha / (1 - alpha)) - math.log(n)
    return ell


def expected_integral(proc, graph: str, n: int, x0: int, t_lo: float = 0.0) -> float:
    """∫_{t_lo}^1 E_{q_t(z|x0)} f(z, t) dt by composite Gauss-Legendre in v = log t (20 nodes per unit of v down to
    t = 1e-10; the integrand is O(t log 1/t) below), the network output = the exact scores at each node."""
    import numpy as np

    x, wts = np.polynomial.legendre.leggauss(20)
    lo = math.log(max(t_lo, 1e-10))
    edges = np.linspace(lo, 0.0, int(math.ceil(-lo)) + 1)
    vs = np.concatenate([(b - a) / 2 * x + (a + b) / 2 for a, b in zip(edges[:-1], edges[1:])])
    ws = np.concatenate([(b - a) / 2 * wts for a, b in zip(edges[:-1], edges[1:])])
    t = torch.tensor(np.exp(vs), dtype=F64)
    a, ap = proc.alpha(t), proc.alpha_prime(t)
    w = proc.vocab_size
    total = 0.0
    for i in range(t.numel()):
        q = transition(graph, n, -math.log(float(a[i])))[x0]
        zs = [z for z in range(w) if q[z] > 0]
        f = proc.nelbo(exact_output(graph, n, float(a[i])).expand(len(zs), 1, w).contiguous(),
                       torch.tensor(zs)[:, None], torch.full((len(zs), 1), x0), a[i], ap[i])
        total += float(ws[i]) * float(t[i]) * float((q[zs] * f[:, 0].double()).sum())
    return total


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_dse_loss_matches_brute_force_sum(graph):
    n, g = 5, torch.Generator().manual_seed(1)
    w = n + 1 if graph == "absorb" else n
    proc = SEDDProcess(w, graph)
    r = rate_matrix(graph, n)
    for trial in range(6):
        alpha = float(torch.rand((), generator=g, dtype=F64)) * 0.9 + 0.05
        alpha_prime = -float(torch.rand((), generator=g, dtype=F64)) - 0.1
        x0 = int(torch.randint(n, (), generator=g))
        out = torch.log_softmax(torch.randn(w, generator=g, dtype=F64) * 2, -1)
        q = transition(graph, n, -math.log(alpha))[x0]
        for z in range(w):
            if q[z] == 0:
                continue
            # reference: Σ_{y≠z} R(y → z)[s − r log s + r log r − r], the documented score reading
            ref = 0.0
            for y in range(w):
                if y == z or r[y, z] == 0:
                    continue
                if graph == "uniform":
                    log_s = float(out[y] - out[z])
                else:
                    log_s = float(out[y] - out[n]) + math.log(alpha / (1 - alpha)) - math.log(n)
                ratio = float(q[y] / q[z])
                k_term = ratio * math.log(ratio) - ratio if ratio > 0 else 0.0
                ref += float(r[y, z]) * (math.exp(log_s) - ratio * log_s + k_term)
            ref *= -alpha_prime / alpha
            got = proc.nelbo(out[None, None].float(), torch.tensor([[z]]), torch.tensor([[x0]]),
                             torch.tensor(alpha, dtype=F64), torch.tensor(alpha_prime, dtype=F64))
            assert float(got) == pytest.approx(ref, rel=1e-5, abs=1e-6), (trial, z)
            assert float(got) >= 0


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_dse_elbo_is_the_exact_nll_for_exact_scores(graph):
    """∫_0^1 E_{q_t(z|x0)} f dt + KL(q_1(·|x0) ‖ p_1) = −log p(x0) when the scores are the true ratios (L = 1)."""
    n = 4
    w = n + 1 if graph == "absorb" else n
    proc = SEDDProcess(w, graph, schedule=LogLinearSchedule(1e-3))
    for x0 in (0, 3):
        val = expected_integral(proc, graph, n, x0)
        a1 = float(proc.alpha(torch.tensor(1.0, dtype=F64)))
        q1 = transition(graph, n, -math.log(a1))[x0]
        p1 = P @ transition(graph, n, -math.log(a1))[:n]
        kl = float(torch.where(q1 > 0, q1 * (q1 / p1).log(), torch.zeros_like(q1)).sum())
        assert val + kl == pytest.approx(-math.log(P[x0]), abs=2e-6)


def test_dse_integral_does_not_depend_on_the_schedule():
    """f dt = g(σ̄) dσ̄: the geometric schedule's integral over t ∈ [0, 1] equals the log-linear one over the same
    σ̄ range (checks GeometricSchedule's α and α')."""
    n, x0 = 4, 1
    geo = GeometricSchedule(1e-3, 8.0)
    ll_eps = math.exp(-8.0)
    t0 = -math.expm1(-1e-3) / (1 - ll_eps)  # σ̄_LL(t0) = σ_min
    v_geo = expected_integral(SEDDProcess(n, "uniform", schedule=geo), "uniform", n, x0)
    v_ll = expected_integral(SEDDProcess(n, "uniform", schedule=LogLinearSchedule(ll_eps)), "uniform", n, x0, t0)
    assert v_geo == pytest.approx(v_ll, rel=1e-5)
    t = torch.tensor([0.2, 0.7], dtype=F64)
    h = 1e-6
    fd = (geo.alpha(t + h) - geo.alpha(t - h)) / (2 * h)
    assert torch.allclose(geo.alpha_prime(t), fd, rtol=1e-6)
    assert geo.t_for_alpha(float(geo.alpha(torch.tensor(0.3, dtype=F64)))) == pytest.approx(0.3, abs=1e-12)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_analytic_step_is_bayes_rule_for_exact_scores(graph):
    """SEDD's Tweedie step with exact scores = p(z_s = y | z_t = z) = p_s(y) q_{s→t}(z | y) / p_t(z) (L = 1)."""
    n = 4
    w = n + 1 if graph == "absorb" else n
    proc = SEDDProcess(w, graph)
    for a_t, a_s in ((0.3, 0.6), (0.05, 0.9), (0.5, 1.0)):
        trans_st = transition(graph, n, math.log(a_s / a_t))
        p_s = P @ transition(graph, n, -math.log(a_s))[:n]
        p_t = P @ transition(graph, n, -math.log(a_t))[:n]
        ell = exact_output(graph, n, a_t)
        for z in range(w):
            if p_t[z] <= 0 or (graph == "absorb" and z != n):
                continue
            ref = p_s * trans_st[:, z] / p_t[z]
            if a_s == 1.0 and graph == "absorb":
                ref[n] = 0.0
            got = proc.reverse_probs(ell[None, None], torch.tensor([[z]]), a_t, a_s, "analytic")[0, 0]
            assert torch.allclose(got, ref / ref.sum(), atol=1e-10), (a_t, a_s, z)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_euler_step_is_the_rate_times_dsigma(graph):
    n, g = 4, torch.Generator().manual_seed(3)
    w = n + 1 if graph == "absorb" else n
    proc = SEDDProcess(w, graph)
    r = rate_matrix(graph, n)
    a_t, a_s = 0.4, 0.45
    out = torch.log_softmax(torch.randn(w, generator=g, dtype=F64), -1)
    z = n if graph == "absorb" else 2
    ref = torch.zeros(w, dtype=F64)
    for y in range(w):
        if y != z:
            log_s = float(out[y] - (out[n] if graph == "absorb" else out[z]))
            if graph == "absorb":
                log_s += math.log(a_t / (1 - a_t)) - math.log(n)
            ref[y] = math.log(a_s / a_t) * r[y, z] * math.exp(log_s)
    ref[z] = 1 - ref.sum()
    got = proc.reverse_probs(out[None, None], torch.tensor([[z]]), a_t, a_s, "euler")[0, 0]
    assert torch.allclose(got, ref.clamp_min(0) / ref.clamp_min(0).sum(), atol=1e-12)


def test_absorb_gradients_are_finite_with_unmasked_positions():
    proc = SEDDProcess(6, "absorb")
    out = torch.randn(2, 3, 6, requires_grad=True)
    z = torch.tensor([[5, 1, 5], [2, 3, 4]])
    x0 = torch.tensor([[0, 1, 2], [2, 3, 4]])
    f = proc.nelbo(torch.log_softmax(out, -1), z, x0, torch.tensor(0.4, dtype=F64), torch.tensor(-1.0, dtype=F64))
    assert float(f[1].detach().abs().sum()) == 0.0 and float(f[0, 1].detach()) == 0.0
    f.sum().backward()
    assert bool(torch.isfinite(out.grad).all())


@pytest.mark.parametrize("graph,predictor", [("absorb", "analytic"), ("uniform", "analytic"), ("uniform", "euler")])
def test_sampler_draws_the_data_law_with_exact_scores(graph, predictor):
    """L = 1, a denoiser returning the exact scores: the analytic sampler is exact step by step, so its samples follow
    P (up to the log-linear prior mismatch α(1) = ε); the Euler sampler with many steps too (looser tolerance)."""
    from duo_plugin.sampling import sample
    from duo_plugin.sampling.sedd import SEDDScheduler

    n = 4
    w = n + 1 if graph == "absorb" else n
    proc = SEDDProcess(w, graph)

    def denoiser(z, sigma):
        assert bool((sigma == sigma[0]).all())
        alpha = math.exp(-float(sigma[0]))
        return exact_output(graph, n, alpha).float().expand(z.shape[0], 1, w)

    steps = 8 if predictor == "analytic" else 32
    m = 8000
    toks = sample(denoiser, SEDDScheduler(proc, predictor=predictor), batch_size=m, seq_len=1, steps=steps,
                  generator=torch.Generator().manual_seed(0), t_eps=1e-4, noise_removal="ancestral", progress=False)
    freq = torch.bincount(toks[:, 0], minlength=w).double() / m
    assert float(freq[n:].sum()) == 0.0 if graph == "absorb" else True
    tol = 4 * torch.sqrt(P * (1 - P) / m) + (0.0 if predictor == "analytic" else 0.02)
    assert bool(((freq[:n] - P).abs() <= tol + 2e-3).all()), freq


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_ids_outside_the_state_space_contribute_zero(graph):
    """An unscored pad that reaches the loss as drawn (official pad mode) must not turn the row into NaN/inf."""
    valid = torch.tensor([True, True, True, False, False])  # id 3 = PAD (not a state), id 4 = [MASK] (absorb)
    proc = SEDDProcess(5, graph, 4 if graph == "absorb" else None, valid_vocab=valid if graph == "absorb" else valid)
    out = torch.log_softmax(torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    z = torch.tensor([[4 if graph == "absorb" else 1, 3, 0]])
    x0 = torch.tensor([[0, 3, 0]])
    f = proc.nelbo(out, z, x0, torch.tensor(0.5, dtype=F64), torch.tensor(-1.0, dtype=F64))
    assert bool(torch.isfinite(f).all()) and float(f[0, 1]) == 0.0 and float(f[0, 0]) > 0


def test_prompt_clamps_are_kept_and_the_mask_is_refused():
    from duo_plugin.sampling import sample
    from duo_plugin.sampling.sedd import SEDDScheduler

    proc = SEDDProcess(5, "absorb")
    sched = SEDDScheduler(proc)
    lp = torch.log_softmax(torch.randn(5, generator=torch.Generator().manual_seed(0)), -1)
    den = lambda z, s: lp.expand(z.shape[0], z.shape[1], 5)  # noqa: E731
    toks = sample(den, sched, batch_size=4, seq_len=3, steps=4, seed=0, prompt=torch.tensor([2]), progress=False)
    assert bool((toks[:, 0] == 2).all()) and bool((toks != 4).all())
    with pytest.raises(ValueError, match="SEDD state space"):
        sample(den, sched, batch_size=1, seq_len=3, steps=2, seed=0, prompt=torch.tensor([4]), progress=False)
    with pytest.raises(ValueError, match="temperature"):
        SEDDScheduler(proc, temperature=0.5)
