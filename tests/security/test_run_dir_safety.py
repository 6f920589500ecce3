"""No second command can harm a live run; overwrite removes only the toolkit's files; pruning is crash-safe; a
``latest`` pointer of any content falls back with a WARNING.

The deterministic tests hold the run lock in this process (``flock`` is per open file, so a second open in the same
process is refused exactly like another process) on a directory that looks live (a half-written ``.tmp-`` checkpoint,
an open log) and check that every kind of second command is refused with NOTHING changed -- which is only possible if
the lock is taken before any mutation.  The slow test does it for real against a training subprocess."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from duo_plugin.recipes import duo_pretrain as dp
from duo_plugin.training import checkpointing as ck
from duo_plugin.training import run_dir

REPO = Path(__file__).resolve().parents[2]
KINDS = {  # second command -> config overrides
    "fresh": {},
    "overwrite": {"overwrite": True},
    "resume_true": {"resume": True},
    "resume_auto": {"resume": "auto"},
    "resume_path": {"resume": "__ckpt__"},
}


def _live_looking_copy(good: Path, d: Path) -> None:
    shutil.copytree(good, d, ignore=shutil.ignore_patterns(".duo_run.lock"))
    half = d / "checkpoints" / ".tmp-step_00000006.abc123"  # the live run's checkpoint being written
    (half / "model").mkdir(parents=True)
    (half / "model" / "model.safetensors").write_bytes(b"half written")
    (d / "notes.txt").write_text("the user's own notes")
    (d / "final" / "USER_README.md").write_text("the user's file inside final/")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_second_command_against_a_live_run_is_refused_with_nothing_changed(kind, trained, tmp_path, capsys, h,
                                                                           monkeypatch):
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    d = tmp_path / "live"
    _live_looking_copy(trained["good"], d)
    over = {k: (str(d / "checkpoints" / "step_00000004") if v == "__ckpt__" else v) for k, v in KINDS[kind].items()}
    before = h.snapshot(d)
    with run_dir.RunDirLock(d):  # the live run
        line = h.one_line_error("duo_pretrain", lambda: dp.run(h.pretrain_cfg(tmp_path, trained["assets"], "live",
                                                                              **over)), capsys)
    assert "is in use by another run" in line and str(d) in line, line
    assert h.snapshot(d) == before, "a refused second command changed the live run's directory"


def test_prepare_output_dir_takes_the_lock_before_any_change(trained, tmp_path):
    """The library call too: with the lock held elsewhere, overwrite / resume / temp clean-up change nothing."""
    from duo_plugin.errors import UserError

    d = tmp_path / "live"
    _live_looking_copy(trained["good"], d)
    with run_dir.RunDirLock(d):
        before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
        for resume, overwrite in ((False, True), (True, False), ("auto", False)):
            with pytest.raises(UserError, match="in use by another run"):
                run_dir.prepare_output_dir(d, resume, overwrite)
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before


def test_overwrite_removes_only_what_the_toolkit_wrote(trained, tmp_path, h):
    d = tmp_path / "ow"
    shutil.copytree(trained["good"], d, ignore=shutil.ignore_patterns(".duo_run.lock"))
    manifest = run_dir.read_manifest(d)
    assert "summary.json" in manifest and "checkpoints/step_00000004" in manifest
    assert any(e.startswith("final/") for e in manifest) and any(e.startswith("logs/") for e in manifest)
    user = {"notes.txt": "top", "final/USER_README.md": "in final", "logs/my_notes.txt": "in logs",
            "checkpoints/keep.txt": "in checkpoints"}
    for rel, text in user.items():
        (d / rel).write_text(text)
    old_logs = {p.name for p in (d / "logs").iterdir()} - {"my_notes.txt"}
    s = dp.run(h.pretrain_cfg(tmp_path, trained["assets"], "ow", overwrite=True, max_steps=2,
                              **{"checkpoint.every": 0}))
    assert s["steps"] == 2 and s["losses"] == trained["summary"]["losses"][:2]
    for rel, text in user.items():
        assert (d / rel).read_text() == text, rel
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["keep.txt", "latest", "step_00000002"]
    assert not old_logs & {p.name for p in (d / "logs").iterdir()}, "the earlier run's log was not removed"
    assert (d / "final" / "duo_config.json").is_file()


def test_overwrite_of_a_directory_without_manifest_removes_only_toolkit_names(trained, tmp_path):
    d = tmp_path / "legacy"
    shutil.copytree(trained["good"], d, ignore=shutil.ignore_patterns(".duo_run.lock", ".duo_manifest.json"))
    (d / "final" / "USER_README.md").write_text("mine")
    (d / "logs" / "my_notes.txt").write_text("mine")
    run_dir.prepare_output_dir(d, False, overwrite=True)
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != ".duo_run.lock") == [
        ".duo_manifest.json", "final/USER_README.md", "logs/my_notes.txt"]


def test_pruning_killed_mid_delete_never_leaves_a_half_deleted_step(tmp_path, monkeypatch):
    """keep_last=1: the old step is renamed to a .tmp- name before deletion; a kill in the middle of the delete leaves
    only a .tmp- leftover (ignored, removed by clean_tmp), never a partial directory under a step_* name."""
    def writer(payload):
        def w(p: Path):
            for i in range(5):
                (p / f"part{i}.bin").write_bytes(payload)
        return w

    ck.save_step_checkpoint(tmp_path, 1, writer=writer(b"one"), keep_last=1)
    real = shutil.rmtree

    def killed_midway(path, *a, **k):
        files = sorted(Path(path).iterdir())
        files[0].unlink()  # part of the directory is gone...
        raise KeyboardInterrupt("killed")  # ...when the process dies

    monkeypatch.setattr(ck.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ck.save_step_checkpoint(tmp_path, 2, writer=writer(b"two"), keep_last=1)
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    root = tmp_path / "checkpoints"
    steps = [p for p in root.iterdir() if p.name.startswith("step_")]
    assert [p.name for p in steps] == ["step_00000002"]
    assert all(len(list(p.iterdir())) == 5 for p in steps), "a step directory is incomplete"
    assert ck.latest_checkpoint(tmp_path).name == "step_00000002"
    ck.clean_tmp(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


@pytest.mark.parametrize("content", [random.Random(0).randbytes(64), b"", b"\xff\xfe\x00step", b"step_99999999\n",
                                     b"../../etc\n", "step_0000000\u00e9".encode()])
def test_latest_of_any_content_falls_back_with_a_warning(content, trained, tmp_path, caplog):
    d = tmp_path / "run"
    shutil.copytree(trained["good"] / "checkpoints", d / "checkpoints")
    (d / "checkpoints" / "latest").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="duo_plugin.training.checkpointing"):
        got = ck.latest_checkpoint(d)
    assert got == d / "checkpoints" / "step_00000004"
    assert any("does not name a checkpoint" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_resume_with_garbage_latest_continues_exactly(trained, tmp_path, h):
    d = tmp_path / "resume"
    shutil.copytree(trained["good"] / "checkpoints", d / "checkpoints")
    shutil.rmtree(d / "checkpoints" / "step_00000004")
    (d / "checkpoints" / "latest").write_bytes(random.Random(1).randbytes(200))
    s = dp.run(h.pretrain_cfg(tmp_path, trained["assets"], "resume", resume=True))
    assert s["losses"] == trained["summary"]["losses"]


def _wait(pred, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_live_run_survives_second_commands_of_every_kind(trained, tmp_path, h, capsys, monkeypatch):
    """A real training process (checkpoint + prune every step) while second commands of each kind (fresh, resume=true,
    resume=auto, overwrite=true) are fired at its output_dir, ``DUO_LIVE_TRIES`` times each (default 3; the issue's
    bar is 10): every one is refused, and the live run finishes with losses identical to an undisturbed run."""
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    tries = int(os.environ.get("DUO_LIVE_TRIES", "3"))
    over = {"max_steps": 40, "checkpoint.every": 1, "checkpoint.keep_last": 2}
    ref = dp.run(h.pretrain_cfg(tmp_path, trained["assets"], "ref", **over))["losses"]
    cfg = h.pretrain_cfg(tmp_path, trained["assets"], "live", **over)
    path = tmp_path / "live.yaml"
    OmegaConf.save(cfg, path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    live = subprocess.Popen([sys.executable, "-m", "duo_plugin.recipes.duo_pretrain", "--config", str(path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = tmp_path / "live"
    try:
        assert _wait(lambda: (d / "checkpoints" / "latest").exists() or live.poll() is not None, 300)
        fired = {k: 0 for k in ("fresh", "overwrite", "resume_true", "resume_auto")}
        while live.poll() is None and min(fired.values()) < tries:
            for kind in fired:
                if live.poll() is not None:
                    break
                line = h.one_line_error("duo_pretrain", lambda: dp.run(h.pretrain_cfg(
                    tmp_path, trained["assets"], "live", **over, **KINDS[kind])), capsys)
                assert "in use by another run" in line, line
                fired[kind] += 1
        out, _ = live.communicate(timeout=600)
    finally:
        if live.poll() is None:
            live.kill()
    print(f"second commands refused while the live run trained: {fired}")
    assert live.returncode == 0, out[-3000:]
    assert min(fired.values()) >= 1, f"the live run ended before every kind was tried: {fired}"
    assert json.loads((d / "summary.json").read_text())["losses"] == ref
