"""DiT denoiser: checked against an independent brute-force reference of docs/method.md §6."""

import math

import pytest
import torch
import torch.nn.functional as F

from duo_plugin.models import DiT, SoftTopK, duo_dit_medium, duo_dit_small, duo_dit_tiny

K, L = 37, 12


def randomize(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny(**kw):
    torch.manual_seed(0)
    return duo_dit_tiny(K, 32, **kw).eval()


# ---------------------------------------------------------------- independent reference forward
def ref_forward(m, ids_or_emb, sigma, key_mask=None):
    """Brute force: explicit attention matrices, complex-number RoPE, manual LayerNorm, float64."""
    P = {k: v.double() for k, v in m.state_dict().items()}
    emb = P["vocab_embed.weight"][ids_or_emb] if not ids_or_emb.is_floating_point() else ids_or_emb.double()
    B, Ln, D = emb.shape
    H = m.n_heads
    hd = D // H
    # sinusoidal features, closed form: [cos(s * 10000^{-i/128}), sin(...)]
    i = torch.arange(128, dtype=torch.float64)
    f = 10000.0 ** (-i / 128)
    feats = torch.cat([torch.cos(sigma.double()[:, None] * f), torch.sin(sigma.double()[:, None] * f)], -1)
    lin = lambda x, n, bias=True: x @ P[n + ".weight"].T + (P[n + ".bias"] if bias else 0)
    c = F.silu(lin(F.silu(lin(feats, "sigma_map.mlp.0")), "sigma_map.mlp.2"))

    def ln(x, w):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w

    pos = torch.arange(Ln, dtype=torch.float64)
    theta = pos[:, None] * (10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd))[None]
    rot = torch.polar(torch.ones_like(theta), theta)  # e^{i theta}, [L, hd/2]

    def rope(x):  # x [B, L, H, hd], rotate-half pairs (j, j + hd/2)
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], -1)

    h = emb
    for b in range(len(m.blocks)):
        n = f"blocks.{b}"
        mod = lin(c, n + ".adaLN_modulation")[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, -1)
        a = ln(h, P[n + ".norm1.weight"]) * (1 + sc1) + sh1
        qkv = lin(a, n + ".attn_qkv", bias=False).view(B, Ln, 3, H, hd)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        if m.causal:
            scores = scores.masked_fill(~torch.ones(Ln, Ln, dtype=torch.bool).tril(), float("-inf"))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(B, Ln, D)
        h = h + g1 * lin(att, n + ".attn_out", bias=False)
        u = ln(h, P[n + ".norm2.weight"]) * (1 + sc2) + sh2
        u = lin(F.gelu(lin(u, n + ".mlp.0"), approximate="tanh"), n + ".mlp.2")
        h = h + g2 * u
    sh, sc = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, -1)
    h = ln(h, P["output_layer.norm_final.weight"]) * (1 + sc) + sh
    return torch.log_softmax(lin(h, "output_layer.linear"), -1)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_bruteforce_reference(causal):
    m = randomize(tiny(causal=causal))
    x = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 2.5])
    out = m(x, sigma)
    assert out.dtype == torch.float32 and out.shape == (2, L, K)
    torch.testing.assert_close(out.double(), ref_forward(m, x, sigma), atol=2e-4, rtol=1e-4)


def test_uniform_at_init_and_logsumexp_zero():
    m = tiny()
    x = torch.randint(0, K, (3, L))
    out = m(x, torch.rand(3))
    assert out.dtype == torch.float32 and out.shape == (3, L, K)
    torch.testing.assert_close(out, torch.full_like(out, -math.log(K)), atol=1e-6, rtol=0)
    r = randomize(tiny())(x, torch.rand(3))
    torch.testing.assert_close(torch.logsumexp(r, -1), torch.zeros(3, L), atol=1e-5, rtol=0)


def test_bidirectional_vs_causal_twin():
    bi = randomize(tiny())
    ca = tiny(causal=True)
    ca.load_state_dict(bi.state_dict())
    x = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(2))
    x2 = x.clone()
    x2[:, -1] = (x[:, -1] + 1) % K
    s = torch.tensor([1.0, 1.0])
    assert (bi(x, s)[:, 0] - bi(x2, s)[:, 0]).abs().max() > 1e-4  # earlier output sees later token
    torch.testing.assert_close(ca(x, s)[:, :-1], ca(x2, s)[:, :-1], atol=1e-6, rtol=0)


