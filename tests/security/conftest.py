"""Shared state of the security / reliability tests: one tiny corpus + tokenizer and ONE trained tiny run per session
(4 steps, checkpoints at 2 and 4), whose outputs every test treats as "earlier files" that must stay unchanged, plus
helpers to run an entry point the way a user does (one-line error, exit status) and to hash a directory."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from duo_plugin.errors import user_errors

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "duo_plugin" / "configs" / "duo"
_WORDS = ("the king queen crown sword castle river stone night day light dark love war peace bread wine ship sea "
          "storm field horse rider song word old young brave fair wise cold warm green gold silver iron").split()


def write_corpus(path: Path, n_docs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [" ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(rng.randint(2, 5))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def snapshot(d: Path, skip: tuple = (".duo_run.lock",)) -> dict:
    """sha256 of every file under ``d`` (hidden temp entries included: a live run's half-written checkpoint counts)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file() and p.name not in skip}


def pretrain_cfg(root: Path, assets: dict, name: str, **overrides):
    cfg = OmegaConf.create({
        "output_dir": str(root / name), "seed": 3, "device": "cpu",
        "tokenizer": {"path": str(assets["tokenizer"])},
        "data": {"source": "files", "files": [str(assets["corpus"])], "seq_len": 16, "packing": "wrap",
                 "val_fraction": 0.1, "cache_dir": str(root / "cache")},
        "model": {"_component_": "duo_plugin.models.dit.duo_dit_tiny", "dropout": 0.0, "dim": 32, "n_layers": 1,
                  "n_heads": 2, "cond_dim": 16},
        "global_batch_size": 8, "eval_batch_size": 16, "max_steps": 4,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.0},
        "lr_scheduler": {"name": "constant_with_warmup", "warmup_steps": 2}, "ema": {"decay": 0.9},
        "curriculum": {"steps": 2, "tau": 1e-3, "table_points": 65}, "eval_every": 0,
        "checkpoint": {"every": 2, "keep_last": 3},
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(root / name / "logs")},
        "progress_bar": False,
    })
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False, force_add=True)
    return cfg


def generate_cfg(checkpoint: Path, out: Path, **overrides):
    cfg = OmegaConf.load(CONFIGS / "generate.yaml")
    upd = {"checkpoint": str(checkpoint), "output_dir": str(out), "steps": 2, "num_samples": 1, "batch_size": 1,
           "progress_bar": False, **overrides}
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False, force_add=True)
    return cfg


def eval_cfg(checkpoint: Path, out: Path, corpus: Path, **overrides):
    cfg = OmegaConf.load(CONFIGS / "eval_ppl.yaml")
    upd = {"checkpoint": str(checkpoint), "output_dir": str(out), "dataset.source": "files",
           "dataset.files": [str(corpus)], "dataset.val_fraction": 0.1, "batch_size": 4, "max_blocks": 2,
           "progress_bar": False, **overrides}
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False, force_add=True)
    return cfg


def distill_cfg(init_from: Path, out: Path, corpus: Path, **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "distill_tiny_cpu.yaml"), {
        "init_from": str(init_from), "output_dir": str(out),
        "data": {"source": "files", "files": [str(corpus)]}})
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False, force_add=True)
    return cfg


def one_line_error(prog: str, fn, capsys) -> str:
    """Run ``fn`` as an entry point does (:func:`user_errors`); assert exit status 2, exactly one
    ``<prog>: error:`` line and no traceback; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        with user_errors(prog):
            fn()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="session")
def sec_assets(tmp_path_factory):
    from duo_plugin.data.tokenizers import train_sentencepiece

    root = tmp_path_factory.mktemp("sec_assets")
    corpus = write_corpus(root / "corpus.txt")
    train_sentencepiece([corpus], 320, root / "tokenizer")
    return {"corpus": corpus, "tokenizer": root / "tokenizer", "root": root}


@pytest.fixture(scope="session")
def trained(sec_assets, tmp_path_factory):
    """One completed tiny run (the earlier outputs every test must leave unchanged)."""
    from duo_plugin.recipes import duo_pretrain as dp

    root = tmp_path_factory.mktemp("sec_runs")
    summary = dp.run(pretrain_cfg(root, sec_assets, "good"))
    return {"root": root, "good": root / "good", "summary": summary, "assets": sec_assets}


@pytest.fixture(scope="session")
def h():
    """The helpers above, for the test modules (``--import-mode=importlib`` cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(pretrain_cfg=pretrain_cfg, generate_cfg=generate_cfg, eval_cfg=eval_cfg,
                           distill_cfg=distill_cfg, one_line_error=one_line_error, snapshot=snapshot,
                           write_corpus=write_corpus, REPO=REPO, CONFIGS=CONFIGS)
