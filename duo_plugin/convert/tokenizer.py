"""The official models' tokenizers from local files (no hub): GPT-2 (OpenWebText) and BERT (LM1B).

Accepted inputs (a directory or a file): ``tokenizer.json``; GPT-2's ``vocab.json`` + ``merges.txt`` (byte-level
BPE); BERT's ``vocab.txt`` (WordPiece, lower-cased, as ``bert-base-uncased``). The result is one ``tokenizer.json``
(built with the ``tokenizers`` library, data only) plus ``duo_tokenizer.json`` in ``<model>/tokenizer``, with the
special ids the official code uses:

* GPT-2: ``<|endoftext|>`` (50256) is BOS and EOS; one row is appended after the 50,257 ids (id 50257): ``[PAD]``
  for Duo (the official ``len(tokenizer)`` width) and ``[MASK]`` for MDLM / AR (the official ``mask_index =
  vocab_size``), so the tokenizer covers the model's 50,258 rows.
* BERT: ``[CLS]`` is BOS, ``[SEP]`` EOS, ``[PAD]`` pad, ``[MASK]`` the MDLM mask id (103 in bert-base-uncased).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

from duo_plugin.errors import UserError

__all__ = ["build_official_tokenizer", "save_official_tokenizer", "find_tokenizer_files"]


def find_tokenizer_files(src) -> Tuple[str, Dict[str, Path]]:
    """``(family, files)``: ``("json", {"tokenizer.json"})``, ``("gpt2", {"vocab.json", "merges.txt"})`` or
    ``("bert", {"vocab.txt"})`` found in ``src`` (a directory or one of those files)."""
    p = Path(src)
    d = p if p.is_dir() else p.parent
    if p.is_file() and p.name not in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"):
        raise UserError(f"--tokenizer {p}: expected a directory or tokenizer.json / vocab.json / vocab.txt")
    if not p.exists():
        raise UserError(f"--tokenizer {p} does not exist")
    if (p.is_dir() or p.name == "tokenizer.json") and (d / "tokenizer.json").is_file():
        return "json", {"tokenizer.json": d / "tokenizer.json"}
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return "gpt2", {"vocab.json": d / "vocab.json", "merges.txt": d / "merges.txt"}
    if (d / "vocab.txt").is_file():
        return "bert", {"vocab.txt": d / "vocab.txt"}
    raise UserError(f"--tokenizer {p}: no tokenizer.json, vocab.json + merges.txt, or vocab.txt found there")


def _gpt2(files: Dict[str, Path]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
    lines = files["merges.txt"].read_text(encoding="utf-8").splitlines()
    merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise UserError(f"{files['merges.txt']}: line {' '.join(bad[0])!r} is not a pair of tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _bert(files: Dict[str, Path]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = files["vocab.txt"].read_text(encoding="utf-8").splitlines()
    vocab = {w: i for i, w in enumerate(words) if w != "" or i == len(words) - 1}
    if "[UNK]" not in vocab:
        raise UserError(f"{files['vocab.txt']} has no [UNK] token; not a BERT vocabulary")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def build_official_tokenizer(src, *, kind: str, width: int, embedded_json: Optional[bytes] = None):
    """``(tokenizers.Tokenizer, specials)`` for an official model of ``kind`` with ``width`` embedding rows.

    ``src``: the ``--tokenizer`` path, or None to use ``embedded_json`` (the tokenizer pickled in a ``.ckpt``).
    ``specials``: ``{"bos_token", "eos_token", "pad_token"}`` names (pad may be None)."""
    from tokenizers import AddedToken, Tokenizer

    if src is None:
        if embedded_json is None:
            raise UserError("no tokenizer: pass --tokenizer DIR (tokenizer.json, vocab.json + merges.txt or vocab.txt)")
        tok, family = Tokenizer.from_str(embedded_json.decode("utf-8")), "json"
    else:
        family, files = find_tokenizer_files(src)
        tok = (Tokenizer.from_file(str(files["tokenizer.json"])) if family == "json"
               else _gpt2(files) if family == "gpt2" else _bert(files))
    vocab = tok.get_vocab(with_added_tokens=True)
    if "[CLS]" in vocab and "[SEP]" in vocab:  # BERT family
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
        specials = {"bos_token": "[CLS]", "eos_token": "[SEP]", "pad_token": "[PAD]" if "[PAD]" in vocab else None}
    elif "<|endoftext|>" in vocab:  # GPT-2 family
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": None}
        n = max(vocab.values()) + 1
        extra = "[PAD]" if kind == "duo" else "[MASK]"
        if n == width - 1 and "[PAD]" not in vocab and "[MASK]" not in vocab:
            tok.add_special_tokens([AddedToken(extra, special=True, normalized=False)])
        if "[PAD]" in tok.get_vocab(with_added_tokens=True):
            specials["pad_token"] = "[PAD]"
    else:
        raise UserError(f"tokenizer {src or '(embedded)'}: neither GPT-2 (<|endoftext|>) nor BERT ([CLS]/[SEP]) "
                        "special tokens found; the official models use one of those")
    size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    if size > width:
        raise UserError(f"tokenizer {src or '(embedded)'} has {size} ids but the model has {width} rows; wrong "
                        "tokenizer for this checkpoint")
    return tok, specials


def save_official_tokenizer(src, out_dir, *, kind: str, width: int, embedded_json: Optional[bytes] = None):
    """Write ``out_dir/tokenizer.json`` + ``duo_tokenizer.json``; returns the loaded :class:`HFTokenizer`."""
    from duo_plugin.data.tokenizers import HFTokenizer

    tok, specials = build_official_tokenizer(src, kind=kind, width=width, embedded_json=embedded_json)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    hf = HFTokenizer(out / "tokenizer.json", **specials)
    hf.save(out)
    return hf
