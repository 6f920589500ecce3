"""Schedules (log-linear, Gaussian γ-window, duality) and the stratified global-batch time sampler."""

import math

import pytest
import torch

from duo_plugin.diffusion.duality import DualityTable, discrete_alpha
from duo_plugin.diffusion.schedules import (
    DualitySchedule,
    LogLinearSchedule,
    gamma_at,
    gaussian_coefficients,
    log_linear_alpha,
    log_linear_alpha_prime,
    stratified_times,
)

F64 = torch.float64


def test_log_linear():
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(log_linear_alpha(t), 1 - 0.999 * t)
    h = 1e-6
    tt = t.clamp(h, 1 - h)
    fd = (log_linear_alpha(tt + h) - log_linear_alpha(tt - h)) / (2 * h)
    torch.testing.assert_close(log_linear_alpha_prime(tt), fd, rtol=1e-8, atol=1e-8)
    s = LogLinearSchedule(eps=1e-3)
    torch.testing.assert_close(s.sigma(t), -torch.log(1 - 0.999 * t))
    assert s.alpha(1.0).item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="eps"):
        LogLinearSchedule(eps=0.0)


def test_gaussian_coefficients_variance_preserving():
    g = torch.linspace(-10, 10, 41, dtype=F64)
    a, s = gaussian_coefficients(g)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(g))
    torch.testing.assert_close(a / s, torch.exp(-g / 2))  # m = α̃/σ̃ = e^{-γ/2}, SNR = e^{-γ}
    torch.testing.assert_close(gamma_at(torch.tensor([0.0, 0.5, 1.0]), -3.55, -1.85),
                               torch.tensor([-3.55, -2.7, -1.85], dtype=F64))


def test_duality_schedule_chain_rule_and_table():
    K, g0, g1 = 1000, -3.0, -1.0
    direct = DualitySchedule(K, g0, g1)
    t = torch.linspace(0.01, 0.99, 17, dtype=F64)
    torch.testing.assert_close(direct.alpha(t), discrete_alpha(g0 + t * (g1 - g0), K))
    h = 1e-6
    fd = (direct.alpha(t + h) - direct.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(direct.alpha_prime(t), fd, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(direct.sigma(t), -torch.log(direct.alpha(t)))
    tabbed = DualitySchedule(K, g0, g1, table=DualityTable.build(K, -4.0, 0.0, num_points=801))
    torch.testing.assert_close(tabbed.alpha(t), direct.alpha(t), rtol=0, atol=1e-9)
    torch.testing.assert_close(tabbed.alpha_prime(t), direct.alpha_prime(t), rtol=1e-6, atol=1e-8)
    assert (direct.alpha_prime(t) < 0).all()
    with pytest.raises(ValueError, match="K=1000"):
        DualitySchedule(999, g0, g1, table=tabbed.table)
    with pytest.raises(ValueError, match="wider range"):
        DualitySchedule(K, -5.0, g1, table=tabbed.table)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        DualitySchedule(K, 1.0, -1.0)


def test_stratified_times_independent_of_split_and_stratified():
    N, seed = 16, 123
    for step in (0, 1, 977):
        single = stratified_times(seed, step, range(N), N)
        ranks = torch.cat([stratified_times(seed, step, range(r * 8, r * 8 + 8), N) for r in range(2)])
        accum = torch.cat([stratified_times(seed, step, range(a * 4, a * 4 + 4), N) for a in range(4)])
        interleaved = stratified_times(seed, step, [1, 3, 5], N)
        assert torch.equal(single, ranks) and torch.equal(single, accum)
        assert torch.equal(interleaved, single[[1, 3, 5]])
        t = stratified_times(seed, step, range(N), N, t_min=1e-3, dtype=F64)
        assert (t >= 1e-3).all() and (t < 1).all()
        u = (t - 1e-3) / (1 - 1e-3)
        strata = torch.floor(u * N + 1e-9).long()
        assert sorted(strata.tolist()) == list(range(N))  # exactly one per stratum
        # one uniform per global batch: all offsets within the strata are equal
        off = u * N - torch.arange(N, dtype=F64)
        off = torch.remainder(off, 1.0)
        assert (off - off[0]).abs().max() < 1e-9
    assert not torch.equal(stratified_times(seed, 0, range(N), N), stratified_times(seed, 1, range(N), N))


def test_stratified_times_uniform_over_steps():
    # the per-step uniform u (recovered from stratum 0) is U[0, 1) across steps: mean 1/2, var 1/12, flat histogram
    N, n = 8, 4000
    t0 = torch.stack([stratified_times(0, s, [0], N, t_min=0.0, dtype=F64) for s in range(n)]).flatten()
    u = t0 * N
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u, bins=10, min=0, max=1)
    stat = ((counts - n / 10) ** 2 / (n / 10)).sum().item()
    assert stat < 9 + 5 * math.sqrt(18)
    # pooled over the whole global batch, times cover [t_min, 1) uniformly: mean (1 + t_min)/2
    t = torch.stack([stratified_times(0, s, range(N), N, dtype=F64) for s in range(200)])
    assert abs(t.mean().item() - 0.5005) < 4 * math.sqrt(1 / 12 / 200) / N
