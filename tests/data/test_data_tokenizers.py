"""Tokenizers: SentencePiece training round trip, save/load, HF tokenizer.json, torchtune wrapper, check_vocab."""

import json

import pytest
import sentencepiece as spm
import torch

from duo_plugin.data.tokenizers import (
    DESCRIPTOR_NAME,
    DuoTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    check_vocab,
    file_sha256,
    load_tokenizer,
    main,
    train_sentencepiece,
)

SAMPLES = [
    "To be, or not to be, that is the question:",
    "Unseen words: zebra quixotic ça va? 日本語 — emoji 🙂",
    "two  spaces\nnew line\ttab",
]


def test_sentencepiece_round_trip_and_specials(sp_tok):
    assert isinstance(sp_tok, DuoTokenizer)
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 3)
    for s in SAMPLES:
        ids = sp_tok.encode(s)
        assert all(0 <= i < sp_tok.vocab_size for i in ids)
        assert sp_tok.unk_id not in ids  # byte fallback: unseen characters never become <unk>
        assert not set(ids) & sp_tok.special_ids
        assert sp_tok.decode(ids) == s
        full = sp_tok.encode(s, add_bos=True, add_eos=True)
        assert full == [sp_tok.bos_id] + ids + [sp_tok.eos_id]
        assert sp_tok.decode(full) == s
    # The unseen characters really went through byte pieces (independent check with the raw processor).
    raw = spm.SentencePieceProcessor(model_file=str(sp_tok.model_path))
    pieces = [raw.id_to_piece(i) for i in sp_tok.encode("日")]
    assert pieces and all(p.startswith("<0x") for p in pieces if p != "▁")


def test_training_is_deterministic(train_text_file, sp_tok, tmp_path):
    again = train_sentencepiece([train_text_file], 300, tmp_path / "again", hard_vocab_limit=False)
    assert file_sha256(again.model_path) == file_sha256(sp_tok.model_path)


def test_save_load_paths(sp_tok, tmp_path):
    d = sp_tok.save(tmp_path / "saved")
    desc = json.loads((d / DESCRIPTOR_NAME).read_text())
    assert desc["type"] == "sentencepiece" and desc["vocab_size"] == sp_tok.vocab_size
    for spec in (d, d / DESCRIPTOR_NAME, d / "tokenizer.model"):
        t = load_tokenizer(spec)
        assert t.encode(SAMPLES[1]) == sp_tok.encode(SAMPLES[1])
        assert t.descriptor() == sp_tok.descriptor()
    # A replaced model file is detected through the recorded sha256.
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text("completely different training text, other words entirely\n" * 30)
    train_sentencepiece([tmp_path / "other.txt"], 300, other, hard_vocab_limit=False)
    (d / "tokenizer.model").write_bytes((other / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(d)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="duo-tokenizer train"):
        load_tokenizer(tmp_path / "empty")


def test_cli_train(train_text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--input", str(train_text_file), "--vocab-size", "300", "--out", str(out),
                 "--soft-vocab-limit"]) == 0
    t = load_tokenizer(out)
    assert isinstance(t, SentencePieceTokenizer)
    assert t.decode(t.encode(SAMPLES[0])) == SAMPLES[0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a console script: one line naming the file, exit status 2
        main(["train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "duo-tokenizer: error:" in err and "missing.txt" in err and "Traceback" not in err


def test_check_vocab(sp_tok):
    k_tok = sp_tok.vocab_size
    with pytest.raises(ValueError, match=f"tokenizer has {k_tok} ids but the model embeds {k_tok - 4}; "
                                         f"set model.vocab_size={k_tok}"):
        check_vocab(sp_tok, k_tok - 4)
    K = k_tok + 20  # padded embedding rows
    valid = check_vocab(sp_tok, K)
    assert valid.dtype == torch.bool and valid.shape == (K,)
    # Independent reference from the raw SentencePiece model: every normal/byte piece plus bos/eos is valid;
    # unk, pad (control pieces other than bos/eos) and padded rows are not.
    raw = spm.SentencePieceProcessor(model_file=str(sp_tok.model_path))
    ref = torch.zeros(K, dtype=torch.bool)
    for i in range(raw.get_piece_size()):
        ref[i] = not (raw.is_unknown(i) or raw.is_control(i)) or i in (raw.bos_id(), raw.eos_id())
    assert torch.equal(valid, ref)
    assert not valid[sp_tok.pad_id] and not valid[sp_tok.unk_id] and valid[sp_tok.bos_id] and valid[sp_tok.eos_id]
    assert check_vocab(sp_tok, K, include_pad=True)[sp_tok.pad_id]
    assert check_vocab(sp_tok, K, include_special=True)[sp_tok.unk_id]
    # every id produced by encode on real text is valid
    for s in SAMPLES:
        assert valid[torch.tensor(sp_tok.encode(s, add_bos=True, add_eos=True))].all()


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory, train_text_file):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(train_text_file)], trainer)
    p = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(p))
    return p


def test_hf_tokenizer(hf_json, tmp_path):
    t = load_tokenizer(hf_json)
    assert isinstance(t, HFTokenizer) and isinstance(t, DuoTokenizer)
    raw = json.loads(hf_json.read_text())
    ids_of = {a["content"]: a["id"] for a in raw["added_tokens"]}
    assert (t.bos_id, t.eos_id, t.pad_id) == (ids_of["<s>"], ids_of["</s>"], ids_of["<pad>"])
    assert t.special_ids == set(ids_of.values())
    for s in SAMPLES:
        ids = t.encode(s, add_bos=True, add_eos=True)
        assert ids[0] == t.bos_id and ids[-1] == t.eos_id
        assert t.decode(ids) == s
    valid = check_vocab(t, t.vocab_size + 3)
    assert not valid[ids_of["<mask>"]] and not valid[ids_of["<pad>"]] and valid[t.bos_id]
    assert int(valid.sum()) == t.vocab_size - 2
    t2 = load_tokenizer(t.save(tmp_path / "hfsaved"))
    assert t2.encode(SAMPLES[0]) == t.encode(SAMPLES[0]) and t2.descriptor() == t.descriptor()
    with pytest.raises(ValueError, match="bos_token"):
        HFTokenizer(hf_json, bos_token="<nope>")


def test_torchtune_wrapper(sp_tok, tmp_path):
    pytest.importorskip("torchtune")
    from duo_plugin.integrations.torchtune_tokenizer import TorchtuneTokenizer

    t = TorchtuneTokenizer.from_config("torchtune.models.llama2.llama2_tokenizer", path=str(sp_tok.model_path))
    assert isinstance(t, DuoTokenizer)
    assert (t.vocab_size, t.bos_id, t.eos_id) == (sp_tok.vocab_size, sp_tok.bos_id, sp_tok.eos_id)
    s = SAMPLES[0]
    assert t.encode(s, add_bos=True, add_eos=True) == sp_tok.encode(s, add_bos=True, add_eos=True)
    assert t.decode(t.encode(s)) == s
    t2 = load_tokenizer(t.save(tmp_path / "tt"))
    assert isinstance(t2, TorchtuneTokenizer) and t2.encode(s) == t.encode(s)
