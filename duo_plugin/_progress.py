"""Optional tqdm progress bars, shown only on a terminal (no duo_plugin imports: any module may use it)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def _enabled(progress: bool) -> bool:
    if not progress:
        return False
    try:
        return bool(sys.stderr.isatty())
    except Exception:  # pragma: no cover
        return False


def progress_bar(progress: bool, **tqdm_kwargs: Any):
    """A ``tqdm.auto.tqdm(**tqdm_kwargs)`` bar if ``progress`` is set and stderr is a TTY, else ``None``."""
    if not _enabled(progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(**tqdm_kwargs)
