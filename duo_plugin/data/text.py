"""Text → token documents → fixed-length blocks, with a deterministic, resumable, topology-free order.

Pipeline (docs/method.md §6 "Data", §8 "Zero-shot"):

1. :func:`load_documents` reads raw documents from local ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` /
   ``.parquet`` files (column configurable) or a hub dataset name (offline-safe: a clear error when the hub
   is offline and the dataset is not cached).
2. :func:`load_tokenized` tokenizes once and caches a flat ``int32`` token stream plus ``int64`` document offsets
   (:class:`TokenizedDocs`) in a safetensors file keyed by (files' identity, tokenizer descriptor, options).
3. :func:`wrap_blocks` (OWT style: ``[BOS] + (L-2) tokens + [EOS]``, EOS between documents unless
   ``insert_eos=False`` for zero-shot sets) or :func:`pad_sentences` (LM1B style, one padded sentence per row).
4. :class:`TokenBlockDataset` + :class:`GlobalBatchSampler` + :func:`shard`: global step ``s`` → the global
   batch's dataset indices → the contiguous slice a (rank, micro-step) processes, with its positions in the
   global batch (used for per-sample noise / stratified times). Resume state = the step number.

No torchtune / lm_eval imports here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch

from duo_plugin._io import atomic_open
from duo_plugin.diffusion import streams
from duo_plugin.errors import UserError

__all__ = [
    "read_text_file",
    "TokenizedDocs",
    "as_docs",
    "load_documents",
    "split_text",
    "tokenize_documents",
    "cached_tokenize",
    "load_tokenized",
    "files_identity",
    "default_cache_dir",
    "wrap_blocks",
    "pad_sentences",
    "split_heldout",
    "TokenBlockDataset",
    "collate_blocks",
    "GlobalBatchSampler",
    "shard",
]

_CACHE_VERSION = 1
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

#: A text file whose undecodable (non-UTF-8) bytes exceed this fraction of its characters is refused as binary.
MAX_UNDECODABLE_FRACTION = 0.05
_REPLACEMENT = "\ufffd"


def read_text_file(path: Union[str, os.PathLike]) -> str:
    """Read a UTF-8 text file for training; refuse binary input, report replacement characters.

    A file holding NUL bytes, or whose undecodable bytes become more than :data:`MAX_UNDECODABLE_FRACTION` of its
    characters, is refused with a :class:`~duo_plugin.errors.UserError` naming it (random bytes, a
    ``.safetensors`` file, UTF-16 text).  A few undecodable bytes (a legitimately mixed encoding) are replaced by
    U+FFFD and their count is logged as a warning naming the file.
    """
    import logging

    from duo_plugin.errors import UserError

    p = Path(path)
    raw = p.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    n_bad = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode("utf-8"))
    n_chars = max(1, len(text))
    if b"\x00" in raw or n_bad > MAX_UNDECODABLE_FRACTION * n_chars:
        why = "holds NUL bytes" if b"\x00" in raw else f"has {n_bad} undecodable bytes in {len(text)} characters"
        raise UserError(f"data file {p} is not UTF-8 text ({why}: binary data?); pass text/jsonl/csv/parquet files "
                        "only (convert other encodings to UTF-8, e.g. iconv -t UTF-8)")
    if n_bad:
        logging.getLogger(__name__).warning(
            "data file %s: %d undecodable bytes (not UTF-8) were replaced by U+FFFD (%.3f%% of %d characters); "
            "convert the file to UTF-8 to keep them", p, n_bad, 100.0 * n_bad / n_chars, len(text))
    return text


# ----------------------------------------------------------------------------------------------------------
# Token documents
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedDocs:
    """Documents as one flat token stream: doc ``i`` is ``tokens[offsets[i]:offsets[i+1]]``.

    Attributes:
        tokens: ``np.ndarray[int32]`` of shape ``[T]`` (no BOS/EOS; those are added by wrapping).
        offsets: ``np.ndarray[int64]`` of shape ``[N + 1]``, ``offsets[0] == 0``, ``offsets[-1] == T``.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self):
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if int(self.offsets[-1]) != len(self.tokens):
            raise ValueError(f"offsets[-1]={int(self.offsets[-1])} != number of tokens {len(self.tokens)}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))

    def select(self, start: int, stop: int) -> "TokenizedDocs":
        """Documents ``start:stop`` (a contiguous range) as a new TokenizedDocs."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return TokenizedDocs(self.tokens[a:b], self.offsets[start : stop + 1] - a)

    @classmethod
    def from_lists(cls, docs: Sequence[Sequence[int]]) -> "TokenizedDocs":
        lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if len(docs) and offsets[-1]:
            tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]).astype(np.int32)
        else:
            tokens = np.zeros(0, dtype=np.int32)
        return cls(tokens, offsets)


def as_docs(docs) -> TokenizedDocs:
    """``docs`` as :class:`TokenizedDocs` (returned as is when it already is one; else a sequence of id lists)."""
    if isinstance(docs, TokenizedDocs):
        return docs
    out = []
    for d in docs:
        if isinstance(d, torch.Tensor):
            d = d.tolist()
        elif isinstance(d, np.ndarray):
            d = d.tolist()
        out.append(d)
    return TokenizedDocs.from_lists(out)


# ----------------------------------------------------------------------------------------------------------
# Raw documents
# ----------------------------------------------------------------------------------------------------------
def split_text(text: str, sample_by: str) -> list[str]:
    """Split one file's text into documents: ``"document"`` (the whole text), ``"paragraph"`` (blank-line
    separated blocks) or ``"line"`` (non-empty lines). Empty documents are dropped."""
    if sample_by == "document":
        parts = [text]
    elif sample_by == "paragraph":
        parts = re.split(r"\n\s*\n", text)
    elif sample_by == "line":
        parts = text.splitlines()
    else:
        raise ValueError(f"sample_by (data.sample_by / dataset.sample_by) must be 'document', 'paragraph' or "
                         f"'line', got {sample_by!r}")
    return [p.strip() for p in parts if p.strip()]


def _as_paths(source) -> list[Path] | None:
    """Local file list if ``source`` names existing files / a directory / a glob, else None (hub name)."""
    if isinstance(source, (list, tuple)):
        paths = [Path(s) for s in source]
        for p in paths:
            if p.is_dir():
                raise UserError(f"data file {p} is a directory; list its files (data.files: [{p}/a.txt, ...]) or "
                                f"use a glob ({p}/*.txt)")
            if not p.is_file():
                raise FileNotFoundError(f"data file not found: {p}")
        return paths
    s = str(source)
    p = Path(s)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise ValueError(f"data directory {p} holds no files")
        return files
    if any(ch in s for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(s))
        if not files:
            raise FileNotFoundError(f"no data files match {s}")
        return files
    looks_local = s.startswith((".", "/", "~")) or p.suffix.lower() in {".txt", *_LOCAL_BUILDERS}
    if looks_local:
        raise FileNotFoundError(f"data file not found: {p}")
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _column(ds, column: str, where: str) -> list[str]:
    if column not in ds.column_names:
        raise ValueError(f"unknown column {column!r} in {where}; available columns: {ds.column_names}")
    return [x if isinstance(x, str) else str(x) for x in ds[column]]


def load_documents(
    source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    column: str = "text",
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    sample_by: str = "document",
    hf_cache_dir: str | None = None,
) -> list[str]:
    """Load raw text documents.

    Args:
        source: a local file, a list of files, a directory, a glob, or a hub dataset name (e.g.
            ``"wikitext"`` with ``name="wikitext-2-raw-v1"``). ``.txt`` files are read directly and split with
            ``sample_by``; ``.json``/``.jsonl``/``.csv``/``.parquet`` go through ``datasets`` and use ``column``.
        column: text column for structured files / hub datasets.
        split: hub split (local structured files are loaded as split "train").
        sample_by: for ``.txt`` files: ``"document"`` (one doc per file), ``"paragraph"`` or ``"line"``.
    Returns:
        ``list[str]`` in a deterministic order (files in the given / sorted order, rows in file order).
    Raises:
        FileNotFoundError naming a missing file; ValueError for an unknown column or an empty result;
        RuntimeError when a hub dataset is requested offline and is not in the local cache.
    """
    paths = _as_paths(source)
    docs: list[str] = []
    if paths is not None:
        for p in paths:
            suf = p.suffix.lower()
            if suf in _LOCAL_BUILDERS:
                import datasets

                ds = datasets.load_dataset(_LOCAL_BUILDERS[suf], data_files=str(p), split="train",
                                           cache_dir=hf_cache_dir)
                docs.extend(d for d in _column(ds, column, str(p)) if d.strip())
            else:
                docs.extend(split_text(read_text_file(p), sample_by))
        where = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    else:
        import datasets

        try:
            ds = datasets.load_dataset(str(source), name, split=split, revision=revision, cache_dir=hf_cache_dir)
        except Exception as e:  # datasets raises several types for "not reachable / not cached"
            if _offline():
                raise RuntimeError(
                    f"hub dataset {source!r} (config={name!r}, split={split!r}) is not in the local datasets cache "
                    "and the hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1). Download it once on a machine "
                    "with access (same datasets cache), or pass local files (.txt/.jsonl/.parquet) instead. "
                    f"Underlying error: {type(e).__name__}: {e}"
                ) from e
            raise
        docs = [d for d in _column(ds, column, f"{source}:{split}") if d.strip()]
        where = f"{source}:{split}"
    if not docs:
        raise ValueError(f"empty dataset: no non-empty documents in {where}")
    return docs


# ----------------------------------------------------------------------------------------------------------
# Tokenize once, cache
# ----------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$DUO_CACHE_DIR`` or ``~/.cache/duo_plugin/tokenized``."""
    env = os.environ.get("DUO_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "duo_plugin" / "tokenized"


def files_identity(paths: Sequence[Union[str, os.PathLike]]) -> list[list]:
    """Cheap identity of files for cache keys: ``[absolute path, size, mtime_ns]`` per file."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), int(st.st_size), int(st.st_mtime_ns)])
    return out


def tokenize_documents(texts: Sequence[str], tokenizer, batch_size: int = 1024) -> TokenizedDocs:
    """Encode every text (no BOS/EOS) into a :class:`TokenizedDocs`. Uses ``encode_batch`` when available."""
    docs: list[list[int]] = []
    enc_batch = getattr(tokenizer, "encode_batch", None)
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        if enc_batch is not None:
            docs.extend(enc_batch(chunk))
        else:
            docs.extend(tokenizer.encode(t, add_bos=False, add_eos=False) for t in chunk)
    td = TokenizedDocs.from_lists(docs)
    if td.num_tokens and (int(td.tokens.min()) < 0 or int(td.tokens.max()) >= int(tokenizer.vocab_size)):
        raise ValueError("tokenizer produced ids outside [0, vocab_size)")
    return td


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cached_tokenize(
    get_texts: Callable[[], Sequence[str]],
    tokenizer,
    *,
    key: dict,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> TokenizedDocs:
    """Return the tokenized documents for ``key`` from the cache, or tokenize ``get_texts()`` and store them.

    The cache file is ``cache_dir/tok-<sha256(key + tokenizer.descriptor())[:24]>.safetensors`` holding
    ``tokens: int32[T]`` and ``offsets: int64[N+1]``; it is written atomically (``_io.atomic_open``)
    (atomic, safe against concurrent writers). ``get_texts`` is not called on a hit.
    """
    from safetensors.numpy import load_file, save

    full = {"version": _CACHE_VERSION, "tokenizer": tokenizer.descriptor(), **key}
    h = _key_hash(full)[:24]
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cdir / f"tok-{h}.safetensors"
    if path.is_file():
        try:
            d = load_file(str(path))
            return TokenizedDocs(d["tokens"], d["offsets"])
        except Exception:  # corrupt/partial file from another tool: rebuild
            pass
    td = tokenize_documents(get_texts(), tokenizer)
    if cdir.exists() and not cdir.is_dir():
        raise UserError(f"the tokenized-data cache directory {cdir} (data.cache_dir) is a file; set data.cache_dir "
                        "to a directory")
    cdir.mkdir(parents=True, exist_ok=True)
    payload = save({"tokens": np.ascontiguousarray(td.tokens, dtype=np.int32),
                    "offsets": np.ascontiguousarray(td.offsets, dtype=np.int64)},
                   metadata={"key": json.dumps(full, sort_keys=True, default=str)})
    with atomic_open(path, "wb", prefix=f".{path.name}.", suffix=".tmp") as f:
        f.write(payload)
    return td


def load_tokenized(
    source,
    tokenizer,
    *,
    column: str = "text",
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    sample_by: str = "document",
    cache_dir: Union[str, os.PathLike, None] = None,
    use_cache: bool = True,
) -> TokenizedDocs:
    """:func:`load_documents` + tokenize once (cached). The cache key holds the local files' identity
    (absolute path, size, mtime_ns) or, for hub datasets, (name, config, split, revision); the tokenizer
    descriptor (incl. the sha256 of its model file); ``column`` and ``sample_by``.

    Returns:
        :class:`TokenizedDocs` (int32 tokens, int64 offsets; no BOS/EOS).
    """
    paths = _as_paths(source)
    opts = {"column": column, "sample_by": sample_by}
    if paths is not None:
        key = {"files": files_identity(paths), **opts}
    else:
        key = {"hub": [str(source), name, split, revision], **opts}

    def texts():
        return load_documents(source, column=column, split=split, name=name, revision=revision,
                              sample_by=sample_by)

    if not use_cache:
        return tokenize_documents(texts(), tokenizer)
    td = cached_tokenize(texts, tokenizer, key=key, cache_dir=cache_dir)
    if len(td) == 0:
        raise ValueError(f"empty dataset after tokenization: {source}")
    return td


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------
def _check_block_size(block_size: int) -> int:
    block_size = int(block_size)
    if block_size < 3:
        raise ValueError(f"block_size={block_size} is too small: a block is [BOS] + tokens + [EOS], use block_size >= 3")
    return block_size


def wrap_blocks(
    docs,
    block_size: int,
    bos_id: int,
    eos_id: int,
    insert_eos: bool = True,
    *,
    drop_remainder: bool = True,
    pad_id: int | None = None,
    return_mask: bool = False,
):
    """OWT-style wrapping (docs/method.md §6 Data, §8 zero-shot).

    The documents are concatenated into one stream (``doc_0 [EOS] doc_1 [EOS] ...`` when ``insert_eos``, plain
    concatenation otherwise, as for zero-shot sets), cut into chunks of ``L-2`` tokens, and each chunk becomes
    ``[BOS] + chunk + [EOS]``.

    Args:
        docs: :class:`TokenizedDocs` or a sequence of token-id sequences.
        block_size: ``L`` (>= 3).
        drop_remainder: drop the last partial chunk (training). With ``False`` (evaluation sets: nothing is
            lost) the remainder ``r`` becomes ``[BOS] + r + [EOS] + pad``, and ``return_mask=True`` is required.
        pad_id: filler for the padded last row (default ``eos_id``; it is masked out anyway).
        return_mask: also return ``attention_mask: BoolTensor[N, L]`` (True on real tokens incl. BOS/EOS).
    Returns:
        ``LongTensor[N, L]``, or ``(LongTensor[N, L], BoolTensor[N, L])`` if ``return_mask``.
    Raises:
        ValueError if the result would be empty (naming ``drop_remainder=False`` / a smaller block size).
    """
    L = _check_block_size(block_size)
    if not drop_remainder and not return_mask:
        raise ValueError("wrap_blocks(drop_remainder=False) keeps a padded last block: pass return_mask=True "
                         "and use the attention mask so the padding is excluded from the loss")
    td = as_docs(docs)
    if len(td) == 0:
        raise ValueError("wrap_blocks got no documents (empty dataset)")
    toks = td.tokens.astype(np.int64)
    if insert_eos:
        stream = np.insert(toks, td.offsets[1:], int(eos_id))
    else:
        stream = toks
    c = L - 2
    n_full, rem = divmod(len(stream), c)
    keep_rem = rem > 0 and not drop_remainder
    n = n_full + int(keep_rem)
    if n == 0:
        raise ValueError(
            f"wrap_blocks produced no blocks: the set has {len(stream)} tokens (with separators), fewer than "
            f"block_size-2={c}; lower the block length (data.seq_len when training, block_size in duo_eval) or add "
            "data (evaluation sets: drop_remainder=False)"
        )
    out = np.full((n, L), int(eos_id) if pad_id is None else int(pad_id), dtype=np.int64)
    mask = np.zeros((n, L), dtype=bool)
    out[:n_full, 0] = bos_id
    out[:n_full, 1 : L - 1] = stream[: n_full * c].reshape(n_full, c)
    out[:n_full, L - 1] = eos_id
    mask[:n_full] = True
    if keep_rem:
        out[n_full, 0] = bos_id
        out[n_full, 1 : 1 + rem] = stream[n_full * c :]
        out[n_full, 1 + rem] = eos_id
        mask[n_full, : rem + 2] = True
    ids = torch.from_numpy(out)
    if return_mask:
        return ids, torch.from_numpy(mask)
    return ids


def pad_sentences(docs, block_size: int, bos_id: int, eos_id: int, pad_id: int):
    """LM1B-style (no packing, docs/method.md §6 Data (a)): row i = ``[BOS] + doc_i[:L-2] + [EOS] + [PAD]*``.

    Returns:
        ``(ids: LongTensor[N, L], attention_mask: BoolTensor[N, L])``; the mask is True on BOS, tokens and EOS.
    """
    L = _check_block_size(block_size)
    if pad_id is None:
        raise ValueError("pad_sentences needs a pad_id (the tokenizer's pad id, or any id: padding is masked)")
    td = as_docs(docs)
    n = len(td)
    if n == 0:
        raise ValueError("pad_sentences got no documents (empty dataset)")
    out = np.full((n, L), int(pad_id), dtype=np.int64)
    mask = np.zeros((n, L), dtype=bool)
    lens = np.minimum(np.diff(td.offsets), L - 2)
    out[:, 0] = bos_id
    for i in range(n):
        k = int(lens[i])
        a = int(td.offsets[i])
        out[i, 1 : 1 + k] = td.tokens[a : a + k]
        out[i, 1 + k] = eos_id
        mask[i, : k + 2] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def split_heldout(docs, *, num_heldout: int | None = None, fraction: float | None = None):
    """Deterministic held-out split: the **last** documents are held out (as Duo's OWT ``train[:-100000]``).

    Give exactly one of ``num_heldout`` (count) or ``fraction`` (``ceil(fraction * N)`` docs).
    Returns ``(train, heldout)`` of the same kind as ``docs`` (TokenizedDocs or a list).
    """
    if (num_heldout is None) == (fraction is None):
        raise ValueError("split_heldout needs exactly one of num_heldout= or fraction=")
    n = len(docs)
    if fraction is not None:
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        k = int(math.ceil(float(fraction) * n))
    else:
        k = int(num_heldout)
    if not 0 < k < n:
        raise ValueError(f"held-out size {k} must be in [1, {n - 1}] for a set of {n} documents")
    if isinstance(docs, TokenizedDocs):
        return docs.select(0, n - k), docs.select(n - k, n)
    docs = list(docs)
    return docs[: n - k], docs[n - k :]


class TokenBlockDataset(torch.utils.data.Dataset):
    """Map-style dataset over fixed-length blocks.

    ``ds[i] = {"tokens": LongTensor[L], "attention_mask": BoolTensor[L], "index": i}`` (mask all True when
    none is given).
    """

    def __init__(self, blocks: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if blocks.ndim != 2 or blocks.dtype != torch.long:
            raise ValueError(f"blocks must be a LongTensor[N, L], got {tuple(blocks.shape)} {blocks.dtype}")
        if blocks.shape[0] == 0:
            raise ValueError("TokenBlockDataset got 0 blocks (empty dataset)")
        if attention_mask is not None and (attention_mask.shape != blocks.shape or attention_mask.dtype != torch.bool):
            raise ValueError("attention_mask must be a BoolTensor with the same shape as blocks")
        self.blocks = blocks
        self.attention_mask = attention_mask

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} blocks")
        m = self.attention_mask[i] if self.attention_mask is not None else torch.ones(self.block_size, dtype=torch.bool)
        return {"tokens": self.blocks[i], "attention_mask": m, "index": i}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Fetch many rows at once: ``{"tokens": Long[B, L], "attention_mask": Bool[B, L], "index": Long[B]}``."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        m = (self.attention_mask[idx] if self.attention_mask is not None
             else torch.ones(len(idx), self.block_size, dtype=torch.bool))
        return {"tokens": self.blocks[idx], "attention_mask": m, "index": idx}


def collate_blocks(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack ``TokenBlockDataset`` items (a DataLoader ``collate_fn``)."""
    return {
        "tokens": torch.stack([x["tokens"] for x in items]),
        "attention_mask": torch.stack([x["attention_mask"] for x in items]),
        "index": torch.tensor([int(x["index"]) for x in items], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------------------
# Deterministic, resumable order
# ----------------------------------------------------------------------------------------------------------
def _mix_seed(*parts: int) -> int:
    h = hashlib.sha256((streams.DATA_ORDER + ":" + ":".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class GlobalBatchSampler:
    """Global step → dataset indices of the global batch; a fresh permutation per epoch from ``(seed, epoch)``.

    Each epoch has ``steps_per_epoch = num_blocks // global_batch_size`` steps (the last partial batch of each
    permutation is dropped). ``indices(step)`` is a pure function of ``(num_blocks, global_batch_size, seed,
    step)``, so the training state is just the step number and resume is exact by construction.
    """

    def __init__(self, num_blocks: int, global_batch_size: int, seed: int):
        self.num_blocks = int(num_blocks)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        if self.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if self.num_blocks < self.global_batch_size:
            raise ValueError(
                f"dataset has {self.num_blocks} blocks, fewer than global_batch_size={self.global_batch_size}; "
                "use more data, a smaller data.seq_len (block_size) or a smaller global_batch_size"
            )
        self.steps_per_epoch = self.num_blocks // self.global_batch_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def epoch(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation ``LongTensor[num_blocks]`` (from a generator seeded by (seed, epoch))."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        perm = torch.randperm(self.num_blocks, generator=g)
        self._cache = (epoch, perm)
        return perm

    def indices(self, step: int) -> list[int]:
        """Dataset indices of global batch ``step`` (0-based), length ``global_batch_size``."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        e, j = divmod(step, self.steps_per_epoch)
        b = self.global_batch_size
        return self.permutation(e)[j * b : (j + 1) * b].tolist()

    __call__ = indices

    def iter_from(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, list[int]]]:
        """Yield ``(step, indices)`` from ``start_step`` (resume point) on, ``num_steps`` times (None = forever)."""
        s = int(start_step)
        while num_steps is None or s < int(start_step) + int(num_steps):
            yield s, self.indices(s)
            s += 1

    def state_dict(self, step: int) -> dict:
        return {"step": int(step), "seed": self.seed, "num_blocks": self.num_blocks,
                "global_batch_size": self.global_batch_size}


def shard(global_indices: Sequence[int], rank: int, world_size: int, micro_step: int, grad_accum: int):
    """The contiguous slice of a global batch that ``(rank, micro_step)`` processes.

    The global batch of size ``B`` is split rank-major: rank ``r`` owns positions ``[r*B/W, (r+1)*B/W)`` and its
    micro-step ``m`` the sub-slice of length ``B/(W*A)`` starting at ``(r*A + m) * B/(W*A)``.

    Returns:
        ``(indices: list[int], positions: list[int])``: dataset indices and their positions ``0..B-1`` in the
        global batch (feed the positions to per-sample generators / stratified times so that noise does not
        depend on the topology).
    Raises:
        ValueError if ``B`` is not divisible by ``world_size * grad_accum`` or rank/micro_step is out of range.
    """
    B = len(global_indices)
    W, A = int(world_size), int(grad_accum)
    if W <= 0 or A <= 0:
        raise ValueError(f"world_size and grad_accum must be positive, got {W}, {A}")
    if B % (W * A) != 0:
        raise ValueError(
            f"global batch size {B} is not divisible by world_size*grad_accum = {W}*{A} = {W * A}; "
            "choose a global batch size that is a multiple of it"
        )
    if not 0 <= rank < W:
        raise ValueError(f"rank {rank} out of range for world_size {W}")
    if not 0 <= micro_step < A:
        raise ValueError(f"micro_step {micro_step} out of range for grad_accum {A}")
    per = B // (W * A)
    start = (int(rank) * A + int(micro_step)) * per
    positions = list(range(start, start + per))
    return [int(global_indices[p]) for p in positions], positions
