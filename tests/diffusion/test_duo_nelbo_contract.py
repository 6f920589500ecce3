"""``duo_nelbo``'s contract for ids outside ``valid_vocab``: refused (ValueError naming the ids), at every position,
for ``x0`` and ``z_t``; the objectives put a valid filler at unscored positions (pads) and refuse a scored invalid
id with the config fix."""

from __future__ import annotations

import pytest
import torch

from duo_plugin.diffusion.losses import duo_nelbo

K, B, L = 10, 2, 5
VALID = torch.ones(K, dtype=torch.bool)
VALID[[0, 7]] = False  # e.g. [PAD] and [UNK] excluded


def _args(x0, z):
    logp = torch.log_softmax(torch.randn(B, L, K, generator=torch.Generator().manual_seed(0)), -1)
    a = torch.full((B,), 0.6, dtype=torch.float64)
    return logp, z, x0, a, -torch.ones(B, dtype=torch.float64)


def test_valid_ids_give_a_finite_nonnegative_value():
    x0 = torch.tensor([[1, 2, 3, 4, 5], [6, 8, 9, 1, 2]])
    f = duo_nelbo(*_args(x0, x0.flip(-1)), valid_vocab=VALID)
    assert bool(torch.isfinite(f).all()) and bool((f >= -1e-6).all())


@pytest.mark.parametrize("which", ["x0", "z_t"])
def test_ids_outside_valid_vocab_are_refused_with_their_names(which):
    good = torch.tensor([[1, 2, 3, 4, 5], [6, 8, 9, 1, 2]])
    bad = good.clone()
    bad[0, 4], bad[1, 0] = 7, 0
    x0, z = (bad, good) if which == "x0" else (good, bad)
    with pytest.raises(ValueError, match=rf"duo_nelbo: {which} holds ids outside valid_vocab \[0, 7\] at 2 position"):
        duo_nelbo(*_args(x0, z), valid_vocab=VALID)
    # without a valid_vocab every id in [0, K) is valid (K_eff = K)
    assert bool(torch.isfinite(duo_nelbo(*_args(x0, z))).all())


def _duo_loss(x0, mask):
    from duo_plugin.models.dit import duo_dit_tiny
    from duo_plugin.objectives import DuoObjective, ObjectiveContext

    torch.manual_seed(0)
    model = duo_dit_tiny(K, L, dim=16, n_layers=1, n_heads=2, cond_dim=8).eval()
    obj = DuoObjective(curriculum_steps=0, table_points=None, kernels_curriculum_input="dense", kernels_nelbo="dense")
    obj.setup(model, ObjectiveContext(seed=1, global_batch_size=B, vocab_size=K, valid_vocab=VALID, seq_len=L,
                                      device=torch.device("cpu")))
    with torch.no_grad():
        return obj(model, x0, mask, [0, 1], 3)[0]


def test_objective_pads_outside_valid_vocab_are_fine_and_scored_ones_are_not():
    """clean_masked pads are neither attended to nor scored: the loss is the same whatever id the pads hold (the
    invalid [PAD] 0 or a valid id); a scored invalid id is refused with the config fix."""
    x0 = torch.tensor([[1, 2, 3, 4, 5], [6, 8, 9, 0, 0]])
    mask = x0 != 0
    with_pad = _duo_loss(x0, mask)
    with_valid_filler = _duo_loss(torch.where(mask, x0, torch.full_like(x0, 5)), mask)
    assert torch.isfinite(with_pad) and float(with_pad) == float(with_valid_filler)
    x0[0, 2] = 7
    with pytest.raises(ValueError, match=r"valid_vocab at 1 scored position\(s\): \[7\].*include_special"):
        _duo_loss(x0, mask)
