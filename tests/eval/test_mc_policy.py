"""The two-stage adaptive Monte Carlo policy is unbiased on a heavy-tailed integrand, where the old optional-stopping
rule (add rounds until the *running* standard error is below the target) is biased low; the policy's sizes follow
the pilot variance; the conditional NELBO estimator uses fresh samples (pilot discarded)."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.eval.mc import MCPolicy, plan_samples, two_stage_mean

MU, SIGMA = 0.0, 1.5
TRUTH = math.exp(MU + SIGMA**2 / 2)  # lognormal mean exp(1.125) = 3.0802
REPS, PILOT, TARGET = 1000, 16, 0.5  # 30 of 30 seeds pass the 2-SE check (new), 0 of 30 (old)


def _lognormal(g, n):
    return torch.exp(MU + SIGMA * torch.randn(n, generator=g, dtype=torch.float64))


def _old_rule(g, m, target, cap):
    """The rule before the two-stage policy: rounds of m until the running SE < target (or the cap)."""
    v = _lognormal(g, m)
    while v.numel() + m <= cap and float(v.std(unbiased=True)) / math.sqrt(v.numel()) > target:
        v = torch.cat([v, _lognormal(g, m)])
    return float(v.mean())


def _within_two_se(estimates):
    e = torch.tensor(estimates, dtype=torch.float64)
    mean, se = float(e.mean()), float(e.std(unbiased=True)) / math.sqrt(e.numel())
    return abs(mean - TRUTH) <= 2 * se, mean, se


def test_two_stage_policy_is_unbiased_where_optional_stopping_is_not():
    policy = MCPolicy(PILOT, TARGET, 32 * PILOT)
    g = torch.Generator().manual_seed(1234)
    new = [two_stage_mean(lambda stage, n: _lognormal(g, n), policy)[0] for _ in range(REPS)]
    ok, mean, se = _within_two_se(new)
    assert ok, f"two-stage mean {mean:.4f} ± {se:.4f} vs truth {TRUTH:.4f}"
    g = torch.Generator().manual_seed(1234)
    old = [_old_rule(g, PILOT, TARGET, 32 * PILOT) for _ in range(REPS)]
    ok_old, mean_old, se_old = _within_two_se(old)
    assert not ok_old and mean_old < TRUTH, f"old rule {mean_old:.4f} ± {se_old:.4f} should be biased low"


def test_plan_follows_the_pilot_variance_and_the_bounds():
    policy = MCPolicy(4, 0.5, 100)
    pilot = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64)  # unbiased variance 20/3
    assert plan_samples(pilot, policy) == math.ceil((20 / 3) / 0.25)  # 27
    assert plan_samples(pilot * 100, policy) == 100  # capped
    assert plan_samples(torch.full((4,), 3.0, dtype=torch.float64), policy) == 4  # at least the pilot size
    assert plan_samples(torch.tensor([1.0, float("inf")]), policy) == 0  # +inf whatever is drawn
    with pytest.raises(ValueError, match="max_mc_samples"):
        MCPolicy(8, 0.5, 4)
    with pytest.raises(ValueError, match="target_stderr"):
        MCPolicy(8, 0.0)


def test_conditional_nelbo_adaptive_uses_fresh_samples_sized_by_the_pilot():
    from duo_plugin.eval.likelihood import conditional_nelbo_ragged

    k = 6

    class Const:
        vocab_size = k

        def __call__(self, z, sigma, padding_mask=None):
            return torch.log_softmax(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, 0.0]), -1).expand(*z.shape, k).clone()

    seqs = [torch.tensor([0, 2, 3, 4, 5, 1]), torch.tensor([0, 4, 4])]
    keeps = [torch.tensor([True, False, False, False, False, True]), torch.tensor([True, False, False])]
    m = 8
    pilot = conditional_nelbo_ragged(Const(), seqs, keeps, indices=[7, 9], mc_samples=m, seed=1)
    res = conditional_nelbo_ragged(Const(), seqs, keeps, indices=[7, 9], mc_samples=m, seed=1, target_stderr=0.3,
                                   max_mc_samples=4096)
    for s in range(2):
        var = (pilot.stderr[s] ** 2) * m  # the pilot's unbiased variance (stderr = std / sqrt(m))
        assert int(res.mc_samples[s]) == max(m, min(4096, math.ceil(float(var) / 0.09)))
        assert float(res.nelbo[s]) != float(pilot.nelbo[s])  # the pilot is not part of the estimate
        # fresh samples sized for the target: the reported stderr is near it (sampling noise in the variance)
        assert 0.15 < float(res.stderr[s]) < 0.6
