"""Official pad mode at evaluation (``nelbo_perplexity(pad_mode="official")``): ``[PAD]`` is an embeddable id the
network sees exactly as the process draws it -- never replaced by another id -- and only the score skips pads.

Under the uniform-state process a clean id x stays x with probability α_t and is otherwise replaced by a uniform
valid id, so at a pad position P(z = PAD) = α_t + (1 − α_t) · [PAD valid] / K_eff (exact). The test reads α_t of
every row from the σ the network is given (α = e^{−σ}) and compares the number of pad positions holding PAD with
the sum of these probabilities (binomial tolerance: 4 standard deviations), with PAD outside and inside
``valid_vocab``. It also checks that an unscored [UNK] outside ``valid_vocab`` reaches the network unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.eval.likelihood import nelbo_perplexity

K, PAD, UNK, L = 9, 7, 8, 10


class Spy:
    """x_θ uniform over the valid ids; records every (z, σ) it is given."""

    vocab_size = K

    def __init__(self, valid):
        self.valid, self.calls = valid, []

    def __call__(self, z, sigma, padding_mask=None):
        self.calls.append((z.clone(), sigma.clone()))
        logits = torch.where(self.valid, 0.0, -1e9).expand(*z.shape, K)
        return torch.log_softmax(logits, -1)


def _blocks(n=240):
    g = torch.Generator().manual_seed(0)
    blocks = torch.full((n, L), PAD)
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i in range(n):
        m = int(torch.randint(3, L - 2, (1,), generator=g))  # real length 3..7, the rest pads
        blocks[i, 0], blocks[i, m - 1] = 0, 1
        blocks[i, 1 : m - 1] = torch.randint(2, 7, (m - 2,), generator=g)
        mask[i, :m] = True
    return blocks, mask


@pytest.mark.parametrize("pad_valid", [False, True])
def test_pad_positions_follow_the_process_law(pad_valid):
    valid = torch.ones(K, dtype=torch.bool)
    valid[UNK] = False
    valid[PAD] = pad_valid
    k_eff = int(valid.sum())
    blocks, mask = _blocks()
    res = nelbo_perplexity(Spy(valid), blocks, mask, batch_size=32, mc_passes=2, valid_vocab=valid,
                           pad_mode="official", progress=False)
    assert math.isfinite(res["nll_per_token"]) and res["tokens_all"] == int(mask.sum())  # pads skipped by the score
    # one block per call, so that every recorded row is known
    spy = Spy(valid)
    for i in range(blocks.shape[0]):
        nelbo_perplexity(spy, blocks[i : i + 1], mask[i : i + 1], batch_size=1, mc_passes=1, seed=i,
                         valid_vocab=valid, pad_mode="official", progress=False)
    hits, expect, var = 0, 0.0, 0.0
    for i, (z, sigma) in enumerate(spy.calls):
        a = float(torch.exp(-sigma.double())[0])
        p = a + (1 - a) * (1.0 / k_eff if pad_valid else 0.0)
        pad_pos = ~mask[i]
        hits += int((z[0][pad_pos] == PAD).sum())
        n = int(pad_pos.sum())
        expect += n * p
        var += n * p * (1 - p)
    assert abs(hits - expect) <= 4 * math.sqrt(var), (hits, expect, math.sqrt(var))
    if not pad_valid:  # PAD outside valid_vocab: noise never produces it, a pad only stays PAD when kept
        for i, (z, _) in enumerate(spy.calls):
            assert not bool((z[0][mask[i]] == PAD).any())


def test_unscored_unk_reaches_the_network_unchanged():
    valid = torch.ones(K, dtype=torch.bool)
    valid[UNK] = valid[PAD] = False
    blocks = torch.tensor([[0, 2, 3, 1, UNK, UNK]])
    mask = torch.tensor([[True, True, True, True, False, False]])  # the UNKs are unscored (like pads)
    spy = Spy(valid)
    for seed in range(40):
        nelbo_perplexity(spy, blocks, mask, batch_size=1, seed=seed, valid_vocab=valid, pad_mode="official",
                         progress=False)
    tail = torch.cat([z[:, 4:] for z, _ in spy.calls])
    assert bool((tail == UNK).any()), "the network never saw [UNK]: it was replaced"
