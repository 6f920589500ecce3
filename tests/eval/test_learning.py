"""The demo's learning report: unigram baseline, content mask, content-token NELBO PPL."""

import math

import torch

from duo_plugin.eval.learning import content_mask, content_ppl, read_log_curve, unigram_ppl
from duo_plugin.eval.likelihood import nelbo_perplexity
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.sampling.samplers import DenoiserFn


def test_unigram_ppl_brute_force():
    train = torch.tensor([1, 4, 4, 5, 6, 4, 2, 5])
    val = torch.tensor([1, 4, 5, 7, 2])
    k, special = 8, (0, 1, 2, 3)
    # add-one counts over content ids 4..7 of the training split: 4:3+1, 5:2+1, 6:1+1, 7:0+1 -> total 10
    p = {4: 4 / 10, 5: 3 / 10, 7: 1 / 10}
    want = math.exp(-(math.log(p[4]) + math.log(p[5]) + math.log(p[7])) / 3)
    assert abs(unigram_ppl(train, val, k, special) - want) < 1e-12


def test_content_mask():
    b = torch.tensor([[1, 5, 6, 2, 1, 7], [1, 8, 3, 3, 3, 3]])
    m = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    got = content_mask(b, m, (0, 1, 2, 3))
    assert got.tolist() == [[False, True, True, False, False, True], [False, True, False, False, False, False]]


def test_content_ppl_normalises_the_same_nelbo_by_content_tokens():
    torch.manual_seed(0)
    model = duo_dit_tiny(vocab_size=12, max_seq_len=8).eval()
    for p in model.parameters():  # a non-trivial denoiser (zero-initialised output layers would give uniform x_theta)
        torch.nn.init.normal_(p, std=0.3)
    blocks = torch.randint(3, 12, (6, 8))
    blocks[:, 0] = 1  # BOS
    blocks[::2, -1] = 2  # EOS
    mask = torch.ones_like(blocks, dtype=torch.bool)
    ref = nelbo_perplexity(DenoiserFn(model), blocks, mask, batch_size=4, mc_passes=3, seed=5, progress=False)
    got = content_ppl(model, blocks, mask, (1, 2), passes=3, seed=5, batch_size=4)
    n_all, n_content = blocks.numel(), int(((blocks != 1) & (blocks != 2)).sum())
    assert got["tokens"] == n_content == 6 * 8 - 6 - 3
    # same summed NELBO (same times and noise), divided by the content count instead of all positions
    assert abs(got["nll"] - ref["nll_per_token"] * n_all / n_content) < 1e-9
    assert got["ppl"] > ref["ppl"]


def test_read_log_curve(tmp_path):
    (tmp_path / "log_1.txt").write_text("Step 0 | val_nll:6.0 val_ppl:403.4 \nStep 10 | loss:5.5 lr:0.001 \n"
                                        "Step 20 | loss:5.2 val_ppl:300.0 \n")
    c = read_log_curve(tmp_path)
    assert c["loss"] == [(10, 5.5), (20, 5.2)] and c["val_ppl"] == [(0, 403.4), (20, 300.0)]
