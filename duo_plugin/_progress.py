"""Progress where people wait (no duo_plugin imports: any module may use it).

* :class:`Eta`: a tqdm bar on a terminal, else one line on stderr every ``every_s`` seconds with the elapsed time and
  an ETA (``desc: done/total unit, N s elapsed, ETA M s``), so long runs in logs, CI and ``nohup`` show progress too.
* :func:`progress_bar`: a tqdm bar on a terminal, else ``None``; inside :func:`eta_lines` it returns a line-printing
  :class:`Eta` instead, so a recipe can turn on ETA lines for code that only asks for a bar (the samplers).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Any, Iterator

__all__ = ["Eta", "eta_lines", "progress_bar"]

_LINES: contextvars.ContextVar[float | None] = contextvars.ContextVar("duo_eta_lines", default=None)


def _enabled(progress: bool) -> bool:
    if not progress:
        return False
    try:
        return bool(sys.stderr.isatty())
    except Exception:  # pragma: no cover
        return False


class Eta:
    """Progress with an ETA: a tqdm bar on a terminal, else one line on stderr every ``every_s`` seconds.

    Args:
        progress: False = silent. total: units of work. desc: label. unit: what a unit is (``batch``, ``step``).
        initial: units already done (a resumed run); the ETA uses the rate of this process only.
        every_s: seconds between lines when stderr is not a terminal.
    """

    def __init__(self, progress: bool, total: int, desc: str, every_s: float = 30.0, *, unit: str = "batch",
                 initial: int = 0, **tqdm_kwargs: Any):
        self.total, self.desc, self.every_s, self.unit = int(total), desc, float(every_s), unit
        self.done = self.start = int(initial)
        self.bar = None
        if _enabled(progress):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc=desc, unit=unit,
                            **{"leave": False, **tqdm_kwargs})
        self.log = bool(progress) and self.bar is None
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the rate seen so far (None before the first unit)."""
        now = time.perf_counter() if now is None else now
        ran = self.done - self.start
        return None if ran <= 0 else (now - self.t0) / ran * max(self.total - self.done, 0)

    def set_postfix(self, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)
        else:
            self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log:
            now = time.perf_counter()
            if now - self.last >= self.every_s and self.done < self.total:
                self.last = now
                print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        eta = self.eta_s(now)
        tail = f", {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s, {now - self.t0:.0f} s elapsed, "
                f"ETA {'?' if eta is None else f'{eta:.0f} s'}{tail}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def eta_lines(every_s: float = 30.0) -> Iterator[None]:
    """Within this block :func:`progress_bar` gives an ETA line every ``every_s`` s when stderr is not a terminal."""
    tok = _LINES.set(float(every_s))
    try:
        yield
    finally:
        _LINES.reset(tok)


def progress_bar(progress: bool, **tqdm_kwargs: Any):
    """A ``tqdm.auto.tqdm(**tqdm_kwargs)`` bar if ``progress`` is set and stderr is a TTY; otherwise an ETA-line
    :class:`Eta` inside :func:`eta_lines`, else ``None``."""
    if not progress:
        return None
    if not _enabled(progress):
        every = _LINES.get()
        if every is None:
            return None
        return Eta(True, int(tqdm_kwargs.get("total") or 0), str(tqdm_kwargs.get("desc") or "progress"), every,
                   unit=str(tqdm_kwargs.get("unit") or "it"))
    from tqdm.auto import tqdm

    return tqdm(**tqdm_kwargs)
