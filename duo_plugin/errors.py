"""User errors: one clear line naming the key / file / fix, a non-zero exit, no traceback.

A *user error* is a problem with what the user passed (a config value, a path, a data file, a corrupt checkpoint), as
opposed to a bug.  Library code raises :class:`UserError` (or :class:`~duo_plugin.training.recipe_utils.ConfigError`,
a subclass) with a message that says what is wrong and how to fix it.  Recipe entry points wrap their body in
:func:`user_errors`, which turns such an exception into ``<prog>: error: <message on one line>`` on stderr and exit
status 2.  ``DUO_DEBUG=1`` re-raises instead, with the full traceback.

Besides :class:`UserError`, ``ValueError``, ``OSError`` (missing file, not a directory, read-only file system, ...),
``KeyError`` and ``FloatingPointError`` are reported the same way: the recipes raise them with messages naming the
fix.  A full disk is recognised whatever type a library wraps it in (:func:`disk_full`).  Anything else (a bug) keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator

__all__ = ["UserError", "USER_ERROR_TYPES", "EXIT_USER_ERROR", "debug_enabled", "one_line", "user_errors", "disk_full"]

#: Exit status of a run stopped by a user error (argparse uses 2 for usage errors too).
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input from the user; the message names the key / file and the fix."""


USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, KeyError, FloatingPointError)


def debug_enabled() -> bool:
    """``DUO_DEBUG`` set to anything but ``""``/``0``/``false``: show tracebacks instead of one-line errors."""
    return os.environ.get("DUO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")


def disk_full(exc: BaseException) -> bool:
    """The exception, or one in its ``__cause__``/``__context__`` chain, reports a full disk (``ENOSPC``/``EDQUOT``;
    torch and safetensors wrap the ``OSError`` in their own types)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (continuation lines joined with ``"; "``)."""
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    parts = [p.strip() for p in msg.splitlines() if p.strip()]
    text = "; ".join(parts) if parts else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text} ({exc.filename})"
    if not isinstance(exc, UserError) and type(exc).__name__ not in ("ValueError", "ConfigError"):
        text = f"{type(exc).__name__}: {text}"
    return text


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Run the body; a user error becomes ``<prog>: error: <one line>`` on stderr and ``SystemExit(2)``.

    With ``DUO_DEBUG=1`` the exception propagates unchanged (full traceback)."""
    try:
        yield
    except Exception as e:
        full = disk_full(e)
        if debug_enabled() or not (full or isinstance(e, USER_ERROR_TYPES)):
            raise
        msg = one_line(e)
        if full:
            where = getattr(e, "filename", None)
            msg = (f"disk full (No space left on device){f' writing {where}' if where else ''}: free space on that "
                   "file system or point output_dir elsewhere and rerun (a training run: resume=true continues "
                   "from its last complete checkpoint, which is intact)")
        print(f"{prog}: error: {msg} (set DUO_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
