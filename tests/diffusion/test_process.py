"""The one process class per noise process (diffusion/process.py, diffusion/absorbing.py): the protocol, the forward
marginal q_α(· | x) against its closed form (docs/method.md §1), its agreement with Monte Carlo of ``corrupt``, and
the schedule inverse t_for_alpha against the closed-form inverse of the log-linear schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import duo_plugin.sampling as sampling
from duo_plugin.diffusion.absorbing import AbsorbingProcess
from duo_plugin.diffusion.process import NoiseProcess, UniformProcess
from duo_plugin.diffusion.schedules import DualitySchedule, LogLinearSchedule, t_for_alpha


def test_one_class_per_process_everywhere():
    assert sampling.UniformProcess is UniformProcess  # the sampler re-exports the diffusion class
    for proc in (UniformProcess(6), AbsorbingProcess(6)):
        assert isinstance(proc, NoiseProcess)


def test_uniform_marginal_closed_form():
    valid = torch.tensor([True, False, True, True, False, True])
    proc = UniformProcess(6, valid)
    x = torch.tensor([[0.5, 0.0, 0.25, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([0.3, 0.8], dtype=torch.float64)
    got = proc.marginal(x, a).numpy()
    u = np.array([1, 0, 1, 1, 0, 1]) / 4.0
    want = np.stack([0.3 * x[0].numpy() + 0.7 * u, 0.8 * x[1].numpy() + 0.2 * u])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert got.dtype == np.float64 and proc.k_eff == 4 and proc.fill_id == 0
    assert UniformProcess(6, torch.tensor([False, False, True, True, True, True])).fill_id == 2


def test_uniform_marginal_matches_corrupt_monte_carlo():
    """q_α(· | one-hot x0) is the law of corrupt(x0, α): empirical frequencies of 40,000 draws within 5 sigma."""
    K, N, alpha, x0 = 5, 40_000, 0.35, 3
    valid = torch.tensor([True, True, False, True, True])
    proc = UniformProcess(K, valid)
    z = proc.corrupt(torch.full((N, 1), x0), alpha, torch.Generator().manual_seed(0))[:, 0]
    freq = np.bincount(z.numpy(), minlength=K) / N
    p = proc.marginal(torch.nn.functional.one_hot(torch.tensor(x0), K).double(), alpha).numpy()
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / N) + 1e-12), (freq, p)


def test_absorbing_marginal_closed_form_and_monte_carlo():
    W, N = 5, 40_000  # data ids 0..3, mask id 4
    proc = AbsorbingProcess(W)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    np.testing.assert_allclose(proc.marginal(x, 0.25).numpy(), [0.025, 0.05, 0.075, 0.1, 0.75], rtol=0, atol=1e-15)
    z = proc.corrupt(torch.full((N, 1), 2), 0.25, torch.Generator().manual_seed(1))[:, 0]
    freq = np.bincount(z.numpy(), minlength=W) / N
    p = np.array([0, 0, 0.25, 0, 0.75])
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / N) + 1e-12), (freq, p)


@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.01])
def test_t_for_alpha_inverts_the_schedule(alpha):
    eps = 1e-3
    want = (1 - alpha) / (1 - eps)  # log-linear: α_t = 1 − (1 − ε) t
    for proc in (UniformProcess(4, schedule=LogLinearSchedule(eps)), AbsorbingProcess(4)):
        assert proc.t_for_alpha(alpha) == pytest.approx(want, abs=1e-12)
    dual = DualitySchedule(50, -3.0, 3.0)  # α from 0.977 (t = 0) down to 0.0127 (t = 1); no closed-form inverse
    target = 0.0127 + 0.96 * alpha
    t = t_for_alpha(dual, target)
    assert 0 < t < 1 and float(dual.alpha(torch.tensor(t, dtype=torch.float64))) == pytest.approx(target, abs=1e-12)
