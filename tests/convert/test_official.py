"""duo-convert against the official code's own outputs (../shared/fixtures/official, see its README).

Each fixture was produced by running the official implementation; io.pt holds its inputs and outputs. A converted
folder, loaded with load_pretrained and post-processed the official way (Duo: log_softmax; MDLM: SUBS; AR: [MASK]
column out, then log_softmax), must reproduce those log-probabilities and per-token NELBO / NLL.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from duo_plugin.convert.cli import main as convert_main
from duo_plugin.convert.official import convert_official, read_official, to_official
from duo_plugin.diffusion.absorbing import mdlm_nelbo, subs_log_probs
from duo_plugin.diffusion.losses import duo_nelbo
from duo_plugin.models.checkpoint import load_pretrained
from duo_plugin.objectives.ar import ar_token_nll

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "official"
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"official fixtures not found at {FIX}")
TOL = 1e-5


def _io(kind):
    return torch.load(FIX / f"{kind}_dit_tiny" / "io.pt", weights_only=True)


def _outputs(model, io, kind):
    """(log_probs as the official forward post-processes them, per-token NELBO or NLL) from our model."""
    x = io["input_ids"]
    with torch.no_grad():
        if kind == "ar":
            logits = model.output_projection(model.forward_hidden(x)).float()
            logits[..., int(io["mask_index"])] = -1e6  # the official AR.nll post-processing
            lp = torch.log_softmax(logits, -1)
            return lp, ar_token_nll(lp, x)
        lp = model(x, io["sigma"])
        if kind == "duo":
            return lp, duo_nelbo(lp, x, io["x0"], io["alpha_t"].double(), io["dalpha_t"].double())
        logits = model.output_projection(model.forward_hidden(x, io["sigma"]))
        mi = int(io["mask_index"])
        sub = subs_log_probs(logits, x, mi)
        return sub, mdlm_nelbo(sub, x, io["x0"], io["alpha_t"], io["dalpha_t"], mi)


def _check_log_probs(ours, ref, kind):
    if kind == "mdlm":  # SUBS: the official code writes -1e6 where we write -inf; compare the finite pattern
        keep = ref > -1e5
        assert torch.equal(keep, ours > -1e5)
        ours, ref = ours[keep], ref[keep]
    assert (ours - ref).abs().max().item() <= TOL


def _check_nelbo(ours, ref):
    assert ours.shape == ref.shape
    scale = ref.abs().clamp_min(1.0)
    assert ((ours.float() - ref) / scale).abs().max().item() <= TOL


def test_weights_only_load_refuses_the_fixture():
    """The fixture really needs the restricted unpickler (so the tests below prove the safe path is used)."""
    with pytest.raises(pickle.UnpicklingError):
        torch.load(FIX / "duo_dit_tiny" / "lightning.ckpt", weights_only=True)


@pytest.mark.parametrize("kind", ["duo", "mdlm", "ar"])
@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_ckpt_matches_official_outputs(tmp_path, kind, weights):
    io = _io(kind)
    out = convert_official(FIX / f"{kind}_dit_tiny" / "lightning.ckpt", tmp_path / "m", weights=weights)
    model = load_pretrained(out)
    assert model.duo_metadata["objective"] == kind
    assert model.causal == (kind == "ar")
    assert model.time_conditioning == (kind == "duo")
    lp, per_token = _outputs(model, io, kind)
    _check_log_probs(lp, io[f"{weights}_log_probs"], kind)
    _check_nelbo(per_token, io[f"{weights}_nll" if kind == "ar" else f"{weights}_nelbo_per_token"])
    other = "raw" if weights == "ema" else "ema"  # the other weight set is far away: the right one was picked
    assert (lp - io[f"{other}_log_probs"]).abs().max().item() > 0.5


@pytest.mark.parametrize("kind", ["duo", "mdlm"])
def test_hf_export_matches_official_ema(tmp_path, kind):
    io = _io(kind)
    out = convert_official(FIX / f"{kind}_dit_tiny" / "hf", tmp_path / "m")
    model = load_pretrained(out)
    assert model.duo_metadata["objective"] == kind
    lp, per_token = _outputs(model, io, kind)
    _check_log_probs(lp, io["ema_log_probs"], kind)
    _check_nelbo(per_token, io["ema_nelbo_per_token"])
    ck = load_pretrained(convert_official(FIX / f"{kind}_dit_tiny" / "lightning.ckpt", tmp_path / "c"))
    for k, v in ck.state_dict().items():  # the HF export is the EMA set, bit for bit
        assert torch.equal(v, model.state_dict()[k]), k


def test_mdlm_metadata_and_process(tmp_path):
    from duo_plugin.eval.processes import process_for_model

    model = load_pretrained(convert_official(FIX / "mdlm_dit_tiny" / "lightning.ckpt", tmp_path / "m"))
    assert model.duo_metadata["mask_id"] == 49 and not bool(model.valid_vocab[49])
    spec = process_for_model(model)
    assert spec.kind == "absorbing" and spec.mask_id == 49
    ar = load_pretrained(convert_official(FIX / "ar_dit_tiny" / "lightning.ckpt", tmp_path / "a"))
    assert process_for_model(ar).kind == "causal"
    duo = load_pretrained(convert_official(FIX / "duo_dit_tiny" / "lightning.ckpt", tmp_path / "d"))
    assert duo.valid_vocab is None and process_for_model(duo).kind == "uniform"


def test_embedded_tokenizer_is_read_as_data(tmp_path):
    from duo_plugin.data.tokenizers import load_tokenizer

    out = convert_official(FIX / "duo_dit_tiny" / "lightning.ckpt", tmp_path / "m")
    tok = load_tokenizer(out / "tokenizer")
    assert tok.bos_id == tok.eos_id == 48 and tok.vocab_size == 50
    ids = tok.encode("abc")
    assert ids and all(0 <= i < 48 for i in ids)


def test_to_official_round_trip_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    src = FIX / "duo_dit_tiny" / "hf"
    folder = convert_official(src, tmp_path / "m")
    back = to_official(folder, tmp_path / "hf")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # and back again: the re-imported folder holds the same weights
    again = load_pretrained(convert_official(back, tmp_path / "m2"))
    for k, v in load_pretrained(folder).state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_to_official_from_ckpt_matches_hf_export(tmp_path):
    """A .ckpt converted and exported gives the official HF export's tensors (the export layout is inferred)."""
    from safetensors.torch import load_file

    for kind in ("duo", "mdlm"):
        back = to_official(convert_official(FIX / f"{kind}_dit_tiny" / "lightning.ckpt", tmp_path / kind),
                           tmp_path / f"{kind}_hf")
        ref = load_file(str(FIX / f"{kind}_dit_tiny" / "hf" / "model.safetensors"))
        got = load_file(str(back / "model.safetensors"))
        assert sorted(ref) == sorted(got)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
        cfg = json.loads((back / "config.json").read_text())
        ref_cfg = json.loads((FIX / f"{kind}_dit_tiny" / "hf" / "config.json").read_text())
        assert cfg == ref_cfg


