"""Zero-shot sets: detokenizer rules, local-file loading, and wrapping that keeps every token."""

from __future__ import annotations

import json

import pytest

from duo_plugin.eval.zeroshot import (
    PAPER_SETS,
    ZERO_SHOT_SETS,
    get_set,
    lambada_detokenize,
    lm1b_detokenize,
    load_zeroshot_texts,
    ptb_detokenize,
    wikitext_detokenize,
    zeroshot_blocks,
)


class CharTok:
    def __init__(self):
        self.alphabet = "".join(chr(i) for i in range(32, 127)) + "\n"
        self.bos_id, self.eos_id, self.pad_id = len(self.alphabet), len(self.alphabet) + 1, None
        self.vocab_size = len(self.alphabet) + 2

    def encode(self, text, add_bos=False, add_eos=False):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))


def test_registry_covers_the_paper_columns():
    assert len(PAPER_SETS) == 7 and set(PAPER_SETS) <= set(ZERO_SHOT_SETS)
    assert get_set("scientific_papers_pubmed").config == "pubmed"
    assert get_set("pubmed").detokenizers == ("wikitext", "lm1b")
    assert get_set("ag_news").detokenizers == ()
    assert get_set("lm1b").split == "test" and get_set("ptb").split == "validation"
    with pytest.raises(ValueError, match="unknown zero-shot set"):
        get_set("owt")


def test_detokenizers():
    assert wikitext_detokenize(" = = Early life = = \n") == " == Early life ==\n"
    assert wikitext_detokenize("1 @,@ 000 @-@ year , in 3 @.@ 5 ( see below ) .") == "1,000-year, in 3.5 (see below) ."
    assert ptb_detokenize("the company 's N shares do n't trade at $ N") == "the company's 1 shares don't trade at $1"
    assert ptb_detokenize("a \\/ b <unk>") == "a / b ?"
    assert lm1b_detokenize("He said , \" I 'm here . \" ( really ) 50 %") == 'He said, "I\'m here." (really) 50%'
    assert lambada_detokenize("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'


def test_wrapping_keeps_every_token_of_a_small_set(tmp_path):
    rows = [{"sentence": f"the stock rose N % in year {i} ."} for i in range(7)]
    f = tmp_path / "ptb.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    tok = CharTok()
    texts = load_zeroshot_texts("ptb", data_files=[f])
    assert texts[0] == "the stock rose 1 % in year 0 ."
    stream = [t for s in texts for t in tok.encode(s)]  # no EOS between documents
    L = 16
    blocks, mask = zeroshot_blocks("ptb", tok, L, data_files=[f])
    assert blocks.shape[1] == L and mask.shape == blocks.shape
    assert blocks.shape[0] == -(-len(stream) // (L - 2))  # ceil: the remainder block is kept
    body = []
    for row, m in zip(blocks, mask):
        real = row[m].tolist()
        assert real[0] == tok.bos_id and real[-1] == tok.eos_id
        body.extend(real[1:-1])
    assert body == stream
    assert int(mask.sum()) == len(stream) + 2 * blocks.shape[0]
    # a set shorter than one block still gives one (padded) block
    tiny, tmask = zeroshot_blocks("ptb", tok, 1024, data_files=[f])
    assert tiny.shape[0] == 1 and int(tmask.sum()) == len(stream) + 2


def test_local_dir_save_to_disk_and_offline_error(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a b", "", "c d"]})})
    ds.save_to_disk(str(tmp_path / "ag"))
    assert load_zeroshot_texts("ag_news", local_dir=tmp_path / "ag") == ["a b", "c d"]
    with pytest.raises(ValueError, match="splits"):
        load_zeroshot_texts("ptb", local_dir=tmp_path / "ag")
    with pytest.raises((RuntimeError, Exception), match="data_files|local_dir|offline|cache"):
        load_zeroshot_texts("lm1b")
