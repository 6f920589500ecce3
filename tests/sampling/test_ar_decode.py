"""KV-cache AR decoding: the cached step log-probs equal the full causal forward, and the sampled sequences equal a
plain no-cache loop (full forward on the whole prefix at every step) with the same generators."""

import pytest
import torch

from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.models import duo_dit_tiny
from duo_plugin.sampling.ar_decode import filter_next_token, sample_ar

K, LMAX = 37, 24


def _randomize(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _dit(time_conditioning=True):
    torch.manual_seed(0)
    return _randomize(duo_dit_tiny(K, LMAX, causal=True, time_conditioning=time_conditioning))


# the tiny decoder shapes of tests/models (GQA: 4 query heads, 2 key/value heads)
LLAMA = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
             intermediate_dim=48)
QWEN = dict(LLAMA, tie_word_embeddings=True)


def _decoder(family, time_conditioning=False):
    """The causal Llama builder (AR baseline), or a stock torchtune Qwen2 (q/k/v biases, tied head) wrapped causally
    (an adaptation parent used as an AR model)."""
    from duo_plugin.models import duo_llama3_2
    from duo_plugin.models.adapters import make_denoiser

    torch.manual_seed(0)
    if family == "llama":
        return _randomize(duo_llama3_2(**LLAMA, causal=True, time_conditioning=time_conditioning), std=0.2), LLAMA
    from torchtune.models.qwen2 import qwen2

    return _randomize(make_denoiser(qwen2(**QWEN), causal=True, time_conditioning=time_conditioning), std=0.2), QWEN


MODELS = ["dit", "dit_no_time", "llama", "qwen", "llama_time"]


def _model(kind):
    if kind.startswith("dit"):
        return _dit(time_conditioning=kind == "dit"), K
    m, cfg = _decoder(kind.split("_")[0], time_conditioning=kind.endswith("_time"))
    return m, cfg["vocab_size"]


@pytest.mark.parametrize("kind", MODELS)
def test_cached_steps_equal_the_full_forward(kind):
    """Prefill of 5 positions, then 1-token steps, then a 3-token step: every cached row == the full causal forward."""
    model, V = _model(kind)
    B, L = 3, 16
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros(B)
    with torch.no_grad():
        full = model(x, zeros)
        pieces = []
        with model.kv_cache(B, L) as cache:
            for lo, hi in [(0, 5), *[(i, i + 1) for i in range(5, 13)], (13, 16)]:
                pieces.append(model.forward_cached(x[:, lo:hi], cache, zeros))
            assert cache.pos == L
        cached = torch.cat(pieces, 1)
    assert cached.shape == full.shape == (B, L, V)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # the full forward works again after the cache context (torchtune's caches are deleted on exit)
    with torch.no_grad():
        torch.testing.assert_close(model(x, zeros), full, atol=0, rtol=0)


def _reference_sample(model, prompt, seq_len, gens, **law):
    """No cache: at every step the full causal forward on the whole prefix, last row, same law and generators."""
    from duo_plugin.diffusion.uniform import sample_categorical

    B = len(gens)
    z = prompt.expand(B, -1).clone()
    with torch.no_grad():
        while z.shape[1] < seq_len:
            lp = model(z, torch.zeros(B))[:, -1]
            z = torch.cat([z, sample_categorical(filter_next_token(lp, **law), gens)[:, None]], 1)
    return z


@pytest.mark.parametrize("kind", ["dit", "llama", "qwen"])
@pytest.mark.parametrize("law", [{}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}])
def test_samples_equal_the_no_cache_loop(kind, law):
    model, V = _model(kind)
    prompt = torch.tensor([1, 4, 2])
    B, L = 4, 14
    ref = _reference_sample(model, prompt, L, row_generators(7, 0, range(B)), **law)
    out = sample_ar(model, batch_size=B, seq_len=L, prompt=prompt, seed=7, chunk_size=3, **law)
    assert out.nfe == L - len(prompt)
    assert torch.equal(out.tokens, ref)
    assert torch.equal(out.tokens[:, :3], prompt.expand(B, -1))


def test_filter_next_token_against_brute_force():
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(2, 11, generator=g), -1)
    valid = torch.ones(11, dtype=torch.bool)
    valid[[0, 5]] = False
    out = filter_next_token(lp, temperature=0.5, top_k=4, top_p=0.8, valid_vocab=valid)
    assert out.dtype == torch.float64
    for b in range(2):
        p = torch.exp(lp[b].double() / 0.5)
        p[~valid] = 0
        p = p / p.sum()
        order = sorted(range(11), key=lambda i: -float(p[i]))[:4]  # top-4 valid ids
        kept, mass = [], 0.0
        top_mass = float(sum(p[i] for i in order))
        for i in order:  # nucleus on the renormalised top-4: keep while the mass before is < 0.8
            if mass < 0.8 * top_mass:
                kept.append(i)
            mass += float(p[i])
        want = torch.zeros(11, dtype=torch.float64)
        want[kept] = p[kept] / p[kept].sum()
        torch.testing.assert_close(out[b], want, atol=1e-12, rtol=0)


def test_sampling_law_matches_the_filtered_distribution():
    """Monte Carlo: 4,000 first tokens from a fixed model vs the filtered law (total variation < 0.04)."""
    model = _dit()
    prompt = torch.tensor([3])
    n = 4000
    out = sample_ar(model, batch_size=n, seq_len=2, prompt=prompt, seed=0, top_k=6)
    with torch.no_grad():
        law = filter_next_token(model(prompt[None], torch.zeros(1))[:, -1], top_k=6)[0]
    freq = torch.bincount(out.tokens[:, 1], minlength=K).double() / n
    assert 0.5 * (freq - law).abs().sum() < 0.04


def test_bad_inputs():
    model = _dit()
    with pytest.raises(ValueError, match="prompt"):
        sample_ar(model, batch_size=2, seq_len=5, prompt=None, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        sample_ar(model, batch_size=2, seq_len=5, prompt=torch.tensor([1]))
    with pytest.raises(ValueError, match="max_seq_len"):
        sample_ar(model, batch_size=2, seq_len=LMAX + 1, prompt=torch.tensor([1]), seed=0)
    bidir = duo_dit_tiny(K, LMAX)
    with pytest.raises(ValueError, match="KV-cache"):
        sample_ar(bidir, batch_size=2, seq_len=5, prompt=torch.tensor([1]), seed=0)
    with pytest.raises(ValueError, match="causal"):
        with bidir.kv_cache(2, 5):
            pass
