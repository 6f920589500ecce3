"""Validation curves of the small-scale study (benchmarks/study.py), one panel per corpus.

Each curve is the run's validation content PPL divided by the unigram content PPL of the same tokens, against the
step; one colour per method, every seed a thin line, the seed mean (of the ratio) bold. Dashed: the escape level
(0.8) and the bar's final level (0.6); dotted vertical: the end of the first third of the step budget.

    python benchmarks/study_plot.py --tags base b128 [--out docs/small-scale-training/b128_vs_base.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "small-scale-training" / "results.json"
COLOURS = {"duo": "tab:blue", "udlm": "tab:orange", "mdlm": "tab:green", "ar": "tab:gray"}


def curves(results: dict, tag: str) -> dict:
    """``{corpus: {method: [[(step, ratio), ...] per seed]}}`` of the finished runs of ``tag``."""
    out: dict = {}
    for r in results["runs"].values():
        if r.get("status") != "done" or r["tag"] != tag or not r.get("unigram"):
            continue
        uni = r["unigram"]["ppl"]
        pts = [(int(s), float(v) / uni) for s, v in r.get("val_ppl") or [] if int(s) > 0]
        out.setdefault(r["corpus"], {}).setdefault(r["method"], []).append(sorted(pts))
    return out


def seed_curves(ax, seeds: list, colour: str, label: str) -> None:
    """Every seed's curve ``[(step, value), ...]`` as a thin line, and the mean over the seeds (at the steps they all
    have) as a bold one carrying ``label``."""
    for pts in seeds:
        ax.plot([s for s, _ in pts], [v for _, v in pts], color=colour, lw=0.7, alpha=0.55)
    common = sorted(set.intersection(*[{s for s, _ in p} for p in seeds]))
    mean = [sum(dict(p)[s] for p in seeds) / len(seeds) for s in common]
    ax.plot(common, mean, color=colour, lw=2.2, label=label)


def plot(results: dict, tags: list[str], out: Path, budget: int = 1500) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {t: curves(results, t) for t in tags}
    corpora = sorted({c for d in data.values() for c in d})
    fig, axes = plt.subplots(len(tags), len(corpora), figsize=(4.2 * len(corpora), 3.4 * len(tags)), squeeze=False,
                             sharey=True)
    for i, tag in enumerate(tags):
        for j, corpus in enumerate(corpora):
            ax = axes[i][j]
            for method, seeds in sorted(data[tag].get(corpus, {}).items()):
                seed_curves(ax, seeds, COLOURS.get(method, "k"), f"{method} ({len(seeds)} seeds)")
            ax.axhline(0.8, ls="--", lw=0.8, color="k")
            ax.axhline(0.6, ls="--", lw=0.8, color="tab:red")
            ax.axvline(budget / 3, ls=":", lw=0.8, color="k")
            ax.set_yscale("log")
            ax.set_title(f"{corpus} — {tag}", fontsize=10)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("val content PPL / unigram PPL")
            if data[tag].get(corpus):
                ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tags", nargs="+", default=["base", "b128"])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(REPO / "docs" / "small-scale-training" / "b128_vs_base.png"))
    a = ap.parse_args(argv)
    print(plot(json.loads(Path(a.results).read_text()), a.tags, Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
