"""Atomic step checkpoints, latest pointer, pruning, training state + RNG round trip, resume compatibility."""

import random

import numpy as np
import pytest
import torch

from duo_plugin.training.checkpointing import (
    capture_rng_state,
    check_resume_compatible,
    checkpoint_step,
    clean_tmp,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    restore_rng_state,
    save_step_checkpoint,
    save_training_state,
)


def _writer(payload):
    def w(path):
        (path / "model.bin").write_bytes(payload)
        (path / "sub").mkdir()
        (path / "sub" / "meta.txt").write_text("ok")
    return w


def test_save_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    p = save_step_checkpoint(tmp_path, 5, writer=_writer(b"five"))
    assert p.name == "step_00000005" and checkpoint_step(p) == 5
    assert (p / "model.bin").read_bytes() == b"five" and (p / "sub" / "meta.txt").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert latest_checkpoint(tmp_path) == p
    q = save_step_checkpoint(tmp_path, 12, writer=_writer(b"twelve"))
    assert latest_checkpoint(tmp_path) == q
    # re-saving an existing step replaces it
    q2 = save_step_checkpoint(tmp_path, 12, writer=_writer(b"again"))
    assert q2 == q and (q / "model.bin").read_bytes() == b"again"


def test_failing_writer_changes_nothing(tmp_path):
    good = save_step_checkpoint(tmp_path, 1, writer=_writer(b"one"))

    def bad(path):
        (path / "half.bin").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_step_checkpoint(tmp_path, 2, writer=bad)
    root = tmp_path / "checkpoints"
    assert not (root / "step_00000002").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert latest_checkpoint(tmp_path) == good


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path):
    good = save_step_checkpoint(tmp_path, 3, writer=_writer(b"x"))
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000009").mkdir()  # a crash during writing step 9
    (root / ".tmp-step_00000009" / "model.bin").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    assert (root / ".tmp-step_00000009").exists()  # read-only: a live run's checkpoint being written looks the same
    clean_tmp(tmp_path)  # what a run does holding the output_dir lock
    assert not (root / ".tmp-step_00000009").exists()
    # pointer lost (crash between rename and pointer update): the highest completed step is used
    save_step_checkpoint(tmp_path, 4, writer=_writer(b"y"))
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_keep_last_prunes(tmp_path):
    for s in (10, 20, 30, 40, 50):
        save_step_checkpoint(tmp_path, s, writer=_writer(str(s).encode()), keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [40, 50]
    save_step_checkpoint(tmp_path, 60, writer=_writer(b"60"))  # keep_last=None keeps all
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [40, 50, 60]


def test_training_state_and_rng_round_trip(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    np.random.randn()  # has_gauss state
    rng = capture_rng_state()
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    state = {"step": 7, "optimizer": {"lr": torch.tensor(1e-3)}, "rng": rng}
    save_training_state(tmp_path / "state.pt", state)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    random.seed(99); np.random.seed(99); torch.manual_seed(99)
    loaded = load_training_state(tmp_path / "state.pt")  # weights_only=True works
    assert loaded["step"] == 7
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_training_state(tmp_path / "nothere.pt")


def test_check_resume_compatible():
    saved = {"model": {"vocab_size": 4096, "dim": 64}, "global_batch_size": 512, "seed": 0}
    check_resume_compatible(saved, dict(saved), ["model.vocab_size", "global_batch_size", "seed"])
    now = {"model": {"vocab_size": 4100, "dim": 64}, "global_batch_size": 256, "seed": 0}
    with pytest.raises(ValueError) as e:
        check_resume_compatible(saved, now, ["model.vocab_size", "model.dim", "global_batch_size", "seed", "x.y"])
    msg = str(e.value)
    assert "model.vocab_size: checkpoint=4096, config=4100" in msg
    assert "global_batch_size: checkpoint=512, config=256" in msg
    assert "model.dim" not in msg and "seed" not in msg and "x.y" not in msg
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="model.dim: checkpoint=64, config=<missing>"):
        check_resume_compatible(OmegaConf.create(saved), OmegaConf.create({"model": {"vocab_size": 4096}}),
                                ["model.vocab_size", "model.dim"])