def test_soft_inputs_one_hot_and_topk():
    m = randomize(tiny())
    x = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.5, 1.5])
    hard = m(x, s)
    torch.testing.assert_close(m(F.one_hot(x, K).float() * 1e4, s), hard, atol=1e-5, rtol=1e-5)
    # exactly one-hot weights via SoftTopK(k=1)
    torch.testing.assert_close(m(SoftTopK(x[..., None], torch.ones(2, L, 1)), s), hard, atol=1e-5, rtol=1e-5)
    # dense logits: reference embedding = softmax(logits) @ E computed here
    logits = torch.randn(2, L, K, generator=torch.Generator().manual_seed(4))
    dense = m(logits, s)
    emb = torch.softmax(logits.double(), -1) @ m.vocab_embed.weight.double()
    torch.testing.assert_close(dense.double(), ref_forward(m, emb, s), atol=2e-4, rtol=1e-4)
    # top-k with k = K (ids in a random order) equals dense
    perm = torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(5)) for _ in range(2 * L)])
    ids = perm.view(2, L, K)
    w = torch.softmax(logits, -1).gather(-1, ids)
    torch.testing.assert_close(m(SoftTopK(ids, w), s), dense, atol=1e-5, rtol=1e-5)
    # top-k with k < K equals dense logits with the others at -inf
    top = logits.topk(5, -1)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(m(SoftTopK(top.indices, torch.softmax(top.values, -1)), s), m(masked, s),
                               atol=1e-5, rtol=1e-5)


def test_soft_input_gradient_and_hidden_projection():
    m = randomize(tiny())
    logits = torch.randn(1, L, K, requires_grad=True)
    s = torch.tensor([1.0])
    out = m(logits, s)
    out[..., 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    h = m.forward_hidden(logits.detach(), s)
    assert h.shape == (1, L, 64)
    torch.testing.assert_close(torch.log_softmax(m.output_projection(h).float(), -1), m(logits.detach(), s))


def test_padding_mask_equals_unpadded_prefix():
    m = randomize(tiny())
    x = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(6))
    s = torch.tensor([0.7, 0.7])
    n_real = 7
    pm = torch.zeros(2, L, dtype=torch.bool)
    pm[:, :n_real] = True
    masked = m(x, s, padding_mask=pm)[:, :n_real]
    prefix = m(x[:, :n_real], s)
    torch.testing.assert_close(masked, prefix, atol=1e-5, rtol=1e-5)
    assert (m(x, s)[:, :n_real] - prefix).abs().max() > 1e-4  # without the mask pads are attended
    torch.testing.assert_close(masked.double(), ref_forward(m, x, s, pm)[:, :n_real], atol=2e-4, rtol=1e-4)
    # an all-pad row does not produce NaN
    pm2 = pm.clone()
    pm2[1] = False
    assert torch.isfinite(m(x, s, padding_mask=pm2)).all()
    # causal + padding
    c = tiny(causal=True)
    c.load_state_dict(m.state_dict())
    torch.testing.assert_close(c(x, s, padding_mask=pm)[:, :n_real], c(x[:, :n_real], s), atol=1e-5, rtol=1e-5)


def test_time_conditioning():
    m = randomize(tiny())
    x = torch.randint(0, K, (1, L))
    assert (m(x, torch.tensor([0.1])) - m(x, torch.tensor([3.0]))).abs().max() > 1e-4
    torch.testing.assert_close(m(x, torch.tensor(0.1)), m(x, torch.tensor([[0.1]])))
    nt = tiny(time_conditioning=False)
    nt.load_state_dict(m.state_dict())
    torch.testing.assert_close(nt(x, torch.tensor([0.1])), nt(x, torch.tensor([3.0])))
    torch.testing.assert_close(nt(x, None), ref_forward(m, x, torch.zeros(1)).float(), atol=2e-4, rtol=1e-4)


def test_dropout_train_vs_eval():
    m = randomize(tiny(dropout=0.5))
    x = torch.randint(0, K, (1, L))
    s = torch.tensor([1.0])
    torch.testing.assert_close(m(x, s), m(x, s))
    m.train()
    torch.manual_seed(0)
    a = m(x, s)
    torch.manual_seed(1)
    assert (a - m(x, s)).abs().max() > 1e-4


