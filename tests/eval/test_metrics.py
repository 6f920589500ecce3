"""``eval.metrics.compute_metrics``: Gen PPL of a scorer with a known answer (a uniform causal LM over V ids has
perplexity exactly V), unigram entropy against its closed form, samples given or drawn by a function passed in,
the NELBO perplexity of a split and MC summaries in the same call."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.eval.likelihood import nelbo_perplexity
from duo_plugin.eval.metrics import GenPPLSpec, NelboSpec, compute_metrics
from duo_plugin.eval.summary import MCRecorder


class IdTok:
    bos_id, eos_id, pad_id = 0, 1, None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


V = 7
SAMPLES = torch.tensor([[0, 2, 2, 3, 3], [0, 4, 5, 6, 2]])


def uniform_scorer(tokens):
    return torch.zeros(*tokens.shape, V)


def test_gen_ppl_of_a_uniform_scorer_is_the_vocabulary_size_and_entropy_is_closed_form():
    spec = GenPPLSpec(IdTok(), uniform_scorer, IdTok(), eos_id=1, bos_id=0, name="uniform")
    g = compute_metrics(samples=SAMPLES, genppl=spec)["gen"]
    assert g["gen_ppl"] == pytest.approx(V, rel=1e-12) and g["scorer"] == "uniform"
    # unigram entropy of the raw sample rows: row 0 = {0: 1, 2: 2, 3: 2} of 5 ids, row 1 = five distinct ids
    h0 = -(0.2 * math.log(0.2) + 2 * 0.4 * math.log(0.4))
    h1 = math.log(5)
    assert g["entropy_per_sample"] == pytest.approx([h0, h1], rel=1e-12)
    # the same samples drawn by a function passed in: same numbers, plus the sampling time
    drawn = compute_metrics(sample_fn=lambda: SAMPLES.clone(), genppl=spec)["gen"]
    assert drawn["gen_ppl"] == g["gen_ppl"] and drawn["sample_seconds"] >= 0
    only = compute_metrics(samples=SAMPLES, genppl=GenPPLSpec(IdTok()))["gen"]  # no scorer: entropy only
    assert only["gen_ppl"] is None and only["entropy"] == pytest.approx((h0 + h1) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="samples or sample_fn"):
        compute_metrics(samples=SAMPLES, sample_fn=lambda: SAMPLES, genppl=spec)


def test_nelbo_and_mc_summaries_in_one_call():
    k = 6

    class Uniform:
        vocab_size = k

        def __call__(self, z, sigma, padding_mask=None):
            return torch.full((*z.shape, k), -math.log(k))

    blocks = torch.tensor([[0, 2, 3, 4, 1], [0, 5, 5, 2, 1]])
    rec = MCRecorder({"estimator": "x"})
    rec.record("t", 3.0, 0.5, 2)
    out = compute_metrics(nelbo=NelboSpec(Uniform(), blocks, options={"mc_passes": 2, "progress": False}), mc=rec)
    direct = nelbo_perplexity(Uniform(), blocks, mc_passes=2, progress=False)  # the estimator's own dict
    assert out["nelbo"] == direct and out["nelbo"]["tokens_all"] == 10
    assert out["mc"]["t"]["n"] == 1 and out["mc"]["t"]["mean_nelbo"] == 3.0
