"""DCD pure logic (duo_plugin.training.distill) against independent references: trajectories from one shared ε,
z_s at least as clean as z_t, the round/δ schedule, the time convention, σ = −log T(γ), KL = 0 for s = t."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.diffusion.duality import discrete_alpha
from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.training import distill as D

K, B, L = 11, 3, 40


def _reference_trajectory(x0, gammas, seeds):
    """argmax(α̃ onehot(x) + σ̃ ε) computed directly, with ε drawn here from the same per-row seeds (one ε per row
    for all γ): the definition of a deterministic discrete trajectory (paper Suppl. B.2.1)."""
    eps = torch.stack([torch.randn(L, K, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()
    onehot = torch.nn.functional.one_hot(x0, K).double()
    out = []
    for g in gammas:
        a, s = math.sqrt(1 / (1 + math.exp(g))), math.sqrt(1 / (1 + math.exp(-g)))
        out.append((a * onehot + s * eps).argmax(-1))
    return torch.stack(out)  # [G, B, L]


def _alpha(g):
    return discrete_alpha(g, K)


def _cheap(g):  # any decreasing map: only the ids are checked where this is used
    return torch.sigmoid(-g)


def test_pairs_share_epsilon_and_tokens_flip_at_most_once():
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(0))
    seeds = [101, 202, 303]
    gmin, gmax = -4.0, 3.0
    ts = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    gammas = [gmin + float(t) * (gmax - gmin) for t in ts]
    ref = _reference_trajectory(x0, gammas, seeds)
    # Pairs (t_i, s = t_{i-3}) for every i: both members equal the single-ε reference trajectory.
    for i in range(3, len(ts)):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        b = D.dcd_batch(x0, ts[i].expand(B), ts[i - 3].expand(B), gamma_min=gmin, gamma_max=gmax, alpha_fn=_cheap,
                        vocab_size=K, generator=gens)
        assert torch.equal(b.z_t, ref[i]) and torch.equal(b.z_s, ref[i - 3])
    # Along a trajectory each token changes at most once (x0 -> the ε runner-up), and the trajectory covers both ends.
    changes = (ref[1:] != ref[:-1]).sum(0)
    assert int(changes.max()) <= 1
    assert torch.equal(ref[0], x0)  # γ = −4 with K = 11: clean at this seed
    assert bool((ref[-1] != x0).any()) and bool(changes.sum() > 0)
    # Independent noise per pair would break the coupling: a different seed for z_s gives a different z_s.
    g_other = [torch.Generator().manual_seed(s + 1) for s in seeds]
    b2 = D.dcd_batch(x0, ts[30].expand(B), ts[30].expand(B), gamma_min=gmin, gamma_max=gmax, alpha_fn=_alpha,
                     vocab_size=K, generator=g_other)
    assert not torch.equal(b2.z_s, ref[30])


def test_z_s_is_at_least_as_clean_as_z_t():
    x0 = torch.randint(0, K, (8, L), generator=torch.Generator().manual_seed(1))
    t = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.1
    s = t - 0.1
    b = D.dcd_batch(x0, t, s, gamma_min=-4.0, gamma_max=2.0, alpha_fn=_alpha, vocab_size=K,
                    generator=row_generators(0, 0, range(8)))
    clean_t, clean_s = b.z_t == x0, b.z_s == x0
    assert bool((clean_s | ~clean_t).all())  # clean at t => clean at s
    assert bool((clean_s.sum(1) >= clean_t.sum(1)).all())
    # Where z_t is corrupted and z_s is not, z_t is the runner-up, never a fresh random id: z_t == z_s elsewhere.
    assert bool(((b.z_t == b.z_s) | (clean_s & ~clean_t)).all())
    with pytest.raises(ValueError, match="s <= t"):
        D.dcd_batch(x0, s, t, gamma_min=-4.0, gamma_max=2.0, alpha_fn=_alpha, vocab_size=K,
                    generator=row_generators(0, 0, range(8)))


def test_conditioning_is_minus_log_discrete_alpha_of_gamma():
    x0 = torch.zeros(2, 4, dtype=torch.long)
    t = torch.tensor([0.25, 1.0], dtype=torch.float64)
    s = torch.tensor([0.0, 0.5], dtype=torch.float64)
    b = D.dcd_batch(x0, t, s, gamma_min=-4.0, gamma_max=-1.0, alpha_fn=_alpha, vocab_size=K,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.gamma_t, torch.tensor([-3.25, -1.0], dtype=torch.float64))
    torch.testing.assert_close(b.gamma_s, torch.tensor([-4.0, -2.5], dtype=torch.float64))
    torch.testing.assert_close(b.sigma_t.double(), -torch.log(discrete_alpha(b.gamma_t, K)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.sigma_s.double(), -torch.log(discrete_alpha(b.gamma_s, K)), rtol=1e-6, atol=1e-7)
    assert bool((b.sigma_t > b.sigma_s).all())


def test_distill_times_code_convention():
    n, delta = 16, 1 / 8
    t, s = D.distill_times(5, 7, range(n), n, delta, t_min=1e-3)
    raw = stratified_times(5, 7, range(n), n, 1e-3, dtype=torch.float64)
    torch.testing.assert_close(t, torch.clamp(raw + delta, max=1.0))
    torch.testing.assert_close(t - s, torch.full((n,), delta, dtype=torch.float64))
    assert float(s.min()) >= 1e-3 - 1e-12 and float(t.max()) <= 1.0
    assert bool((t == 1.0).any())  # the point mass at t = 1 of the code's shift-and-clip
    # Per-position (world-size free): a subset of positions gets the same times.
    t2, s2 = D.distill_times(5, 7, [3, 9], n, delta)
    torch.testing.assert_close(t2, t[[3, 9]])


def test_schedule_rounds_delta_and_refresh_steps():
    sch = D.DistillSchedule(rounds=5, steps_per_round=10_000)
    assert sch.total_steps == 50_000
    assert [sch.delta(r * 10_000) for r in range(5)] == [1 / 512, 1 / 256, 1 / 128, 1 / 64, 1 / 32]
    assert sch.delta(9_999) == 1 / 512 and sch.delta(10_000) == 1 / 256 and sch.delta(60_000) == 1 / 32
    small = D.DistillSchedule(rounds=3, steps_per_round=4, delta0=0.01)
    assert [s for s in range(20) if small.refreshes_teacher(s)] == [0, 4, 8]
    assert [s for s in range(20) if small.ends_round(s)] == [3, 7, 11]
    with pytest.raises(ValueError, match="delta"):
        D.DistillSchedule(rounds=10, steps_per_round=1, delta0=1 / 256)


def test_kl_zero_for_same_network_at_s_equal_t_and_positive_otherwise():
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(0)
    net = duo_dit_tiny(K, L, dim=16, n_layers=1, n_heads=2, cond_dim=8)
    with torch.no_grad():  # make the zero-initialised output layer non-trivial
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(3))
    t = torch.full((B,), 0.6, dtype=torch.float64)
    same = D.dcd_batch(x0, t, t, gamma_min=-4.0, gamma_max=2.0, alpha_fn=_alpha, vocab_size=K,
                       generator=row_generators(0, 0, range(B)))
    assert torch.equal(same.z_t, same.z_s)
    for direction in ("bwd", "fwd"):
        kl = D.dcd_token_losses(net, net, same, direction=direction)
        assert kl.shape == (B, L) and float(kl.detach().abs().max()) < 1e-6
    apart = D.dcd_batch(x0, t, t - 0.4, gamma_min=-4.0, gamma_max=2.0, alpha_fn=_alpha, vocab_size=K,
                        generator=row_generators(0, 0, range(B)))
    kl = D.dcd_token_losses(net, net, apart)
    # Independent reference: Σ p_S (log p_S − log p_T) with p_S from z_t, p_T from z_s.
    with torch.no_grad():
        ls, lt = net(apart.z_t, apart.sigma_t).double(), net(apart.z_s, apart.sigma_s).double()
    torch.testing.assert_close(kl.double(), (ls.exp() * (ls - lt)).sum(-1), rtol=1e-4, atol=1e-6)
    assert float(kl.detach().mean()) > 1e-4
    # Gradient flows to the student only through z_t's forward (teacher under no_grad).
    net.zero_grad()
    D.dcd_token_losses(net, net, apart).mean().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_gamma_window_paper_default_and_matching():
    assert D.distill_gamma_window(1000, -4.0, -1.0) == (-4.0, -1.0)
    a_min, a_max = D.paper_alpha_window()
    assert 0.0 < a_min < 0.02 and 0.99 < a_max < 1.0
    gmin, gmax = D.distill_gamma_window(320)
    got = discrete_alpha(torch.tensor([gmin, gmax], dtype=torch.float64), 320)
    torch.testing.assert_close(got, torch.tensor([a_max, a_min], dtype=torch.float64), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="both"):
        D.distill_gamma_window(320, -4.0, None)


def test_copy_weights_and_quality_table_layout(tmp_path):
    from duo_plugin.models.dit import duo_dit_tiny

    a = duo_dit_tiny(K, 8, dim=16, n_layers=1, n_heads=2, cond_dim=8)
    b = duo_dit_tiny(K, 8, dim=16, n_layers=1, n_heads=2, cond_dim=8)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    D.copy_weights_(b, a)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rows = [{"model": "base", "sampler": "ancestral", "steps": 64, "gen_ppl": 80.5, "entropy": 5.5,
             "sample_seconds": 2.0},
            {"model": "base", "sampler": "greedy", "steps": 64, "gen_ppl": 70.25, "entropy": 5.2,
             "sample_seconds": 2.1},
            {"model": "round1", "sampler": "ancestral", "steps": 8, "gen_ppl": None, "entropy": 5.4,
             "sample_seconds": 0.3}]
    jp, mp = D.write_quality_table(rows, tmp_path / "t", title="x")
    md = mp.read_text()
    assert "| base | 64 | 80.50 / 5.50 | 70.25 / 5.20 | 2.00 |" in md
    assert "| round1 | 8 | n/a / 5.40 | – | 0.30 |" in md
    import json

    assert json.loads(jp.read_text())["rows"] == rows
