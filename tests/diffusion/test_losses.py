"""NELBO (f_Duo) vs the textbook UDLM form, tightness on a toy distribution, curriculum latents, DCD pairs, KL."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duo_plugin.diffusion.duality import discrete_alpha
from duo_plugin.diffusion.losses import curriculum_inputs, dcd_pair, distillation_kl, duo_nelbo, gaussian_latent
from duo_plugin.diffusion.uniform import row_generators

F64 = torch.float64


def udlm_reference(log_x_theta, z_t, x0, alpha, alpha_prime, valid=None):
    """Test-only UDLM NELBO (docs/method.md §1.3, paper Eq. 48–49) building x̄ and x̄_θ explicitly, fp64.

    f = α'/(Kα) [K/x̄_i − K/(x̄_θ)_i − Σ_j (x̄_j/x̄_i) log((x̄_θ)_i x̄_j / ((x̄_θ)_j x̄_i))]; with ``valid`` the
    vocabulary is restricted to the valid ids and x_θ renormalised over them.
    """
    B, L, K = log_x_theta.shape
    out = torch.empty(B, L, dtype=F64)
    cols = torch.arange(K) if valid is None else torch.nonzero(valid).flatten()
    Ke = cols.numel()
    for b in range(B):
        for l in range(L):
            a = float(alpha[b]) if torch.as_tensor(alpha).dim() else float(alpha)
            ap = float(alpha_prime[b]) if torch.as_tensor(alpha_prime).dim() else float(alpha_prime)
            xt = log_x_theta[b, l, cols].double().exp()
            xt = xt / xt.sum()
            x = (cols == x0[b, l]).double()
            i = int((cols == z_t[b, l]).nonzero())
            xbar = Ke * a * x + (1 - a)
            xbt = Ke * a * xt + (1 - a)
            s = (xbar / xbar[i] * torch.log(xbt[i] * xbar / (xbt * xbar[i]))).sum()
            out[b, l] = ap / (Ke * a) * (Ke / xbar[i] - Ke / xbt[i] - s)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_valid", [False, True])
def test_duo_nelbo_equals_udlm(dtype, with_valid):
    gen = torch.Generator().manual_seed(0)
    B, L, K = 4, 6, 11
    valid = torch.ones(K, dtype=torch.bool)
    if with_valid:
        valid[[0, 7]] = False
    vv = valid if with_valid else None
    ids = torch.nonzero(valid).flatten()
    logits = 2.0 * torch.randn(B, L, K, generator=gen, dtype=F64)
    log_x = torch.log_softmax(logits, -1).to(dtype)
    x0 = ids[torch.randint(0, ids.numel(), (B, L), generator=gen)]
    z_t = ids[torch.randint(0, ids.numel(), (B, L), generator=gen)]
    z_t[:, :3] = x0[:, :3]  # both z_t = x and z_t ≠ x cases
    alpha = torch.tensor([0.001, 0.2, 0.7, 0.999], dtype=F64)
    alpha_p = torch.tensor([-0.999, -1.0, -0.3, -2.0], dtype=F64)
    got = duo_nelbo(log_x, z_t, x0, alpha, alpha_p, valid_vocab=vv)
    ref = udlm_reference(log_x, z_t, x0, alpha, alpha_p, valid)
    assert got.dtype == torch.float32 and got.shape == (B, L)
    assert (ref >= 0).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-9 if dtype == F64 else 1e-6)
    # [B, L] alpha gives the same
    got2 = duo_nelbo(log_x, z_t, x0, alpha[:, None].expand(B, L), alpha_p[:, None].expand(B, L), valid_vocab=vv)
    torch.testing.assert_close(got, got2)


def test_duo_nelbo_large_vocab_fp32_close_to_fp64():
    gen = torch.Generator().manual_seed(1)
    B, L, K = 2, 3, 50258
    log_x = torch.log_softmax(3 * torch.randn(B, L, K, generator=gen, dtype=F64), -1)
    x0 = torch.randint(0, K, (B, L), generator=gen)
    z_t = x0.clone()
    z_t[:, 0] = (x0[:, 0] + 1) % K
    for a in (0.001, 0.5, 0.99):
        ref = duo_nelbo(log_x, z_t, x0, a, -0.999)
        got = duo_nelbo(log_x.float(), z_t, x0, a, -0.999)
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-5)


def test_duo_nelbo_input_errors():
    log_x = torch.log_softmax(torch.randn(1, 2, 5), -1)
    z = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        duo_nelbo(log_x, z, z, 1.0, -1.0)
    with pytest.raises(ValueError, match="alpha_prime_t"):
        duo_nelbo(log_x, z, z, 0.5, 1.0)
    with pytest.raises(ValueError, match="outside"):
        duo_nelbo(log_x, z + 5, z, 0.5, -1.0)
    with pytest.raises(ValueError, match="shape"):
        duo_nelbo(log_x, z, z, torch.tensor([0.5, 0.5, 0.5]), -1.0)
    with pytest.raises(ValueError, match="length"):
        duo_nelbo(log_x, z, z, 0.5, -1.0, valid_vocab=torch.ones(4, dtype=torch.bool))


def _integrated_nelbo(p: torch.Tensor, x: int, denoiser, n_nodes: int) -> float:
    """∫_0^1 E_{z_t ~ q_t(·|x)} f dt with α = 1 − t, exact enumeration over z_t (L = 1).

    Gauss–Legendre in v with t = v³ (dt = 3v² dv) to tame the t → 0 endpoint behaviour of the integrand.
    """
    K = p.numel()
    u, w = np.polynomial.legendre.leggauss(n_nodes)
    v = torch.tensor((u + 1) / 2, dtype=F64)
    t = v**3
    wt = torch.tensor(w / 2, dtype=F64) * 3 * v**2
    alpha = 1 - t  # [T]
    a_rep = alpha.repeat_interleave(K)
    z_t = torch.arange(K).repeat(t.numel())[:, None]
    x0 = torch.full_like(z_t, x)
    log_x = denoiser(z_t.squeeze(1), a_rep).log()[:, None, :]
    f = duo_nelbo(log_x, z_t, x0, a_rep, -torch.ones_like(a_rep)).double().view(t.numel(), K)
    qz = alpha[:, None] * F.one_hot(torch.tensor(x), K).double() + (1 - alpha[:, None]) / K
    return (wt[:, None] * qz * f).sum().item()


def test_nelbo_is_tight_for_data_distribution_and_larger_otherwise():
    K = 4
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=F64)

    def exact(z, a):  # x_θ ≡ p: makes the L = 1 bound tight
        return p.expand(z.numel(), K)

    def post_mean(z, a):  # E[x | z_t] ∝ p(x) q_t(z_t | x): NOT the tight choice
        q = a[:, None] * F.one_hot(z, K).double() + (1 - a[:, None]) / K
        r = p[None, :] * q
        return r / r.sum(-1, keepdim=True)

    pert = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)

    def perturbed(z, a):
        return pert.expand(z.numel(), K)

    gaps_pm, gaps_pt = [], []
    for x in range(K):
        nll = -math.log(p[x])
        errs = [abs(_integrated_nelbo(p, x, exact, n) - nll) for n in (8, 16, 40)]
        assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7, (x, errs)  # → −log p(x) as the t-grid refines
        gaps_pm.append(_integrated_nelbo(p, x, post_mean, 40) - nll)
        gaps_pt.append(_integrated_nelbo(p, x, perturbed, 40) - nll)
    for gaps in (gaps_pm, gaps_pt):
        assert max(gaps) > 1e-3
        assert float((p * torch.tensor(gaps, dtype=F64)).sum()) > 1e-3


def test_gaussian_latent_argmax_marginal_is_duality_categorical():
    K_full, n = 20, 20_000
    valid = torch.ones(K_full, dtype=torch.bool)
    valid[[3, 17, 18, 19]] = False  # K_eff = 16
    gen = torch.Generator().manual_seed(11)
    x0 = torch.full((2, n), 5)
    for gamma in (-2.0, 0.5):
        w = gaussian_latent(x0, gamma, K_full, gen, valid_vocab=valid)
        assert w.dtype == torch.float32 and torch.isneginf(w[..., ~valid]).all()
        z = w.argmax(-1).flatten()
        counts = torch.bincount(z, minlength=K_full).double()
        assert (counts[~valid] == 0).all()
        T = discrete_alpha(gamma, 16).item()
        probs = valid.double() * (1 - T) / 16
        probs[5] += T
        exp = counts.sum() * probs[valid]
        stat = ((counts[valid] - exp) ** 2 / exp).sum().item()
        assert stat < 15 + 5 * math.sqrt(30), (gamma, stat)
        # the clean-token frequency within 4 standard errors
        pc = probs[5].item()
        assert abs(counts[5].item() / z.numel() - pc) < 4 * math.sqrt(pc * (1 - pc) / z.numel())


def test_curriculum_inputs_hard_and_soft_from_one_sample():
    K = 30
    x0 = torch.randint(0, K, (3, 8), generator=torch.Generator().manual_seed(0))
    w = gaussian_latent(x0, -1.0, K, torch.Generator().manual_seed(5))
    prev = None
    for tau in (1.0, 0.1, 1e-3):
        z, soft = curriculum_inputs(x0, -1.0, tau, K, torch.Generator().manual_seed(5))
        assert torch.equal(z, w.argmax(-1))
        torch.testing.assert_close(soft, w / tau)
        dist = (torch.softmax(soft, -1) - F.one_hot(z, K).float()).abs().sum(-1).max().item()
        if prev is not None:
            assert dist <= prev + 1e-7
        prev = dist
    assert prev < 1e-3
    with pytest.raises(ValueError, match="tau"):
        curriculum_inputs(x0, -1.0, 0.0, K, torch.Generator())


def test_per_row_generators_for_latents():
    K = 12
    x0 = torch.randint(0, K, (3, 5), generator=torch.Generator().manual_seed(0))
    a = gaussian_latent(x0, torch.tensor([-1.0, 0.0, 1.0]), K, row_generators(0, 1, [0, 1, 2]))
    b = gaussian_latent(x0[1:2], torch.tensor([0.0]), K, row_generators(0, 1, [1]))
    torch.testing.assert_close(a[1:2], b)


def test_dcd_pair_shared_epsilon_trajectory():
    K = 40
    gen_seed = 21
    x0 = torch.randint(0, K, (4, 64), generator=torch.Generator().manual_seed(1))
    gammas = torch.linspace(-5, 4, 30, dtype=F64)
    traj = [dcd_pair(x0, g, g, K, torch.Generator().manual_seed(gen_seed))[0] for g in gammas]
    traj = torch.stack(traj)  # [G, B, L]
    # cross-check with the explicit argmax of α̃x + σ̃ε on the same ε
    for gi in (0, 13, 29):
        w = gaussian_latent(x0, gammas[gi].item(), K, torch.Generator().manual_seed(gen_seed))
        assert torch.equal(traj[gi], w.argmax(-1))
    flips = (traj[1:] != traj[:-1]).sum(0)
    assert flips.max() <= 1 and flips.sum() > 0
    assert (traj[0] == x0).float().mean() > 0.9 and (traj[-1] == x0).float().mean() < 0.3
    z_t, z_s = dcd_pair(x0, 0.5, -2.0, K, torch.Generator().manual_seed(gen_seed))
    assert ((z_t == x0) <= (z_s == x0)).all()
    # where z_s ≠ x, z_t equals z_s (same runner-up)
    assert torch.equal(z_t[z_s != x0], z_s[z_s != x0])
    with pytest.raises(ValueError, match="gamma_s <= gamma_t"):
        dcd_pair(x0, -2.0, 0.5, K, torch.Generator())


def test_distillation_kl():
    gen = torch.Generator().manual_seed(0)
    s = torch.log_softmax(torch.randn(2, 3, 9, generator=gen, dtype=F64), -1)
    t = torch.log_softmax(torch.randn(2, 3, 9, generator=gen, dtype=F64), -1)
    assert torch.equal(distillation_kl(s, s), torch.zeros(2, 3))
    ps, pt = s.exp(), t.exp()
    bwd = sum(ps[..., j] * (s[..., j] - t[..., j]) for j in range(9))
    fwd = sum(pt[..., j] * (t[..., j] - s[..., j]) for j in range(9))
    torch.testing.assert_close(distillation_kl(s, t).double(), bwd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(distillation_kl(s, t, "fwd").double(), fwd, rtol=1e-6, atol=1e-7)
    assert (distillation_kl(s, t) > 0).all()
    # zero-probability entries contribute 0 (no NaN)
    s2 = s.clone()
    s2[..., 0] = float("-inf")
    s2 = s2 - torch.logsumexp(s2, -1, keepdim=True)
    assert torch.isfinite(distillation_kl(s2, t)).all()
    with pytest.raises(ValueError, match="direction"):
        distillation_kl(s, t, "sideways")
    with pytest.raises(ValueError, match="same shape"):
        distillation_kl(s, t[..., :5])
