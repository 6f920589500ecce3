"""Text -> Duo token blocks through ``fairseq2.data`` (sharded over data-parallel ranks, resumable).

Pipeline (all fairseq2 ``DataPipeline`` operators, so ``state_dict()`` / ``load_state_dict()`` resume it
mid-stream, which the fairseq2 trainer does from its checkpoints):

``read_text(file)`` for each file (``.txt``: one document per non-empty line; ``.jsonl``: the
``text_key`` field of each record) -> ``shard(rank, world)`` over documents -> ``shuffle`` (optional,
seeded) -> ``map(tokenize)`` -> ``bucket(docs_per_wrap)`` -> ``map(wrap)`` -> ``yield_from`` blocks ->
``shuffle`` -> ``bucket(batch_size, drop_remainder=True)`` -> ``map(collate)`` -> :class:`DuoBatch`.

``wrap`` is the OWT-style block wrapping of docs/method.md §6: the documents of one bucket are concatenated,
each followed by EOS, and cut into ``[BOS] + (L - 2) tokens + [EOS]`` blocks; the remainder of each bucket
is dropped, as the reference code drops it per ``datasets.map`` batch. ``mode="pad"`` instead gives
LM1B-style ``[BOS] doc [EOS]`` rows right-padded to ``L`` (long documents truncated) with a padding mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from fairseq2.data.data_pipeline import DataPipeline, read_sequence
from fairseq2.data.text import read_text
from fairseq2.datasets import DataPipelineReader
from fairseq2.device import SupportsDeviceTransfer
from fairseq2.gang import Gangs

__all__ = ["DUO_TEXT_DATASET", "DuoTextDatasetConfig", "DuoTextDataset", "DuoBatch", "open_duo_text_dataset",
           "wrap_blocks"]

DUO_TEXT_DATASET = "duo_text"


@dataclass(kw_only=True)
class DuoTextDatasetConfig:
    paths: List[Path] = field(default_factory=list)
    """Text files: ``*.jsonl`` (one JSON record per line) or anything else (one document per line)."""

    text_key: str = "text"


class DuoBatch(SupportsDeviceTransfer):
    """``x0``: ``Long[B, L]`` clean ids; ``padding_mask``: ``Bool[B, L]`` (True = real token) or None."""

    def __init__(self, x0: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> None:
        self.x0 = x0
        self.padding_mask = padding_mask

    def to(self, device, *, non_blocking: bool = False) -> None:  # fairseq2 moves batches in place
        self.x0 = self.x0.to(device, non_blocking=non_blocking)
        if self.padding_mask is not None:
            self.padding_mask = self.padding_mask.to(device, non_blocking=non_blocking)

    @property
    def batch_size(self) -> int:
        return int(self.x0.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.x0.numel() if self.padding_mask is None else self.padding_mask.sum())


def wrap_blocks(docs: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> List[List[int]]:
    """Concatenate ``doc + [EOS]`` and cut into ``[BOS] + (seq_len - 2) + [EOS]`` blocks; drop the remainder."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 for [BOS] ... [EOS] blocks, got {seq_len}")
    stream: List[int] = []
    for d in docs:
        stream.extend(int(t) for t in d)
        stream.append(int(eos_id))
    body = seq_len - 2
    return [[int(bos_id)] + stream[i:i + body] + [int(eos_id)] for i in range(0, len(stream) - body + 1, body)]


class DuoTextDataset:
    def __init__(self, files: Sequence[Path], text_key: str = "text") -> None:
        if not files:
            raise ValueError("duo_text dataset needs at least one file (dataset.config_overrides.paths)")
        self.files = [Path(f) for f in files]
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"duo_text dataset file not found: {f}")
        self.text_key = text_key

    def _documents(self) -> DataPipeline:
        pipes = []
        for f in self.files:
            b = read_text(f, rtrim=True, skip_empty=True)
            if f.suffix == ".jsonl":
                key = self.text_key
                b = b.map(lambda line, _k=key: json.loads(line)[_k])
            pipes.append(b.and_return())
        return DataPipeline.concat(pipes).and_return() if len(pipes) > 1 else pipes[0]

    def create_reader(
        self,
        tokenizer,
        gangs: Gangs,
        *,
        seq_len: int,
        batch_size: int,
        mode: str = "wrap",
        docs_per_wrap: int = 64,
        shuffle_window: int = 0,
        seed: int = 0,
        num_accumulate: int = 1,
        prefetch: int = 0,
        sync: bool = True,
    ) -> DataPipelineReader[DuoBatch]:
        """Reader yielding lists of ``num_accumulate`` :class:`DuoBatch` of ``batch_size`` rows on each rank.

        ``tokenizer`` is a :class:`duo_plugin.data.tokenizers.DuoTokenizer`. ``shuffle_window`` 0 = no shuffle
        (deterministic order), otherwise the window of both the document and the block shuffles. ``sync``: stop
        all ranks when the first runs out of data (fairseq2's ``SyncMode.UNTIL_FIRST``; needs a real gang).
        """
        if mode not in ("wrap", "pad"):
            raise ValueError(f"mode must be 'wrap' or 'pad', got {mode!r}")
        bos, eos = int(tokenizer.bos_id), int(tokenizer.eos_id)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
        builder = read_sequence([0]).yield_from(lambda _: self._documents())
        builder = builder.shard(gangs.dp.rank, gangs.dp.size, allow_uneven=True)
        if shuffle_window:
            builder = builder.shuffle(shuffle_window, seed=seed)
        builder = builder.map(lambda text: tokenizer.encode(text))
        if mode == "wrap":
            builder = builder.bucket(docs_per_wrap)
            builder = builder.yield_from(
                lambda docs: read_sequence(wrap_blocks(docs, seq_len, bos, eos)).and_return()
            )
        else:
            builder = builder.map(lambda ids: [bos] + list(ids)[: seq_len - 2] + [eos])
        if shuffle_window:
            builder = builder.shuffle(shuffle_window, seed=seed + 1)
        builder = builder.bucket(batch_size, drop_remainder=True)

        def collate(rows) -> DuoBatch:
            if mode == "wrap":
                return DuoBatch(torch.tensor(rows, dtype=torch.long))
            x0 = torch.full((len(rows), seq_len), int(pad), dtype=torch.long)
            mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
            for i, r in enumerate(rows):
                x0[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = True
            return DuoBatch(x0, mask)

        builder = builder.map(collate)
        if prefetch:
            builder = builder.prefetch(prefetch)
        return DataPipelineReader(builder.and_return(), gangs, num_accumulate=num_accumulate, drop_remainder=True,
                                  sync=sync)


def open_duo_text_dataset(config: DuoTextDatasetConfig) -> DuoTextDataset:
    return DuoTextDataset(config.paths, config.text_key)
