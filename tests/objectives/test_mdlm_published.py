"""MDLM as published: the shipped config builds a denoiser without time conditioning, so the sampler's x_θ cache
applies (network calls counted on the real model); ``objective.mask_id`` reuses a tokenizer's own mask token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.objectives import ObjectiveContext
from duo_plugin.objectives.mdlm import MDLMObjective, resolve_mask_id

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"


def _shipped_mdlm_model(width: int, seq_len: int):
    """The denoiser ``duo/mdlm_tiny_cpu`` builds (its model section as written), at the given width."""
    from torchtune import config as tt_config

    mcfg = OmegaConf.load(CONFIGS / "mdlm_tiny_cpu.yaml").model
    mcfg.vocab_size = width
    torch.manual_seed(0)
    return tt_config.instantiate(mcfg, max_seq_len=seq_len).eval()


def test_shipped_mdlm_configs_are_not_time_conditioned():
    for path in sorted(CONFIGS.glob("mdlm_*.yaml")):
        assert OmegaConf.load(path).model.time_conditioning is False, path.name
    model = _shipped_mdlm_model(9, 6)
    z = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # σ really is ignored
        a, b = model(z, torch.tensor([0.01, 0.02])), model(z, torch.tensor([5.0, 3.0]))
    assert model.time_conditioning is False and torch.equal(a, b)


@pytest.mark.parametrize("time_conditioned", [False, True])
def test_mdlm_sampler_reuses_x_theta_without_time_conditioning(time_conditioned):
    """Count the network's forward calls: time-conditioned, one per step plus the noise-removal call; without time
    conditioning, one per distinct z (x_θ(z) is reused while no token changes), so far fewer than the steps when
    the steps outnumber the positions. Each recorded input differs from the previous one (never a wasted call)."""
    from duo_plugin.diffusion.absorbing import AbsorbingProcess
    from duo_plugin.sampling.mdlm import sample_mdlm

    width, seq_len, steps = 9, 6, 64  # 8 data ids + the [MASK] row
    model = _shipped_mdlm_model(width, seq_len)
    inputs = []
    model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
    valid = torch.ones(width, dtype=torch.bool)
    valid[-1] = False
    with torch.no_grad():
        z, nfe = sample_mdlm(model, AbsorbingProcess(width, width - 1, valid_vocab=valid), batch_size=1,
                             seq_len=seq_len, steps=steps, time_conditioned=time_conditioned, seed=3, return_nfe=True)
    assert nfe == len(inputs)
    assert not bool((z == width - 1).any())
    if time_conditioned:
        assert len(inputs) == steps + 1
        return
    changes = sum(not torch.equal(a, b) for a, b in zip(inputs, inputs[1:]))
    assert changes == len(inputs) - 1  # a call only after z changed
    assert len(inputs) <= seq_len + 1 < steps  # at most one change per position (a token is revealed once)


class _Tok:
    """A tokenizer stand-in with the interface MDLM reads: ``encode`` and ``special_ids``."""

    special_ids = {0, 100, 101, 102, 103}
    _ids = {"[PAD]": [0], "[UNK]": [100], "[CLS]": [101], "[SEP]": [102], "[MASK]": [103], "mask": [2000],
            "<mask>": [1, 2, 3]}

    def encode(self, text, add_bos=False, add_eos=False):
        return list(self._ids[text])


def test_mask_id_resolution():
    tok = _Tok()
    assert resolve_mask_id(None, 30523, tok) == 30522  # appended row
    assert resolve_mask_id(103, 30522, tok) == resolve_mask_id("103", 30522, tok) == 103
    assert resolve_mask_id("[MASK]", 30522, tok) == 103  # BERT's own [MASK], width 30,522 (LM1B, official MDLM)
    with pytest.raises(ValueError, match="objective.mask_id='mask' is not one special token"):
        resolve_mask_id("mask", 30522, tok)
    with pytest.raises(ValueError, match="encodes to \\[1, 2, 3\\]"):
        resolve_mask_id("<mask>", 30522, tok)
    with pytest.raises(ValueError, match="outside the model's 30522 embedding rows"):
        resolve_mask_id(30522, 30522, tok)
    with pytest.raises(ValueError, match="no tokenizer"):
        resolve_mask_id("[MASK]", 30522, None)


@pytest.mark.parametrize("mask_valid", [False, True])
def test_reused_mask_token_is_never_data(mask_valid):
    """With the tokenizer's [MASK] reused, the process's data ids exclude it — also when the run's valid_vocab counts
    special tokens (official pad mode) — and corruption puts exactly that id at masked positions."""
    from duo_plugin.models.dit import duo_dit_tiny

    width = 110
    tok = _Tok()
    valid = torch.ones(width, dtype=torch.bool)
    valid[103] = mask_valid
    model = duo_dit_tiny(width, 8, dim=16, n_layers=1, n_heads=2, cond_dim=8)
    obj = MDLMObjective(mask_id="[MASK]")
    obj.setup(model, ObjectiveContext(seed=0, global_batch_size=2, vocab_size=width, valid_vocab=valid, seq_len=8,
                                      device=torch.device("cpu"), tokenizer=tok))
    assert obj.process.mask_id == 103 and not bool(obj.process.valid_vocab[103])
    assert int(obj.process.valid_vocab.sum()) == width - 1
    x0 = torch.randint(104, width, (2, 8), generator=torch.Generator().manual_seed(0))
    b = obj.noisy_batch(model, x0, torch.ones(2, 8, dtype=torch.bool), [0, 1], 0)
    assert set(b.z_t[b.z_t != x0].tolist()) <= {103}
    with pytest.raises(ValueError, match="is a valid token"):  # a plain data id cannot be the mask
        MDLMObjective(mask_id=105).setup(model, ObjectiveContext(
            seed=0, global_batch_size=2, vocab_size=width, valid_vocab=valid, seq_len=8, device=torch.device("cpu"),
            tokenizer=tok))
