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

import json
import sys
from pathlib import Path
from typing import List, Optional

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


def main(argv: Optional[List[str]] = None) -> None:
    from duo_plugin.integrations.lm_eval_registry import register

    register()
    args = rewrite_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0]] + args
    keep_bundled_tasks()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
