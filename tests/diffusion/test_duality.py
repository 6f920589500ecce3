"""Duality operator T (paper Eq. 11) against independent references: closed form (K=2), scipy quadrature,
Monte Carlo argmax frequencies, finite differences; the cached table and the CLI."""

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from duo_plugin.diffusion import duality
from duo_plugin.diffusion.duality import (
    DualityTable,
    discrete_alpha,
    discrete_alpha_and_prime,
    discrete_alpha_prime,
    gamma_window,
)

F64 = torch.float64


def _quad_I(gam: float, K: int) -> float:
    """Independent reference: scipy adaptive quadrature of ∫ φ(z−m) Φ(z)^{K−1} dz."""
    m = math.exp(-gam / 2)
    zk = math.sqrt(2 * math.log(K))
    f = lambda z: math.exp(norm.logpdf(z - m) + (K - 1) * norm.logcdf(z))  # noqa: E731
    v, _ = integrate.quad(f, min(m, zk) - 15, max(m, zk) + 15, points=[m, zk], limit=500, epsabs=1e-15, epsrel=1e-13)
    return v


def _quad_dI(gam: float, K: int) -> float:
    """The brief's form: dI/dγ = ∫ (−½ m (z − m)) φ(z − m) Φ(z)^{K−1} dz (not the by-parts form used in the code)."""
    m = math.exp(-gam / 2)
    zk = math.sqrt(2 * math.log(K))
    f = lambda z: -0.5 * m * (z - m) * math.exp(norm.logpdf(z - m) + (K - 1) * norm.logcdf(z))  # noqa: E731
    v, _ = integrate.quad(f, min(m, zk) - 15, max(m, zk) + 15, points=[m, zk], limit=500, epsabs=1e-15, epsrel=1e-12)
    return v


def test_k2_closed_form():
    # K=2: P(N(m,1) > N(0,1)) = Φ(m/√2)  =>  T = 2Φ(m/√2) − 1
    g = torch.linspace(-8, 12, 81, dtype=F64)
    m = torch.exp(-g / 2)
    ref = 2 * torch.special.ndtr(m / math.sqrt(2)) - 1
    torch.testing.assert_close(discrete_alpha(g, 2), ref, rtol=0, atol=1e-13)
    dref = math.sqrt(2) * torch.exp(-(m**2) / 4) / math.sqrt(2 * math.pi) * (-m / 2)
    torch.testing.assert_close(discrete_alpha_prime(g, 2), dref, rtol=1e-11, atol=1e-15)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("K", [3, 16, 1000, 50258, 151936, 262144])
def test_against_scipy_quadrature(K):
    gams = [-6.0, -3.55, -2.5, -1.85, 0.0, 3.0]
    a, ap = discrete_alpha_and_prime(torch.tensor(gams, dtype=F64), K)
    for j, gam in enumerate(gams):
        assert a[j].item() == pytest.approx((K * _quad_I(gam, K) - 1) / (K - 1), rel=1e-9, abs=1e-13)
        assert ap[j].item() == pytest.approx(K / (K - 1) * _quad_dI(gam, K), rel=1e-8, abs=1e-13)