def test_to_official_refuses_ar(tmp_path, capsys):
    folder = convert_official(FIX / "ar_dit_tiny" / "lightning.ckpt", tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        convert_main(["to-official", str(folder), str(tmp_path / "x")])
    assert e.value.code == 2
    assert "AR" in capsys.readouterr().err


def _hf_copy(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    src = FIX / "duo_dit_tiny" / "hf"
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.__setitem__("backbone.extra.weight", torch.zeros(3)), "backbone.extra.weight"),
    (lambda sd: sd.__setitem__("noise.sigma_max", torch.zeros(())), "noise.sigma_max"),
    (lambda sd: sd.pop("backbone.blocks.1.mlp.2.bias"), "blocks.1.mlp.2.bias"),
    (lambda sd: sd.__setitem__("backbone.blocks.0.mlp.0.bias", torch.zeros(95)), "blocks.0.mlp.0.bias"),
])
def test_unmappable_tensors_are_refused_with_one_line(tmp_path, capsys, edit, needle):
    d = _hf_copy(tmp_path, edit)
    with pytest.raises(SystemExit) as e:
        convert_main(["official", str(d), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duo-convert: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_kind_override_must_agree_with_the_tensors(tmp_path):
    from duo_plugin.errors import UserError

    with pytest.raises(UserError, match="adaLN"):
        read_official(FIX / "ar_dit_tiny" / "lightning.ckpt", kind="duo")
    om = read_official(FIX / "duo_dit_tiny" / "lightning.ckpt", kind="mdlm", overrides={"time_conditioning": False})
    assert om.kind == "mdlm" and om.time_conditioning is False and om.mask_id == 49


def test_cli_converts_and_reports(tmp_path, capsys):
    assert convert_main(["official", str(FIX / "mdlm_dit_tiny" / "lightning.ckpt"), str(tmp_path / "m"),
                         "--weights", "raw"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_pretrained(tmp_path / "m")
    lp, _ = _outputs(model, _io("mdlm"), "mdlm")
    _check_log_probs(lp, _io("mdlm")["raw_log_probs"], "mdlm")


@pytest.mark.parametrize("variant", ["pytorch_model.bin", "no_prefix", "sharded"])
def test_hf_export_variants(tmp_path, variant):
    """Known variants of the inferred HF-export layout load to the same weights as model.safetensors."""
    from safetensors.torch import load_file, save_file

    src = FIX / "duo_dit_tiny" / "hf"
    sd = load_file(str(src / "model.safetensors"))
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    if variant == "pytorch_model.bin":
        torch.save(sd, d / "pytorch_model.bin")
    elif variant == "no_prefix":
        save_file({k[len("backbone."):]: v for k, v in sd.items()}, str(d / "model.safetensors"))
    else:
        keys = sorted(sd)
        half = len(keys) // 2
        parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for name, ks in parts.items():
            save_file({k: sd[k] for k in ks}, str(d / name))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    got = load_pretrained(convert_official(d, tmp_path / "m"))
    ref = load_pretrained(convert_official(src, tmp_path / "r"))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k


def test_converted_folders_run_through_the_recipes(tmp_path):
    """duo_generate (Duo: Greedy-Tail and Ψ, MDLM) and duo_eval read converted folders, with the AR fixture as the
    Gen PPL scorer (tiny official models; the full-size run is tests/convert/test_fullsize.py)."""
    from omegaconf import OmegaConf

    from duo_plugin.recipes import duo_eval, duo_generate

    configs = ROOT / "configs" / "duo"
    models = {k: convert_official(FIX / f"{k}_dit_tiny" / "lightning.ckpt", tmp_path / k)
              for k in ("duo", "mdlm", "ar")}

    def cfg(name, **over):
        c = OmegaConf.load(configs / f"{name}.yaml")
        for k, v in over.items():
            OmegaConf.update(c, k, v, force_add=True)
        return c

    for kind, extra in (("duo", {"noise_removal": "greedy"}), ("duo", {"predictor": "psi"}), ("mdlm", {})):
        out = tmp_path / f"gen_{kind}_{len(extra)}_{sorted(extra)[0] if extra else ''}"
        m = duo_generate.run(cfg("generate", checkpoint=str(models[kind]), output_dir=str(out), steps=4,
                                 num_samples=2, batch_size=2, progress_bar=False,
                                 **{"genppl.path": str(models["ar"])}, **extra))
        assert m["tokens_per_sample"] == 16 and m["num_samples"] == 2 and m["gen_ppl"] > 1
        assert m["process"] == ("absorbing" if kind == "mdlm" else "uniform")
    text = tmp_path / "val.txt"
    text.write_text("abc abd\n\nbad cab\n\nab ba\n")
    for kind in ("duo", "mdlm"):
        m = duo_eval.run(cfg("eval_ppl", checkpoint=str(models[kind]), output_dir=str(tmp_path / f"ev_{kind}"),
                             progress_bar=False, batch_size=4, block_size=16, **{"dataset.source": "files",
                             "dataset.files": [str(text)], "dataset.val_fraction": 0}))
        assert m["process"] == ("absorbing" if kind == "mdlm" else "uniform")
        assert m["sets"]["files"]["tokens"] > 0 and m["sets"]["files"]["ppl"] > 1
