"""Local GPT-2 / BERT tokenizer files -> the converted model folder, with the official special ids.

The reference is transformers' own GPT2TokenizerFast / BertTokenizerFast built from the same local files (an
independent implementation of the same formats); the special ids follow the official rules (GPT-2 EOS as BOS/EOS,
one appended row: [PAD] for Duo, [MASK] for MDLM; BERT [CLS]/[SEP]/[MASK])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duo_plugin.convert.official import convert_official
from duo_plugin.data.tokenizers import load_tokenizer
from duo_plugin.models.checkpoint import load_pretrained

FIX = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official"
TEXTS = ["the cat sat", "Theft then", "a  b\tthe", "zebra quiz the the"]


def _gpt2_files(d: Path) -> Path:
    """A 49-id byte-level BPE in GPT-2's file format, <|endoftext|> last (48), like GPT-2's 50,256 of 50,257."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    base = sorted(set("abcdefghijklmnopqrstuvwxyz") | {"Ġ", "Ċ", "ĉ", "T"})
    merges = [("t", "h"), ("Ġ", "t"), ("Ġt", "h"), ("h", "e"), ("Ġth", "e"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at")]
    tokens = base + ["".join(m) for m in merges]
    extra = [c for c in sorted(alphabet) if c not in tokens][: 48 - len(tokens)]
    tokens += extra
    assert len(tokens) == 48
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|endoftext|>"] = 48
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return d


def _bert_files(d: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "hello", "world", "##s", "##ing",
             "a", "b", "t", "h", "e", "c", "s", "##t", "##h", "##e", ",", "."]
    words += [f"w{i}" for i in range(50 - len(words))]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    return d


def test_gpt2_vocab_merges_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _gpt2_files(tmp_path / "gpt2")
    out = convert_official(FIX / "duo_dit_tiny" / "lightning.ckpt", tmp_path / "m", tokenizer=d)
    tok = load_tokenizer(out / "tokenizer")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id == tok.eos_id == 48 == ref.eos_token_id
    assert tok.pad_id == 49 and tok.vocab_size == 50  # the official Duo width: len(tokenizer) with [PAD]
    model = load_pretrained(out)
    assert model.duo_metadata["tokenizer"]["bos_id"] == 48


def test_gpt2_for_mdlm_appends_mask(tmp_path):
    d = _gpt2_files(tmp_path / "gpt2")
    out = convert_official(FIX / "mdlm_dit_tiny" / "lightning.ckpt", tmp_path / "m", tokenizer=d)
    tok = load_tokenizer(out / "tokenizer")
    model = load_pretrained(out)
    assert model.duo_metadata["mask_id"] == 49 and tok.vocab_size == 50 and 49 in tok.special_ids
    assert tok.bos_id == tok.eos_id == 48
    assert json.loads((out / "tokenizer" / "tokenizer.json").read_text())["added_tokens"][-1]["content"] == "[MASK]"


def test_tokenizer_json_input_equals_vocab_merges(tmp_path):
    d = _gpt2_files(tmp_path / "gpt2")
    a = load_tokenizer(convert_official(FIX / "duo_dit_tiny" / "hf", tmp_path / "a", tokenizer=d) / "tokenizer")
    j = tmp_path / "json"
    j.mkdir()
    (j / "tokenizer.json").write_text((tmp_path / "a" / "tokenizer" / "tokenizer.json").read_text())
    b = load_tokenizer(convert_official(FIX / "duo_dit_tiny" / "hf", tmp_path / "b", tokenizer=j / "tokenizer.json")
                       / "tokenizer")
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
    assert (a.bos_id, a.eos_id, a.pad_id, a.vocab_size) == (b.bos_id, b.eos_id, b.pad_id, b.vocab_size)


def test_bert_vocab_txt_matches_transformers_and_sets_mask(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _bert_files(tmp_path / "bert")
    out = convert_official(FIX / "mdlm_dit_tiny" / "lightning.ckpt", tmp_path / "m", tokenizer=d)
    tok = load_tokenizer(out / "tokenizer")
    ref = transformers.BertTokenizerFast.from_pretrained(str(d), do_lower_case=True)
    for text in ["Hello world, the cats.", "THE cat sat", "thing"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)
    model = load_pretrained(out)
    assert model.duo_metadata["mask_id"] == 4 == ref.mask_token_id  # the official rule: the tokenizer's [MASK]
    assert not bool(model.valid_vocab[4]) and bool(model.valid_vocab[49])


def test_tokenizer_too_large_for_the_model_is_refused(tmp_path, capsys):
    from duo_plugin.convert.cli import main

    d = tmp_path / "big"
    d.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(60)]
    (d / "vocab.txt").write_text("\n".join(words))
    with pytest.raises(SystemExit) as e:
        main(["official", str(FIX / "duo_dit_tiny" / "hf"), str(tmp_path / "m"), "--tokenizer", str(d)])
    assert e.value.code == 2 and "65 ids but the model has 50 rows" in capsys.readouterr().err
