"""The output directory of a training run: no silent overwrite, explicit resume, one writer at a time.

Rules (checked by :func:`prepare_output_dir` before anything is written):

* a fresh run (``resume=false``) refuses an ``output_dir`` that already holds files, unless ``overwrite=true`` (then
  the earlier run's ``checkpoints/``, ``final/`` and ``summary.json`` are removed first);
* ``resume=true`` needs a checkpoint in ``output_dir/checkpoints`` (else it is an error); ``resume=auto`` resumes
  when there is one and starts fresh otherwise; ``resume=<dir>`` names the checkpoint;
* ``output_dir`` must be a directory (not a file) and writable;
* an exclusive lock ``output_dir/.duo_run.lock`` (``fcntl.flock``, held for the run's lifetime, released by the OS when
  the process dies, also on SIGKILL) stops a second run — e.g. torch-elastic workers that outlived a killed
  launcher — from writing into the same directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from duo_plugin.errors import UserError

__all__ = ["LOCK_NAME", "RUN_ARTIFACTS", "check_output_dir", "prepare_output_dir", "RunDirLock"]

LOCK_NAME = ".duo_run.lock"
#: What a training run writes and ``overwrite=true`` removes (nothing else in the directory is touched).
RUN_ARTIFACTS = ("checkpoints", "final", ".final.tmp", "summary.json", "logs")


def _resume_mode(resume: Any) -> str:
    if resume is None or resume is False:
        return "fresh"
    if resume is True:
        return "true"
    if isinstance(resume, str):
        low = resume.strip().lower()
        if low in ("false", "no", "0", ""):
            return "fresh"
        if low in ("true", "yes", "1"):
            return "true"
        if low == "auto":
            return "auto"
        return "path"
    raise UserError(f"resume must be false, true, auto or a checkpoint directory, got {resume!r}")


def _entries(out: Path, inputs: Sequence[Any] = ()) -> list[str]:
    skip = set()
    for p in inputs:
        if p:
            try:
                skip.add(Path(str(p)).resolve())
            except OSError:
                pass
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and p.resolve() not in skip)


def check_output_dir(output_dir: str | os.PathLike, resume: Any, overwrite: bool = False,
                     inputs: Sequence[Any] = ()) -> Path | None:
    """Validate ``output_dir`` against ``resume``/``overwrite`` without writing anything (every rank may call it).

    ``inputs``: paths the config itself places in ``output_dir`` as INPUTS (``tokenizer.path``, ``data.cache_dir``,
    e.g. ``${output_dir}/tokenizer``); they do not make it "non-empty".
    Returns the checkpoint to resume from (``None`` for a fresh start).  Raises :class:`UserError` naming the fix.
    """
    from duo_plugin.training.checkpointing import latest_checkpoint

    out = Path(output_dir)
    mode = _resume_mode(resume)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir={out} exists and is not a directory; set output_dir to a (new) directory")
    if mode == "path":
        ckpt = Path(str(resume))
        if not (ckpt / "training_state.pt").is_file():
            raise UserError(f"resume={ckpt} is not a checkpoint directory (no training_state.pt); pass "
                            f"resume=<output_dir>/checkpoints/step_XXXXXXXX, resume=true or resume=auto")
        return ckpt
    ckpt = latest_checkpoint(out) if mode in ("true", "auto") and out.is_dir() else None
    if mode == "true" and ckpt is None:
        raise UserError(f"resume=true but {out / 'checkpoints'} holds no checkpoint; set resume=auto to resume "
                        "when possible and start fresh otherwise, or resume=false to start a fresh run")
    if ckpt is not None:
        return ckpt
    if mode == "fresh" and out.is_dir() and not overwrite:
        entries = _entries(out, inputs)
        if entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise UserError(f"output_dir={out} is not empty ({shown}); set resume=true (or resume=auto) to continue "
                            "that run, overwrite=true to replace it, or a new output_dir")
    return None


def prepare_output_dir(output_dir: str | os.PathLike, resume: Any, overwrite: bool = False,
                       inputs: Sequence[Any] = ()) -> Path | None:
    """:func:`check_output_dir`, then create the directory, check it is writable and, for ``overwrite=true`` on a
    fresh start, remove the earlier run's :data:`RUN_ARTIFACTS`.  Call on the writing rank only."""
    ckpt = check_output_dir(output_dir, resume, overwrite, inputs)
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".duo_write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir={out} is not writable ({e.strerror or e}); set output_dir to a writable "
                        "directory") from None
    if ckpt is None and overwrite and _resume_mode(resume) == "fresh":
        for name in RUN_ARTIFACTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return ckpt


class RunDirLock:
    """Exclusive, non-blocking ``flock`` on ``output_dir/.duo_run.lock`` (POSIX).  ``acquire()`` raises
    :class:`UserError` naming the holder's pid when another live process holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"output_dir={self.path.parent} is in use by another run (pid {holder} holds "
                            f"{self.path}); wait for it to finish, stop it, or use another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
