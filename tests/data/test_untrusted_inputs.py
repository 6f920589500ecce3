"""Model folders and data files are DATA: a tokenizer descriptor cannot name arbitrary code, every torch.load is
weights-only, binary training files are refused by name, and a checkpoint's stored tokenizer is enforced."""

from __future__ import annotations

import ast
import json
import logging
import random
import sys
from pathlib import Path

import pytest

from duo_plugin.data.tokenizers import (DESCRIPTOR_NAME, TORCHTUNE_TOKENIZER_BUILDERS, check_same_tokenizer,
                                        load_tokenizer)
from duo_plugin.data.text import load_documents, read_text_file
from duo_plugin.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hostile_module(tmp_path, monkeypatch):
    """An importable module whose import and call both leave a marker file (proof that code ran)."""
    marker = tmp_path / "pwned"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "duo_hostile_mod.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        f"def build(**kw):\n    open({str(marker)!r}, 'a').write('called\\n')\n")
    monkeypatch.syspath_prepend(str(pkg))
    yield marker
    sys.modules.pop("duo_hostile_mod", None)


@pytest.mark.parametrize("component", ["duo_hostile_mod.build", "subprocess.check_output"])
def test_hostile_tokenizer_descriptor_is_refused_before_import(tmp_path, hostile_module, component):
    d = tmp_path / "tok"
    d.mkdir()
    kwargs = {"args": ["touch", str(hostile_module)]} if component.startswith("subprocess") else {}
    (d / DESCRIPTOR_NAME).write_text(json.dumps({"type": "torchtune", "component": component, "kwargs": kwargs}))
    with pytest.raises(UserError, match=rf"refusing tokenizer builder '{component}'"):
        load_tokenizer(d)
    with pytest.raises(UserError, match="refusing tokenizer builder"):
        load_tokenizer({"type": "torchtune", "component": component, "kwargs": kwargs})  # metadata.tokenizer form
    assert not hostile_module.exists(), "the descriptor ran code"
    assert "duo_hostile_mod" not in sys.modules


def test_model_folder_metadata_tokenizer_cannot_run_code(tmp_path, hostile_module):
    """The `duo_generate checkpoint=...` path: a duo model folder whose duo_config.json metadata.tokenizer names a
    callable (and that has no tokenizer/ folder) is refused; nothing is imported or called."""
    import torch

    from duo_plugin.models.checkpoint import save_pretrained
    from duo_plugin.models.dit import duo_dit_tiny
    from duo_plugin.recipes.duo_generate import load_model_and_tokenizer

    torch.manual_seed(0)
    save_pretrained(duo_dit_tiny(40, 8), tmp_path / "m",
                    metadata={"tokenizer": {"type": "torchtune", "component": "duo_hostile_mod.build"}})
    with pytest.raises(UserError, match="refusing tokenizer builder 'duo_hostile_mod.build'"):
        load_model_and_tokenizer(str(tmp_path / "m"), "model", None, "cpu")
    assert not hostile_module.exists() and "duo_hostile_mod" not in sys.modules


def test_allowed_torchtune_builder_still_loads(sp_tok, tmp_path):
    from duo_plugin.integrations.torchtune_tokenizer import TorchtuneTokenizer

    assert "torchtune.models.llama2.llama2_tokenizer" in TORCHTUNE_TOKENIZER_BUILDERS
    t = TorchtuneTokenizer.from_config("torchtune.models.llama2.llama2_tokenizer", path=str(sp_tok.model_path))
    t.save(tmp_path / "tt")
    assert load_tokenizer(tmp_path / "tt").encode("the king") == t.encode("the king")


def test_descriptor_file_must_be_a_plain_name(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / DESCRIPTOR_NAME).write_text(json.dumps({"type": "hf", "file": "../../etc/passwd"}))
    with pytest.raises(UserError, match="plain file name"):
        load_tokenizer(d)


def test_every_torch_load_is_weights_only():
    """No torch.load in the package may unpickle arbitrary objects (a checkpoint is data)."""
    bad = []
    for f in (REPO / "duo_plugin").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = "weights_only" in kw and (not isinstance(kw["weights_only"], ast.Constant)
                                               or kw["weights_only"].value is True)
                if not ok:
                    bad.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


