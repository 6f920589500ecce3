"""duo_plugin.objectives called directly (no recipe): losses against inline references built from the diffusion
primitives, the two phase-switch conventions agreeing, the AR objective against torch's cross-entropy, and the
noise-process interface."""

from __future__ import annotations

import pytest
import torch

from duo_plugin.diffusion import DualitySchedule, LogLinearSchedule, corrupt, curriculum_inputs, duo_nelbo
from duo_plugin.diffusion.process import NoiseProcess, UniformProcess
from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.objectives import ARObjective, DuoObjective, ObjectiveContext, objective_from_config

K, L, B, SEED = 41, 12, 4, 7
VALID = torch.ones(K, dtype=torch.bool)
VALID[-3:] = False


def _model(causal=False):
    torch.manual_seed(0)
    m = duo_dit_tiny(K, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, dropout=0.0, causal=causal)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def _batch():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, K - 3, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 9:] = False
    mask[3, 5:] = False
    return x0, mask


def _ctx(gbs=B):
    return ObjectiveContext(seed=SEED, global_batch_size=gbs, vocab_size=K, valid_vocab=VALID, seq_len=L,
                            device=torch.device("cpu"))


@pytest.mark.parametrize("step", [0, 2])
def test_duo_objective_equals_inline_reference_on_a_padded_batch(step):
    model = _model()
    obj = DuoObjective(curriculum_steps=2, tau=1e-2, gamma_min=-3.0, gamma_max=-1.0, table_points=None,
                       kernels_curriculum_input="dense", kernels_nelbo="dense")
    obj.setup(model, _ctx(gbs=2 * B))
    x0, mask = _batch()
    pos = [4, 5, 6, 7]  # the second half of a global batch of 8
    with torch.no_grad():
        loss, n, metrics = obj(model, x0, mask, pos, step)
    t = stratified_times(SEED, step, pos, 2 * B, 1e-3, dtype=torch.float64)
    gens = row_generators(SEED, step, pos)
    if step < 2:
        sched = DualitySchedule(int(VALID.sum()), -3.0, -1.0)
        z, net_in = curriculum_inputs(x0, sched.gamma(t), 1e-2, K, gens, VALID)
    else:
        sched = LogLinearSchedule(1e-3)
        z = torch.where(mask, corrupt(x0, sched.alpha(t), gens, VALID), x0)
        net_in = z
    alpha = sched.alpha(t)
    with torch.no_grad():
        logp = model(net_in, (-torch.log(alpha)).float(), padding_mask=mask)
    f = duo_nelbo(logp, z, x0, alpha, sched.alpha_prime(t), VALID)
    assert metrics["phase"] == ("curriculum" if step < 2 else "discrete")
    assert n == int(mask.sum()) == obj.count_tokens(mask)
    torch.testing.assert_close(loss, torch.where(mask, f, torch.zeros(())).sum(), rtol=1e-6, atol=1e-6)


def test_reference_code_phase_switch_matches_step_count_form_before_the_last_step():
    """``curriculum_end``/``tau_end`` (fairseq2 trainer) vs ``curriculum_steps`` (recipes): same loss at step 0;
    the reference schedule drops τ to 1e-10 at ``curriculum_end`` itself (still curriculum)."""
    model = _model()
    a = DuoObjective(curriculum_steps=3, tau=1e-2, gamma_min=-3.0, gamma_max=-1.0, table_points=65)
    b = DuoObjective(curriculum_start=0, curriculum_end=2, tau=1e-2, tau_end=1e-2, gamma_min=-3.0, gamma_max=-1.0,
                     table_points=65)
    for o in (a, b):
        o.setup(model, _ctx())
    x0, mask = _batch()
    with torch.no_grad():
        assert torch.equal(a(model, x0, mask, range(B), 0)[0], b(model, x0, mask, range(B), 0)[0])
    assert [a.phase(s) for s in range(4)] == [b.phase(s) for s in range(4)] == ["curriculum"] * 3 + ["discrete"]
    assert a.tau_at(2) == 1e-2 and b.tau_at(2) == pytest.approx(1e-10)


def test_ar_objective_equals_cross_entropy_over_real_pairs():
    model = _model(causal=True)
    obj = ARObjective()
    obj.setup(model, _ctx())
    x0, mask = _batch()
    with torch.no_grad():
        loss, n, _ = obj(model, x0, mask, range(B), 0)
        logits = model(x0, torch.zeros(B), padding_mask=mask)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, K), x0[:, 1:].reshape(-1), reduction="none")
    pair = (mask[:, 1:] & mask[:, :-1]).reshape(-1)
    assert n == int(pair.sum())
    torch.testing.assert_close(loss, ce[pair].sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        ARObjective().setup(_model(causal=False), _ctx())


def test_objective_from_config_errors_name_the_key():
    with pytest.raises(ValueError, match="kernels.nelbo"):
        objective_from_config({"objective": "duo", "kernels": {"nelbo": "fast"}})
    with pytest.raises(ValueError, match="curriculum.steps must be 0"):
        objective_from_config({"objective": "ar", "curriculum": {"steps": 5}})
    with pytest.raises(ValueError, match="objective must be"):
        objective_from_config({"objective": "mdlm"})
    obj = objective_from_config({"objective": {"_component_": "duo_plugin.objectives.ARObjective"}})
    assert isinstance(obj, ARObjective)


def test_uniform_process_implements_the_noise_process_interface():
    """The interface a second process (absorbing) implements; the uniform one's posterior rows sum to 1 and put no
    mass on invalid ids, its prior and corruption draw only valid ids, and ``corrupt`` at α = 1 is the identity."""
    proc = UniformProcess(K, VALID)
    assert isinstance(proc, NoiseProcess)
    x0, _ = _batch()
    g = row_generators(0, 0, range(B))
    assert torch.equal(proc.corrupt(x0, torch.ones(B, dtype=torch.float64), g), x0)
    z = proc.corrupt(x0, torch.full((B,), 0.3, dtype=torch.float64), g)
    prior = proc.prior_sample((B, L), torch.Generator().manual_seed(0))
    assert bool(VALID[z].all()) and bool(VALID[prior].all())
    post = proc.posterior(z, torch.nn.functional.one_hot(x0, K).double(), 0.3, 0.6)
    torch.testing.assert_close(post.sum(-1), torch.ones(B, L, dtype=torch.float64))
    assert float(post[..., ~VALID].abs().max()) == 0.0
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    torch.testing.assert_close(proc.alpha(t), 1 - (1 - 1e-3) * t)
