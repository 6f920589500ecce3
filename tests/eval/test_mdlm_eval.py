"""MDLM (absorbing process) evaluation against independent references: the conditional NELBO of a continuation given a
clean context by exact enumeration (with x_θ = the exact conditional of a toy distribution it equals −log p(cont |
ctx); for any x_θ its closed-form time integral is a Beta-weighted sum over mask patterns), the lm-eval backend's
loglikelihood / greedy check / rolling on the same toy, the metadata → process lookup, and duo_eval's MDLM NELBO PPL
against ``nelbo_perplexity(process=...)``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from duo_plugin.diffusion.absorbing import AbsorbingProcess, mask_vocab
from duo_plugin.diffusion.process import UniformProcess
from duo_plugin.eval.likelihood import conditional_nelbo
from duo_plugin.eval.processes import process_for

K, L = 3, 4                       # data ids 0..2 (0 = BOS, 1 = EOS for the lm-eval tokenizer), 4 positions
W, MASK = mask_vocab(K)


def toy(seed=1):
    """p over sequences (0, a, b, c): position 0 is always BOS = 0, the rest a random Dirichlet table."""
    rng = np.random.default_rng(seed)
    states = [(0,) + s for s in itertools.product(range(K), repeat=L - 1)]
    return states, rng.dirichlet(np.ones(len(states)))


class Linear:
    """α_t = 1 − t (ε = 0: at t = 1 every position is masked, so no prior term is missing)."""

    def alpha(self, t):
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def alpha_prime(self, t):
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), -1.0)


class ToyMDLM(torch.nn.Module):
    """x_θ(z) = p(x_l | the visible tokens of z) by enumeration (``noise`` > 0: perturbed, no longer exact); the mask
    column gets a large logit that SUBS must remove."""

    def __init__(self, states, p, noise=0.0, seed=0):
        super().__init__()
        self.vocab_size, self.max_seq_len = W, L + 1
        self.duo_metadata = {"objective": "mdlm"}
        self.valid_vocab = torch.tensor([True] * K + [False])
        self.w = torch.nn.Parameter(torch.zeros(1))
        rng = np.random.default_rng(seed)
        self.table = {}
        for z in itertools.product(range(W), repeat=L):
            cons = [(s, q) for s, q in zip(states, p) if all(z[m] == MASK or z[m] == s[m] for m in range(L))]
            out = np.full((L, W), 1e-300)
            tot = sum(q for _, q in cons) or 1.0
            for s, q in cons:
                for l in range(L):
                    out[l, s[l]] += q / tot
            out[:, :K] = out[:, :K] * np.exp(noise * rng.standard_normal((L, K)))
            out[:, :K] /= out[:, :K].sum(-1, keepdims=True)
            out[:, MASK] = 5.0
            self.table[z] = torch.tensor(np.log(out / out.sum(-1, keepdims=True)))

    def forward(self, z, sigma, padding_mask=None):
        """Rows shorter than L (or padded: ``padding_mask`` False) are prefixes: the missing positions count as
        masked, so x_θ is the exact conditional given the visible prefix tokens."""
        if padding_mask is not None:
            z = torch.where(padding_mask, z, torch.full_like(z, MASK))
        n = z.shape[1]
        return torch.stack([self.table[tuple(r + [MASK] * (L - n))][:n] for r in z.tolist()]).float()


def exact_conditional(states, p, ids, n_keep):
    """−log p(ids[n_keep:] | ids[:n_keep]) by brute force."""
    num = sum(q for s, q in zip(states, p) if list(s[: len(ids)]) == list(ids))
    den = sum(q for s, q in zip(states, p) if list(s[:n_keep]) == list(ids[:n_keep]))
    return -math.log(num / den)


def beta_nelbo(model, ids, n_keep):
    """The MDLM conditional NELBO with α_t = 1 − t in closed form: each continuation position is masked w.p. t, the
    weight is 1/t, so ∫_0^1 Σ_M t^{|M|−1} (1−t)^{n−|M|} Σ_{l∈M} −log x_θ(z_M)[x_l] dt = Σ_M B(|M|, n−|M|+1) (...)."""
    n = len(ids) - n_keep
    total = 0.0
    for m in range(1, n + 1):
        weight = math.factorial(m - 1) * math.factorial(n - m) / math.factorial(n)
        for pos in itertools.combinations(range(n_keep, len(ids)), m):
            z = list(ids)
            for q in pos:
                z[q] = MASK
            logp = model(torch.tensor([z]), torch.zeros(1))[0].double()
            lp = torch.log_softmax(logp[:, :K], -1)  # SUBS: the mask column removed, renormalised
            total += weight * sum(-float(lp[q, ids[q]]) for q in pos)
    return total


def test_conditional_nelbo_is_tight_for_the_exact_conditional_and_matches_the_closed_form():
    states, p = toy()
    exact_model, noisy_model = ToyMDLM(states, p), ToyMDLM(states, p, noise=0.7)
    proc = AbsorbingProcess(W, MASK, schedule=Linear())
    cases = [([0, 2, 1, 2], 2), ([0, 1, 0, 0], 1), ([0, 2, 2, 1], 3)]
    for ids, n_keep in cases:
        ref = exact_conditional(states, p, ids, n_keep)
        assert beta_nelbo(exact_model, ids, n_keep) == pytest.approx(ref, rel=1e-6)  # tight (no MC; fp32 x_θ)
        for model, target in ((exact_model, ref), (noisy_model, beta_nelbo(noisy_model, ids, n_keep))):
            keep = torch.tensor([i < n_keep for i in range(L)])
            res = conditional_nelbo(model, torch.tensor([ids]), keep, mc_samples=2048, batch_size=512, seed=3,
                                    t_min=1e-7, process=proc)
            assert abs(float(res.nelbo[0]) - target) < 4 * float(res.stderr[0]) + 1e-3, (ids, res, target)
            assert int(res.num_tokens[0]) == L - n_keep


def test_conditional_nelbo_is_an_upper_bound_in_expectation():
    """For a wrong x_θ: E_{cont ~ p(·|ctx)} NELBO_θ(cont | ctx) ≥ H(cont | ctx) (NELBO ≥ −log p_θ, Gibbs)."""
    states, p = toy(seed=4)
    model = ToyMDLM(states, p, noise=1.0, seed=2)
    for ctx in ([0], [0, 2]):
        conts = [s for s in states if list(s[: len(ctx)]) == ctx]
        den = sum(q for s, q in zip(states, p) if s in conts)
        w = [q / den for s, q in zip(states, p) if s in conts]
        bound = sum(wi * beta_nelbo(model, list(s), len(ctx)) for wi, s in zip(w, conts))
        entropy = -sum(wi * math.log(wi) for wi in w)
        assert bound > entropy


def test_process_lookup_from_metadata():
    vv = torch.tensor([True] * K + [False])
    assert process_for({"objective": "duo"}, vocab_size=W).kind == "uniform"
    uni = process_for({"objective": "udlm"}, vocab_size=W, valid_vocab=vv).process  # a real process, not None
    assert isinstance(uni, UniformProcess) and uni.vocab_size == W and uni.valid_vocab is vv
    assert process_for({}, vocab_size=W, causal=True).kind == "causal"
    assert process_for({}, vocab_size=W, causal=True).process is None
    # every process owns sigma(t) = -log alpha_t (log-linear: alpha_t = 1 - (1 - 1e-3) t, closed form)
    t = torch.tensor([0.0, 0.25, 0.999, 1.0], dtype=torch.float64)
    for proc in (uni, process_for({"objective": "mdlm"}, vocab_size=W, valid_vocab=vv).process):
        torch.testing.assert_close(proc.sigma(t), -torch.log(1 - (1 - 1e-3) * t), rtol=1e-15, atol=0)
    spec = process_for({"objective": "mdlm"}, vocab_size=W, valid_vocab=vv)
    assert spec.kind == "absorbing" and spec.mask_id == MASK and isinstance(spec.process, AbsorbingProcess)
    assert process_for({"objective": "mdlm", "mask_id": 1}, vocab_size=W).mask_id == 1
    with pytest.raises(ValueError, match="objective='sedd' has no noise process"):
        process_for({"objective": "sedd"}, vocab_size=W)
    with pytest.raises(ValueError, match="not causal"):
        process_for({"objective": "ar"}, vocab_size=W)
    with pytest.raises(ValueError, match=r"\[MASK\] id 3 is a valid data id"):
        process_for({"objective": "mdlm"}, vocab_size=W, valid_vocab=torch.ones(W, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ lm-eval backend
class IdTok:
    def __init__(self, k):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = k, 0, 1, None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_lm_eval_mdlm_loglikelihood_greedy_and_rolling_on_the_exact_toy():
    pytest.importorskip("lm_eval")
    from duo_plugin.integrations import lm_eval as dl

    states, p = toy()
    model = ToyMDLM(states, p)
    lm = dl.DuoLM(model=model, tokenizer=IdTok(K), mc_samples=1024, seed=1)
    assert lm.process_spec.kind == "absorbing" and "AbsorbingProcess" in lm.estimator()
    # the mode of p(x_2 | BOS, x_1 = 2): a single-token continuation whose greedy check must be True
    best = int(np.argmax([sum(q for s, q in zip(states, p) if s[1] == 2 and s[2] == c) for c in range(K)]))
    reqs = [(("", ""), [2], [1, 2]), (("", ""), [1, 0], [0]), (("", ""), [], [2, 2, 1]), (("", ""), [2], [best])]
    out = lm._loglikelihood_tokens(reqs)
    recs = lm.scorer.recorder.records["unknown"]
    for (_, ctx, cont), (ll, greedy), (_, se, _) in zip(reqs, out, recs):
        ids = [0] + ctx + cont
        ref = exact_conditional(states, p, ids, 1 + len(ctx))
        # log-linear ε = 1e-3 and t_min = 1e-3 (not the ε = 0 limit): a bias of O(1e-3) per token besides MC error
        assert abs(-ll - ref) < 4 * se + 0.02, (ids, ll, ref, se)
        # greedy: all continuation positions masked, argmax of the exact conditional given the context alone
        marg = {}
        for s, q in zip(states, p):
            if list(s[: 1 + len(ctx)]) == [0] + ctx:
                for j, c in enumerate(cont):
                    marg.setdefault(j, np.zeros(K))[s[1 + len(ctx) + j]] += q
        assert greedy == all(int(np.argmax(marg[j])) == c for j, c in enumerate(cont))
    assert {g for _, g in out} == {True, False}  # both outcomes exercised
    # rolling: one window [BOS] + 3 tokens (room max_length − 1 = 4) scored with the context empty: −log p(x_1:3)
    lm_r = dl.DuoLM(model=model, tokenizer=IdTok(K), mc_samples=1024, seed=2, window_eos=False)

    class Req:
        args = ("2 1 2",)

    (ll_r,) = lm_r.loglikelihood_rolling([Req()])
    se_r = lm_r.scorer.recorder.records["unknown"][0][1]
    ref_r = exact_conditional(states, p, [0, 2, 1, 2], 1)
    assert abs(-ll_r - ref_r) < 4 * se_r + 0.02
    with pytest.raises(ValueError, match="likelihood=nelbo"):
        dl.DuoLM(model=model, tokenizer=IdTok(K), likelihood="official")


# ------------------------------------------------------------------------------------------------ duo_eval data
def test_duo_eval_sets_come_from_the_data_builder_and_accept_the_old_source_name(monkeypatch):
    """``dataset.source: corpus`` (old name) and ``shakespeare`` give the same held-out blocks, equal to a split and
    wrap built by hand from the low-level text functions."""
    from omegaconf import OmegaConf

    from duo_plugin.data import corpora
    from duo_plugin.data import text as data_text
    from duo_plugin.recipes.duo_eval import build_eval_sets

    class Tok:
        bos_id, eos_id, pad_id = 0, 1, None

    docs = [list(range(2 + i, 9 + 2 * i)) for i in range(10)]
    monkeypatch.setattr(corpora, "load_shakespeare", lambda tok, unit, cache_dir=None: data_text.as_docs(docs))
    held = docs[-2:]  # val_fraction 0.2 of 10 documents: the last 2
    flat = [t for d in held for t in d]
    out = {}
    for src in ("corpus", "shakespeare"):
        cfg = OmegaConf.create({"dataset": {"source": src, "val_fraction": 0.2, "packing": "wrap"}})
        (name, (blocks, mask)), = build_eval_sets(cfg, Tok(), 8).items()
        assert name == "shakespeare_heldout"
        out[src] = blocks
        content = blocks[mask & (blocks > 1)].tolist()
        assert content == flat  # every held-out token once, in order (BOS/EOS markers aside), nothing else
    assert torch.equal(out["corpus"], out["shakespeare"])
    with pytest.raises(ValueError, match=r"dataset.source=files needs dataset.files"):
        build_eval_sets(OmegaConf.create({"dataset": {"source": "files"}}), Tok(), 8)
