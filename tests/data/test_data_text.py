"""Documents, tokenize-once cache, OWT wrapping, LM1B padding, held-out split, dataset, global order and sharding."""

import json
import os

import numpy as np
import pytest
import torch

from duo_plugin.data.text import (
    GlobalBatchSampler,
    TokenBlockDataset,
    TokenizedDocs,
    collate_blocks,
    load_documents,
    load_tokenized,
    pad_sentences,
    shard,
    split_heldout,
    wrap_blocks,
)

BOS, EOS, PAD = 1, 2, 3


def _random_docs(seed, n_docs, max_len=13, vocab=50):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len, (n_docs,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lens]


def _wrap_reference(docs, L, insert_eos, drop_remainder):
    """Brute force: concatenate by hand, slice into L-2 chunks, frame each with BOS/EOS, pad the last."""
    stream = []
    for d in docs:
        stream += list(d)
        if insert_eos:
            stream.append(EOS)
    rows, masks = [], []
    for a in range(0, len(stream), L - 2):
        chunk = stream[a : a + L - 2]
        if len(chunk) < L - 2 and drop_remainder:
            break
        row = [BOS] + chunk + [EOS]
        masks.append([True] * len(row) + [False] * (L - len(row)))
        rows.append(row + [PAD] * (L - len(row)))
    return rows, masks


@pytest.mark.parametrize("L", [3, 5, 8, 16])
@pytest.mark.parametrize("insert_eos", [True, False])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_wrap_blocks_matches_brute_force(L, insert_eos, drop_remainder):
    for seed in range(3):
        docs = _random_docs(seed, 9)
        rows, masks = _wrap_reference(docs, L, insert_eos, drop_remainder)
        for form in (docs, TokenizedDocs.from_lists(docs), [torch.tensor(d) for d in docs]):
            ids, mask = wrap_blocks(form, L, BOS, EOS, insert_eos, drop_remainder=drop_remainder, pad_id=PAD,
                                    return_mask=True)
            assert ids.dtype == torch.long and mask.dtype == torch.bool
            assert ids.tolist() == rows and mask.tolist() == masks
        if drop_remainder:
            assert torch.equal(wrap_blocks(docs, L, BOS, EOS, insert_eos, pad_id=PAD), ids)


def test_zero_shot_wrapping_keeps_every_token():
    docs = _random_docs(7, 5, max_len=40)
    n_in = sum(len(d) for d in docs)
    for L in (4, 7, 32, 1024):  # 1024 > whole set: a small eval set must not vanish
        ids, mask = wrap_blocks(docs, L, BOS, EOS, insert_eos=False, drop_remainder=False, return_mask=True)
        inner = [row[1 : int(m.sum()) - 1] for row, m in zip(ids.tolist(), mask)]
        assert sum(len(x) for x in inner) == n_in
        assert [t for x in inner for t in x] == [t for d in docs for t in d]
        assert (ids[:, 0] == BOS).all()
        assert all(row[int(m.sum()) - 1] == EOS for row, m in zip(ids.tolist(), mask))


def test_wrap_blocks_errors():
    with pytest.raises(ValueError, match="block_size >= 3"):
        wrap_blocks([[5, 6]], 2, BOS, EOS)
    with pytest.raises(ValueError, match="drop_remainder=False"):
        wrap_blocks([[5, 6, 7]], 1024, BOS, EOS)  # would be empty
    with pytest.raises(ValueError, match="return_mask=True"):
        wrap_blocks([[5, 6, 7]], 8, BOS, EOS, drop_remainder=False)
    with pytest.raises(ValueError, match="no documents"):
        wrap_blocks([], 8, BOS, EOS)


def test_pad_sentences_matches_reference():
    docs = _random_docs(3, 12, max_len=14)
    L = 8
    ids, mask = pad_sentences(docs, L, BOS, EOS, PAD)
    for d, row, m in zip(docs, ids.tolist(), mask.tolist()):
        body = d[: L - 2]
        exp = [BOS] + body + [EOS]
        assert row == exp + [PAD] * (L - len(exp))
        assert m == [True] * len(exp) + [False] * (L - len(exp))
    with pytest.raises(ValueError, match="block_size"):
        pad_sentences(docs, 2, BOS, EOS, PAD)
    with pytest.raises(ValueError, match="no documents"):
        pad_sentences([], 8, BOS, EOS, PAD)


def test_split_heldout():
    docs = _random_docs(1, 10)
    tr, ho = split_heldout(docs, num_heldout=3)
    assert tr == docs[:7] and ho == docs[7:]
    td = TokenizedDocs.from_lists(docs)
    tr2, ho2 = split_heldout(td, fraction=0.25)  # ceil(2.5) = 3
    assert [list(x) for x in tr2] == docs[:7] and [list(x) for x in ho2] == docs[7:]
    with pytest.raises(ValueError, match="exactly one"):
        split_heldout(docs)
    with pytest.raises(ValueError, match="held-out size"):
        split_heldout(docs, num_heldout=10)


