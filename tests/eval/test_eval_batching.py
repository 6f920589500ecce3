"""Batched evaluation paths against the one-sequence-at-a-time estimators they replace.

References: the conditional NELBO of each sequence computed alone with the unchanged one-sample estimator
``sequence_nelbo`` (same times and generators, no padding, no other rows in the call); the AR log-likelihood and
argmax by one unbatched causal forward per window; Gen PPL and NELBO perplexity with one row per call.
"""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.diffusion.schedules import stratified_times
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.eval.genppl import causal_nll
from duo_plugin.eval.likelihood import (
    _COND_STEP_OFFSET,
    conditional_nelbo_ragged,
    nelbo_perplexity,
    pack_rows,
    sequence_nelbo,
)
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.sampling import DenoiserFn


def _dit(k, length, seed=0, causal=False):
    torch.manual_seed(seed)
    m = duo_dit_tiny(k, length, causal=causal)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:  # adaLN-zero: give the blocks and the head some weight
                p.normal_(0, 0.3)
    return m.eval()


def _alone(den, ids, n_keep, index, m, seed):
    """Mean over the M samples of sequence_nelbo for one unpadded sequence (the pre-batching estimator)."""
    x0 = torch.tensor([ids])
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[0, :n_keep] = True
    times = stratified_times(seed, _COND_STEP_OFFSET + index, range(m), m, t_min=1e-3, dtype=torch.float64)
    gens = row_generators(seed, _COND_STEP_OFFSET + index, range(m))
    vals = [float(sequence_nelbo(den, x0, times[j : j + 1], gens[j : j + 1], score_mask=~keep, keep_mask=keep)[0])
            for j in range(m)]
    return sum(vals) / m


def test_pack_rows_respects_budgets():
    lengths = [9, 9, 7, 5, 5, 5, 2]
    batches = pack_rows(lengths, max_rows=3, max_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20)
    assert pack_rows([30, 4], None, 20) == [[0], [1]]  # a row over the budget runs alone


@pytest.mark.parametrize("budget", [None, 40, 7])
def test_ragged_conditional_nelbo_equals_each_sequence_alone(budget):
    """Rows of different lengths packed into one padded call give each sequence's one-at-a-time value."""
    k, m, seed = 9, 6, 3
    den = DenoiserFn(_dit(k, 10, seed=1))
    seqs = [[0, 3, 4, 5, 6, 2], [0, 7], [0, 8, 8, 3], [0, 5, 6, 7, 8, 3, 4, 5], [0, 4, 4, 4]]
    n_keep = [3, 1, 2, 4, 1]
    index = [11, 5, 901, 7, 12]
    keeps = [torch.arange(len(s)) < nk for s, nk in zip(seqs, n_keep)]
    res = conditional_nelbo_ragged(den, [torch.tensor(s) for s in seqs], keeps, indices=index, mc_samples=m,
                                   max_batch_tokens=budget, seed=seed)
    for i, s in enumerate(seqs):
        ref = _alone(den, s, n_keep[i], index[i], m, seed)
        assert math.isclose(float(res.nelbo[i]), ref, rel_tol=2e-5, abs_tol=1e-5), (i, float(res.nelbo[i]), ref)
    assert res.num_tokens.tolist() == [len(s) - nk for s, nk in zip(seqs, n_keep)]
    assert res.mc_samples.tolist() == [m] * len(seqs)


