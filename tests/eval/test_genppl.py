"""Gen PPL and entropy against hand-computed values (fixed bigram scorer, character tokenizers)."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.eval.genppl import DiTScorer, gen_ppl_and_entropy, unigram_entropy


class CharTok:
    """Characters -> ids from an alphabet string; specials after it."""

    def __init__(self, alphabet, specials=("<bos>", "<eos>")):
        self.alphabet = alphabet
        self.ids = {c: i for i, c in enumerate(alphabet)}
        self.bos_id = len(alphabet) if "<bos>" in specials else None
        self.eos_id = len(alphabet) + (1 if self.bos_id is not None else 0)
        self.pad_id = None
        self.vocab_size = self.eos_id + 1

    def encode(self, text, add_bos=False, add_eos=False):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))


DIFF = CharTok("abc")  # a=0 b=1 c=2 <bos>=3 <eos>=4
SCORE = CharTok("cba", specials=("<eos>",))  # c=0 b=1 a=2 <eos>=3
P = torch.tensor(
    [
        [0.1, 0.2, 0.3, 0.4],
        [0.25, 0.25, 0.25, 0.25],
        [0.05, 0.6, 0.15, 0.2],
        [0.7, 0.1, 0.1, 0.1],
    ],
    dtype=torch.float64,
)  # P[prev, next] over scorer ids


def bigram_scorer(tokens):
    return torch.log(P)[tokens].float()


def lp(a, b):
    return math.log(P[a, b])


def test_gen_ppl_and_entropy_hand_computed():
    samples = torch.tensor(
        [
            [3, 0, 1, 4, 2, 2],  # <bos> a b <eos> c c  -> scorer [a b EOS c c] = [2 1 3 0 0]
            [0, 0, 0, 0, 0, 0],  # a a a a a a          -> [2 2 2 2 2 2]
            [0, 4, 4, 1, 1, 2],  # a <eos> <eos> b b c  -> [2 3 3 1 1 0]
        ]
    )
    nll = -(lp(2, 1) + lp(1, 3) + lp(3, 0) + lp(0, 0))  # sample 1: 4 targets (first EOS counted)
    nll += -5 * lp(2, 2)  # sample 2: 5 targets
    nll += -(lp(2, 3) + lp(3, 1) + lp(1, 1) + lp(1, 0))  # sample 3: second EOS dropped; tokens after it kept
    n_tok = 4 + 5 + 4
    for bs in (1, 2, 3):
        res = gen_ppl_and_entropy(samples, diffusion_tokenizer=DIFF, scorer=bigram_scorer, scorer_tokenizer=SCORE,
                                  eos_id_scorer=SCORE.eos_id, batch_size=bs, max_len=64)
        assert res["tokens"] == n_tok and res["n_samples"] == 3
        assert math.isclose(res["gen_ppl"], math.exp(nll / n_tok), rel_tol=1e-6)
    h1 = -(4 * (1 / 6) * math.log(1 / 6) + (2 / 6) * math.log(2 / 6))
    h3 = -(2 * (1 / 6) * math.log(1 / 6) + 2 * (2 / 6) * math.log(2 / 6))  # ids {0:1, 4:2, 1:2, 2:1}
    assert math.isclose(res["entropy"], (h1 + 0.0 + h3) / 3, rel_tol=1e-12)
    assert res["entropy_per_sample"][1] == 0.0


def test_max_len_truncation_and_bos():
    samples = torch.tensor([[0, 1, 2, 0, 1, 2]])  # a b c a b c -> [2 1 0 2 1 0]
    res = gen_ppl_and_entropy(samples, diffusion_tokenizer=DIFF, scorer=bigram_scorer, scorer_tokenizer=SCORE,
                              eos_id_scorer=SCORE.eos_id, batch_size=4, max_len=3)
    nll = -(lp(2, 1) + lp(1, 0))
    assert res["tokens"] == 2 and math.isclose(res["gen_ppl"], math.exp(nll / 2), rel_tol=1e-6)
    # a scorer BOS (here id 3 used as BOS) makes the first token a target too
    res = gen_ppl_and_entropy(samples, diffusion_tokenizer=DIFF, scorer=bigram_scorer, scorer_tokenizer=SCORE,
                              eos_id_scorer=SCORE.eos_id, batch_size=4, max_len=3, bos_id_scorer=3)
    # sequence [3, 2, 1]: targets 2 (first EOS-id token is the BOS at position 0: not a target) and 1
    assert res["tokens"] == 2 and math.isclose(res["gen_ppl"], math.exp(-(lp(3, 2) + lp(2, 1)) / 2), rel_tol=1e-6)


def test_unigram_entropy_bounds():
    ids = torch.arange(16).view(1, 16)
    assert math.isclose(float(unigram_entropy(ids)[0]), math.log(16))
    assert float(unigram_entropy(torch.zeros(1, 9, dtype=torch.long))[0]) == 0.0


def test_dit_scorer_requires_causal_model():
    from duo_plugin.models.dit import duo_dit_tiny

    with pytest.raises(ValueError, match="causal"):
        DiTScorer(duo_dit_tiny(8, 16))
    m = duo_dit_tiny(8, 16, causal=True)
    out = DiTScorer(m)(torch.randint(0, 8, (2, 5)))
    assert out.shape == (2, 5, 8)
    # causal: the prediction at position 1 does not depend on later tokens
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 7, 0]])
    sa, sb = DiTScorer(m)(a), DiTScorer(m)(b)
    assert torch.allclose(sa[:, :2], sb[:, :2], atol=1e-5)


# ------------------------------------------------------------------------------------------------ HF scorer
def test_hf_causal_lm_scorer_matches_a_direct_forward(tmp_path):
    """A tiny GPT-2 written locally (config + random weights + a word-level tokenizer) scores samples with the Gen PPL
    protocol: re-tokenised, later EOS dropped, token-weighted; the result is labelled with the scorer's name."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from duo_plugin.eval.genppl import gen_ppl_and_entropy, load_hf_scorer

    words = ["<eos>", "the", "king", "queen", "sings", "of", "love", "war"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    d = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=16,
                                                                 n_layer=1, n_head=2, bos_token_id=0,
                                                                 eos_token_id=0))
    model.eval().save_pretrained(d)
    hf_tok.save_pretrained(d)

    class DiffTok:  # diffusion-side tokenizer: id i <-> word i (1..7), EOS = 0
        eos_id, bos_id, pad_id = 0, None, None

        def decode(self, ids):
            return " ".join(words[i] for i in ids)

    scorer = load_hf_scorer(d)
    assert scorer.name == "hf:gpt2-tiny" and scorer.eos_id == 0
    samples = torch.tensor([[1, 2, 4, 5, 6, 0, 3, 3], [1, 3, 4, 5, 7, 5, 6, 0]])
    r = gen_ppl_and_entropy(samples, diffusion_tokenizer=DiffTok(), scorer=scorer, scorer_tokenizer=scorer.tokenizer,
                            eos_id_scorer=scorer.eos_id)
    assert r["scorer"] == "hf:gpt2-tiny"
    # reference (module protocol): targets = positions 1.., every non-EOS token and the first EOS
    tot, cnt = 0.0, 0
    for row in ([1, 2, 4, 5, 6, 0, 3, 3], [1, 3, 4, 5, 7, 5, 6, 0]):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits.double(), -1)[0]
        tot -= sum(float(lp[i - 1, row[i]]) for i in range(1, len(row)))
        cnt += len(row) - 1
    assert r["tokens"] == cnt and r["gen_ppl"] == pytest.approx(math.exp(tot / cnt), rel=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_scorer(tmp_path)


def test_gen_nll_stderr_is_the_ratio_estimators_standard_error():
    """The samples are the independent units: the SE of Σs/Σn against the formula written out by hand (numpy-free
    sums over the hand-computed per-sample NLLs of the first test), and against a Monte Carlo of the estimator."""
    samples = torch.tensor([[3, 0, 1, 4, 2, 2], [0, 0, 0, 0, 0, 0], [0, 4, 4, 1, 1, 2]])
    s = [-(lp(2, 1) + lp(1, 3) + lp(3, 0) + lp(0, 0)), -5 * lp(2, 2), -(lp(2, 3) + lp(3, 1) + lp(1, 1) + lp(1, 0))]
    n = [4, 5, 4]
    r = sum(s) / sum(n)
    want = math.sqrt(3 / 2 * sum((si - r * ni) ** 2 for si, ni in zip(s, n))) / sum(n)
    res = gen_ppl_and_entropy(samples, diffusion_tokenizer=DIFF, scorer=bigram_scorer, scorer_tokenizer=SCORE,
                              eos_id_scorer=SCORE.eos_id, batch_size=2, max_len=64)
    assert math.isclose(res["gen_nll_stderr"], want, rel_tol=1e-6)
    one = gen_ppl_and_entropy(samples[:1], diffusion_tokenizer=DIFF, scorer=bigram_scorer, scorer_tokenizer=SCORE,
                              eos_id_scorer=SCORE.eos_id, max_len=64)
    assert math.isnan(one["gen_nll_stderr"])  # one sample: no spread to estimate


def test_ratio_stderr_matches_the_spread_of_repeated_estimates():
    """Monte Carlo: draw many sets of 200 sequences with random lengths and per-token NLLs; the SE predicted from ONE
    set matches the standard deviation of the estimate over 400 sets within 15 % (the SE of an SD estimate from 400
    draws is ~3.5 %; the linearisation error at n = 200 is far smaller)."""
    from duo_plugin.eval.genppl import ratio_stderr

    g = torch.Generator().manual_seed(0)

    def one_set():
        lens = torch.randint(5, 40, (200,), generator=g)
        rate = torch.rand(200, generator=g, dtype=torch.float64) * 3 + 1  # a per-sequence mean NLL in [1, 4]
        sums = [float(torch.distributions.Gamma(float(L), float(L) / float(m)).sample()) for L, m in zip(lens, rate)]
        return list(zip(sums, lens.tolist()))

    torch.manual_seed(1)
    ests = []
    for _ in range(400):
        seqs = one_set()
        ests.append(sum(s for s, _ in seqs) / sum(n for _, n in seqs))
    mean = sum(ests) / len(ests)
    sd = math.sqrt(sum((e - mean) ** 2 for e in ests) / (len(ests) - 1))
    predicted = [ratio_stderr(one_set()) for _ in range(20)]
    assert abs(sum(predicted) / len(predicted) / sd - 1) < 0.15, (sum(predicted) / len(predicted), sd)