def test_clear_errors():
    m = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long), torch.ones(1))
    with pytest.raises(ValueError, match="vocabulary width"):
        m(torch.zeros(1, 4, K + 1), torch.ones(1))
    with pytest.raises(ValueError, match="sigma"):
        m(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="sigma"):
        m(torch.zeros(2, 4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="padding_mask"):
        m(torch.zeros(2, 4, dtype=torch.long), torch.ones(2), padding_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="SoftTopK"):
        m(SoftTopK(torch.zeros(1, 4, 2, dtype=torch.long), torch.ones(1, 4, 3)), torch.ones(1))


def _dit_params(K, d, n_layers, cond, freq=256, ratio=4):
    """Closed-form parameter count of the paper's DiT (docs/method.md §6)."""
    emb = K * d
    t_mlp = (freq * cond + cond) + (cond * cond + cond)
    block = 2 * d + d * 3 * d + d * d + (d * ratio * d + ratio * d) + (ratio * d * d + d) + (cond * 6 * d + 6 * d)
    final = d + (d * K + K) + (cond * 2 * d + 2 * d)
    return emb + t_mlp + n_layers * block + final


def test_parameter_counts_meta():
    with torch.device("meta"):
        small = duo_dit_small(vocab_size=50258, max_seq_len=1024)
        medium = duo_dit_medium(vocab_size=50258, max_seq_len=1024)
        lm1b = duo_dit_small(vocab_size=30522, max_seq_len=128)
    n = sum(p.numel() for p in small.parameters())
    assert n == _dit_params(50258, 768, 12, 128)
    assert round(n / 1e6, 1) == 169.6  # the paper's "170M" (docs/method.md §6)
    assert round(sum(p.numel() for p in lm1b.parameters()) / 1e6) == 139
    assert sum(p.numel() for p in medium.parameters()) == _dit_params(50258, 1024, 24, 128)
    assert small.vocab_size == 50258 and small.max_seq_len == 1024
    assert small.blocks[0].dropout == 0.1 and small.n_heads == 12


def test_fp32_on_cpu_and_builder_record():
    m = duo_dit_tiny(K, 16, dropout=0.1, cond_dim=16)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m._duo_builder[0] == "duo_plugin.models.dit.duo_dit_tiny"
    assert m._duo_builder[1]["cond_dim"] == 16 and m._duo_builder[1]["vocab_size"] == K
    assert isinstance(m, DiT)


def test_bf16_autocast_outputs_fp32_log_probs():
    m = randomize(tiny(), std=0.1)
    x = torch.randint(0, K, (2, L))
    s = torch.tensor([0.5, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, s)
        soft = m(torch.randn(2, L, K), s)
    assert out.dtype == torch.float32 and soft.dtype == torch.float32
    torch.testing.assert_close(out, m(x, s), atol=0.1, rtol=0.05)


# ---------------------------------------------------------------- initialisation variants (studies)
def test_init_variants_set_exactly_the_gates_and_the_output_weight():
    """``gate_init`` sets both residual-gate chunks of every block's adaLN bias (and nothing else);
    ``output_init_std`` draws the output weight from N(0, std^2) after every other initialisation, so every other
    parameter equals the default model's at the same seed."""
    base = tiny()
    var = tiny(gate_init=0.5, output_init_std=0.05)
    d = base.dim
    for name, p in var.state_dict().items():
        q = base.state_dict()[name]
        if name.endswith("adaLN_modulation.bias") and name.startswith("blocks."):
            want = torch.zeros(6 * d)
            want[2 * d:3 * d] = 0.5
            want[5 * d:6 * d] = 0.5
            assert torch.equal(p, want), name
        elif name == "output_layer.linear.weight":
            # 37 x 64 = 2,368 draws: the sample SD is within 4 % of 0.05 (its SE is ~1.5 %), the mean within 4 SE
            assert abs(float(p.std()) / 0.05 - 1) < 0.04 and abs(float(p.mean())) < 4 * 0.05 / p.numel() ** 0.5
        else:
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="output_init_std"):
        duo_dit_tiny(K, 32, output_init_std=-1.0)


def test_open_gates_change_the_initial_function_and_the_reference_agrees():
    """With the gates at 0 every block is the identity at initialisation: the output is the final layer applied to
    the embedding (hand formula); with open gates the blocks act, and the brute-force reference forward (which reads
    only the parameters) agrees with the model."""
    ids = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.3, 2.0])
    shut = tiny(output_init_std=0.05)
    P = {k: v.double() for k, v in shut.state_dict().items()}
    h = F.layer_norm(P["vocab_embed.weight"][ids], (shut.dim,))  # adaLN shift/scale of the final layer are 0
    want = torch.log_softmax(h @ P["output_layer.linear.weight"].T + P["output_layer.linear.bias"], -1)
    assert torch.allclose(shut(ids, sigma).double(), want, atol=1e-5)
    opened = tiny(gate_init=1.0, output_init_std=0.05)
    out = opened(ids, sigma)
    assert not torch.allclose(out.double(), want, atol=1e-3)
    assert torch.allclose(out.double(), ref_forward(opened, ids, sigma), atol=1e-4)


def test_init_variants_survive_save_and_load(tmp_path):
    from duo_plugin.models.checkpoint import load_pretrained, save_pretrained

    m = tiny(gate_init=0.25, output_init_std=0.02)
    save_pretrained(m, tmp_path / "m")
    back = load_pretrained(tmp_path / "m", weights="model").eval()
    ids = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(ids, torch.tensor([0.5, 1.0])), m(ids, torch.tensor([0.5, 1.0])))
