"""Tokenizers for Duo: a small protocol, local SentencePiece training, HF ``tokenizer.json`` and loading.

Every tokenizer used by duo-plugin satisfies :class:`DuoTokenizer`:

* ``encode(text, add_bos=False, add_eos=False) -> list[int]`` and ``decode(ids) -> str``;
* ``vocab_size``: the number of ids the model must embed (``max id + 1``, so ids are ``0..vocab_size-1``);
* ``bos_id`` / ``eos_id`` (ints), ``pad_id`` (int or ``None``), ``special_ids`` (set of ints: ids that never
  come out of ``encode`` for ordinary text, *including* bos/eos/pad);
* ``save(dir)``: writes ``dir/duo_tokenizer.json`` (the descriptor) plus the files it names, so that
  :func:`load_tokenizer` (``dir``) rebuilds the same tokenizer;
* ``descriptor() -> dict``: JSON-able identity (type, special ids, sha256 of the model file) used as cache key.

The model's vocabulary and the uniform-noise support (docs/method.md §0, architecture.md "Shared conventions")
are tied to the tokenizer by :func:`check_vocab`, which returns ``valid_vocab: BoolTensor[K_model]``.

This module never imports torchtune; the torchtune wrapper lives in
``duo_plugin.integrations.torchtune_tokenizer``, which registers its descriptor loader
(:func:`register_descriptor_loader`) when imported; this module never imports an integration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from duo_plugin._io import atomic_open, atomic_write_text
from duo_plugin.errors import UserError
from duo_plugin.untrusted import names_code

__all__ = [
    "DESCRIPTOR_NAME",
    "DuoTokenizer",
    "BaseTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "train_sentencepiece",
    "load_tokenizer",
    "check_vocab",
    "file_sha256",
    "SpecialIds",
    "DESCRIPTOR_LOADERS",
    "TORCHTUNE_TOKENIZER_ARGS",
    "TORCHTUNE_TOKENIZER_BUILDERS",
    "check_descriptor",
    "check_tokenizer_builder",
    "folder_file",
    "register_descriptor_loader",
    "main",
]

DESCRIPTOR_NAME = "duo_tokenizer.json"


@runtime_checkable
class DuoTokenizer(Protocol):
    """The tokenizer contract every duo-plugin component relies on (see module docstring)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int | None: ...

    @property
    def special_ids(self) -> set[int]: ...

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, out_dir: str | os.PathLike) -> Path: ...

    def descriptor(self) -> dict: ...


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (identity of tokenizer model files for cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


#: descriptor ``type`` -> ``loader(descriptor, base) -> DuoTokenizer`` for tokenizer families defined outside this
#: module (integrations fill it: ``duo_plugin.integrations.torchtune_tokenizer`` registers ``"torchtune"`` on import).
DESCRIPTOR_LOADERS: dict = {}


def register_descriptor_loader(kind: str, loader) -> None:
    """Let :func:`load_tokenizer` rebuild descriptors of ``type: kind`` with ``loader(descriptor, base)`` (``base``:
    the folder holding the descriptor; the loader must validate the descriptor, e.g. with :func:`check_descriptor`,
    before importing or opening anything it names)."""
    DESCRIPTOR_LOADERS[str(kind)] = loader


class SpecialIds:
    """bos/eos/pad/special-id bookkeeping shared by every tokenizer (here and the torchtune wrapper).

    Subclasses call :meth:`_set_special_ids` once in ``__init__``; it stores the ids behind the
    ``bos_id`` / ``eos_id`` / ``pad_id`` / ``special_ids`` properties.
    """

    _bos: int
    _eos: int
    _pad: int | None
    _specials: set[int]

    def _set_special_ids(self, bos: int, eos: int, pad: int | None, specials: Iterable[int] = ()) -> None:
        """Record bos/eos/pad; ``special_ids`` = ``specials`` plus bos, eos and pad (when not ``None``)."""
        self._bos, self._eos, self._pad = bos, eos, pad
        specials = set(specials) | {bos, eos}
        if pad is not None:
            specials.add(pad)
        self._specials = specials

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @property
    def special_ids(self) -> set[int]:
        return set(self._specials)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def _drop_bos_eos_pad(self, ids: Iterable[int]) -> list[int]:
        return [i for i in ids if i not in (self._bos, self._eos, self._pad)]


class BaseTokenizer(SpecialIds):
    """Shared helpers: bos/eos insertion, id validation and descriptor-based ``save``."""

    type_name: str = "base"

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise ValueError(
                f"decode got ids outside [0, {self.vocab_size}) (e.g. {bad[:5]}); the model embeds more rows "
                "than the tokenizer has ids: mask them with valid_vocab (check_vocab) before sampling"
            )
        return ids

    def _model_file(self) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def _descriptor_extra(self) -> dict:
        return {}

    def descriptor(self) -> dict:
        """JSON-able identity: type, special ids, vocab size and the sha256 of the model file."""
        mf = self._model_file()
        return {
            "type": self.type_name,
            "file": mf.name,
            "sha256": file_sha256(mf),
            "vocab_size": int(self.vocab_size),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "special_ids": sorted(int(i) for i in self.special_ids),
            **self._descriptor_extra(),
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Copy the model file into ``out_dir`` and write ``out_dir/duo_tokenizer.json``. Returns ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = self._model_file()
        dst = out / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        atomic_write_text(out / DESCRIPTOR_NAME, json.dumps(self.descriptor(), indent=2, sort_keys=True))
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(file={self._model_file()}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
        )


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece ``.model`` file. ``special_ids`` = unk/bos/eos/pad plus control/user-defined pieces.

    Args:
        model_path: path to the ``.model`` file.
    Raises:
        FileNotFoundError naming the file; ValueError if the model has no bos or eos piece.
    """

    type_name = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        bos = int(self._sp.bos_id())
        eos = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        if bos < 0 or eos < 0:
            raise ValueError(
                f"{self.model_path} has no bos/eos piece (bos={bos}, eos={eos}); retrain with "
                "train_sentencepiece (which defines unk=0, bos=1, eos=2, pad=3)"
            )
        n = int(self._sp.get_piece_size())
        specials = {i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self._set_special_ids(bos, eos, pad if pad >= 0 else None, specials)
        self._unk = int(self._sp.unk_id())

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def unk_id(self) -> int:
        return self._unk

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(list(self._sp.encode(text)), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (no bos/eos); used by the tokenize-once cache."""
        return [list(x) for x in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (bos/eos/pad dropped).  Byte-fallback pieces are joined into UTF-8 characters; a byte
        that does not complete a valid UTF-8 character (a sampled ``<0xE2>`` on its own, say) is written as the
        escape ``\\xe2`` rather than as U+FFFD, so split multi-byte characters are visible as such."""
        ids = self._drop_bos_eos_pad(self._check_ids(ids))
        text = self._sp.decode(ids)
        if "\ufffd" not in text or not any(self._sp.is_byte(i) for i in ids):
            return text
        return self._decode_bytes(ids)

    def _decode_bytes(self, ids: list[int]) -> str:
        sp = self._sp
        buf = bytearray()
        for i in ids:
            if sp.is_byte(i):
                buf.append(int(sp.id_to_piece(i)[3:5], 16))  # "<0xNN>"
            elif sp.is_unknown(i):
                buf += " \u2047 ".encode("utf-8")  # what SentencePiece writes for <unk>
            elif sp.is_control(i):
                continue
            else:
                buf += sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
        text = bytes(buf).decode("utf-8", errors="backslashreplace")
        first = next((i for i in ids if not sp.is_control(i)), None)
        if first is not None and not sp.is_byte(first) and sp.id_to_piece(first).startswith("\u2581"):
            text = text[1:]  # the dummy-prefix space SentencePiece strips at the start
        return text

    def _model_file(self) -> Path:
        return self.model_path


_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "[CLS]", "<bos>", "<|endoftext|>", "<|im_start|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "[SEP]", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer(BaseTokenizer):
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` package (no hub access).

    Special tokens: ``bos_token`` / ``eos_token`` / ``pad_token`` name them explicitly; otherwise well-known
    names are looked up (``<s>``/``</s>``, ``[CLS]``/``[SEP]``, ``<|endoftext|>`` for both, as in GPT-2/Duo OWT).
    ``encode`` never applies the file's post-processor template (bos/eos only via the flags).
    ``special_ids`` = every ``added_tokens`` entry marked special, plus bos/eos/pad.
    """

    type_name = "hf"

    def __init__(
        self,
        tokenizer_json: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        from tokenizers import Tokenizer

        self.path = Path(tokenizer_json)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
        self._tok = Tokenizer.from_file(str(self.path))

        def find(explicit: str | None, cands: Iterable[str], what: str, required: bool) -> int | None:
            if explicit is not None:
                i = self._tok.token_to_id(explicit)
                if i is None:
                    raise ValueError(f"{what}_token {explicit!r} is not in {self.path}")
                return int(i)
            for c in cands:
                i = self._tok.token_to_id(c)
                if i is not None:
                    return int(i)
            if required:
                raise ValueError(
                    f"could not find a {what} token in {self.path}; pass {what}_token='...' (e.g. the "
                    f"document separator) to HFTokenizer / load_tokenizer"
                )
            return None

        bos = find(bos_token, _BOS_CANDIDATES, "bos", True)
        eos = find(eos_token, _EOS_CANDIDATES, "eos", True)
        pad = find(pad_token, _PAD_CANDIDATES, "pad", False)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        raw = json.loads(self.path.read_text(encoding="utf-8"))
        specials = {int(t["id"]) for t in raw.get("added_tokens", []) if t.get("special", False)}
        self._set_special_ids(bos, eos, pad, specials)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(list(self._tok.encode(text, add_special_tokens=False).ids), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)

    def _model_file(self) -> Path:
        return self.path

    def _descriptor_extra(self) -> dict:
        return {k: v for k, v in self._tokens.items() if v is not None}


def train_sentencepiece(
    input_files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 0,
    hard_vocab_limit: bool = True,
    user_defined_symbols: Sequence[str] = (),
    normalization: str = "identity",
    byte_fallback: bool = True,
) -> SentencePieceTokenizer:
    """Train a SentencePiece model locally and save it as a duo tokenizer directory.

    Deterministic: one thread, no sentence sampling/shuffling, fixed piece ids unk=0, bos=1, eos=2, pad=3,
    ``byte_fallback=True`` (any UTF-8 text encodes without ``<unk>``; 256 ``<0xNN>`` pieces are reserved,
    so ``vocab_size`` must exceed 260 + the number of distinct characters). By default no normalisation and
    no whitespace collapsing (``normalization="identity"``), so ``decode(encode(s)) == s`` for text without
    leading whitespace (newlines and tabs go through byte pieces).

    Args:
        input_files: text files (one sentence/line per line; long lines are truncated by SentencePiece
            at ``max_sentence_length`` bytes for *training* only).
        vocab_size: requested number of pieces (= ids the model must embed, unless ``hard_vocab_limit=False``
            lets SentencePiece stop earlier on a tiny corpus).
        out_dir: receives ``tokenizer.model``, ``tokenizer.vocab`` (piece, score per line) and
            ``duo_tokenizer.json``. The model bytes depend only on the input text and the options.
        byte_fallback: ``False`` spends no ids on the 256 byte pieces (a small corpus with a small vocabulary then
            gets ~256 more real pieces); characters absent from the training text then encode as ``<unk>``, and
            newline/tab must be listed in ``user_defined_symbols`` to survive encoding.
    Returns:
        The trained :class:`SentencePieceTokenizer` (loaded from ``out_dir``).
    """
    import sentencepiece as spm

    files = [Path(f) for f in input_files]
    if not files:
        raise ValueError("train_sentencepiece needs at least one input file (--input FILE ...)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training input not found: {f}")
    if byte_fallback and vocab_size < 262:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback reserves 256 byte pieces + 4 specials; "
            "use --vocab-size >= 300"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import io

    def lines():  # fed as an iterator (not paths) so the model bytes do not record input/output paths
        from duo_plugin.data.text import read_text_file  # binary input refused by name, replacements reported

        for f in files:  # the lines text-mode iteration gives (universal newlines), without the newline
            text = read_text_file(f).replace("\r\n", "\n").replace("\r", "\n")
            parts = text.split("\n")
            yield from parts[:-1] if text.endswith("\n") else parts

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=bool(byte_fallback),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        num_threads=1,
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=False,
        max_sentence_length=int(max_sentence_length),
        hard_vocab_limit=hard_vocab_limit,
        user_defined_symbols=list(user_defined_symbols),
        normalization_rule_name=normalization,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    model_path = out / "tokenizer.model"
    with atomic_open(model_path, "wb", prefix=".tokenizer.model.", suffix=".tmp") as f:
        f.write(buf.getvalue())
    tok = SentencePieceTokenizer(model_path)
    vocab_txt = "".join(f"{tok._sp.id_to_piece(i)}\t{tok._sp.get_score(i)}\n" for i in range(tok.vocab_size))
    atomic_write_text(out / "tokenizer.vocab", vocab_txt)
    tok.save(out)
    return tok


def _read_descriptor(f: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({str(e).splitlines()[0]}): the tokenizer folder is truncated or "
                        "corrupt; re-save the tokenizer or pass tokenizer=<path>") from None


def load_tokenizer(path_or_spec, *, base: str | os.PathLike | None = None, **kwargs) -> DuoTokenizer:
    """Load a tokenizer from a duo tokenizer directory, a ``.model`` file or a ``tokenizer.json``.

    Args:
        path_or_spec: a directory holding ``duo_tokenizer.json`` (written by ``save``), a directory holding a
            ``tokenizer.json`` or ``tokenizer.model``, a ``*.model`` SentencePiece file, a ``*.json``
            HF tokenizer file, or a dict descriptor (as in ``duo_tokenizer.json``). An object that already
            satisfies :class:`DuoTokenizer` is returned as is.
        base: for a dict descriptor, the folder its file names are relative to (default: the working directory).
        **kwargs: forwarded to :class:`HFTokenizer` (``bos_token=...`` etc.).
    """
    if isinstance(path_or_spec, dict):
        return _from_descriptor(path_or_spec, base=Path(base) if base is not None else Path("."))
    if isinstance(path_or_spec, DuoTokenizer) and not isinstance(path_or_spec, (str, os.PathLike)):
        return path_or_spec
    p = Path(path_or_spec)
    if p.is_dir():
        if (p / DESCRIPTOR_NAME).is_file():
            return _from_descriptor(_read_descriptor(p / DESCRIPTOR_NAME), base=p)
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p / "tokenizer.json", **kwargs)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise FileNotFoundError(
            f"{p} holds no {DESCRIPTOR_NAME}, tokenizer.json or tokenizer.model; train one with "
            "`duo-tokenizer train --input FILE --vocab-size N --out DIR`"
        )
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path not found: {p}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        if p.name == DESCRIPTOR_NAME:
            return _from_descriptor(_read_descriptor(p), base=p.parent)
        return HFTokenizer(p, **kwargs)
    raise UserError(f"unrecognised tokenizer file {p} (tokenizer.path / tokenizer=): expected a tokenizer directory, "
                    "a SentencePiece .model or an HF tokenizer.json")


#: The only callables a ``torchtune`` tokenizer descriptor may name, each with the only keyword arguments it may pass
#: (files inside the tokenizer folder, or an integer).  A descriptor comes from a model folder, which is DATA (it may
#: have been downloaded): naming an arbitrary importable callable -- or handing an allowed builder an argument it
#: resolves as a dotted path, like torchtune's ``prompt_template`` -- would let a folder run code (as
#: :mod:`duo_plugin.models.checkpoint` restricts model builders).  Checked before anything is imported.
TORCHTUNE_TOKENIZER_ARGS: dict[str, tuple[str, ...]] = {
    "torchtune.models.llama2.llama2_tokenizer": ("path", "max_seq_len"),
    "torchtune.models.llama3.llama3_tokenizer": ("path", "special_tokens_path", "max_seq_len"),
    "torchtune.models.qwen2.qwen2_tokenizer": ("path", "merges_file", "special_tokens_path", "max_seq_len"),
    "torchtune.models.qwen2_5.qwen2_5_tokenizer": ("path", "merges_file", "special_tokens_path", "max_seq_len"),
    "torchtune.models.mistral.mistral_tokenizer": ("path", "max_seq_len"),
    "torchtune.models.gemma.gemma_tokenizer": ("path", "max_seq_len"),
    "torchtune.models.phi3.phi3_mini_tokenizer": ("path", "special_tokens_path", "max_seq_len"),
}
TORCHTUNE_TOKENIZER_BUILDERS = frozenset(TORCHTUNE_TOKENIZER_ARGS)
#: builder arguments that name a file (a plain relative path inside the tokenizer folder) / that are integers
TORCHTUNE_FILE_ARGS = frozenset({"path", "merges_file", "special_tokens_path"})
TORCHTUNE_INT_ARGS = frozenset({"max_seq_len"})

#: Every field a descriptor may hold, with its type (anything else is refused, naming the field).
_INT, _OPT_INT, _INT_LIST, _STR, _OPT_STR, _HEX, _HEX_MAP, _ANY_KW = (
    "int", "int|null", "list[int]", "str", "str|null", "sha256", "{arg: sha256}", "kwargs")
_DESCRIPTOR_FIELDS: dict[str, dict[str, str]] = {
    "sentencepiece": {"file": _STR, "sha256": _HEX},
    "hf": {"file": _STR, "sha256": _HEX, "bos_token": _OPT_STR, "eos_token": _OPT_STR, "pad_token": _OPT_STR},
    "torchtune": {"component": _STR, "kwargs": _ANY_KW, "file_sha256": _HEX_MAP},
}
_COMMON_FIELDS = {"type": _STR, "vocab_size": _INT, "bos_id": _INT, "eos_id": _OPT_INT, "pad_id": _OPT_INT,
                  "special_ids": _INT_LIST}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_hex(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


_CHECKS = {
    _INT: _is_int,
    _OPT_INT: lambda v: v is None or _is_int(v),
    _INT_LIST: lambda v: isinstance(v, list) and all(_is_int(i) for i in v),
    _STR: lambda v: isinstance(v, str),
    _OPT_STR: lambda v: v is None or isinstance(v, str),
    _HEX: lambda v: v is None or _is_hex(v),
    _HEX_MAP: lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_hex(h) for k, h in v.items()),
    _ANY_KW: lambda v: isinstance(v, dict),
}


def check_tokenizer_builder(component: Any, where: str = "the descriptor") -> str:
    """Refuse a tokenizer builder outside :data:`TORCHTUNE_TOKENIZER_BUILDERS` (nothing is imported or called)."""
    if not isinstance(component, str) or component not in TORCHTUNE_TOKENIZER_BUILDERS:
        raise UserError(
            f"refusing tokenizer builder {component!r} named in {where}: a model folder is data and may only name "
            f"one of {sorted(TORCHTUNE_TOKENIZER_BUILDERS)}; pass tokenizer=<a tokenizer.json / .model / dir> instead")
    return component


def folder_file(base: Path, value: Any, what: str, where: str) -> Path:
    """``base / value`` for a descriptor's file entry: a relative path that stays inside ``base`` (no ``..``, no
    absolute path, no symlink leaving the folder) and names an existing file; else :class:`UserError`."""
    if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise UserError(f"tokenizer descriptor in {where}: {what} must be a file name inside the tokenizer folder, "
                        f"got {value!r}; re-save the tokenizer (it copies its files next to {DESCRIPTOR_NAME}) or "
                        "pass tokenizer=<path> explicitly")
    p = base / value
    try:
        inside = p.resolve().is_relative_to(base.resolve())
    except OSError:
        inside = False
    if not inside:
        raise UserError(f"tokenizer descriptor in {where}: {what}={value!r} leads outside the tokenizer folder; "
                        "pass tokenizer=<path> explicitly")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer descriptor in {where}: {what}={value!r} is not a file in {base}")
    return p


def check_descriptor(desc: Any, base: Path, where: str | None = None) -> dict:
    """Validate a tokenizer descriptor (data from a model folder) BEFORE anything is imported or opened as code:
    only the fields of its ``type`` with their types; for ``torchtune``, an allow-listed builder and only its
    allow-listed arguments (file names inside ``base``, integers).  Returns the descriptor with the torchtune
    ``kwargs`` resolved (files as absolute paths inside ``base``, sha256 checked).  :class:`UserError` otherwise,
    naming the field and the fix."""
    where = where or str(base)
    if not isinstance(desc, dict):
        raise UserError(f"tokenizer descriptor in {where} must be a JSON object, got {type(desc).__name__}")
    kind = desc.get("type")
    if kind not in _DESCRIPTOR_FIELDS:
        if isinstance(kind, str) and kind in DESCRIPTOR_LOADERS:
            return desc
        raise UserError(f"tokenizer descriptor in {where}: unknown type {kind!r} (expected sentencepiece, hf or "
                        "torchtune); pass tokenizer=<a tokenizer.json / .model / dir> instead")
    fields = {**_COMMON_FIELDS, **_DESCRIPTOR_FIELDS[kind]}
    for key, value in desc.items():
        if key not in fields:
            raise UserError(f"tokenizer descriptor in {where}: unexpected field {key!r} for type {kind!r} (allowed: "
                            f"{', '.join(sorted(fields))}); a model folder is data: remove the field or re-save the "
                            "tokenizer")
        if not _CHECKS[fields[key]](value):
            raise UserError(f"tokenizer descriptor in {where}: field {key!r} must be {fields[key]}, got {value!r}")
        if key not in ("file", "component") and isinstance(value, str) and names_code(value):
            raise UserError(f"tokenizer descriptor in {where}: refusing field {key}={value!r}: it names Python code "
                            "and a model folder is data; remove the value or pass tokenizer=<path> explicitly")
    if kind != "torchtune":
        f = desc.get("file")
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise UserError(f"tokenizer descriptor in {where}: 'file' must be a plain file name next to it, got {f!r}")
        return desc
    component = check_tokenizer_builder(desc.get("component"), where=where)
    allowed = TORCHTUNE_TOKENIZER_ARGS[component]
    kwargs, hashes = {}, desc.get("file_sha256") or {}
    for name in desc.get("kwargs") or {}:  # every name first: nothing is opened while a refused one is present
        if name not in allowed:
            raise UserError(f"tokenizer descriptor in {where}: refusing argument {name!r} for {component} (a model "
                            f"folder is data; allowed arguments: {', '.join(allowed)}); remove it from "
                            f"{DESCRIPTOR_NAME} or pass tokenizer=<path> explicitly")
    for name, value in (desc.get("kwargs") or {}).items():
        if name in TORCHTUNE_INT_ARGS:
            if not (value is None or _is_int(value)):
                raise UserError(f"tokenizer descriptor in {where}: argument {name!r} must be an integer or null, "
                                f"got {value!r}")
            kwargs[name] = value
            continue
        p = folder_file(base, value, f"argument {name!r}", where)
        if name in hashes and file_sha256(p) != hashes[name]:
            raise UserError(f"{p} does not match the sha256 recorded in {where}; the tokenizer file was replaced: "
                            "re-save the tokenizer or restore the original file")
        kwargs[name] = str(p.resolve())
    if "path" not in kwargs:
        raise UserError(f"tokenizer descriptor in {where}: {component} needs the argument 'path' (a file in the "
                        "tokenizer folder)")
    return {**desc, "kwargs": kwargs}


def _from_descriptor(raw: dict, base: Path) -> DuoTokenizer:
    desc = check_descriptor(raw, base)  # every field typed, builders and their arguments allow-listed: before imports
    kind = desc.get("type")
    if kind == "sentencepiece":
        tok = SentencePieceTokenizer(base / desc["file"])
    elif kind == "hf":
        tok = HFTokenizer(
            base / desc["file"],
            bos_token=desc.get("bos_token"),
            eos_token=desc.get("eos_token"),
            pad_token=desc.get("pad_token"),
        )
    elif kind in DESCRIPTOR_LOADERS:
        return DESCRIPTOR_LOADERS[kind](raw, base)  # the loader checks ``raw`` again (it is public)
    else:  # torchtune, integration not imported
        raise UserError("a 'torchtune' tokenizer descriptor needs the torchtune integration: `import "
                        "duo_plugin.integrations.torchtune_tokenizer` (the recipes and the lm-eval backend do) and "
                        "install torchtune")
    sha = desc.get("sha256")
    if sha is not None and file_sha256(tok._model_file()) != sha:
        raise ValueError(
            f"{tok._model_file()} does not match the sha256 recorded in {DESCRIPTOR_NAME}; the tokenizer file "
            "was replaced: re-save the tokenizer or restore the original file"
        )
    return tok


def check_vocab(
    tokenizer: DuoTokenizer,
    model_vocab_size: int,
    *,
    include_pad: bool = False,
    include_special: bool = False,
    model_source: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Check the model's vocabulary against the tokenizer and build ``valid_vocab: BoolTensor[K_model]``.

    ``valid_vocab[i]`` is True for the ids the data can contain, i.e. the uniform-noise support of
    docs/method.md §1 (``K_eff = valid_vocab.sum()``): every tokenizer id, **except** padded embedding rows
    ``tokenizer.vocab_size <= i < model_vocab_size``, the pad id (unless ``include_pad``) and special ids other
    than bos/eos (unless ``include_special``). bos and eos stay valid because ``wrap_blocks`` / ``pad_sentences``
    put them in every sequence the model must reconstruct.

    Raises:
        ValueError if the model embeds fewer ids than the tokenizer produces, naming ``model.vocab_size`` (or, for a
        model loaded from a checkpoint ``model_source``, naming the tokenizer saved with it).
    """
    k_tok = int(tokenizer.vocab_size)
    k = int(model_vocab_size)
    if k < k_tok and model_source is not None:
        raise UserError(
            f"tokenizer has {k_tok} ids but the model loaded from init_from={model_source} embeds {k} (its size is "
            f"fixed by that checkpoint, model.vocab_size does not apply); use the tokenizer saved with it "
            f"(tokenizer.path={Path(str(model_source)) / 'tokenizer'})")
    if k < k_tok:
        raise ValueError(
            f"tokenizer has {k_tok} ids but the model embeds {k}; set model.vocab_size={k_tok} "
            "(or larger, e.g. a multiple of 64: extra rows are masked out by valid_vocab)"
        )
    valid = torch.zeros(k, dtype=torch.bool)
    valid[:k_tok] = True
    keep = {int(tokenizer.bos_id), int(tokenizer.eos_id)}
    if not include_special:
        for i in tokenizer.special_ids:
            if i not in keep and 0 <= i < k:
                valid[i] = False
    pad = tokenizer.pad_id
    if pad is not None and 0 <= pad < k:
        valid[pad] = bool(include_pad) or pad in keep
    if int(valid.sum()) < 2:
        raise ValueError("valid_vocab has fewer than 2 ids; check the tokenizer's special ids")
    return valid


def _identity(desc: dict) -> dict:
    """The parts of a descriptor that identify the vocabulary (file hashes, size, special ids)."""
    keys = ("type", "sha256", "file_sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
    return {k: desc.get(k) for k in keys if desc.get(k) is not None}


def check_same_tokenizer(saved: dict | None, tokenizer: DuoTokenizer, source: str | os.PathLike) -> None:
    """Raise :class:`UserError` when ``tokenizer`` is not the one stored with the checkpoint ``source`` (its
    ``metadata.tokenizer`` descriptor ``saved``): another vocabulary would silently re-map every token id.
    A checkpoint without a stored descriptor is not checked."""
    if not isinstance(saved, dict):
        return
    try:
        mine = tokenizer.descriptor()
    except Exception:  # a tokenizer wrapped from an instance has no descriptor: compare what is known
        mine = {"vocab_size": int(tokenizer.vocab_size), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    a, b = _identity(saved), _identity(mine)
    diff = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if diff:
        shown = ", ".join(f"{k}: checkpoint={a[k]!r} vs tokenizer={b[k]!r}" for k in diff[:3])
        raise UserError(
            f"the tokenizer does not match the one init_from={source} was trained with ({shown}); set "
            f"tokenizer.path={Path(str(source)) / 'tokenizer'} (saved with the model)")


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``duo-tokenizer``: ``duo-tokenizer train --input FILE [FILE...] --vocab-size N --out DIR``
    and ``duo-tokenizer info DIR``."""
    ap = argparse.ArgumentParser(prog="duo-tokenizer", description="Train/inspect duo-plugin tokenizers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a byte-fallback SentencePiece tokenizer locally")
    tr.add_argument("--input", nargs="+", required=True, help="text file(s)")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    tr.add_argument("--character-coverage", type=float, default=1.0)
    tr.add_argument("--soft-vocab-limit", action="store_true", help="allow fewer pieces on tiny corpora")
    info = sub.add_parser("info", help="print a tokenizer's descriptor")
    info.add_argument("path")
    args = ap.parse_args(argv)
    from duo_plugin.errors import user_errors
    from duo_plugin.runtime import drop_cwd_from_sys_path

    drop_cwd_from_sys_path()  # a tokenizer folder used as the working directory is data, not importable code
    with user_errors("duo-tokenizer"):
        return _main(args)


def _main(args) -> int:
    if args.cmd == "train":
        tok = train_sentencepiece(
            args.input,
            args.vocab_size,
            args.out,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            hard_vocab_limit=not args.soft_vocab_limit,
        )
        print(f"saved {tok!r} to {args.out}")
    else:
        tok = load_tokenizer(args.path)
        print(json.dumps(tok.descriptor(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


