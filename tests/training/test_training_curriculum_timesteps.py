"""Curriculum phase / τ schedule against the reference-code formula; topology-free stratified times."""

import math

import pytest
import torch

from duo_plugin.data.text import GlobalBatchSampler, shard
from duo_plugin.training.curriculum import CurriculumPhase
from duo_plugin.diffusion.schedules import micro_batch_generators, micro_batch_times


def test_constant_tau_paper_setting():
    c = CurriculumPhase(0, 500_000, 1e-3, 1e-3, -3.55, -1.85)
    for s in (0, 1, 250_000, 499_999):
        info = c.at(s)
        assert info.phase == "curriculum" and info.tau == pytest.approx(1e-3)
    assert c.phase(500_000) == "curriculum"  # code: discrete only when global_step > curriculum_end
    assert c.phase(500_001) == "discrete" and c.tau(500_001) is None
    assert c.at(0).gamma(0.0) == -3.55 and c.at(0).gamma(1.0) == pytest.approx(-1.85)


def test_log10_linear_anneal():
    c = CurriculumPhase(100, 200, tau_start=1e-1, tau_end=1e-2, gamma_min=-3.5, gamma_max=-1.75)
    assert c.tau(50) == pytest.approx(0.1)  # before start: tau_start
    for s in (100, 125, 150, 199):
        frac = (s - 100) / 100
        assert c.tau(s) == pytest.approx(10 ** (-1 - frac), rel=1e-12)
    assert c.tau(150) == pytest.approx(1 / math.sqrt(1000))
    assert c.tau(200) == pytest.approx(1e-10)  # code sets log10 tau = -10 at the end step
    assert c.tau(201) is None


def test_disabled_curriculum_and_errors():
    assert CurriculumPhase(0, -1).phase(0) == "discrete"
    with pytest.raises(ValueError, match="curriculum_start <= curriculum_end"):
        CurriculumPhase(10, 5)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        CurriculumPhase(gamma_min=-1.0, gamma_max=-2.0)


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_times_do_not_depend_on_topology(world_size, grad_accum):
    B, seed, step = 8, 5, 3
    sampler = GlobalBatchSampler(40, B, seed)
    full = micro_batch_times(seed, step, range(B), B)
    # stratified: exactly one sample per stratum [i/N, (i+1)/N) before the t_min affine map
    raw = (full.double() - 1e-3) / (1 - 1e-3)
    assert sorted(torch.floor(raw * B).long().tolist()) == list(range(B))
    got = torch.empty(B)
    for r in range(world_size):
        for m in range(grad_accum):
            _, pos = shard(sampler.indices(step), r, world_size, m, grad_accum)
            got[pos] = micro_batch_times(seed, step, pos, B)
            g = micro_batch_generators(seed, step, pos)
            ref = micro_batch_generators(seed, step, range(B))
            for gi, p in zip(g, pos):
                assert torch.equal(torch.rand(2, generator=gi), torch.rand(2, generator=ref[p]))
    assert torch.equal(got, full)
    assert not torch.equal(micro_batch_times(seed, step + 1, range(B), B), full)
    with pytest.raises(ValueError, match="positions must lie in"):
        micro_batch_times(seed, step, [B], B)
