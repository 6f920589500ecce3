"""Generation quality against time: Gen PPL and entropy of Duo / MDLM at T steps and of AR sampling (temperature 1,
KV cache), with the CPU and wall seconds per sample, through ``duo_generate`` as a user runs it; one plot.

    python benchmarks/bench_generation_quality.py --duo DUO/final --mdlm MDLM/final --ar AR/final \\
        --scorer SCORER/final --steps 4 8 16 32 64 --num-samples 32 --out OUT_DIR

Every model is sampled with ``duo_generate`` (BOS prompt, seed 0, ``batch_size`` = all samples): Duo with ancestral
and Greedy-Tail noise removal, MDLM with Greedy-Tail (its default), the AR model left to right with its KV cache.
Gen PPL: the samples scored by ``--scorer`` (an AR-objective DiT of the same tokenizer, trained with another seed so
the AR samples are not scored by the model that drew them; ``genppl.scorer=dit``, BOS first). Time: the recipe's
sampling seconds, wall (``seconds``) and process CPU (``cpu_seconds``), each per sample; the plot uses CPU seconds
(wall time on a shared machine counts other programs). Writes ``OUT/quality.json``, ``OUT/quality.md`` and
``OUT/genppl_vs_time.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate(checkpoint: str, out: Path, scorer: str, **over) -> dict:
    """One ``duo_generate`` run in this process; its metrics plus ``cpu_s`` (process CPU seconds of the run)."""
    from omegaconf import OmegaConf

    from duo_plugin.recipes.duo_generate import run

    cfg = OmegaConf.load(REPO / "duo_plugin" / "configs" / "duo" / "generate.yaml")
    for k, v in {"checkpoint": checkpoint, "output_dir": str(out), "progress_bar": False, "genppl.path": scorer,
                 "genppl.scorer": "dit", **over}.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return run(cfg)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["sample_cpu_s_per_sample"], r["gen_ppl"], r["T"]) for r in rows if r["label"] == label
                     and math.isfinite(r["gen_ppl"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if label != "AR (KV cache, T=1)" else "*",
                ms=6 if label != "AR (KV cache, T=1)" else 12, label=label)
        for x, y, T in pts:
            if T is not None:
                ax.annotate(str(T), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="sampling CPU seconds per sample (1 thread)", ylabel="Gen PPL (AR scorer)",
           title="Gen PPL vs time per sample (tiny_cpu models; labels = T)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duo", required=True)
    p.add_argument("--mdlm", default=None)
    p.add_argument("--ar", required=True)
    p.add_argument("--scorer", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.num_samples
    runs = [("Duo (ancestral)", args.duo, {"noise_removal": "ancestral"}),
            ("Duo (greedy-tail)", args.duo, {"noise_removal": "greedy"})]
    if args.mdlm:
        runs.append(("MDLM (greedy-tail)", args.mdlm, {"noise_removal": "greedy"}))
    rows = []
    jobs = [(lab, ck, {**o, "steps": T}, T) for lab, ck, o in runs for T in args.steps]
    jobs.append(("AR (KV cache, T=1)", args.ar, {"steps": 1}, None))
    for i, (label, ck, over, T) in enumerate(jobs):
        c0 = time.process_time()
        m = generate(ck, out / f"run{i}", args.scorer, num_samples=n, batch_size=n, **over)
        rows.append({"label": label, "T": T, "nfe": m["nfe"], "gen_ppl": m["gen_ppl"], "entropy": m["entropy"],
                     "sample_wall_s_per_sample": m["seconds"] / n,
                     "sample_cpu_s_per_sample": m["cpu_seconds"] / n, "total_cpu_s": time.process_time() - c0,
                     "checkpoint": ck, "overrides": over})
        print(f"{label} T={T}: Gen PPL {m['gen_ppl']:.2f}, entropy {m['entropy']:.3f}, {m['seconds']:.2f} s",
              file=sys.stderr, flush=True)
    (out / "quality.json").write_text(json.dumps({"command": " ".join(sys.argv), "num_samples": n, "rows": rows},
                                                 indent=1))
    lines = ["| method | T | NFE | Gen PPL | entropy | CPU s / sample | wall s / sample |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['T'] if r['T'] is not None else '–'} | {r['nfe']} | {r['gen_ppl']:.2f} | "
                     f"{r['entropy']:.3f} | {r['sample_cpu_s_per_sample']:.4f} | {r['sample_wall_s_per_sample']:.4f} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "genppl_vs_time.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
