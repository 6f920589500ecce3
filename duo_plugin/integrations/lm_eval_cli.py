"""``duo-eval``: lm-eval's own CLI (identical flags) with the ``duo`` backend and duo's bundled tasks.

* registers the ``duo`` model (lazy placeholder, registry-empty safe) before lm-eval parses anything;
* adds ``--include_path <duo_plugin/lm_eval_tasks>`` when the user passes none; when they pass their own (lm-eval
  0.4.13 takes a single directory), the bundled directory is added to lm-eval's task manager next to it, so the
  bundled tasks stay available;
* with ``--output_path`` and ``--model duo``, adds ``mc_stderr_path=<output dir>/duo_mc_stderr.json`` to
  ``--model_args`` (unless set) so the per-task Monte-Carlo standard errors land next to the results.

Also runnable as ``python -m duo_plugin.integrations.lm_eval_cli``.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Iterator, List, Optional

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
_SUBCOMMANDS = {"run", "ls", "validate"}


def _flag_value(argv: List[str], flag: str) -> Optional[int]:
    """Index of the value of ``flag`` (``--flag v`` or ``--flag=v``) in argv, or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return i + 1
        if a.startswith(flag + "="):
            return i
    return None


def _get(argv, i, flag):
    return argv[i].split("=", 1)[1] if argv[i].startswith(flag + "=") else argv[i]


def _set(argv, i, flag, value):
    argv[i] = f"{flag}={value}" if argv[i].startswith(flag + "=") else value


def rewrite_argv(argv: List[str]) -> List[str]:
    """Return the argv (without the program name) that ``duo-eval`` hands to lm-eval (see module doc)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    out_i = _flag_value(argv, "--output_path")
    model_i = _flag_value(argv, "--model")
    if out_i is not None and model_i is not None and _get(argv, model_i, "--model") == "duo":
        out = Path(_get(argv, out_i, "--output_path"))
        target = (out.parent / f"{out.stem}_duo_mc_stderr.json") if out.suffix == ".json" else out / "duo_mc_stderr.json"
        ma_i = _flag_value(argv, "--model_args")
        if ma_i is None:
            argv += ["--model_args", f"mc_stderr_path={target}"]
        else:
            ma = _get(argv, ma_i, "--model_args")
            if "mc_stderr_path" not in ma:
                if ma.strip().startswith("{"):
                    d = json.loads(ma)
                    d["mc_stderr_path"] = str(target)
                    new = json.dumps(d)
                else:
                    new = f"{ma},mc_stderr_path={target}" if ma.strip() else f"mc_stderr_path={target}"
                _set(argv, ma_i, "--model_args", new)
    return argv


def keep_bundled_tasks() -> None:
    """Make lm-eval's ``TaskManager`` always scan :data:`TASKS_DIR` besides the ``include_path`` it is given."""
    from lm_eval.tasks import manager

    orig = manager.TaskManager.__init__
    if getattr(orig, "_duo_keeps_bundled", False):
        return

    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        paths = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
        if str(TASKS_DIR) not in {str(p) for p in paths}:
            paths.append(str(TASKS_DIR))
        orig(self, verbosity, paths, *args, **kwargs)

    __init__._duo_keeps_bundled = True
    manager.TaskManager.__init__ = __init__


def _cli_running() -> bool:
    """True inside lm-eval's command line (``lm_eval ...`` / ``duo-eval ...``), False for the Python API."""
    prog = Path(sys.argv[0] if sys.argv else "")
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    via_lm_eval = "lm_eval.__main__" in sys.modules or getattr(main_spec, "name", None) == "lm_eval.__main__"
    return via_lm_eval and (
        prog.name in ("lm_eval", "lm-eval", "duo-eval", "lm_eval_cli.py")
        or (prog.name == "__main__.py" and prog.parent.name == "lm_eval"))  # python -m lm_eval


def unknown_arg_error(cls, e: TypeError) -> Exception:
    """``cls(**model_args)`` with a key ``cls`` does not take: a :class:`~duo_plugin.errors.UserError` naming the key,
    the closest valid one and the list (else ``e`` itself)."""
    from duo_plugin.errors import UserError

    m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
    if not m:
        return e
    valid = sorted(k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs"))
    close = difflib.get_close_matches(m.group(1), valid, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return UserError(f"--model_args: unknown key {m.group(1)!r} for --model duo; {hint}valid keys: {', '.join(valid)}")


@contextlib.contextmanager
def model_args_errors(cls=None, prog: str = "lm_eval") -> Iterator[None]:
    """Around building the ``duo`` model from ``--model_args``: on lm-eval's command line a user error (a bad value,
    an unknown key, a missing checkpoint) is one line ``lm_eval: error: ...`` and exit status 2, the traceback only
    with ``DUO_DEBUG=1``; from the Python API the exception propagates unchanged."""
    from duo_plugin.errors import user_errors

    if _cli_running():
        from duo_plugin.runtime import drop_cwd_from_sys_path

        drop_cwd_from_sys_path()  # `python -m lm_eval` from inside a model folder: the folder is data, not code
    try:
        yield
    except TypeError as e:
        err = unknown_arg_error(cls, e) if cls is not None else e
        if err is e or not _cli_running():
            raise
        with user_errors(prog):
            raise err from e
    except Exception:
        if not _cli_running():
            raise
        with user_errors(prog):
            raise


def main(argv: Optional[List[str]] = None) -> None:
    """``duo-eval``: every user error (bad flags values, model args, a missing checkpoint, a full disk) is one line
    ``duo-eval: error: ...`` with exit status 2 (``DUO_DEBUG=1``: the traceback)."""
    from duo_plugin.errors import user_errors
    from duo_plugin.runtime import drop_cwd_from_sys_path

    drop_cwd_from_sys_path()  # a model folder used as the working directory is data, not importable code
    from duo_plugin.integrations.lm_eval_registry import register

    register()
    args = rewrite_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0]] + args
    keep_bundled_tasks()
    from lm_eval.__main__ import cli_evaluate

    with user_errors("duo-eval"):
        cli_evaluate()


if __name__ == "__main__":
    main()
