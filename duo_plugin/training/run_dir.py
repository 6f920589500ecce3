"""The output directory of a training run: no silent overwrite, explicit resume, one writer at a time, and no second
command can harm a live run.

Rules (:func:`open_output_dir`; nothing in ``output_dir`` is changed before the lock is held):

* an exclusive lock ``output_dir/.duo_run.lock`` (``fcntl.flock``, held for the run's lifetime, released by the OS when
  the process dies, also on SIGKILL) is taken FIRST; a second command of any kind (fresh, ``resume=true|auto``,
  ``overwrite=true``) against a live run is refused with nothing changed -- no temp clean-up, no removal;
* a fresh run (``resume=false``) refuses an ``output_dir`` that already holds files, unless ``overwrite=true``: then
  only what the toolkit wrote there is removed -- the entries of its manifest ``output_dir/.duo_manifest.json``
  (step checkpoints, ``checkpoints/latest``, the files of ``final/``, ``summary.json``, the metric logger's files and
  ``torchtune_config.yaml``);
  a user's own files, also inside ``final/`` or ``logs/``, stay.  A directory written before manifests existed is
  recognised by the toolkit's file names instead (:func:`toolkit_outputs`);
* ``resume=true`` needs a checkpoint in ``output_dir/checkpoints`` (else it is an error); ``resume=auto`` resumes
  when there is one and starts fresh otherwise; ``resume=<dir>`` names the checkpoint;
* ``output_dir`` must be a directory (not a file) and writable;
* leftovers of a crashed checkpoint write (``checkpoints/.tmp-*``) are removed only under the lock.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from duo_plugin.errors import UserError

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "RUN_ARTIFACTS", "check_output_dir", "prepare_output_dir", "open_output_dir",
           "RunDirLock", "record_outputs", "read_manifest", "toolkit_outputs", "remove_outputs"]

LOCK_NAME = ".duo_run.lock"
MANIFEST_NAME = ".duo_manifest.json"
#: Top-level names a training run writes (a directory without a manifest: only toolkit-named files under these go).
RUN_ARTIFACTS = ("checkpoints", "final", ".final.tmp", "summary.json", "logs", "torchtune_config.yaml")
_MODEL_DIR_FILES = ("duo_config.json", "model.safetensors", "ema.safetensors", "config.json", "duo_extra.safetensors",
                    "model.safetensors.index.json")


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
    return sorted(p.name for p in out.iterdir()
                  if p.name not in (LOCK_NAME, MANIFEST_NAME) and p.resolve() not in skip)


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(output_dir: str | os.PathLike) -> list[str] | None:
    """The relative paths the toolkit recorded as written in ``output_dir`` (None: no readable manifest)."""
    f = Path(output_dir) / MANIFEST_NAME
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        entries = data["entries"]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    if not isinstance(entries, list):
        return None
    return [e for e in entries if isinstance(e, str) and _safe_rel(e)]


def _safe_rel(rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and p.parts[0] in RUN_ARTIFACTS


def record_outputs(output_dir: str | os.PathLike, rel_paths: Iterable[str], *, replace: bool = False) -> None:
    """Add ``rel_paths`` (relative to ``output_dir``, under :data:`RUN_ARTIFACTS`) to the manifest of files the
    toolkit wrote (atomic rewrite; the writing rank only, holding the run lock).  ``replace``: write exactly these."""
    from duo_plugin._io import atomic_write_text

    new = [str(r) for r in rel_paths]
    bad = [r for r in new if not _safe_rel(r)]
    if bad:
        raise ValueError(f"record_outputs: {bad[:3]} are not toolkit outputs under {RUN_ARTIFACTS}")
    old = [] if replace else (read_manifest(output_dir) or [])
    merged = list(dict.fromkeys(old + new))
    atomic_write_text(Path(output_dir) / MANIFEST_NAME, json.dumps({"version": 1, "entries": merged}, indent=1))


def toolkit_outputs(output_dir: str | os.PathLike) -> list[str]:
    """What ``overwrite=true`` may remove: the manifest's entries; for a directory written before manifests, the
    toolkit's own names (``checkpoints/step_*`` / ``latest`` / ``.tmp-*``, ``summary.json``, ``.final.tmp*``, the
    model files of ``final/`` and ``logs/log_*.txt``)."""
    out = Path(output_dir)
    listed = read_manifest(out)
    if listed is not None:
        return listed
    from duo_plugin.training.checkpointing import is_checkpoint_entry

    found = []
    ck = out / "checkpoints"
    if ck.is_dir():
        found += [f"checkpoints/{p.name}" for p in ck.iterdir() if is_checkpoint_entry(p.name)]
    found += [p.name for p in out.iterdir()
              if p.name in ("summary.json", "torchtune_config.yaml") or p.name.startswith(".final.tmp")]
    final = out / "final"
    if final.is_dir():
        found += [f"final/{n}" for n in _MODEL_DIR_FILES if (final / n).exists()]
        found += [f"final/{d}" for d in ("tokenizer", "ema") if (final / d).is_dir()]
    logs = out / "logs"
    if logs.is_dir():
        found += [f"logs/{p.name}" for p in logs.iterdir() if p.name.startswith("log_") and p.suffix == ".txt"]
    return found


def remove_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Remove :func:`toolkit_outputs` (then the directories they leave empty); never anything else -- no entry
    reached through a symlink out of ``output_dir``, no directory that still holds a user's file.  Call with the run
    lock held.  Returns what was removed."""
    out = Path(output_dir)
    root = out.resolve()
    gone, parents = [], set()
    for rel in toolkit_outputs(out):
        p = out / rel
        try:
            inside = p.parent.resolve().is_relative_to(root)
        except OSError:
            inside = False
        if not inside:
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        gone.append(rel)
        parents.update(p.parents[i] for i in range(len(Path(rel).parts) - 1))
    parents.update(out / top for top in RUN_ARTIFACTS)  # the toolkit's own folders, when nothing is left in them
    for d in sorted(parents, key=lambda x: -len(x.parts)):  # deepest first; only directories our files were in
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    record_outputs(out, [], replace=True)
    return gone


