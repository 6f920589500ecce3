"""duo_plugin.kernels: every implementation equals the dense reference (values and gradients)."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

import duo_plugin.kernels as dk
from duo_plugin.diffusion.uniform import posterior
from duo_plugin.kernels import curriculum as C
from duo_plugin.kernels import nelbo as N
from duo_plugin.kernels import rng
from duo_plugin.kernels import sampler as S

try:
    import triton  # noqa: F401

    HAS_TRITON = dk.triton_available("cpu")
except Exception:  # pragma: no cover
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable (or TRITON_INTERPRET unset)")

B, L, K, D = 2, 5, 70, 24
VV = torch.ones(K, dtype=torch.bool)
VV[[0, 5, 69]] = False


def _impls():
    return ["chunked", pytest.param("triton", marks=needs_triton)]


# ---------------------------------------------------------------------------------------------------------- rng
def test_mix64_matches_python_ints():
    r = random.Random(0)
    vals = [r.getrandbits(64) for _ in range(200)] + [0, 1, (1 << 64) - 1, 1 << 63]
    out = rng.mix64(torch.tensor([rng._s64(v) for v in vals], dtype=torch.int64))
    assert [o & ((1 << 64) - 1) for o in out.tolist()] == [rng.mix64_int(v) for v in vals]


def test_counter_normal_and_exponential_statistics():
    keys = rng.position_keys(torch.tensor([7, 8], dtype=torch.int64), 50, rng.STREAM_CURRICULUM)
    n = rng.counter_normal(keys, 2000).double()
    assert abs(n.mean().item()) < 0.01 and abs(n.var().item() - 1) < 0.01
    assert abs((n > 1.96).double().mean().item() - 0.025) < 0.002
    e = rng.counter_exponential(keys, 2000)
    assert abs(e.mean().item() - 1) < 0.01 and bool((e > 0).all())
    # distinct keys give different streams; same keys are deterministic
    assert not torch.equal(n[0, 0], n[0, 1]) and not torch.equal(n[0], n[1])
    assert torch.equal(n, rng.counter_normal(keys, 2000).double())


def test_noise_is_per_row_seed_not_batch_composition():
    x0 = torch.randint(0, K, (2, L))
    seeds = torch.tensor([11, 22], dtype=torch.int64)
    w2 = dk.curriculum_latent_reference(x0, 0.9, 0.4, seeds, K)
    w1 = dk.curriculum_latent_reference(x0[1:], 0.9, 0.4, seeds[1:], K)
    assert torch.equal(w2[1], w1[0])
    assert not torch.equal(w2[0], w2[1])


def test_latent_definition():
    x0 = torch.randint(0, K, (B, L))
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    w = dk.curriculum_latent_reference(x0, torch.tensor([0.9, 0.8]), torch.tensor([0.3, 0.6]), seeds, K, VV)
    keys = rng.position_keys(seeds, L, rng.STREAM_CURRICULUM)
    eps = rng.counter_normal(keys, K)
    exp = eps * torch.tensor([0.3, 0.6])[:, None, None]
    exp = exp + torch.nn.functional.one_hot(x0, K) * torch.tensor([0.9, 0.8])[:, None, None]
    exp = exp.masked_fill(~VV, float("-inf"))
    torch.testing.assert_close(w, exp, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- curriculum
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("tau", [1e-3, 0.5])
@pytest.mark.parametrize("valid", [False, True])
def test_curriculum_soft_embedding_matches_reference(impl, tau, valid):
    torch.manual_seed(0)
    vv = VV if valid else None
    x0 = torch.randint(1, 5, (B, L)) if valid else torch.randint(0, K, (B, L))
    seeds = torch.tensor([3, 12345678901234], dtype=torch.int64)
    E = torch.randn(K, D, requires_grad=True)
    at = torch.tensor([0.9, 0.95])
    st = (1 - at**2).sqrt()
    e_ref, z_ref = C.curriculum_soft_embedding_reference(x0, at, st, tau, seeds, E, vv)
    w = dk.curriculum_latent_reference(x0, at, st, seeds, K, vv)
    assert torch.equal(z_ref, w.argmax(-1))
    g = torch.randn_like(e_ref)
    (gr_ref,) = torch.autograd.grad((e_ref * g).sum(), E)
    if impl == "chunked":  # several chunks of 2 rows
        e, z = C.curriculum_soft_embedding_chunked(x0, at, st, tau, seeds, E, vv, workspace=2 * K)
    else:
        e, z = dk.curriculum_soft_embedding(x0, at, st, tau, seeds, E, vv, impl=impl)
    (gr,) = torch.autograd.grad((e * g).sum(), E)
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr, gr_ref, rtol=1e-5, atol=1e-5)
    if vv is not None:
        assert bool(vv[z].all()) and float(gr[~vv].abs().max()) == 0.0


def test_curriculum_feeds_dit_via_embedding_override():
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(0)
    model = duo_dit_tiny(K, L)
    x0 = torch.randint(0, K, (B, L))
    seeds = torch.tensor([4, 5], dtype=torch.int64)
    sigma = torch.tensor([0.5, 1.0])
    tau = 1e-3
    emb, z = dk.curriculum_soft_embedding(x0, 0.9, 0.43, tau, seeds, model.vocab_embed.weight, impl="chunked")
    with dk.embedding_override(model.vocab_embed, emb):
        h = model.forward_hidden(z, sigma)
    w = dk.curriculum_latent_reference(x0, 0.9, 0.43, seeds, K)
    h_ref = model.forward_hidden(w / tau, sigma)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(h)
    (g1,) = torch.autograd.grad((h * g).sum(), model.vocab_embed.weight)
    (g2,) = torch.autograd.grad((h_ref * g).sum(), model.vocab_embed.weight)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ NELBO
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("valid", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_nelbo_matches_reference(impl, valid, with_bias):
    torch.manual_seed(1)
    vv = VV if valid else None
    h = torch.randn(B, L, D, requires_grad=True)
    W = (torch.randn(K, D) * 0.5).requires_grad_()
    b = torch.randn(K).requires_grad_() if with_bias else None
    x0 = torch.randint(1, 5, (B, L))
    z = x0.clone()
    z[:, ::2] = torch.randint(6, 60, (B, 3))
    if valid:  # an id outside valid_vocab is refused on every path (duo_nelbo's contract); pads get a valid filler
        bad = x0.clone()
        bad[0, 1] = 0
        with pytest.raises(ValueError, match=r"x0 holds ids outside valid_vocab \[0\]"):
            dk.fused_duo_nelbo(h, W, b, z, bad, torch.tensor([0.3, 0.9]), torch.tensor([-0.999, -1.5]), vv, impl=impl)
    a = torch.tensor([0.3, 0.9])
    ap = torch.tensor([-0.999, -1.5])
    params = [h, W] + ([b] if with_bias else [])
    f_ref = N.fused_duo_nelbo_reference(h, W, b, z, x0, a, ap, vv)
    assert bool((f_ref >= -1e-4).all())
    g = torch.rand_like(f_ref)
    gr_ref = torch.autograd.grad((f_ref * g).sum(), params)
    if impl == "chunked":
        f = N.fused_duo_nelbo_chunked(h, W, b, z, x0, a, ap, vv, workspace=3 * K)
    else:
        f = dk.fused_duo_nelbo(h, W, b, z, x0, a, ap, vv, impl=impl)
    gr = torch.autograd.grad((f * g).sum(), params)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-4)
    for p, q in zip(gr, gr_ref):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("upstream", ["mean", "masked", "random", "zero"])
@pytest.mark.parametrize("needs", ["all", "hidden_only", "weight_only"])
def test_chunked_nelbo_gradient_for_any_upstream_weights(upstream, needs):
    """The chunked path precomputes the gradient for unit upstream weights in the forward and corrects the tokens
    whose weight differs from the most common one: every weighting and every subset of inputs needing a gradient
    must equal dense autograd (tiles of 4 tokens so that corrections span several tiles)."""
    torch.manual_seed(3)
    n = 13
    h = torch.randn(1, n, D, requires_grad=needs != "weight_only")
    W = (torch.randn(K, D) * 0.5).requires_grad_(needs != "hidden_only")
    b = torch.randn(K).requires_grad_(needs == "all")
    ids = VV.nonzero().flatten()  # duo_nelbo's contract: ids in valid_vocab
    x0 = ids[torch.randint(0, ids.numel(), (1, n))]
    z = torch.where(torch.rand(1, n) < 0.5, x0, ids[torch.randint(0, ids.numel(), (1, n))])
    a = torch.rand(1, n, dtype=torch.float64) * 0.9 + 0.05
    g = {"mean": torch.full((1, n), 1.0 / n), "masked": (torch.rand(1, n) < 0.7).float() / 9,
         "random": torch.rand(1, n), "zero": torch.zeros(1, n)}[upstream]
    params = [t for t in (h, W, b) if t.requires_grad]
    f_ref = N.fused_duo_nelbo_reference(h, W, b, z, x0, a, -1.3, VV)
    gr_ref = torch.autograd.grad((f_ref * g).sum(), params)
    f = N.fused_duo_nelbo_chunked(h, W, b, z, x0, a, -1.3, VV, workspace=4 * K)
    gr = torch.autograd.grad((f * g).sum(), params)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-4)
    for p, q in zip(gr, gr_ref):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_row_sum64_and_chunked_nelbo_at_a_vocabulary_wider_than_one_block():
    torch.manual_seed(5)
    x = torch.rand(3, 5000) * torch.logspace(-8, 2, 5000)
    torch.testing.assert_close(N._row_sum64(x), x.double().sum(1), rtol=1e-6, atol=0)
    k, n = 4500, 6
    h = torch.randn(1, n, 8, requires_grad=True)
    W = torch.randn(k, 8, requires_grad=True)
    x0 = torch.randint(0, k, (1, n))
    z = x0.roll(1, 1)
    f_ref = N.fused_duo_nelbo_reference(h, W, None, z, x0, 0.2, -1.0)
    gr_ref = torch.autograd.grad(f_ref.mean(), (h, W))
    f = N.fused_duo_nelbo_chunked(h, W, None, z, x0, 0.2, -1.0)
    gr = torch.autograd.grad(f.mean(), (h, W))
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-4)
    for p, q in zip(gr, gr_ref):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_chunked_nelbo_without_grad_matches_reference():
    torch.manual_seed(4)
    h, W = torch.randn(2, 7, D), torch.randn(K, D)
    x0 = torch.randint(0, K, (2, 7))
    with torch.no_grad():
        f = N.fused_duo_nelbo_chunked(h, W, None, x0, x0.flip(1), 0.4, -1.0, workspace=3 * K)
    torch.testing.assert_close(f, N.fused_duo_nelbo_reference(h, W, None, x0, x0.flip(1), 0.4, -1.0),
                               rtol=1e-5, atol=1e-4)


@needs_triton
def test_nelbo_small_alpha_precision():
    """Tiny α makes every softplus term ≈ r·x_θ ≪ 1: the Triton log1p must stay accurate."""
    torch.manual_seed(2)
    h = torch.randn(1, 4, D)
    W = torch.randn(K, D)
    x0 = torch.randint(0, K, (1, 4))
    f_ref = N.fused_duo_nelbo_reference(h, W, None, x0, x0, 2e-3, -0.999)
    f = dk.fused_duo_nelbo(h, W, None, x0, x0, 2e-3, -0.999, impl="triton")
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("valid", [False, True])
def test_posterior_sample_matches_reference(impl, valid):
    torch.manual_seed(3)
    vv = VV if valid else None
    lx = torch.log_softmax(torch.randn(B, 8, K) * 2, -1)
    z = torch.randint(1, 5, (B, 8))
    at, as_ = torch.tensor([0.3, 0.5]), torch.tensor([0.6, 1.0])
    seeds = torch.tensor([5, 9], dtype=torch.int64)
    ref = S.posterior_sample_reference(lx, z, at, as_, seeds, 3, vv)
    if impl == "chunked":
        out = S.posterior_sample_chunked(lx, z, at, as_, seeds, 3, vv, workspace=3 * K)
    else:
        out = dk.posterior_sample_step(lx, z, at, as_, seeds, 3, vv, impl=impl)
    assert torch.equal(out, ref)
    if vv is not None:
        assert bool(vv[out].all())
    assert not torch.equal(ref, S.posterior_sample_reference(lx, z, at, as_, seeds, 4, vv))  # step keys the stream


def test_posterior_sample_distribution():
    torch.manual_seed(4)
    k, n = 6, 20000
    lx = torch.log_softmax(torch.randn(k), -1).expand(1, n, k).contiguous()
    z = torch.full((1, n), 2)
    out = dk.posterior_sample_step(lx, z, 0.4, 0.7, torch.tensor([1], dtype=torch.int64), 0, impl="chunked")
    p = posterior(z[:, :1], lx[:, :1].double().exp(), 0.4, 0.7)[0, 0]
    freq = torch.bincount(out[0], minlength=k).double() / n
    assert float((freq - p).abs().max()) < 4 * math.sqrt(0.25 / n)


# --------------------------------------------------------------------------------------------------- dispatch
def test_resolve_impl():
    assert dk.resolve_impl("auto", "cpu") == "chunked"
    assert dk.resolve_impl("reference", "cpu") == "reference"
    with pytest.raises(ValueError):
        dk.resolve_impl("fast", "cpu")


# ------------------------------------------------------------------------------------------- mixture sampler
@pytest.mark.parametrize("valid", [False, True])
def test_posterior_mixture_sparse_equals_dense_stream(valid):
    torch.manual_seed(5)
    vv = VV if valid else None
    lx = torch.log_softmax(torch.randn(B, 40, K) * 2, -1)
    z = torch.randint(1, 5, (B, 40))
    at, as_ = torch.tensor([0.2, 0.5]), torch.tensor([0.7, 1.0])
    seeds = torch.tensor([5, 9], dtype=torch.int64)
    ref = S.posterior_mixture_reference(lx, z, at, as_, seeds, 3, vv)
    out = S.posterior_mixture_sample(lx, z, at, as_, seeds, 3, vv, workspace=3 * K)
    assert torch.equal(out, ref)
    assert torch.equal(dk.posterior_sample_step(lx, z, at, as_, seeds, 3, vv, method="mixture"), ref)
    if vv is not None:
        assert bool(vv[out].all())
    assert not torch.equal(ref, S.posterior_mixture_reference(lx, z, at, as_, seeds, 4, vv))


@pytest.mark.parametrize("valid", [False, True])
def test_posterior_mixture_distribution(valid):
    """Monte Carlo vs uniform.posterior (float64), including renormalisation over valid ids."""
    torch.manual_seed(6)
    k, n = 7, 40000
    vv = None
    if valid:
        vv = torch.ones(k, dtype=torch.bool)
        vv[[0, 4]] = False
    lx = torch.log_softmax(torch.randn(k) * 1.5, -1).expand(1, n, k).contiguous()
    z = torch.full((1, n), 2)
    out = dk.posterior_sample_step(lx, z, 0.3, 0.65, torch.tensor([1], dtype=torch.int64), 0, vv, method="mixture")
    p = posterior(z[:, :1], lx[:, :1].double().exp(), 0.3, 0.65, vv)[0, 0]
    freq = torch.bincount(out[0], minlength=k).double() / n
    assert float((freq - p).abs().max()) < 4 * math.sqrt(0.25 / n)


# -------------------------------------------------------------------------------- compiled chunked noise (CPU)
@pytest.mark.skipif(os.environ.get("DUO_TEST_COMPILE") != "1", reason="torch.compile takes ~1-2 min; DUO_TEST_COMPILE=1")
def test_compiled_chunked_curriculum_matches_reference(monkeypatch):
    monkeypatch.setenv("DUO_KERNELS_COMPILE", "1")
    torch.manual_seed(7)
    x0 = torch.randint(0, K, (B, L))
    seeds = torch.tensor([3, 11], dtype=torch.int64)
    wt = torch.randn(K, D, requires_grad=True)
    args = (x0, torch.tensor([0.9, 0.4]), torch.tensor([0.45, 0.9]), 0.5, seeds)
    e_ref, z_ref = C.curriculum_soft_embedding_reference(*args, wt, VV)
    e, z = C.curriculum_soft_embedding_chunked(*args, wt, VV, workspace=3 * K)
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(e)
    (gr,) = torch.autograd.grad(e_ref, wt, g)
    (gc,) = torch.autograd.grad(e, wt, g)
    torch.testing.assert_close(gc, gr, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- review: 64-bit offsets in the Triton posterior kernel
@pytest.mark.skipif(not torch.cuda.is_available() or not dk.triton_available("cuda"),
                    reason="needs CUDA + Triton and ~9 GB of GPU memory")
def test_posterior_triton_large_rows_times_vocab():
    """rows * K >= 2^31 must not wrap the int32 offset into log x_θ: with x_θ a point mass per row and α_s = 1 the
    draw is that id deterministically (independent reference: the point-mass ids themselves)."""
    k = 50258
    n = (1 << 31) // k + 64  # the last 64 rows start beyond 2^31 elements
    dev = torch.device("cuda")
    target = torch.randint(0, k, (n,), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    lx = torch.full((1, n, k), float("-inf"), device=dev)
    lx[0].scatter_(1, target[:, None], 0.0)
    z = torch.zeros(1, n, dtype=torch.long, device=dev)
    out = S.posterior_sample_triton(lx, z, 0.3, 1.0, torch.tensor([7], dtype=torch.int64), 0)
    assert torch.equal(out[0, -128:], target[-128:])
    del lx
