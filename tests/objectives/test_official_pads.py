"""Official pad mode (``data.pad_mode: official``, the paper's LM1B config): PAD and the tokenizer's other special ids
(BERT's ``[UNK]``) are ordinary ids in BOTH training phases, as in the official code (K = len(tokenizer)); only the
loss skips pads.

The law checked at pad positions (x0 = PAD), against references computed here, not by the code under test:

* discrete phase: P(z_t = PAD) = α_t + (1 − α_t)/K_eff with α_t = 1 − (1 − ε) t (uniform-state forward law);
* curriculum: P(argmax w = PAD) for w = α̃ onehot(PAD) + σ̃ ε over K_eff ids = ∫ φ(e) Φ(e + α̃/σ̃)^(K_eff − 1) de
  (the clean entry beats K_eff − 1 iid normals), by trapezoidal quadrature on [−12, 12] (error < 1e-9).

Monte Carlo: the observed fraction of PAD over n ≈ 7,000 pad positions per phase must lie within 4 standard errors
(SE² = Σ p_i (1 − p_i) / n², p_i the exact probability of position i at its own time) of the exact mean. The previous
behaviour (PAD outside the noise support: −∞ in the latent, never produced by the noise) fails both checks by far
(curriculum fraction 0; discrete fraction mean α_t, ≥ 8 SE below).
"""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.data.tokenizers import check_vocab
from duo_plugin.diffusion.schedules import gaussian_coefficients, stratified_times
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.objectives import DuoObjective, ObjectiveContext
from duo_plugin.objectives.base import vocab_options

K, L, B, SEED, CUR = 12, 32, 64, 5, 4
PAD, UNK, CLS, SEP = 0, 1, 2, 3


class _BertLike:
    """check_vocab's view of a BERT-like tokenizer: [PAD] 0, [UNK] 1, [CLS] 2 (bos), [SEP] 3 (eos)."""

    vocab_size, bos_id, eos_id, pad_id = K, CLS, SEP, PAD
    special_ids = {PAD, UNK, CLS, SEP}


def _official_vocab():
    inc_pad, inc_special = vocab_options("official")
    return check_vocab(_BertLike(), K, include_pad=inc_pad, include_special=inc_special)


def test_official_mode_makes_pad_and_unk_ordinary_ids():
    assert _official_vocab().all()  # K_eff = K = len(tokenizer), as the official code
    clean = check_vocab(_BertLike(), K, include_pad=vocab_options("clean_masked")[0],
                        include_special=vocab_options("clean_masked")[1])
    assert not clean[PAD] and not clean[UNK] and clean[CLS] and clean[SEP]
    assert vocab_options("official", None, False) == (True, False)
    with pytest.raises(ValueError, match="data.valid_vocab.include_pad: false contradicts data.pad_mode: official"):
        vocab_options("official", False, None)


def _p_argmax_clean(a_tilde: torch.Tensor, s_tilde: torch.Tensor, k: int) -> torch.Tensor:
    """P(the clean entry is the argmax), per element of ``a_tilde``/``s_tilde`` (float64 quadrature)."""
    e = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    phi = torch.exp(-0.5 * e * e) / math.sqrt(2 * math.pi)
    cdf = 0.5 * torch.erfc(-(e + (a_tilde / s_tilde)[:, None]) / math.sqrt(2.0))
    return torch.trapezoid(phi * cdf ** (k - 1), e, dim=-1)


def _run(phase_steps):
    """Per step: (inputs the network saw, kwargs). Rows: 2 real tokens then pads."""
    valid = _official_vocab()
    torch.manual_seed(0)
    model = duo_dit_tiny(K, L, dim=16, n_layers=1, n_heads=2, cond_dim=8).eval()
    obj = DuoObjective(curriculum_steps=CUR, table_points=65, kernels_curriculum_input="dense",
                       kernels_nelbo="dense")
    obj.setup(model, ObjectiveContext(seed=SEED, global_batch_size=B, vocab_size=K, valid_vocab=valid, seq_len=L,
                                      device=torch.device("cpu"), pad_mode="official"))
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[0].clone(), dict(kwargs))),
                                    with_kwargs=True)
    x0 = torch.randint(4, K, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :2] = True
    x0 = torch.where(mask, x0, torch.full_like(x0, PAD))
    x0[0, 1] = UNK  # a content [UNK] is an ordinary (scored) token
    with torch.no_grad():
        for step in phase_steps:
            loss, n, _ = obj(model, x0, mask, list(range(B)), step)
            assert torch.isfinite(loss) and n == int(mask.sum())
    return obj, seen, mask


def _check(frac_hits, probs):
    p = torch.cat(probs)
    n = p.numel()
    want = float(p.mean())
    se = math.sqrt(float((p * (1 - p)).sum())) / n
    got = float(torch.cat(frac_hits).double().mean())
    assert abs(got - want) < 4 * se, (got, want, se)
    return want, se


def test_curriculum_input_sees_pad_as_the_process_law():
    obj, seen, mask = _run(range(CUR))
    hits, probs = [], []
    for step, (logits, kw) in enumerate(seen):
        assert logits.dim() == 3 and "padding_mask" not in kw  # soft input; pads attended to
        z = logits.argmax(-1)
        t = stratified_times(SEED, step, list(range(B)), B, 1e-3, dtype=torch.float64)
        at, st = gaussian_coefficients(obj.duality.gamma(t))
        p_row = _p_argmax_clean(at.double(), st.double(), K)
        pads = ~mask
        hits.append((z == PAD)[pads])
        probs.append(p_row[:, None].expand(B, L)[pads])
    want, se = _check(hits, probs)
    assert want > 8 * se  # the old law (PAD never the argmax: fraction 0) is far outside the tolerance


def test_discrete_corruption_keeps_pad_as_the_process_law():
    _, seen, mask = _run(range(CUR, 2 * CUR))
    hits, probs, old = [], [], []
    for i, (z, kw) in enumerate(seen):
        step = CUR + i
        assert z.dim() == 2 and "padding_mask" not in kw
        t = stratified_times(SEED, step, list(range(B)), B, 1e-3, dtype=torch.float64)
        alpha = 1 - (1 - 1e-3) * t
        pads = ~mask
        hits.append((z == PAD)[pads])
        probs.append((alpha + (1 - alpha) / K)[:, None].expand(B, L)[pads])
        old.append(alpha[:, None].expand(B, L)[pads])
    want, se = _check(hits, probs)
    assert want - float(torch.cat(old).mean()) > 8 * se  # PAD outside the noise support (law α_t) is rejected
