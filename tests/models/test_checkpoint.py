"""Checkpoint I/O: HF-format load/save for decoders, native safetensors for the DiT, EMA, atomicity."""

import json
import subprocess
import sys

import pytest
import torch

from duo_plugin.models import duo_dit_tiny, load_pretrained, save_pretrained
from duo_plugin.models.checkpoint import decode_valid_vocab, encode_valid_vocab

V, L = 64, 8


def _ids(seed=0, B=2, K=V):
    return torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(seed))


def test_checkpoint_module_does_not_import_torchtune():
    code = ("import sys, duo_plugin.models, duo_plugin.models.checkpoint, duo_plugin.models.dit;"
            "assert 'torchtune' not in sys.modules and 'lm_eval' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ DiT
def _dit(helpers, seed=0):
    torch.manual_seed(0)
    return helpers.randomize_(duo_dit_tiny(V, 16, dropout=0.1), seed=seed).eval()


def test_dit_round_trip_ema_valid_vocab(helpers, tmp_path):
    m = _dit(helpers)
    ema = {k: v + 0.01 for k, v in m.state_dict().items() if "blocks.0" not in k}  # partial EMA
    valid = torch.zeros(V, dtype=torch.bool)
    valid[:50] = True
    valid[60] = True
    out = save_pretrained(m, tmp_path / "run" / "dit", ema_state_dict=ema,
                          metadata={"step": 7, "valid_vocab": valid, "tokenizer": "gpt2"})
    assert sorted(p.name for p in out.iterdir()) == ["duo_config.json", "ema.safetensors", "model.safetensors"]
    cfg = json.loads((out / "duo_config.json").read_text())
    assert cfg["family"] == "dit" and cfg["builder"] == "duo_plugin.models.dit.duo_dit_tiny"
    assert cfg["valid_vocab"] == [[0, 50], [60, 61]] and cfg["metadata"] == {"step": 7, "tokenizer": "gpt2"}
    x, s = _ids(), torch.tensor([0.5, 1.0])
    raw = load_pretrained(out, weights="model")
    assert not raw.training and torch.equal(raw.valid_vocab, valid) and raw.duo_metadata["step"] == 7
    with torch.no_grad():
        torch.testing.assert_close(raw(x, s), m(x, s), atol=0, rtol=0)
    e = load_pretrained(out, weights="ema")
    for k, v in e.state_dict().items():
        expect = m.state_dict()[k] + (0.01 if "blocks.0" not in k else 0.0)
        torch.testing.assert_close(v, expect, atol=0, rtol=0)
    # the training EMA object's state dict is accepted as is
    from duo_plugin.training.ema import EMA

    tracker = EMA(m, decay=0.5)
    with torch.no_grad():
        tracker.shadow = {k: v + 1.0 for k, v in tracker.shadow.items()}
    e2 = load_pretrained(save_pretrained(m, tmp_path / "ema_obj", ema_state_dict=tracker.state_dict()))
    torch.testing.assert_close(e2.vocab_embed.weight, m.vocab_embed.weight + 1.0, atol=0, rtol=0)
    # without EMA, weights="ema" falls back to the raw weights
    out2 = save_pretrained(m, tmp_path / "noema")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out2)(x, s), m(x, s), atol=0, rtol=0)
    assert load_pretrained(out2).valid_vocab is None


