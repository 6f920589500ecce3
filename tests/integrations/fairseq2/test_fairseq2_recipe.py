"""Duo training through fairseq2's recipe CLI / Trainer: loss goes down, native export samples, resume,
and the fairseq2.data reader is sharded and resumable. Runs only in the fairseq2 lane."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq2")

import torch  # noqa: E402

from duo_plugin.data.tokenizers import load_tokenizer, train_sentencepiece  # noqa: E402
from duo_plugin.diffusion import LogLinearSchedule, corrupt, duo_nelbo  # noqa: E402
from duo_plugin.diffusion.uniform import row_generators  # noqa: E402
from duo_plugin.models.checkpoint import load_pretrained  # noqa: E402

SEQ = 32


def _corpus(path: Path, n: int = 3000) -> None:
    rng = random.Random(0)
    subj = ["the cat", "a dog", "the bird", "my friend", "the king", "a child"]
    verb = ["sees", "likes", "follows", "finds", "helps"]
    obj = ["the ball", "a tree", "the river", "the house", "a song"]
    path.write_text("\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} ." for _ in range(n)) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("f2train")
    _corpus(root / "corpus.txt")
    train_sentencepiece([root / "corpus.txt"], 300, root / "tok")
    cfg = f"""
model:
  family: duo
  arch: duo_tiny
  config_overrides: {{vocab_size: 320, max_seq_len: {SEQ}}}
dataset:
  family: duo_text
  config_overrides: {{paths: [{root / 'corpus.txt'}]}}
  tokenizer: {root / 'tok'}
  seq_len: {SEQ}
  batch_size: 8
  shuffle_window: 100
