"""One data builder for every recipe: text → tokenized documents → held-out split → fixed-length blocks.

``text_blocks(tokenizer, **data_cfg)`` is what the ``data:`` section of duo_pretrain / duo_distill configs calls
(its keys are this function's arguments; ``data: {_component_: duo_plugin.data.text_blocks, ...}`` names it
explicitly, the shipped configs leave ``_component_`` out and get this default). The low-level reading functions
stay in :mod:`duo_plugin.data.text` and :mod:`duo_plugin.data.corpora`.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["TextBlocks", "text_blocks", "text_documents", "tokenized_documents", "heldout_documents", "resolve_files",
           "eval_blocks"]


@dataclass
class TextBlocks:
    """``train``/``val``: :class:`~duo_plugin.data.text.TokenBlockDataset` (``val`` None without a held-out split);
    ``seq_len`` = L."""

    train: Any
    val: Any
    seq_len: int


def resolve_files(files) -> list[str]:
    """``data.files`` as a list of existing paths/globs (FileNotFoundError naming the missing ones)."""
    if not files:
        raise ValueError("data.source=files needs data.files: [path, ...] (text/jsonl/parquet files)")
    if isinstance(files, (str, Path)):
        files = [files]
    files = [str(f) for f in files]
    missing = [f for f in files if not Path(f).exists() and not glob.glob(f)]
    if missing:
        raise FileNotFoundError(f"data.files not found: {missing}; fix the paths in data.files")
    return files


def text_documents(*, source: str = "files", files=None, hub: Mapping | None = None, sample_by: str | None = None,
                   **_ignored) -> list[str]:
    """Raw documents (strings) of a data source (used to train a tokenizer on the training corpus)."""
    from duo_plugin.data.text import load_documents

    if source == "shakespeare":
        from duo_plugin.data.corpora import shakespeare_documents

        return shakespeare_documents()
    if source == "files":
        return load_documents(resolve_files(files))
    hub = dict(hub or {})
    return load_documents(hub.pop("path"), **hub)


def text_blocks(tokenizer, *, seq_len: int, source: str = "files", files: Sequence[str] | str | None = None,
                hub: Mapping | None = None, packing: str = "wrap", sample_by: str | None = None,
                val_fraction: float = 0.0, val_docs: int = 0, cache_dir: str | None = None,
                build_val: bool = True) -> TextBlocks:
    """Documents → tokenize once (cached under ``cache_dir``) → held-out split (the LAST documents) → blocks.

    Args:
        tokenizer: a :class:`~duo_plugin.data.tokenizers.DuoTokenizer`.
        seq_len: L. source: ``shakespeare`` (built-in corpus, paragraphs) | ``files`` (``files``: paths/globs of
            txt/json/jsonl/csv/parquet; ``sample_by`` document|paragraph|line, default paragraph) | ``hub``
            (``hub``: ``{path, name, split, column, ...}`` for :func:`~duo_plugin.data.text.load_tokenized`).
        packing: ``wrap`` (``[BOS] doc [EOS]`` concatenated and cut into L-blocks, OWT style) or ``pad`` (one
            padded sentence per row, LM1B style).
        val_fraction / val_docs: hold out this fraction / exactly this many last documents (``val_docs`` wins).
        build_val: False = drop the held-out documents without building validation blocks (distillation trains on
            the same split as pretraining; fewer than 2 documents then means no split).
    Returns:
        :class:`TextBlocks`. Raises ValueError (bad option, empty data) / FileNotFoundError naming the key.
    """
    from duo_plugin.data import text as data_text

    seq_len = int(seq_len)
    docs = tokenized_documents(tokenizer, source=source, files=files, hub=hub, sample_by=sample_by, cache_dir=cache_dir)
    if packing not in ("wrap", "pad"):
        raise ValueError(f"data.packing must be 'wrap' or 'pad', got {packing!r}")
    frac, n_val = float(val_fraction or 0.0), int(val_docs or 0)
    val_docs_list = None
    if frac > 0 or n_val > 0:
        if len(docs) < 2:
            if build_val:
                raise ValueError("a held-out split needs at least 2 documents; add text or set data.val_fraction: 0")
        else:
            split = {"num_heldout": n_val} if n_val > 0 else {"fraction": frac}
            docs, val_docs_list = data_text.split_heldout(docs, **split)
    tok = tokenizer
    if packing == "wrap":
        train = data_text.TokenBlockDataset(data_text.wrap_blocks(docs, seq_len, tok.bos_id, tok.eos_id))
    else:
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        train = data_text.TokenBlockDataset(*data_text.pad_sentences(docs, seq_len, tok.bos_id, tok.eos_id, pad))
    val = None
    if build_val and val_docs_list is not None:
        val = data_text.TokenBlockDataset(*eval_blocks(val_docs_list, tokenizer, seq_len=seq_len, packing=packing))
    return TextBlocks(train, val, seq_len)


def tokenized_documents(tokenizer, *, source: str = "files", files=None, hub: Mapping | None = None,
                        sample_by: str | None = None, column: str | None = None, cache_dir: str | None = None,
                        key: str = "data"):
    """The tokenized documents (:class:`~duo_plugin.data.text.TokenizedDocs`) of a data source, as
    :func:`text_blocks` reads them (``column``: the text column of json/csv/parquet files, default ``text``).
    ``key`` names the config section in error messages."""
    from duo_plugin.data import text as data_text

    if source == "shakespeare":
        from duo_plugin.data.corpora import load_shakespeare

        docs = load_shakespeare(tokenizer, unit="paragraph", cache_dir=cache_dir)
    elif source == "files":
        if not files:
            raise ValueError(f"{key}.source=files needs {key}.files: [path, ...] (text/jsonl/parquet files)")
        kw = {"column": str(column)} if column else {}
        docs = data_text.load_tokenized(resolve_files(files), tokenizer, cache_dir=cache_dir,
                                        sample_by=sample_by or "paragraph", **kw)
    elif source == "hub":
        h = dict(hub or {})
        if "path" not in h:
            raise ValueError(f"{key}.source=hub needs {key}.hub: {{path: ..., name: ..., split: ...}}")
        docs = data_text.load_tokenized(h.pop("path"), tokenizer, cache_dir=cache_dir, **h)
    else:
        raise ValueError(f"{key}.source must be shakespeare, files or hub; got {source!r}")
    if len(docs) == 0 or docs.num_tokens == 0:
        raise ValueError(f"empty dataset: the data source produced no tokens; check {key}.files / {key}.source")
    return docs


def heldout_documents(tokenizer, *, val_fraction: float = 0.0, val_docs: int = 0, key: str = "data", **source):
    """The held-out documents of a data source exactly as :func:`text_blocks` splits it (the LAST
    ``val_fraction`` / ``val_docs`` documents); both 0 = every document. ``source``: the keyword arguments of
    :func:`tokenized_documents`."""
    from duo_plugin.data import text as data_text

    docs = tokenized_documents(tokenizer, key=key, **source)
    frac, n_val = float(val_fraction or 0.0), int(val_docs or 0)
    if frac <= 0 and n_val <= 0:
        return docs
    if len(docs) < 2:
        raise ValueError(f"a held-out split needs at least 2 documents; set {key}.val_fraction: 0 to use all")
    _, held = data_text.split_heldout(docs, **({"num_heldout": n_val} if n_val > 0 else {"fraction": frac}))
    return held


def eval_blocks(docs, tokenizer, *, seq_len: int, packing: str = "wrap"):
    """Evaluation blocks ``(ids Long[N, L], attention_mask Bool[N, L])`` of tokenized documents: ``wrap`` keeps the
    last partial block (masked), ``pad`` gives one padded sentence per row. The validation split of
    :func:`text_blocks` and the held-out sets of duo_eval are built by this one function."""
    from duo_plugin.data import text as data_text

    tok = tokenizer
    if packing == "pad":
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        return data_text.pad_sentences(docs, int(seq_len), tok.bos_id, tok.eos_id, pad)
    if packing != "wrap":
        raise ValueError(f"packing must be 'wrap' or 'pad', got {packing!r}")
    return data_text.wrap_blocks(docs, int(seq_len), tok.bos_id, tok.eos_id, drop_remainder=False, return_mask=True)
