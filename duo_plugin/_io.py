"""Small file-system helpers shared by every layer (no duo_plugin imports: any module may use them).

* :func:`fsync_path`: best-effort ``fsync`` of a file or directory (errors ignored).
* :func:`atomic_open`: write a file through a temp file in the same directory + flush + fsync + ``os.replace``,
  so readers see either the old file or the complete new one; the temp file is removed on any error.
* :func:`atomic_write_text`: :func:`atomic_open` for a whole text file.
* :func:`atomic_dir`: build a directory in a temp sibling and swap it in (model saves, step checkpoints, ``final/``
  publishing, fairseq2 exports); :func:`publish_copy` copies a directory that way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["fsync_path", "atomic_open", "atomic_write_text", "atomic_dir", "fsync_tree", "publish_copy"]


def fsync_path(p: str | os.PathLike) -> None:
    """``fsync`` a file or directory; a path that cannot be opened or synced is skipped silently."""
    try:
        fd = os.open(str(p), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    prefix: str,
    suffix: str | None = None,
    encoding: str | None = None,
    fsync_dir: bool = False,
) -> Iterator[IO]:
    """Open a temp file ``path.parent/<prefix>XXXX<suffix>`` for writing; on a clean exit flush, fsync and
    ``os.replace`` it onto ``path`` (then fsync ``path.parent`` if ``fsync_dir``). The parent directory must
    exist. ``mode`` is ``"w"`` or ``"wb"``; ``encoding`` as in :func:`open` (``None``: the locale's)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync_dir:
            fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, prefix: str | None = None, fsync_dir: bool = False,
                      encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (parent created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", prefix=prefix or f".{path.name}.", suffix=".tmp", encoding=encoding,
                     fsync_dir=fsync_dir) as f:
        f.write(text)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (best effort)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, prefix: str | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory next to ``out_dir``; on a clean exit it replaces ``out_dir`` (an existing one is
    moved aside first and removed after the swap), so readers see the old or the complete new directory. On an
    error the temp directory is removed and ``out_dir`` is untouched. ``prefix``: temp-name prefix (default
    ``.<name>.tmp-``; leftovers of a crash keep it, so callers can clean them); ``fsync``: fsync the tree and the
    parent before the swap."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    prefix = prefix or f".{out_dir.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix + "old-", dir=parent))
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        if fsync:
            fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy directory ``src`` to ``dst`` atomically (e.g. a checkpoint's ``model/`` to ``output_dir/final``)."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)