def test_lm_eval_backend_scores_match_one_request_at_a_time():
    """The backend's packed scoring and greedy checks equal those of one request per call (max_batch_tokens=1)."""
    pytest.importorskip("lm_eval")
    from duo_plugin.integrations import lm_eval as dl

    class IdTok:
        vocab_size, bos_id, eos_id, pad_id = 9, 0, 1, None

        def encode(self, text, add_bos=False, add_eos=False):
            return [int(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    model = _dit(9, 12, seed=2)
    reqs = [(("", ""), [3, 4, 2], [5, 2]), (("", ""), [2], [4]), (("", ""), [5, 5, 5, 4, 6, 7], [3, 3, 8]),
            (("", ""), [3, 4, 2], [6]), (("", ""), [7, 8], [2, 2, 2, 2])]
    packed = dl.DuoLM(model=model, tokenizer=IdTok(), mc_samples=5)
    single = dl.DuoLM(model=model, tokenizer=IdTok(), mc_samples=5, max_batch_tokens=1)
    a, b = packed._loglikelihood_tokens(reqs), single._loglikelihood_tokens(reqs)
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, rel=2e-5, abs=1e-5) and ga == gb
    # the greedy check of every request against an unbatched forward of that request alone
    assert packed.scorer.greedy([r[1:] for r in reqs]) == single.scorer.greedy([r[1:] for r in reqs])


def test_ar_prefix_sharing_and_padding_are_exact():
    """AR windows served by another window's forward (shared context prefix) or padded with longer ones give the
    log-likelihood and argmax check of one unbatched causal forward per window."""
    pytest.importorskip("lm_eval")
    from duo_plugin.integrations import lm_eval as dl

    class IdTok:
        vocab_size, bos_id, eos_id, pad_id = 7, 0, 1, None

        def encode(self, text, add_bos=False, add_eos=False):
            return [int(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    m = _dit(7, 12, seed=0, causal=True)
    lm = dl.DuoLM(model=m, tokenizer=IdTok())
    ctx = [2, 3, 4]
    reqs = [(("", ""), ctx, [c]) for c in range(2, 7)] + [(("", ""), ctx, [5, 6]), (("", ""), ctx + [5], [6]),
                                                          (("", ""), [6, 6], [2, 3, 4, 5]), (("", ""), [5], [3])]
    out = lm._loglikelihood_tokens(reqs)
    for (_, c, t), (ll, greedy) in zip(reqs, out):
        ids = torch.tensor([[0] + c + t])
        with torch.no_grad():
            logp = torch.log_softmax(m(ids, torch.zeros(1)).double(), -1)[0]
        n_keep = 1 + len(c)
        ref = sum(float(logp[i - 1, ids[0, i]]) for i in range(n_keep, ids.shape[1]))
        assert ll == pytest.approx(ref, abs=1e-5)
        assert greedy == all(int(logp[i - 1].argmax()) == int(ids[0, i]) for i in range(n_keep, ids.shape[1]))


def test_causal_nll_does_not_depend_on_batching():
    k = 11
    m = _dit(k, 16, seed=4, causal=True)

    def scorer(toks):
        with torch.no_grad():
            return m(toks, torch.zeros(toks.shape[0]))

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, k, (int(n),), generator=g).tolist() for n in torch.randint(1, 16, (13,), generator=g)]
    seqs[3][5:7] = [1, 1]  # an EOS run: only the first EOS is a target
    one = [causal_nll(scorer, [s], eos_id=1, batch_size=1) for s in seqs]
    ref_total, ref_count = sum(t for t, _ in one), sum(c for _, c in one)
    for rows, budget in [(None, 64), (3, None), (None, 10**6)]:
        total, count = causal_nll(scorer, seqs, eos_id=1, batch_size=rows, max_batch_tokens=budget)
        assert count == ref_count and total == pytest.approx(ref_total, rel=1e-6)


def test_nelbo_perplexity_passes_share_calls_without_changing_values():
    k = 9
    den = DenoiserFn(_dit(k, 8, seed=5))
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, k, (5, 8), generator=g)
    one = nelbo_perplexity(den, blocks, batch_size=1, mc_passes=3, progress=False)
    many = nelbo_perplexity(den, blocks, batch_size=16, mc_passes=3, progress=False)  # 15 rows, one call
    assert many["per_pass_nll"] == pytest.approx(one["per_pass_nll"], rel=1e-5)
    assert many["stderr"] == pytest.approx(one["stderr"], rel=1e-3)