def test_atomic_overwrite_and_errors(helpers, tmp_path):
    a, b = _dit(helpers, 1), _dit(helpers, 2)
    d = tmp_path / "m"
    save_pretrained(a, d)
    save_pretrained(b, d)  # replaces the previous model directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp / old dirs left behind
    torch.testing.assert_close(load_pretrained(d).state_dict()["vocab_embed.weight"], b.vocab_embed.weight)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="duo model directory"):
        save_pretrained(a, other)
    assert (other / "x.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="duo_config.json"):
        load_pretrained(other)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="weights"):
        load_pretrained(d, weights="best")
    # a failing write leaves the old directory intact
    with pytest.raises(ValueError):
        save_pretrained(a, d, ema_state_dict={"nope": torch.zeros(1)})
    torch.testing.assert_close(load_pretrained(d).state_dict()["vocab_embed.weight"], b.vocab_embed.weight)
    # vocabulary mismatch between duo_config and weights
    cfg = json.loads((d / "duo_config.json").read_text())
    cfg["builder_kwargs"]["vocab_size"] = V + 1
    cfg["vocab_size"] = V + 1
    (d / "duo_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(d, weights="model")
    with pytest.raises(ValueError, match="_duo_builder"):
        from duo_plugin.models import DiT

        save_pretrained(DiT(V, 8, dim=16, n_layers=1, n_heads=2, cond_dim=8), tmp_path / "x")


def test_valid_vocab_codec():
    m = torch.tensor([True, True, False, True, False, False, True])
    enc = encode_valid_vocab(m)
    assert enc == [[0, 2], [3, 4], [6, 7]]
    assert torch.equal(decode_valid_vocab(enc, 7), m)
    assert torch.equal(decode_valid_vocab([0, 1, 3, 6], 7), m)
    assert encode_valid_vocab([6, 3, 0, 1]) == enc and encode_valid_vocab(None) is None
    with pytest.raises(ValueError, match="outside"):
        decode_valid_vocab([[0, 8]], 7)


# -------------------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_decoder_hf_load_save_round_trip(helpers, tmp_path, family):
    from torchtune.training import FullModelHFCheckpointer

    from duo_plugin.models import load_hf_checkpoint

    torch.manual_seed(0)
    plain = helpers.randomize_(helpers.plain_decoder(family)).eval()
    hf_dir = helpers.write_hf_checkpoint(plain, family, tmp_path / "hf")
    model = load_hf_checkpoint(helpers.duo_builder(family, time_conditioning=True), hf_dir).eval()
    # pretrained weights arrived unchanged (Llama q/k permutation undone by torchtune)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.decoder.state_dict()[k], v, atol=0, rtol=0)
    x, s = _ids(1), torch.tensor([0.3, 2.0])
    full = torch.ones(2, L, L, dtype=torch.bool)
    with torch.no_grad():
        # zero-init adaLN: output == torchtune's bidirectional forward of the pretrained weights
        torch.testing.assert_close(model(x, s), torch.log_softmax(plain(x, mask=full).float(), -1),
                                   atol=2e-4, rtol=1e-4)
        helpers.randomize_(model.adaln, seed=3, std=0.05)
        ref = model(x, s)
    ema = {k: v * 0.5 for k, v in model.state_dict().items() if k.startswith("decoder.layers.0.")}
    out = save_pretrained(model, tmp_path / "duo", ema_state_dict=ema, metadata={"base": family})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "duo_config.json", "duo_extra.safetensors", "ema", "model.safetensors"]
    assert sorted(p.name for p in (out / "ema").iterdir()) == ["config.json", "duo_extra.safetensors",
                                                              "model.safetensors"]
    loaded = load_pretrained(out, weights="model")
    assert type(loaded).__name__ == "DecoderDenoiser" and loaded.time_conditioning
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, s), ref, atol=0, rtol=0)
    # save -> load -> save -> load is stable
    again = load_pretrained(save_pretrained(loaded, tmp_path / "duo2"), weights="model")
    with torch.no_grad():
        torch.testing.assert_close(again(x, s), ref, atol=0, rtol=0)
    # EMA weights: layer 0 halved, everything else from the model
    e = load_pretrained(out, weights="ema")
    for k, v in e.state_dict().items():
        expect = model.state_dict()[k] * (0.5 if k.startswith("decoder.layers.0.") else 1.0)
        torch.testing.assert_close(v, expect, atol=0, rtol=0)
    # torchtune's own checkpointer reads what we saved and gives back the decoder weights
    tt = FullModelHFCheckpointer(checkpoint_dir=str(out), checkpoint_files=["model.safetensors"],
                                 model_type="LLAMA3_2" if family == "llama" else "QWEN2",
                                 output_dir=str(tmp_path / "tt_out"))
    sd = tt.load_checkpoint()["model"]
    assert set(sd) == set(model.decoder_state_dict())
    for k, v in sd.items():
        torch.testing.assert_close(v, model.decoder_state_dict()[k], atol=0, rtol=0)
    # and the stock, untouched torchtune decoder loads it strictly
    helpers.plain_decoder(family).load_state_dict(sd, strict=True)


def test_decoder_without_extras_and_vocab_mismatch(helpers, tmp_path):
    from duo_plugin.models import load_hf_checkpoint

    plain = helpers.randomize_(helpers.plain_decoder("llama")).eval()
    hf_dir = helpers.write_hf_checkpoint(plain, "llama", tmp_path / "hf")
    model = load_hf_checkpoint(helpers.duo_builder("llama"), hf_dir)
    out = save_pretrained(model, tmp_path / "duo")
    assert not (out / "duo_extra.safetensors").exists()
    x = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(x, None), model.eval()(x, None), atol=0, rtol=0)
    from duo_plugin.models import duo_llama3_2

    wrong = duo_llama3_2(**{**helpers.LLAMA, "vocab_size": V + 8})
    with pytest.raises(ValueError, match="shape"):
        load_hf_checkpoint(wrong, hf_dir)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(model, tmp_path)


def test_lora_saved_merged_and_reloads_as_full_model(helpers, tmp_path):
    from duo_plugin.models import duo_lora_qwen2_5

    torch.manual_seed(0)
    lora = duo_lora_qwen2_5(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                            lora_rank=4, lora_alpha=8.0, time_conditioning=True, **helpers.QWEN)
    helpers.randomize_(lora, seed=4, std=0.1)  # non-zero lora_b and adaLN
    lora.eval()
    x, s = _ids(3), torch.tensor([1.0, 0.1])
    with torch.no_grad():
        ref = lora(x, s)
    out = save_pretrained(lora, tmp_path / "lora")
    cfg = json.loads((out / "duo_config.json").read_text())
    assert cfg["builder"] == "duo_plugin.models.builders.duo_qwen2_5" and "lora_rank" not in cfg["builder_kwargs"]
    full = load_pretrained(out)
    assert not any("lora" in k for k in full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(full(x, s), ref, atol=1e-5, rtol=1e-5)