# ------------------------------------------------------------------------------------------------ checks
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


def _probe_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".duo_write_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir={out} is not writable ({e.strerror or e}); set output_dir to a writable "
                        "directory") from None


def prepare_output_dir(output_dir: str | os.PathLike, resume: Any, overwrite: bool = False,
                       inputs: Sequence[Any] = (), lock: "RunDirLock | None" = None) -> Path | None:
    """:func:`check_output_dir`, then -- holding the run lock (``lock``, or one taken here for the duration) --
    create the directory, check it is writable, remove crash leftovers (``checkpoints/.tmp-*``) and, for
    ``overwrite=true`` on a fresh start, the earlier run's outputs (:func:`remove_outputs`).  Writing rank only."""
    check_output_dir(output_dir, resume, overwrite, inputs)  # read-only: a bad request changes nothing
    out = Path(output_dir)
    _probe_writable(out)
    own = lock is None
    lock = RunDirLock(out).acquire() if own else lock
    try:
        ckpt = check_output_dir(out, resume, overwrite, inputs)  # again, now that no other run can change it
        from duo_plugin.training.checkpointing import clean_tmp

        clean_tmp(out)
        if ckpt is None and overwrite and _resume_mode(resume) == "fresh":
            remove_outputs(out)
    finally:
        if own:
            lock.release()
    return ckpt


def open_output_dir(output_dir: str | os.PathLike, resume: Any, overwrite: bool = False,
                    inputs: Sequence[Any] = ()) -> tuple[Path | None, "RunDirLock"]:
    """The writing rank's start of a run: validate (read-only), create ``output_dir``, take the run lock, then
    :func:`prepare_output_dir` under it.  Returns ``(checkpoint to resume or None, the held lock)``."""
    RunDirLock(output_dir).refuse_if_held()  # a live run first: its directory is not "an earlier run"
    check_output_dir(output_dir, resume, overwrite, inputs)
    out = Path(output_dir)
    _probe_writable(out)
    lock = RunDirLock(out).acquire()
    try:
        return prepare_output_dir(out, resume, overwrite, inputs, lock=lock), lock
    except BaseException:
        lock.release()
        raise


class RunDirLock:
    """Exclusive, non-blocking ``flock`` on ``output_dir/.duo_run.lock`` (POSIX).  ``acquire()`` raises
    :class:`UserError` naming the holder's pid when another live process holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def refuse_if_held(self) -> None:
        """:class:`UserError` when another live process holds the lock (an existing lock file is opened read-only and
        probed; nothing is created or written)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or no directory): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"output_dir={self.path.parent} is in use by another run (pid {holder} holds "
                            f"{self.path}); wait for it to finish, stop it, or use another output_dir") from None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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
