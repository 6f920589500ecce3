"""The fairseq2 TrainUnit computes its loss with the library objective that duo_pretrain uses
(``duo_plugin.objectives.DuoObjective``): its (loss sum, token count) equal (a) an independent inline computation
from the diffusion primitives (stratified times, per-sample generators, curriculum inputs / corruption, NELBO,
padding excluded with ``where``), and (b) the same DuoObjective built the way duo_pretrain builds it from the
short-form config. Padded rows are included: the unit used to multiply by the mask (``per_tok * mask``), which
lets a non-finite value at a pad leak into the sum.

Runs only in the fairseq2 lane (scripts/test-fairseq2); skipped where fairseq2 is not installed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fairseq2")

import torch  # noqa: E402

from duo_plugin.diffusion import DualitySchedule, LogLinearSchedule, corrupt, curriculum_inputs, duo_nelbo  # noqa
from duo_plugin.diffusion.schedules import stratified_times  # noqa: E402
from duo_plugin.diffusion.uniform import row_generators  # noqa: E402
from duo_plugin.integrations.fairseq2.data import DuoBatch  # noqa: E402
from duo_plugin.integrations.fairseq2.recipe import DuoObjectiveSection, DuoTrainUnit  # noqa: E402
from duo_plugin.models.dit import duo_dit_tiny  # noqa: E402
from duo_plugin.objectives import ObjectiveContext, objective_from_config  # noqa: E402

K, L, B = 41, 12, 4
SEED = 7


class _Recorder:
    """Collects the unit's metric updates (only the values it reports are checked, not fairseq2's bag)."""

    def __init__(self):
        self.updates = []

    def get(self, name, kind):
        rec = self

        class _M:
            def update(self, value, weight=None):
                rec.updates.append((name, value, weight))

        return _M()


def _model():
    torch.manual_seed(0)
    m = duo_dit_tiny(K, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def _batch():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, K - 3, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 9:] = False
    mask[3, 5:] = False
    return x0, mask


@pytest.mark.parametrize("step", [0, 3])  # curriculum (step <= curriculum_end = 1), discrete
def test_unit_loss_equals_inline_reference_and_pretrain_objective(step):
    valid = torch.ones(K, dtype=torch.bool)
    valid[-3:] = False
    model = _model().eval()  # dropout 0 anyway; eval keeps the comparison deterministic
    cfg = DuoObjectiveSection(curriculum_end=1, tau_start=1e-2, tau_end=1e-2, gamma_min=-3.0, gamma_max=-1.0,
                              ema_decay=None, export_native=False)
    unit = DuoTrainUnit(model, model, cfg, valid_vocab=valid, seed=SEED, batch_size=B, world_size=1, rank=0,
                        num_accumulate=1, seq_len=L)
    unit.set_step_nr(step + 1)
    x0, mask = _batch()
    with torch.no_grad():
        loss, n = unit.process_batch(DuoBatch(x0, mask), _Recorder())

    # (a) inline reference from the primitives
    pos = list(range(B))
    t = stratified_times(SEED, step, pos, B, 1e-3, dtype=torch.float64)
    gens = row_generators(SEED, step, pos)
    if step <= 1:
        sched = DualitySchedule(int(valid.sum()), -3.0, -1.0)
        z, net_in = curriculum_inputs(x0, sched.gamma(t), 1e-2, K, gens, valid)
    else:
        sched = LogLinearSchedule(1e-3)
        z = torch.where(mask, corrupt(x0, sched.alpha(t), gens, valid), x0)
        net_in = z
    alpha, alpha_p = sched.alpha(t), sched.alpha_prime(t)
    with torch.no_grad():
        logp = model(net_in, (-torch.log(alpha)).float(), padding_mask=mask)
    f = duo_nelbo(logp, z, x0, alpha, alpha_p, valid)
    ref = torch.where(mask, f, torch.zeros(())).sum()
    assert n == int(mask.sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)

    # (b) duo_pretrain's objective object (short-form config: curriculum for steps [0, 2), same τ / γ / ε / t_min)
    obj = objective_from_config({"objective": "duo", "curriculum": {"steps": 2, "tau": 1e-2, "gamma_min": -3.0,
                                                                    "gamma_max": -1.0, "table_points": None},
                                 "kernels": {"curriculum_input": "dense", "nelbo": "dense"}})
    obj.setup(model, ObjectiveContext(seed=SEED, global_batch_size=B, vocab_size=K, valid_vocab=valid, seq_len=L,
                                      device=torch.device("cpu")))
    with torch.no_grad():
        loss2, n2, _ = obj(model, x0, mask, pos, step)
    assert n2 == n
    assert torch.equal(loss2, loss)