@pytest.mark.parametrize("K", [2, 50258, 262144])
def test_derivative_matches_finite_difference(K):
    g = torch.tensor([-4.0, -3.0, -2.2, -1.0, 1.5], dtype=F64)
    h = 1e-5
    fd = (discrete_alpha(g + h, K) - discrete_alpha(g - h, K)) / (2 * h)
    torch.testing.assert_close(discrete_alpha_prime(g, K), fd, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("K", [2, 16, 1000])
def test_monte_carlo_full_argmax(K):
    """Draw the full K-vector α̃x + σ̃ε and count how often the argmax is the clean id (= I = T + (1 − T)/K)."""
    gen = torch.Generator().manual_seed(1234 + K)
    rows, chunks = (200_000, 1) if K <= 16 else (4_000, 5)
    for gam in [-3.0, -1.0, 1.0]:
        g = torch.tensor(gam, dtype=F64)
        at, st = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        hits = 0
        for _ in range(chunks):
            w = st * torch.randn(rows, K, generator=gen, dtype=F64)
            w[:, 0] += at
            hits += (w.argmax(1) == 0).sum().item()
        n = rows * chunks
        T = discrete_alpha(g, K).item()
        p = T + (1 - T) / K
        se = math.sqrt(p * (1 - p) / n)
        assert abs(hits / n - p) < 4 * se, (K, gam, hits / n, p, se)


@pytest.mark.parametrize("K", [50258, 262144])
def test_monte_carlo_max_inverse_cdf(K):
    """Large K: the max of K−1 iid normals is Φ^{-1}(U^{1/(K−1)}); P(m + ε > max) must equal I = T + (1 − T)/K."""
    rng = np.random.default_rng(K)
    n = 400_000
    for gam in [-3.55, -2.6, -1.85]:
        m = math.exp(-gam / 2)
        u = rng.random(n)
        mx = norm.ppf(np.exp(np.log(u) / (K - 1)))
        p_hat = float(np.mean(m + rng.standard_normal(n) > mx))
        T = discrete_alpha(gam, K).item()
        p = T + (1 - T) / K
        se = math.sqrt(p * (1 - p) / n)
        assert abs(p_hat - p) < 4 * se, (K, gam, p_hat, p)


def test_huge_vocab_finite_monotone():
    g = torch.linspace(-12, 12, 241, dtype=F64)
    a, ap = discrete_alpha_and_prime(g, 262_144)
    assert torch.isfinite(a).all() and torch.isfinite(ap).all()
    assert (a[1:] <= a[:-1]).all() and (a >= 0).all() and (a <= 1).all()
    assert (ap <= 0).all()
    assert a[0] > 1 - 1e-12 and a[-1] < 1e-3


def test_gamma_window_roundtrip_and_paper_owt():
    g0, g1 = gamma_window(50258)
    assert discrete_alpha(g0, 50258).item() == pytest.approx(0.95, abs=1e-8)
    assert discrete_alpha(g1, 50258).item() == pytest.approx(0.05, abs=1e-8)
    # paper OWT window [-3.55, -1.85] (K=50258) maps to α ≈ [0.95, 0.05]: loose sanity, not a hard-coded value
    assert abs(g0 - (-3.55)) < 0.1 and abs(g1 - (-1.85)) < 0.1
    a, b = gamma_window(16, 0.2, 0.6)
    assert discrete_alpha(a, 16).item() == pytest.approx(0.6, abs=1e-8)
    assert discrete_alpha(b, 16).item() == pytest.approx(0.2, abs=1e-8)
    with pytest.raises(ValueError, match="alpha_min"):
        gamma_window(16, 0.9, 0.1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="vocab_size"):
        discrete_alpha(0.0, 1)
    with pytest.raises(ValueError, match="finite"):
        discrete_alpha(float("nan"), 10)


def test_table_lookup_matches_direct_and_derivative_consistent(tmp_path):
    K = 50258
    tab = DualityTable.build(K, -5.0, 1.0, num_points=601)
    gen = torch.Generator().manual_seed(0)
    g = -5.0 + 6.0 * torch.rand(300, generator=gen, dtype=F64)
    a_d, ap_d = discrete_alpha_and_prime(g, K)
    torch.testing.assert_close(tab.alpha(g), a_d, rtol=0, atol=2e-9)
    torch.testing.assert_close(tab.alpha_prime(g), ap_d, rtol=0, atol=2e-6)
    # knots reproduce stored values exactly; derivative of the interpolant == its FD (consistency)
    torch.testing.assert_close(tab.alpha(tab.gammas), tab.alphas, rtol=0, atol=1e-15)
    torch.testing.assert_close(tab.alpha_prime(tab.gammas), tab.alpha_primes, rtol=0, atol=1e-12)
    h = 1e-6
    gi = g.clamp(-5 + 2 * h, 1 - 2 * h)
    fd = (tab.alpha(gi + h) - tab.alpha(gi - h)) / (2 * h)
    torch.testing.assert_close(tab.alpha_prime(gi), fd, rtol=0, atol=1e-7)
    # shape preserved
    assert tab.alpha(g.reshape(10, 30)).shape == (10, 30)
    with pytest.raises(ValueError, match="outside the table range"):
        tab.alpha(torch.tensor([1.5], dtype=F64))
    p = tmp_path / "t.pt"
    tab.save(p)
    tab2 = DualityTable.load(p, vocab_size=K)
    torch.testing.assert_close(tab2.alpha(g), tab.alpha(g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="K=50258"):
        DualityTable.load(p, vocab_size=100)


def test_table_cached(tmp_path):
    t1 = DualityTable.cached(100, -3.0, 0.0, num_points=33, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "K100" in files[0].name
    t2 = DualityTable.cached(100, -3.0, 0.0, num_points=33, cache_dir=tmp_path)
    assert torch.equal(t1.alphas, t2.alphas)


def test_cli_build(tmp_path, capsys):
    out = tmp_path / "sub" / "tab.pt"
    rc = duality.main(["build", "--vocab-size", "1000", "--gamma-min", "-4", "--gamma-max", "-1", "--num-points",
                       "101", "--out", str(out)])
    assert rc == 0
    tab = DualityTable.load(out)
    assert tab.vocab_size == 1000 and tab.gamma_min == -4.0 and tab.gamma_max == -1.0 and tab.gammas.numel() == 101
    torch.testing.assert_close(tab.alphas, discrete_alpha(tab.gammas, 1000), rtol=0, atol=0)
    assert duality.main(["build", "--vocab-size", "1000", "--gamma-min", "1", "--gamma-max", "-1",
                         "--out", str(out)]) == 2
    assert "gamma_min < gamma_max" in capsys.readouterr().err
    assert duality.main(["window", "--vocab-size", "50258"]) == 0
    assert "gamma_min=-3.5" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("duo-duality") is None, reason="console script not installed")
def test_console_script(tmp_path):
    out = tmp_path / "t.pt"
    r = subprocess.run(["duo-duality", "build", "--vocab-size", "50", "--gamma-min", "-2", "--gamma-max", "0",
                        "--num-points", "11", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert DualityTable.load(out).vocab_size == 50
