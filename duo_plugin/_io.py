"""Small file-system helpers shared by every layer (no duo_plugin imports: any module may use them).

* :func:`fsync_path`: best-effort ``fsync`` of a file or directory (errors ignored).
* :func:`atomic_open`: write a file through a temp file in the same directory + flush + fsync + ``os.replace``,
  so readers see either the old file or the complete new one; the temp file is removed on any error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["fsync_path", "atomic_open"]


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