optimizer: {{config: {{lr: 3.0e-3}}}}
lr_scheduler: {{config: {{num_warmup_steps: 2}}}}
regime: {{num_steps: 30, checkpoint_every_n_steps: 10, publish_metrics_every_n_steps: 5}}
duo: {{curriculum_end: 3, gamma_min: -3.5, gamma_max: -1.75, ema_decay: 0.99}}
common: {{no_sweep_dir: true, metric_recorders: {{tensorboard: {{enabled: false}}}}}}
"""
    (root / "cfg.yaml").write_text(cfg)
    out = root / "out"
    cmd = [sys.executable, "-m", "duo_plugin.integrations.fairseq2.train", str(out),
           "--config-file", str(root / "cfg.yaml"), "--no-rich", "--no-exit-on-error"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return {"root": root, "out": out, "cmd": cmd, "log": p.stdout + p.stderr}


def _eval_nelbo(model, batch: torch.Tensor, valid) -> float:
    """Discrete Duo NELBO (log-linear schedule) at fixed times / noise, computed outside the recipe."""
    sched = LogLinearSchedule()
    t = torch.linspace(0.05, 0.95, batch.shape[0], dtype=torch.float64)
    alpha = sched.alpha(t)
    z = corrupt(batch, alpha, row_generators(123, 0, range(batch.shape[0])), valid)
    with torch.no_grad():
        logp = model.eval()(z, sched.sigma(t).float())
    return float(duo_nelbo(logp, z, batch, alpha, sched.alpha_prime(t), valid).mean())


def _eval_batch(run) -> torch.Tensor:
    tok = load_tokenizer(run["root"] / "tok")
    lines = (run["root"] / "corpus.txt").read_text().splitlines()[:200]
    ids = []
    for ln in lines:
        ids += tok.encode(ln) + [tok.eos_id]
    body = SEQ - 2
    rows = [[tok.bos_id] + ids[i:i + body] + [tok.eos_id] for i in range(0, 16 * body, body)]
    return torch.tensor(rows)


def test_training_exports_native_dirs_and_lowers_the_loss(run):
    native = run["out"] / "native"
    assert {"step_10", "step_20", "step_30", "latest"} <= {p.name for p in native.iterdir()}
    cfg = json.loads((native / "latest" / "duo_config.json").read_text())
    assert cfg["metadata"]["step"] == 30 and cfg["metadata"]["trainer"] == "fairseq2"
    assert cfg["metadata"]["ema_num_updates"] == 30  # one EMA update per optimizer step
    batch = _eval_batch(run)
    m10 = load_pretrained(native / "step_10", weights="model")
    m30 = load_pretrained(native / "step_30", weights="model")
    valid = m30.valid_vocab
    assert valid is not None and int(valid.sum()) < 320  # pad + padded rows are outside the noise support
    # Initial model: zero output layer -> uniform x_theta; same architecture as the exports.
    init = type(m30)(**cfg["builder_kwargs"])
    l0, l10, l30 = (_eval_nelbo(m, batch, valid) for m in (init, m10, m30))
    assert l30 < l10 < l0, (l0, l10, l30)
    assert l30 < 0.8 * l0
    # fairseq2 itself logged our metric
    assert "duo_nelbo" in run["log"]


def test_exported_checkpoint_samples_with_our_sampler(run):
    from duo_plugin.sampling import DenoiserFn, sample

    model = load_pretrained(run["out"] / "native" / "latest", weights="ema")
    valid = model.valid_vocab
    x = sample(DenoiserFn(model), batch_size=3, seq_len=SEQ, vocab_size=model.vocab_size, steps=16,
               valid_vocab=valid, seed=0, progress=False)
    assert x.shape == (3, SEQ) and x.dtype == torch.long
    assert bool(valid[x].all())
    again = sample(DenoiserFn(model), batch_size=3, seq_len=SEQ, vocab_size=model.vocab_size, steps=16,
                   valid_vocab=valid, seed=0, progress=False)
    assert torch.equal(x, again)
    text = load_tokenizer(run["root"] / "tok").decode(x[0].tolist())
    assert isinstance(text, str) and text


def test_resume_continues_from_fairseq2_checkpoint(run):
    p = subprocess.run(run["cmd"] + ["--config", "regime.num_steps=35", "regime.checkpoint_every_n_steps=5"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    log = p.stdout + p.stderr
    assert "step 30" in log and "Restored the EMA" in log
    cfg = json.loads((run["out"] / "native" / "step_35" / "duo_config.json").read_text())
    assert cfg["metadata"]["step"] == 35 and cfg["metadata"]["ema_num_updates"] == 35


def test_reader_is_sharded_and_resumable(tmp_path):
    from fairseq2.gang import FakeGang, Gangs

    from duo_plugin.integrations.fairseq2.data import DuoTextDataset, wrap_blocks

    assert wrap_blocks([[5, 6, 7], [8, 9]], 5, 1, 2) == [[1, 5, 6, 7, 2], [1, 2, 8, 9, 2]]
    _corpus(tmp_path / "c.txt", 400)
    train_sentencepiece([tmp_path / "c.txt"], 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    ds = DuoTextDataset([tmp_path / "c.txt"])

    def reader(rank, world):
        g = FakeGang(device=torch.device("cpu"), rank=rank, size=world)
        gangs = Gangs(root=g, dp=g, rdp=g, sdp=g, tp=g, pp=g)
        return ds.create_reader(tok, gangs, seq_len=16, batch_size=4, shuffle_window=50, seed=3, sync=world == 1)

    r = reader(0, 1)
    first = [next(r)[0].x0 for _ in range(3)]
    state = r.state_dict()
    cont = [next(r)[0].x0 for _ in range(3)]
    r2 = reader(0, 1)
    r2.load_state_dict(state)
    assert all(torch.equal(a, next(r2)[0].x0) for a in cont)
    assert first[0].shape == (4, 16) and bool((first[0][:, 0] == tok.bos_id).all())
    # two ranks read disjoint documents: their blocks differ
    a, b = next(reader(0, 2))[0].x0, next(reader(1, 2))[0].x0
    assert not torch.equal(a, b)
