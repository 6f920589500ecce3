"""The paper's seven zero-shot likelihood sets (Duo Table 2; docs/method.md §8).

Each set is described by a :class:`ZeroShotSet` (hub id / config / split / text column / detokenizers). Texts are
loaded by name through ``datasets`` when the hub (or its local cache) is available, or from local files with the
same pipeline (``data_files=`` a file list, or ``local_dir=`` a directory of files or a ``save_to_disk`` dump):

    raw rows → detokenizer(s) → tokenizer (no BOS/EOS) → concatenated **without EOS between documents**
    (``insert_eos=False``) → blocks ``[BOS] + (L-2) tokens + [EOS]`` with the last partial block **kept**
    (padded, masked by the returned attention mask) so no token of a small set (PTB) is ever dropped.

The detokenizers undo each corpus' tokenisation artefacts before re-tokenising (their rules are written out in
the docstrings; they are this package's own implementation of the conventions used by the Duo/MDLM/SEDD code).
Differences from the reference code: the reference wraps per ``datasets.map`` shard and drops each shard's
remainder (so small sets depend on ``num_proc``); here nothing is dropped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from duo_plugin.data.text import load_documents, tokenize_documents, wrap_blocks

__all__ = [
    "ZeroShotSet",
    "ZERO_SHOT_SETS",
    "PAPER_SETS",
    "DETOKENIZERS",
    "wikitext_detokenize",
    "ptb_detokenize",
    "lm1b_detokenize",
    "lambada_detokenize",
    "get_set",
    "load_zeroshot_texts",
    "zeroshot_blocks",
]


# ------------------------------------------------------------------------------------------------------------------
# Detokenizers
# ------------------------------------------------------------------------------------------------------------------
def wikitext_detokenize(text: str) -> str:
    """Undo WikiText tokenisation.

    Rules: number separators `` @-@ `` → ``-``, `` @,@ `` → ``,``, `` @.@ `` → ``.``; no space before
    ``: ; . ! ? ,`` when followed by a space; no space inside ``( )``, ``[ ]``, ``{ }`` and ``" "`` pairs;
    heading markers ``= = =`` → ``===`` (and ``= =`` → ``==``); `` 's`` → ``'s``, ``s '`` → ``s'``;
    `` °`` spacing; no space around newlines.
    """
    s = text
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"\{\s*([^\}]*?)\s*\}", r"{\1}", s)
    s = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" 's", "'s").replace("s ' ", "s' ")
    s = s.replace(" \u00b0 ", "\u00b0 ")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    return s


def ptb_detokenize(text: str) -> str:
    """Undo Penn Treebank tokenisation (``ptb_text_only``).

    Rules: `` 's`` → ``'s``, ``s ' `` → ``s' ``, `` n't`` → ``n't``, `` \\n `` → ``\\n``, ``\\/`` → ``/``, the
    number placeholder ``N`` (a whole token) → ``1``, ``$ 1`` → ``$1``, ``# 1`` → ``#1``, ``<unk>`` → ``?``.
    """
    s = text
    s = s.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    s = s.replace(" \n ", "\n").replace("\\/", "/")
    s = re.sub(r"(?<!\S)N(?!\S)", "1", s)
    s = s.replace("$ 1", "$1").replace("# 1", "#1")
    s = s.replace("<unk>", "?")
    return s


def lm1b_detokenize(text: str) -> str:
    """Undo LM1B (One Billion Word) tokenisation.

    Rules: `` 's``/`` 're``/`` 've``/`` 'm``/`` 'll``/`` 'd``/`` n't`` attach to the previous word; no space
    before ``. , ; : ! ? % ) ] }`` and after ``( [ {`` and ``$``; `` @-@ `` → ``-``; ``" x "`` → ``"x"``;
    repeated spaces collapse.
    """
    s = text
    s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s)
    s = s.replace(" @-@ ", "-")
    s = re.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    s = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', s)
    s = re.sub(r" {2,}", " ", s)
    return s


def lambada_detokenize(text: str) -> str:
    """LAMBADA (OpenAI ``lambada_test.jsonl``): curly quotes → straight quotes, strip, and start the passage
    on a new line (the passages are concatenated without EOS, so the newline separates them)."""
    s = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    return "\n" + s.strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize,
}


# ------------------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroShotSet:
    """One zero-shot set: where its text lives and how it is cleaned.

    Attributes:
        name: registry key. hub_id / config / split: arguments of ``datasets.load_dataset``.
        text_column: the column holding the text. detokenizers: names in :data:`DETOKENIZERS`, applied in order.
        paper_column: the column of Duo Table 2 it reproduces.
    """

    name: str
    hub_id: str
    config: Optional[str]
    split: str
    text_column: str
    detokenizers: tuple[str, ...]
    paper_column: str

    def detokenize(self, text: str) -> str:
        for d in self.detokenizers:
            text = DETOKENIZERS[d](text)
        return text


ZERO_SHOT_SETS: dict[str, ZeroShotSet] = {
    s.name: s
    for s in [
        ZeroShotSet("ptb", "ptb_text_only", None, "validation", "sentence", ("ptb",), "PTB"),
        # WikiText-2 and -103 validation texts are identical (docs/method.md §8); "wikitext" = the 103 config.
        ZeroShotSet("wikitext", "wikitext", "wikitext-103-raw-v1", "validation", "text", ("wikitext",), "Wikitext"),
        ZeroShotSet("wikitext2", "wikitext", "wikitext-2-raw-v1", "validation", "text", ("wikitext",), "Wikitext"),
        ZeroShotSet("lm1b", "lm1b", None, "test", "text", ("lm1b",), "LM1B"),
        # EleutherAI/lambada_openai "default" is OpenAI's lambada_test.jsonl (5153 passages).
        ZeroShotSet("lambada", "EleutherAI/lambada_openai", "default", "test", "text", ("lambada",), "Lambada"),
        # The reference code applies no detokenizer to AG News (the paper text says otherwise).
        ZeroShotSet("ag_news", "ag_news", None, "test", "text", (), "AG News"),
        ZeroShotSet("pubmed", "scientific_papers", "pubmed", "validation", "article", ("wikitext", "lm1b"), "Pubmed"),
        ZeroShotSet("arxiv", "scientific_papers", "arxiv", "validation", "article", ("wikitext", "lm1b"), "Arxiv"),
    ]
}

#: The seven columns of Table 2, in the paper's order.
PAPER_SETS = ("ptb", "wikitext", "lm1b", "lambada", "ag_news", "pubmed", "arxiv")


def get_set(name: str) -> ZeroShotSet:
    key = name.lower().replace("-", "_")
    key = {"wikitext103": "wikitext", "scientific_papers_pubmed": "pubmed", "scientific_papers_arxiv": "arxiv",
           "lm1b_gpt2": "lm1b", "agnews": "ag_news"}.get(key, key)
    if key not in ZERO_SHOT_SETS:
        raise ValueError(f"unknown zero-shot set {name!r}; choose one of {sorted(ZERO_SHOT_SETS)}")
    return ZERO_SHOT_SETS[key]


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def load_zeroshot_texts(
    name: str,
    *,
    data_files: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None] = None,
    local_dir: Union[str, os.PathLike, None] = None,
    split: Optional[str] = None,
    column: Optional[str] = None,
    sample_by: str = "line",
    max_docs: Optional[int] = None,
    detokenize: bool = True,
) -> list[str]:
    """Load and detokenize the texts of a zero-shot set.

    Source, in order of precedence: ``data_files`` (local ``.txt`` (split by ``sample_by``) / ``.json(l)`` /
    ``.csv`` / ``.parquet`` files), ``local_dir`` (a ``datasets.save_to_disk`` directory, or a directory of such
    files), else the hub id (needs network or the datasets cache; offline errors name these options).

    Args:
        name: a key of :data:`ZERO_SHOT_SETS` (``ptb``, ``wikitext``, ``lm1b``, ``lambada``, ``ag_news``,
            ``pubmed``, ``arxiv``; aliases ``wikitext2``/``wikitext103``/``scientific_papers_pubmed``...).
        split / column: override the registry's split / text column.
        max_docs: keep only the first ``max_docs`` documents (for smoke tests).
    Returns:
        ``list[str]`` (empty/whitespace rows are dropped by the loader; an empty result raises ``ValueError``).
    """
    spec = get_set(name)
    col = column or spec.text_column
    sp = split or spec.split
    if data_files is not None:
        docs = load_documents(data_files, column=col, sample_by=sample_by)
    elif local_dir is not None:
        p = Path(local_dir)
        if not p.exists():
            raise FileNotFoundError(f"local_dir {p} does not exist")
        if _is_saved_dataset(p):
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if sp not in ds:
                    raise ValueError(f"{p} has splits {list(ds)}, not {sp!r}; pass split=")
                ds = ds[sp]
            if col not in ds.column_names:
                raise ValueError(f"{p} has columns {ds.column_names}, not {col!r}; pass column=")
            docs = [d for d in ds[col] if isinstance(d, str) and d.strip()]
        else:
            docs = load_documents(p, column=col, sample_by=sample_by)
    else:
        try:
            docs = load_documents(spec.hub_id, name=spec.config, split=sp, column=col)
        except RuntimeError as e:
            raise RuntimeError(
                f"zero-shot set {spec.name!r} ({spec.hub_id}, config={spec.config}, split={sp}) is not available "
                "offline; pass data_files=[...] or local_dir=DIR (files with a "
                f"{col!r} column, or a datasets.save_to_disk dump). {e}"
            ) from e
    if max_docs is not None:
        docs = docs[: int(max_docs)]
    if detokenize:
        docs = [spec.detokenize(d) for d in docs]
    if not docs:
        raise ValueError(f"zero-shot set {spec.name!r} is empty")
    return docs


def zeroshot_blocks(
    name: str,
    tokenizer,
    block_size: int,
    **load_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts of a zero-shot set → ``(blocks Long[N, L], attention_mask Bool[N, L])``.

    Documents are concatenated without EOS (``insert_eos=False``) and wrapped to ``[BOS] + (L-2) + [EOS]``; the
    last partial block is kept (padded; ``attention_mask`` False on the padding), so every token is evaluated.
    ``load_kwargs`` go to :func:`load_zeroshot_texts`.
    """
    texts = load_zeroshot_texts(name, **load_kwargs)
    docs = tokenize_documents(texts, tokenizer)
    if docs.num_tokens == 0:
        raise ValueError(f"zero-shot set {name!r} has no tokens after tokenization")
    return wrap_blocks(
        docs,
        block_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        insert_eos=False,
        drop_remainder=False,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        return_mask=True,
    )
