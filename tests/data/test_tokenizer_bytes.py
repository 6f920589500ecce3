"""Byte-fallback pieces decode to whole UTF-8 characters; a split character is shown escaped, never as U+FFFD;
and tokenizers can be trained without byte fallback."""

from duo_plugin.data.tokenizers import load_tokenizer, train_sentencepiece


def test_split_multibyte_character_is_escaped_not_replaced(sp_tok):
    sp = sp_tok._sp
    ids = sp_tok.encode("To ☃ be")  # U+2603 is not in the training text: three byte pieces E2 98 83
    pieces = [sp.id_to_piece(i) for i in ids]
    assert ["<0xE2>", "<0x98>", "<0x83>"] == [p for p in pieces if p.startswith("<0x")]
    assert sp_tok.decode(ids) == "To ☃ be"  # whole character: joined
    i98 = pieces.index("<0x98>")
    cut = ids[:i98] + ids[i98 + 2:]  # drop 0x98 and 0x83: a lone lead byte E2 remains
    text = sp_tok.decode(cut)
    assert "\ufffd" not in text
    assert text == "To \\xe2 be"
    assert sp_tok.decode([sp.piece_to_id("<0x83>")]) == "\\x83"


def test_decode_without_broken_bytes_matches_sentencepiece(sp_tok):
    ids = sp_tok.encode("Whether 'tis nobler—in the mind\nTo suffer ☃", add_bos=True, add_eos=True)
    assert sp_tok.decode(ids) == sp_tok._sp.decode(ids[1:-1]) == "Whether 'tis nobler—in the mind\nTo suffer ☃"
    assert sp_tok._decode_bytes(ids[1:-1]) == sp_tok._sp.decode(ids[1:-1])


def test_train_without_byte_fallback(train_text_file, tmp_path):
    tok = train_sentencepiece([train_text_file], 120, tmp_path / "t", byte_fallback=False, user_defined_symbols=["\n"],
                              hard_vocab_limit=False)
    sp = tok._sp
    assert not any(sp.is_byte(i) for i in range(tok.vocab_size))
    s = "To be, or not to be, that is the question:\nWhether 'tis nobler"
    assert tok.decode(tok.encode(s)) == s
    assert load_tokenizer(tmp_path / "t").vocab_size == tok.vocab_size
