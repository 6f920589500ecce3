"""fairseq2 extension: entry point, ``duo`` family, archs, factory vs our DiT, converter, asset cards.

Runs only in the fairseq2 lane (scripts/test-fairseq2); skipped where fairseq2 is not installed.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import asdict

import pytest

fairseq2 = pytest.importorskip("fairseq2")

import torch  # noqa: E402

from duo_plugin.integrations.fairseq2 import ARCHS, DuoConfig  # noqa: E402
from duo_plugin.models.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from duo_plugin.models.dit import DiT, duo_dit_medium, duo_dit_small, duo_dit_tiny  # noqa: E402

K, L = 97, 16
TINY = DuoConfig(vocab_size=K, max_seq_len=L, dim=32, n_layers=2, n_heads=4, cond_dim=16, dropout=0.0)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # The DiT zero-initialises adaLN and the output layer (x_theta uniform): randomise every tensor so that
    # output comparisons are meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def f2(tmp_path_factory):
    """A native model dir + asset card written BEFORE init_fairseq2 (the extension reads the card dirs then)."""
    from duo_plugin.integrations.fairseq2.model import write_asset_card

    root = tmp_path_factory.mktemp("f2ext")
    ref = duo_dit_tiny(K, L, dim=32, n_layers=2, n_heads=4, cond_dim=16)
    _randomize(ref, 1)
    ema = {k: v + 0.01 for k, v in ref.state_dict().items()}
    native = save_pretrained(ref, root / "native", ema_state_dict=ema, metadata={"note": "test"})
    cards = root / "cards"
    write_asset_card(native, "duo_test_local", cards, weights="ema", arch="duo_tiny")
    os.environ["DUO_FAIRSEQ2_ASSET_DIRS"] = str(cards)
    from fairseq2 import init_fairseq2

    init_fairseq2()
    return {"native": native, "ref": ref, "ema": ema}


def test_entry_point_is_declared_and_importable_without_fairseq2_side_effects():
    eps = [ep for ep in md.entry_points(group="fairseq2.extension") if ep.name == "duo"]
    assert len(eps) == 1, "pyproject must declare [project.entry-points.'fairseq2.extension'] duo = ..."
    fn = eps[0].load()
    from duo_plugin.integrations.fairseq2 import setup_duo_extension

    assert fn is setup_duo_extension


def test_extension_registers_family_and_archs_on_init(f2):
    from duo_plugin.integrations.fairseq2.extension import get_duo_model_hub

    hub = get_duo_model_hub()
    assert set(ARCHS) <= hub.get_archs()
    assert hub.get_arch_config("duo_small") == DuoConfig()


@pytest.mark.parametrize(
    "arch,builder,kwargs",
    [("duo_small_owt", duo_dit_small, {}), ("duo_small_lm1b", duo_dit_small, dict(vocab_size=30522, max_seq_len=128)),
     ("duo_medium", duo_dit_medium, {})],
)
def test_arch_configs_match_core_builders(f2, arch, builder, kwargs):
    """Each named arch builds exactly the parameter shapes of the core builder (paper sizes, docs/method.md §6)."""
    from duo_plugin.integrations.fairseq2.extension import get_duo_model_hub

    cfg = get_duo_model_hub().get_arch_config(arch)
    with torch.device("meta"):
        ours = DiT(**asdict(cfg))
        ref = builder(**kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    if arch == "duo_small_owt":  # 169.6M parameters for K = 50258 (docs/method.md §6)
        assert abs(sum(p.numel() for p in ours.parameters()) / 1e6 - 169.6) < 0.1


def test_fairseq2_model_matches_our_dit_for_same_weights(f2):
    from fairseq2.device import CPU
    from duo_plugin.integrations.fairseq2.extension import get_duo_model_hub

    hub = get_duo_model_hub()
    model = hub.create_new_model(TINY, device=CPU)
    assert isinstance(model, DiT)
    _randomize(model, 7)
    ref = duo_dit_tiny(K, L, dim=32, n_layers=2, n_heads=4, cond_dim=16)
    ref.load_state_dict(model.state_dict())
    model.eval(), ref.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, K, (3, L), generator=g)
    sigma = torch.rand(3, generator=g) * 3
    soft = torch.randn(3, L, K, generator=g) * 5
    mask = torch.ones(3, L, dtype=torch.bool)
    mask[1, 10:] = False
    with torch.no_grad():
        assert torch.equal(model(x, sigma), ref(x, sigma))
        assert torch.equal(model(soft, sigma), ref(soft, sigma))
        assert torch.equal(model(x, sigma, padding_mask=mask), ref(x, sigma, padding_mask=mask))
        out = model(x, sigma)
    assert out.shape == (3, L, K) and out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, L))


def test_new_model_has_paper_init(f2):
    """Factory output keeps DiT's init: zero output layer -> x_theta exactly uniform (docs/method.md §6)."""
    from fairseq2.device import CPU
    from duo_plugin.integrations.fairseq2.extension import get_duo_model_hub

    model = get_duo_model_hub().create_new_model(TINY, device=CPU).eval()
    with torch.no_grad():
        out = model(torch.randint(0, K, (2, L)), torch.ones(2))
    torch.testing.assert_close(out, torch.full_like(out, -torch.log(torch.tensor(float(K)))))


def test_native_roundtrip_and_converter(f2, tmp_path):
    from duo_plugin.integrations.fairseq2.model import (
        convert_duo_state_dict, create_duo_model, load_native, save_native,
    )

    model = create_duo_model(TINY)
    _randomize(model, 3)
    out = save_native(model, tmp_path / "m", metadata={"step": 5})
    back = load_pretrained(out, weights="model")
    x, s = torch.randint(0, K, (2, L)), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        assert torch.equal(back(x, s), model.eval()(x, s))
    cfg, sd = load_native(out, weights="model")
    assert cfg == TINY
    from duo_plugin.integrations.fairseq2 import config_from_builder_kwargs
    from duo_plugin.models.checkpoint import read_duo_config

    rec = read_duo_config(out)
    assert config_from_builder_kwargs(rec["builder_kwargs"], rec["builder"]) == TINY
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    # converter: DDP / compile prefixes and {"model": ...} nesting -> DiT keys, values untouched
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}
    conv = convert_duo_state_dict(wrapped, TINY)
    assert conv.keys() == sd.keys() and all(conv[k] is sd[k] for k in sd)
    with pytest.raises(ValueError, match="vocab_size"):
        convert_duo_state_dict(sd, DuoConfig(**{**asdict(TINY), "vocab_size": K + 1}))
    with pytest.raises(ValueError, match="not a duo DiT"):
        convert_duo_state_dict({"decoder.tok_embeddings.weight": torch.zeros(2)}, TINY)


def test_asset_card_loads_native_ema_weights_through_fairseq2(f2):
    """A card written for a local native dir loads via fairseq2's own checkpoint loader + our converter."""
    from duo_plugin.integrations.fairseq2.extension import get_duo_model_hub

    hub = get_duo_model_hub()
    assert hub.get_model_config("duo_test_local") == DuoConfig(
        vocab_size=K, max_seq_len=L, dim=32, n_layers=2, n_heads=4, cond_dim=16, dropout=0.0)
    loaded = hub.load_model("duo_test_local").eval()
    ref = load_pretrained(f2["native"], weights="ema")
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.state_dict()["vocab_embed.weight"], f2["ema"]["vocab_embed.weight"])
