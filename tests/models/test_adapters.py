"""torchtune decoders made Duo denoisers: bidirectionality, soft inputs, adaLN-zero, shift, padding."""

import pytest
import torch
import torch.nn.functional as F

from duo_plugin.models import SoftTopK

V, L = 64, 10
FAMILIES = ["llama", "qwen"]


def _ids(seed, B=2):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def _pair(helpers, family, **kw):
    """(stock causal torchtune decoder, our denoiser) with identical random weights."""
    torch.manual_seed(0)
    plain = helpers.randomize_(helpers.plain_decoder(family)).eval()
    duo = helpers.duo_builder(family, **kw).eval()
    duo.load_decoder_state_dict(plain.state_dict())
    return plain, duo


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_torchtune_with_full_mask_and_is_bidirectional(helpers, family):
    plain, duo = _pair(helpers, family)
    x = _ids(0)
    full = torch.ones(2, L, L, dtype=torch.bool)
    with torch.no_grad():
        ref = torch.log_softmax(plain(x, mask=full).float(), -1)  # torchtune's own bidirectional path
        out = duo(x, None)
        assert out.dtype == torch.float32 and out.shape == (2, L, V)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(2, L), atol=1e-5, rtol=0)
        x2 = x.clone()
        x2[:, -1] = (x[:, -1] + 1) % V
        assert (duo(x2, None)[:, 0] - out[:, 0]).abs().max() > 1e-4
        # the untouched causal twin does not see later tokens
        torch.testing.assert_close(plain(x)[:, :-1], plain(x2)[:, :-1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tying_and_keys_preserved(helpers, family):
    plain, duo = _pair(helpers, family)
    assert duo.decoder.output.tied_module is duo.decoder.tok_embeddings
    assert list(duo.decoder_state_dict()) == list(plain.state_dict())
    assert duo.vocab_size == V and duo.max_seq_len == 32 and duo.time_conditioning is False
    assert duo.extra_state_dict() == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_inputs(helpers, family):
    _, duo = _pair(helpers, family)
    x = _ids(1)
    with torch.no_grad():
        hard = duo(x, None)
        torch.testing.assert_close(duo(F.one_hot(x, V).float() * 1e4, None), hard, atol=1e-5, rtol=1e-5)
        logits = torch.randn(2, L, V, generator=torch.Generator().manual_seed(2))
        dense = duo(logits, None)
        # reference: softmax-weighted embedding rows through torchtune's own layers with a full mask
        h = torch.softmax(logits, -1) @ duo.decoder.tok_embeddings.weight
        full = torch.ones(2, L, L, dtype=torch.bool)
        for layer in duo.decoder.layers:
            h = layer(h, mask=full)
        ref = torch.log_softmax(duo.decoder.output(duo.decoder.norm(h)).float(), -1)
        torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
        perm = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(2 * L)])
        ids = perm.view(2, L, V)
        torch.testing.assert_close(duo(SoftTopK(ids, torch.softmax(logits, -1).gather(-1, ids)), None), dense,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_adaln_zero_init_equals_plain_and_conditions_on_sigma(helpers, family):
    _, plain_duo = _pair(helpers, family)
    _, tc = _pair(helpers, family, time_conditioning=True)
    assert tc.time_conditioning and set(tc.extra_state_dict()) and not any(
        k.startswith("decoder.") for k in tc.extra_state_dict())
    x = _ids(3)
    s = torch.tensor([0.2, 4.0])
    with torch.no_grad():
        torch.testing.assert_close(tc(x, s), plain_duo(x, None), atol=1e-6, rtol=0)
        helpers.randomize_(tc.adaln, seed=5, std=0.05)
        helpers.randomize_(tc.final_adaln, seed=6, std=0.05)
        a, b = tc(x, s), tc(x, torch.tensor([4.0, 0.2]))
        assert (a - plain_duo(x, None)).abs().max() > 1e-4
        assert (a[0] - b[0]).abs().max() > 1e-4  # sigma changes the output
        torch.testing.assert_close(a[0], tc(x[:1], s[:1])[0], atol=1e-5, rtol=1e-5)  # per-row sigma
    with pytest.raises(ValueError, match="sigma"):
        tc(x, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_shift(helpers, family):
    _, base = _pair(helpers, family)
    _, sh = _pair(helpers, family, shift=True)
    x = _ids(4)
    with torch.no_grad():
        a, b = base(x, None), sh(x, None)
        torch.testing.assert_close(b[:, 1:], a[:, :-1])  # token i read from hidden state i-1
        torch.testing.assert_close(b[:, 0], a[:, 0])  # position 0: its own hidden state
        h = sh.forward_hidden(x, None)
        torch.testing.assert_close(torch.log_softmax(sh.output_projection(h).float(), -1), b)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_mask(helpers, family):
    _, duo = _pair(helpers, family, time_conditioning=True)
    helpers.randomize_(duo.adaln, seed=7, std=0.05)
    x = _ids(5)
    s = torch.tensor([1.0, 2.0])
    n = 6
    pm = torch.zeros(2, L, dtype=torch.bool)
    pm[:, :n] = True
    with torch.no_grad():
        masked = duo(x, s, padding_mask=pm)[:, :n]
        torch.testing.assert_close(masked, duo(x[:, :n], s), atol=1e-5, rtol=1e-5)
        assert (duo(x, s)[:, :n] - masked).abs().max() > 1e-4
        pm[1] = False
        assert torch.isfinite(duo(x, s, padding_mask=pm)).all()


def test_errors(helpers):
    _, duo = _pair(helpers, "llama")
    with pytest.raises(ValueError, match="max_seq_len"):
        duo(torch.zeros(1, 33, dtype=torch.long), None)
    with pytest.raises(ValueError, match="vocabulary width"):
        duo(torch.zeros(1, 4, V - 1), None)


def test_lora_builder_matches_base_at_init(helpers):
    from duo_plugin.models import duo_lora_llama3_2

    plain, duo = _pair(helpers, "llama")
    lora = duo_lora_llama3_2(["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0,
                             **helpers.LLAMA).eval()
    missing = lora.load_decoder_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("lora_" in k for k in missing)
    x = _ids(6)
    with torch.no_grad():
        torch.testing.assert_close(lora(x, None), duo(x, None), atol=1e-5, rtol=1e-5)  # lora_b = 0 at init
    assert lora._duo_full_builder[0].endswith("duo_llama3_2") and "lora_rank" not in lora._duo_full_builder[1]


def test_causal_llama_denoiser_equals_the_stock_causal_decoder(helpers):
    """``duo_llama3_2(causal=True)`` (the AR baseline on the adaptation architecture) == torchtune's own causal
    forward, also with padding; later tokens never influence earlier outputs."""
    plain, duo = _pair(helpers, "llama", causal=True)
    assert duo.causal
    x = _ids(3)
    with torch.no_grad():
        ref = torch.log_softmax(plain(x).float(), -1)  # the stock decoder is causal (is_causal=True, no mask)
        out = duo(x, None)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        x2 = x.clone()
        x2[:, 5:] = (x[:, 5:] + 1) % V
        torch.testing.assert_close(duo(x2, None)[:, :5], out[:, :5], atol=1e-6, rtol=0)
        pad = torch.ones(2, L, dtype=torch.bool)
        pad[0, 7:] = False  # right padding: real positions must equal the unpadded causal output
        outp = duo(x, None, padding_mask=pad)
        torch.testing.assert_close(outp[0, :7], out[0, :7], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shift"):
        helpers.duo_builder("llama", causal=True, shift=True)


def test_init_weights_gives_near_uniform_predictions(helpers):
    """From-scratch init: small weights (N(0, 0.02²)), so the initial predictions are close to uniform (entropy
    ≈ log V); the stock torchtune init (N(0, 1) embeddings, tied head) starts fully peaked. adaLN stays zero."""
    import math

    duo = helpers.duo_builder("llama", time_conditioning=True)
    x = _ids(4)

    def entropy():
        with torch.no_grad():
            lp = duo(x, torch.zeros(2))
        return float(-(lp.exp() * lp).sum(-1).mean())

    before = entropy()
    duo.init_weights()
    after = entropy()
    assert before < 1.0 and abs(after - math.log(V)) < 0.1
    assert abs(duo.decoder.tok_embeddings.weight.std().item() - 0.02) < 0.003
    assert all(float(v.abs().max()) == 0 for k, v in duo.extra_state_dict().items() if "adaln" in k)
