"""Uniform forward process, exact posterior (vs brute-force Bayes), categorical sampler, per-row generators."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from duo_plugin.diffusion.uniform import (
    corrupt,
    num_valid,
    posterior,
    prior_sample,
    row_generators,
    sample_categorical,
    stable_seed,
    valid_ids,
)

F64 = torch.float64


def _kernel(alpha: float, K: int, valid: torch.Tensor) -> torch.Tensor:
    """Brute-force transition matrix M[a, b] = q(next = b | prev = a) = α 1[a=b] + (1−α)/K_eff 1[b valid]."""
    ke = int(valid.sum())
    return alpha * torch.eye(K, dtype=F64) + (1 - alpha) / ke * valid.to(F64)[None, :].expand(K, K)


def _brute_posterior(zt: int, xprob: torch.Tensor, a_t: float, a_s: float, valid: torch.Tensor) -> torch.Tensor:
    """q(z_s | z_t, x) ∝ Σ_x p(x) q(z_t | z_s) q(z_s | x), normalised (explicit Bayes over the forward kernels)."""
    K = xprob.numel()
    q_s_given_x = _kernel(a_s, K, valid)  # [x, z_s]
    q_t_given_s = _kernel(a_t / a_s, K, valid)  # [z_s, z_t]
    joint = (xprob[:, None] * q_s_given_x).sum(0) * q_t_given_s[:, zt]
    return joint / joint.sum()


@pytest.mark.parametrize("with_valid", [False, True])
def test_posterior_matches_bayes_one_hot_and_mixture(with_valid):
    K = 7
    valid = torch.ones(K, dtype=torch.bool)
    if with_valid:
        valid[[2, 5]] = False
    vv = valid if with_valid else None
    ids = valid_ids(K, vv).tolist()
    gen = torch.Generator().manual_seed(0)
    for a_t, a_s in [(0.1, 0.5), (0.3, 0.31), (0.02, 1.0), (0.9, 0.95), (0.5, 0.5)]:
        zt_list, x_list, ref = [], [], []
        for zt, x in itertools.product(ids, ids):  # one-hot x
            xp = F.one_hot(torch.tensor(x), K).to(F64)
            zt_list.append(zt), x_list.append(xp), ref.append(_brute_posterior(zt, xp, a_t, a_s, valid))
        for zt in ids:  # probability-vector x (mixture), supported on valid ids
            xp = torch.rand(K, generator=gen, dtype=F64) * valid
            xp /= xp.sum()
            zt_list.append(zt), x_list.append(xp), ref.append(_brute_posterior(zt, xp, a_t, a_s, valid))
        z = torch.tensor(zt_list)[None, :]
        xprobs = torch.stack(x_list)[None]
        out = posterior(z, xprobs, a_t, a_s, valid_vocab=vv)
        assert out.dtype == F64 and out.shape == (1, len(zt_list), K)
        torch.testing.assert_close(out[0], torch.stack(ref), rtol=1e-12, atol=1e-14)
        if with_valid:
            assert (out[..., ~valid] == 0).all()


def test_posterior_alpha_shapes_and_errors():
    K, B, L = 5, 2, 3
    gen = torch.Generator().manual_seed(1)
    z = torch.randint(0, K, (B, L), generator=gen)
    x = torch.softmax(torch.randn(B, L, K, generator=gen, dtype=F64), -1)
    a_t = torch.tensor([0.2, 0.4])
    a_s = torch.tensor([0.6, 0.9])
    out = posterior(z, x, a_t, a_s)
    out2 = posterior(z, x, a_t[:, None].expand(B, L), a_s[:, None].expand(B, L))
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out.sum(-1), torch.ones(B, L, dtype=F64))
    with pytest.raises(ValueError, match="alpha_s >= alpha_t"):
        posterior(z, x, 0.5, 0.4)
    with pytest.raises(ValueError, match=r"alpha_t must lie in \(0, 1\]"):
        posterior(z, x, 0.0, 0.4)
    with pytest.raises(ValueError, match="one-hot"):
        posterior(z, z, 0.1, 0.4)
    vv = torch.tensor([True, True, True, True, False])
    with pytest.raises(ValueError, match="outside valid_vocab"):
        posterior(torch.full((B, L), 4), x, 0.1, 0.4, valid_vocab=vv)
    with pytest.raises(ValueError, match="length"):
        posterior(z, x, 0.1, 0.4, valid_vocab=torch.ones(6, dtype=torch.bool))


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square below mean + 5 sd (df = #cells − 1)."""
    n = counts.sum()
    exp = n * probs
    stat = ((counts - exp) ** 2 / exp).sum().item()
    df = probs.numel() - 1
    return stat < df + 5 * math.sqrt(2 * df)


