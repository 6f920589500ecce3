"""Turn run logs and result tables into PNGs (needs matplotlib: ``pip install 'duo-plugin[plots]'``).

* :func:`read_disk_log` parses torchtune ``DiskLogger`` files (``Step N | key:value key:value``) into
  ``{metric: (steps, values)}``; a run directory's ``logs/log_*.txt`` files are read in time order and a later
  record of a step (after a resume) replaces the earlier one.
* :func:`plot_training_curves`: training loss and validation NELBO perplexity of several runs on one figure,
  against steps or wall time (``wall_s``, written by ``DuoMetricLogger``).
* :func:`plot_genppl_vs_steps`: Gen PPL against the number of sampling steps, one line per sampler/model.
* :func:`plot_genppl_vs_entropy`: Gen PPL against unigram entropy (low entropy = repetitive samples).

Each plot function writes the PNG and returns ``{panel: {label: (x, y)}}`` read back from the drawn lines.
CLI: ``python -m duo_plugin.plots training --run duo=outputs/duo --run mdlm=outputs/mdlm --out curves.png``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "read_disk_log",
    "plot_training_curves",
    "plot_genppl_vs_steps",
    "plot_genppl_vs_entropy",
    "main",
]

_LINE = re.compile(r"^Step (\d+) \| (.*)$")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("duo_plugin.plots needs matplotlib: pip install 'duo-plugin[plots]'") from e
    return plt


def _log_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    for d in (path / "logs", path):
        files = sorted(d.glob("log_*.txt")) if d.is_dir() else []
        if files:
            return files
    raise FileNotFoundError(f"no torchtune DiskLogger file (log_*.txt) in {path} or {path / 'logs'}")


def read_disk_log(path) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` (steps ascending) from a log file, a ``logs/`` dir or a run output dir."""
    records: dict[str, dict[int, float]] = {}
    for f in _log_files(Path(path)):
        for line in f.read_text(encoding="utf-8").splitlines():
            m = _LINE.match(line.strip())
            if not m:
                continue
            step = int(m.group(1))
            for item in m.group(2).split():
                key, sep, val = item.rpartition(":")
                if not sep:
                    continue
                try:
                    records.setdefault(key, {})[step] = float(val)
                except ValueError:
                    continue
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in records.items()}


def _series(log, key: str, x: str):
    if key not in log:
        return None
    steps, vals = log[key]
    if x == "step":
        return list(steps), list(vals)
    if "wall_s" not in log:
        raise ValueError("wall-time plots need 'wall_s' in the log (use DuoMetricLogger as metric_logger)")
    wall = dict(zip(*log["wall_s"]))
    pts = [(wall[s], v) for s, v in zip(steps, vals) if s in wall]
    return [p[0] for p in pts], [p[1] for p in pts]


def _read_back(fig) -> dict:
    out = {}
    for ax in fig.axes:
        panel = ax.get_title() or ax.get_ylabel()
        out[panel] = {ln.get_label(): ([float(v) for v in ln.get_xdata()], [float(v) for v in ln.get_ydata()])
                      for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    return out


def plot_training_curves(runs: Mapping[str, object], out_png, *, x: str = "step", loss_key: str = "loss",
                         ppl_key: str = "val_ppl", title: str | None = None) -> dict:
    """Training loss (left) and validation NELBO PPL (right, log scale) of several runs against ``x`` (``"step"``
    or ``"wall"``).  ``runs`` maps a label to a run dir / log file / parsed log."""
    if x not in ("step", "wall"):
        raise ValueError(f"x must be 'step' or 'wall'; got {x!r}")
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, src in runs.items():
        log = src if isinstance(src, Mapping) else read_disk_log(src)
        for ax, key in ((a1, loss_key), (a2, ppl_key)):
            s = _series(log, key, x)
            if s and s[0]:
                ax.plot(s[0], s[1], marker="o" if ax is a2 else None, markersize=3, label=label)
    xl = "training step" if x == "step" else "wall time (s)"
    a1.set(title="training loss", xlabel=xl, ylabel="loss (nats/token)")
    a2.set(title="validation NELBO perplexity", xlabel=xl, ylabel="PPL (upper bound)")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    data = _read_back(fig)
    plt.close(fig)
    return data


def plot_genppl_vs_steps(results: Mapping[str, Sequence[tuple[float, float]]], out_png, *,
                         title: str = "Gen PPL vs sampling steps", reference: float | None = None) -> dict:
    """``results``: label -> [(steps, gen_ppl), ...].  Log-log axes; ``reference`` draws a horizontal line (e.g.
    the Gen PPL of held-out data under the scorer)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in results.items():
        pts = sorted((float(s), float(p)) for s, p in pts if p is not None and math.isfinite(float(p)))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="data")
    ax.set(title=title, xlabel="sampling steps", ylabel="Gen PPL")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    data = _read_back(fig)
    plt.close(fig)
    return data


def plot_genppl_vs_entropy(results: Mapping[str, Iterable[tuple[float, float]]], out_png, *,
                           title: str = "Gen PPL vs entropy") -> dict:
    """``results``: label -> [(entropy, gen_ppl), ...] (e.g. one point per number of steps)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in results.items():
        pts = [(float(e), float(p)) for e, p in pts if p is not None and math.isfinite(float(p))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=":", label=label)
    ax.set(title=title, xlabel="unigram entropy (nats)", ylabel="Gen PPL")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    data = _read_back(fig)
    plt.close(fig)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duo_plugin.plots", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("training", help="training loss + validation PPL of runs (LABEL=RUN_DIR)")
    t.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    t.add_argument("--out", required=True)
    t.add_argument("--x", choices=("step", "wall"), default="step")
    args = p.parse_args(argv)
    runs = {}
    for item in args.run:
        label, sep, d = item.partition("=")
        if not sep:
            p.error(f"--run expects LABEL=DIR, got {item!r}")
        runs[label] = d
    plot_training_curves(runs, args.out, x=args.x)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