# ------------------------------------------------------------------------------------------------ data files
def test_random_bytes_and_safetensors_are_refused_by_name(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(random.Random(0).randbytes(20000))
    with pytest.raises(UserError, match=r"data file .*random.bin is not UTF-8 text"):
        load_documents([rnd], sample_by="paragraph")
    import torch
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(st))
    with pytest.raises(UserError, match=r"model.safetensors is not UTF-8 text"):
        load_documents([st], sample_by="paragraph")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("The king spoke.\n\nThe queen answered.\n", encoding="utf-16")
    with pytest.raises(UserError, match="utf16.txt"):
        read_text_file(utf16)


def test_mixed_encoding_is_read_and_replacements_are_counted(tmp_path, caplog):
    """A UTF-8 file with a few Latin-1 bytes (each accented letter is one undecodable byte: 3 here) is kept, and the
    warning reports exactly 3 replaced bytes and names the file; a genuine U+FFFD in the UTF-8 text is not counted."""
    f = tmp_path / "mixed.txt"
    body = ("The king spoke to the queen in the castle by the river. " * 20).encode("utf-8")
    f.write_bytes(body + "caf\u00e9 na\u00efve \u00e0".encode("latin-1") + " \ufffd ok".encode("utf-8"))
    with caplog.at_level(logging.WARNING):
        text = read_text_file(f)
    assert text.count("\ufffd") == 4
    msgs = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(msgs) == 1 and "mixed.txt: 3 undecodable bytes" in msgs[0]


# ------------------------------------------------------------------------------------------------ tokenizer identity
def test_checkpoint_tokenizer_identity(sp_tok, tmp_path):
    from duo_plugin.data.tokenizers import train_sentencepiece

    saved = sp_tok.descriptor()
    check_same_tokenizer(saved, sp_tok, "ckpt")  # same tokenizer: fine
    check_same_tokenizer(None, sp_tok, "ckpt")  # an old checkpoint without a descriptor: not checked
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"other words number {i} here and there" for i in range(300)))
    other = train_sentencepiece([corpus], 300, tmp_path / "other", hard_vocab_limit=False)
    with pytest.raises(UserError, match=r"does not match the one init_from=ckpt was trained with .*"
                                        r"tokenizer.path=ckpt/tokenizer"):
        check_same_tokenizer(saved, other, "ckpt")


def test_vocab_hint_names_what_works_for_a_checkpoint_model(sp_tok):
    """For a model loaded from init_from (a duo model dir) the fix is the checkpoint's own tokenizer, not
    model.vocab_size (which does not apply to a loaded model)."""
    from duo_plugin.data.tokenizers import check_vocab

    with pytest.raises(ValueError, match="set model.vocab_size="):
        check_vocab(sp_tok, sp_tok.vocab_size - 10)
    with pytest.raises(UserError, match=r"init_from=/ck embeds .*model.vocab_size does not apply.*"
                                        r"tokenizer.path=/ck/tokenizer") as e:
        check_vocab(sp_tok, sp_tok.vocab_size - 10, model_source="/ck")
    assert "set model.vocab_size" not in str(e.value)


@pytest.mark.parametrize("builder,kwargs", [
    ("duo_plugin.integrations.torchtune_scorer.load_torchtune_scorer",
     {"model_builder": "duo_hostile_mod.build", "checkpoint_dir": "."}),
    ("duo_plugin.recipes.duo_pretrain.run", {"cfg": {}}),
    ("duo_hostile_mod.build", {}),
    ("duo_plugin.models.dit.record_builder", {"fn": None}),
])
def test_model_folder_builder_must_be_a_duo_model_builder(tmp_path, hostile_module, builder, kwargs):
    """duo_config.json's builder: only @record_builder functions of the duo model modules are called; a duo_plugin
    function that calls a dotpath of its own (the scorer loader, a recipe) would let a folder run code."""
    import torch

    from duo_plugin.models.checkpoint import load_pretrained, save_pretrained
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(0)
    d = save_pretrained(duo_dit_tiny(40, 8), tmp_path / "m")
    cfg = json.loads((d / "duo_config.json").read_text())
    cfg.update(builder=builder, builder_kwargs=kwargs)
    (d / "duo_config.json").write_text(json.dumps(cfg))
    # refused as a builder, or earlier: a builder_kwargs value naming code (the folder's JSON is checked first)
    with pytest.raises(UserError, match=rf"refusing (to call .*{builder.rsplit('.', 1)[-1]}|field builder_kwargs)"):
        load_pretrained(d)
    assert not hostile_module.exists() and "duo_hostile_mod" not in sys.modules