def test_dataset_and_collate():
    ids, mask = wrap_blocks(_random_docs(0, 20), 6, BOS, EOS, drop_remainder=False, return_mask=True)
    ds = TokenBlockDataset(ids, mask)
    item = ds[len(ds) - 1]
    assert torch.equal(item["tokens"], ids[-1]) and torch.equal(item["attention_mask"], mask[-1])
    assert item["index"] == len(ds) - 1
    b = collate_blocks([ds[i] for i in (2, 0)])
    assert torch.equal(b["tokens"], ids[[2, 0]]) and b["index"].tolist() == [2, 0]
    assert torch.equal(ds.batch([2, 0])["tokens"], b["tokens"])
    assert TokenBlockDataset(ids)[0]["attention_mask"].all()
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="0 blocks"):
        TokenBlockDataset(ids[:0])


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_shards_reassemble_global_batch(world_size, grad_accum):
    sampler = GlobalBatchSampler(num_blocks=37, global_batch_size=8, seed=3)
    for step in range(10):
        glob = sampler.indices(step)
        rebuilt = [None] * 8
        seen = []
        for r in range(world_size):
            for m in range(grad_accum):
                idx, pos = shard(glob, r, world_size, m, grad_accum)
                assert len(idx) == 8 // (world_size * grad_accum)
                assert pos == list(range(pos[0], pos[0] + len(pos)))  # contiguous
                for i, p in zip(idx, pos):
                    assert rebuilt[p] is None
                    rebuilt[p] = i
                seen += pos
        assert rebuilt == glob and sorted(seen) == list(range(8))


def test_sampler_epochs_and_resume():
    n, B = 37, 8
    s = GlobalBatchSampler(n, B, seed=11)
    assert s.steps_per_epoch == 4
    for e in range(3):
        batch = [i for k in range(4) for i in s.indices(4 * e + k)]
        assert len(set(batch)) == 32 and all(0 <= i < n for i in batch)  # no repeats within an epoch
        assert batch == s.permutation(e)[:32].tolist()
    assert s.permutation(0).tolist() != s.permutation(1).tolist()  # fresh permutation per epoch
    full = [s.indices(k) for k in range(12)]
    resumed = GlobalBatchSampler(n, B, seed=11)  # a new process resuming at step 7
    assert [b for _, b in resumed.iter_from(7, 5)] == full[7:12]
    assert GlobalBatchSampler(n, B, seed=12).indices(0) != full[0]


def test_sampler_and_shard_errors():
    with pytest.raises(ValueError, match="fewer than global_batch_size"):
        GlobalBatchSampler(3, 8, 0)
    with pytest.raises(ValueError, match="not divisible by world_size\\*grad_accum"):
        shard(list(range(8)), 0, 3, 0, 1)
    with pytest.raises(ValueError, match="rank"):
        shard(list(range(8)), 2, 2, 0, 1)


# ------------------------------------------------------------------- documents and cache
def test_load_documents_local_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("para one\nline two\n\npara two\n\n\n", encoding="utf-8")
    assert load_documents(txt) == ["para one\nline two\n\npara two"]
    assert load_documents(txt, sample_by="paragraph") == ["para one\nline two", "para two"]
    assert load_documents(txt, sample_by="line") == ["para one", "line two", "para two"]
    rows = [{"content": "alpha"}, {"content": "beta"}, {"content": ""}]
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_documents(jl, column="content") == ["alpha", "beta"]
    import datasets

    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    assert load_documents(pq, column="content") == ["alpha", "beta"]
    assert load_documents([txt, jl], column="content") == ["para one\nline two\n\npara two", "alpha", "beta"]
    with pytest.raises(ValueError, match="unknown column 'text'.*content"):
        load_documents(jl)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(tmp_path / "missing.jsonl")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty dataset"):
        load_documents(empty)


def test_hub_name_offline_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="not in the local datasets cache and the hub is offline"):
        load_documents("duo-plugin-test/no-such-dataset-xyz")


class _CountingTokenizer:
    """Wraps a tokenizer and counts encode calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, add_bos=False, add_eos=False):
        self.calls += 1
        return self.tok.encode(text, add_bos, add_eos)

    def encode_batch(self, texts):
        self.calls += len(texts)
        return self.tok.encode_batch(texts)


def test_tokenize_once_cache(sp_tok, tmp_path):
    f = tmp_path / "docs.txt"
    f.write_text("To be or not to be.\n\nThat is the question.\n\nWhether 'tis nobler.\n")
    cache = tmp_path / "cache"
    tok = _CountingTokenizer(sp_tok)
    a = load_tokenized(f, tok, sample_by="paragraph", cache_dir=cache)
    assert tok.calls == 3 and len(a) == 3
    assert [list(d) for d in a] == [sp_tok.encode(t) for t in load_documents(f, sample_by="paragraph")]
    assert a.tokens.dtype == np.int32 and a.offsets.dtype == np.int64
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    b = load_tokenized(f, tok, sample_by="paragraph", cache_dir=cache)
    assert tok.calls == 3  # cache hit: tokenizer not called again
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
    load_tokenized(f, tok, sample_by="line", cache_dir=cache)  # other options → other key
    assert tok.calls == 6
    f.write_text("Changed contents entirely.\n")
    os.utime(f, ns=(1, 10**18))
    c = load_tokenized(f, tok, sample_by="paragraph", cache_dir=cache)
    assert tok.calls == 7 and [list(d) for d in c] == [sp_tok.encode("Changed contents entirely.")]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
