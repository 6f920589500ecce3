"""The DiT's elementwise paths (rotary, LayerNorm weight, adaLN modulation, gated residual with dropout skipped at p = 0) against their
textbook definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from duo_plugin.models import dit as D


def test_rotary_matches_rotate_half_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8)
    cos, sin = D._rotary_cos_sin(7, 8, 10_000.0, "cpu")
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * cos + torch.cat([-x2, x1], dim=-1) * sin
    torch.testing.assert_close(D._apply_rotary(x, cos, sin), ref, rtol=1e-6, atol=1e-6)


def test_layernorm_modulate_and_gated_residual_match_definitions():
    torch.manual_seed(1)
    ln = D.LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_()
    x, shift, scale, gate, y = torch.randn(2, 5, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16), \
        torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16,), eps=1e-5) * ln.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(D._modulate(x, shift, scale), x * (1 + scale) + shift, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(D._gated_residual(x, gate, y, 0.0, True), x + gate * y, rtol=1e-6, atol=1e-6)
    torch.manual_seed(2)
    out = D._gated_residual(x, gate, y, 0.5, True)
    torch.manual_seed(2)
    torch.testing.assert_close(out, x + gate * F.dropout(y, 0.5, True))
    torch.testing.assert_close(D._gated_residual(x, gate, y, 0.5, False), x + gate * y, rtol=1e-6, atol=1e-6)


def test_output_is_log_probs_flag_is_truthful():
    """Wrappers may skip a second log_softmax when ``output_is_log_probs``: the forward must already be normalised."""
    torch.manual_seed(3)
    model = D.duo_dit_tiny(50, 6).eval()
    with torch.no_grad():
        model.output_projection.weight.normal_()
        out = model(torch.randint(0, 50, (2, 6)), torch.tensor([0.3, 1.2]))
    assert D.DiT.output_is_log_probs and out.dtype == torch.float32
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2, 6), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.log_softmax(out, -1), out, rtol=0, atol=1e-5)