def test_corrupt_marginal_and_valid_vocab():
    K, n = 12, 60_000
    valid = torch.ones(K, dtype=torch.bool)
    valid[[0, 11]] = False
    gen = torch.Generator().manual_seed(3)
    x0 = torch.full((1, n), 4)
    for vv in (None, valid):
        ke = num_valid(K, vv)
        for a in (0.0, 0.3, 0.9):
            z = corrupt(x0, a, gen, vv, vocab_size=K)
            counts = torch.bincount(z.flatten(), minlength=K).to(F64)
            mask = torch.ones(K, dtype=torch.bool) if vv is None else vv
            p = (1 - a) / ke * mask.to(F64)
            p[4] += a
            assert (counts[~mask] == 0).all()
            assert _chi2_ok(counts[mask], p[mask])
    with pytest.raises(ValueError, match="vocab_size"):
        corrupt(x0, 0.5, gen)
    with pytest.raises(ValueError, match="outside"):
        corrupt(torch.full((1, 3), K), 0.5, gen, vocab_size=K)


def test_per_row_generators_make_rows_independent_of_batch_composition():
    K, L = 50, 16
    x0 = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(0))
    full = corrupt(x0, 0.4, row_generators(7, 3, [10, 11, 12, 13]), vocab_size=K)
    # the same global samples split over two "ranks"
    r0 = corrupt(x0[:2], 0.4, row_generators(7, 3, [10, 11]), vocab_size=K)
    r1 = corrupt(x0[2:], 0.4, row_generators(7, 3, [12, 13]), vocab_size=K)
    assert torch.equal(full, torch.cat([r0, r1]))
    # a different step gives different noise
    other = corrupt(x0, 0.4, row_generators(7, 4, [10, 11, 12, 13]), vocab_size=K)
    assert not torch.equal(full, other)
    with pytest.raises(ValueError, match="one generator per"):
        corrupt(x0, 0.4, row_generators(7, 3, [1, 2]), vocab_size=K)


def test_stable_seed_properties():
    seeds = {stable_seed(s, st, i) for s in range(3) for st in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= v < 2**63 for v in seeds)
    assert stable_seed(1, 2, 3) == stable_seed(1, 2, 3) != stable_seed(1, 3, 2)
    g = row_generators(1, 2, torch.tensor([3]))[0]
    ref = torch.Generator().manual_seed(stable_seed(1, 2, 3))
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))


def test_prior_sample_uniform_over_valid():
    K = 9
    valid = torch.tensor([True, False, True, True, False, True, True, True, True])
    z = prior_sample((4, 20_000), K, torch.Generator().manual_seed(5), valid_vocab=valid)
    counts = torch.bincount(z.flatten(), minlength=K).to(F64)
    assert (counts[~valid] == 0).all()
    assert _chi2_ok(counts[valid], torch.full((7,), 1 / 7, dtype=F64))
    gens = row_generators(0, 0, range(3))
    z2 = prior_sample((3, 5), K, gens, valid_vocab=valid)
    z3 = prior_sample((1, 5), K, [row_generators(0, 0, [2])[0]], valid_vocab=valid)
    assert torch.equal(z2[2:], z3)


def test_sample_categorical_frequencies_and_zero_mass():
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05], dtype=F64)
    probs = p.expand(40_000, 5) * 3.0  # unnormalised is fine
    s = sample_categorical(probs, torch.Generator().manual_seed(9))
    counts = torch.bincount(s, minlength=5).to(F64)
    assert counts[1] == 0
    nz = p > 0
    assert _chi2_ok(counts[nz], p[nz])
    # per-row generators: a row's sample doesn't depend on the other rows
    pr = torch.softmax(torch.randn(3, 6, 30, generator=torch.Generator().manual_seed(0), dtype=F64), -1)
    a = sample_categorical(pr, row_generators(1, 1, [0, 1, 2]))
    b = sample_categorical(pr[1:2], row_generators(1, 1, [1]))
    assert a.shape == (3, 6) and torch.equal(a[1:2], b)
