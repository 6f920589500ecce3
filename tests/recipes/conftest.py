"""Shared fixtures for the recipe tests: a small text corpus and a tiny SentencePiece tokenizer, built once per
session in a temp dir (no downloads), plus a tiny-config factory for duo_pretrain."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

WORDS = ("the king queen crown sword castle river stone night day light dark love war peace bread wine ship sea "
         "storm field horse rider song word old young brave fair wise cold warm green gold silver iron").split()


def _write_corpus(path: Path, n_docs: int = 160, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(2, 5)):
            sents.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + ".")
        docs.append(" ".join(sents))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """``{"corpus": Path, "tokenizer": Path}``: ~160 paragraphs of toy text and a 320-piece SentencePiece model."""
    from duo_plugin.data.tokenizers import train_sentencepiece

    root = tmp_path_factory.mktemp("recipe_assets")
    corpus = _write_corpus(root / "corpus.txt")
    tok_dir = root / "tokenizer"
    train_sentencepiece([corpus], 320, tok_dir)
    return {"corpus": corpus, "tokenizer": tok_dir, "root": root}


@pytest.fixture
def make_cfg(tiny_assets, tmp_path):
    """Factory: a tiny duo_pretrain config (tiny DiT, L=16, global batch 8) writing into ``tmp_path/<name>``."""

    def make(name: str = "run", **overrides):
        cfg = {
            "output_dir": str(tmp_path / name),
            "seed": 3,
            "device": "cpu",
            "tokenizer": {"path": str(tiny_assets["tokenizer"])},
            "data": {"source": "files", "files": [str(tiny_assets["corpus"])], "seq_len": 16, "packing": "wrap",
                     "val_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
            "model": {"_component_": "duo_plugin.models.dit.duo_dit_tiny", "dropout": 0.0,
                      "dim": 32, "n_layers": 1, "n_heads": 2, "cond_dim": 16},
            "global_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "eval_batch_size": 16,
            "max_steps": 4,
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-2, "betas": [0.9, 0.999],
                          "weight_decay": 0.0},
            "lr_scheduler": {"name": "constant_with_warmup", "warmup_steps": 2},
            "clip_grad_norm": 1.0,
            "ema": {"decay": 0.9},
            "curriculum": {"steps": 2, "tau": 1e-3, "table_points": 65},
            "eval_every": 0,
            "eval_max_batches": 2,
            "checkpoint": {"every": 0, "keep_last": 3},
            "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                              "log_dir": str(tmp_path / name / "logs")},
            "progress_bar": False,
        }
        c = OmegaConf.create(cfg)
        for k, v in overrides.items():
            OmegaConf.update(c, k, v, merge=False)
        return c

    return make
