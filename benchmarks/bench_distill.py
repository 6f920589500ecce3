"""Distil the CPU demo model and compare, measured in one run: Gen PPL + entropy of the base model at many steps vs
the DCD student at few steps, and the wall-clock ratio of sampling.

    python benchmarks/bench_distill.py                      # trains missing assets under outputs/bench_distill
    python benchmarks/bench_distill.py --base DIR --scorer DIR --work outputs/bench_distill

Assets (reused when present): ``<work>/base/final`` = ``duo_pretrain --config duo/tiny_cpu`` (the demo model),
``<work>/ar/final`` = the same recipe with ``objective=ar`` (the offline Gen PPL scorer, same tokenizer).
Then ``duo_distill --config duo/distill_tiny_cpu`` (per-round table in ``<work>/distill/quality_table.md``), and a
final side-by-side evaluation of the base EMA and the student EMA with the same samplers, seeds and scorer:
``<work>/bench_distill.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "duo_plugin" / "configs" / "duo"


def _pretrain(out: Path, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "duo_plugin.recipes.duo_pretrain", "--config", str(CFG / "tiny_cpu.yaml"),
           f"output_dir={out}", "progress_bar=false", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "final"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "outputs" / "bench_distill"))
    ap.add_argument("--base", default=None, help="base Duo model dir (default: <work>/base/final, trained if missing)")
    ap.add_argument("--scorer", default=None, help="AR-objective model dir (default: <work>/ar/final)")
    ap.add_argument("--base-steps", type=int, nargs="+", default=[256, 64, 16, 8])
    ap.add_argument("--student-steps", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--distill-overrides", nargs="*", default=[], help="extra key=value for duo_distill")
    ap.add_argument("--skip-distill", action="store_true", help="reuse <work>/distill/final")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = Path(args.base) if args.base else work / "base" / "final"
    if not (base / "duo_config.json").is_file():
        base = _pretrain(work / "base", [])
    scorer = Path(args.scorer) if args.scorer else work / "ar" / "final"
    if not (scorer / "duo_config.json").is_file():
        scorer = _pretrain(work / "ar", ["objective=ar", "curriculum.steps=0", f"tokenizer.path={base / 'tokenizer'}"])

    import torch
    from omegaconf import OmegaConf

    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.recipes import duo_distill as dd
    from duo_plugin.training.distill import sample_quality_table, write_quality_table

    seq_len = int(load_pretrained(base, weights="model").duo_metadata.get("seq_len") or 64)
    dist_dir = work / "distill"
    t_distill = None
    if not args.skip_distill:
        cfg = OmegaConf.load(CFG / "distill_tiny_cpu.yaml")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
            f"output_dir={dist_dir}", f"init_from={base}", f"data.seq_len={seq_len}", f"eval.seq_len={seq_len}",
            "eval.scorer.type=dit", f"eval.scorer.path={scorer}", "progress_bar=false", "eval.include_base=false",
            "eval.steps=[16,8]", *args.distill_overrides]))
        t1 = time.perf_counter()
        dd.run(cfg)
        t_distill = time.perf_counter() - t1
    student_dir = dist_dir / "final"

    from duo_plugin.eval.genppl import load_dit_scorer

    sc = load_dit_scorer(scorer)
    stok = load_tokenizer(scorer / "tokenizer")
    base_m = load_pretrained(base, weights="ema")
    student_m = load_pretrained(student_dir, weights="ema")
    torch.manual_seed(0)
    rows = sample_quality_table(
        {"base": base_m, "student": student_m}, steps=[], models_steps={"base": args.base_steps,
                                                                       "student": args.student_steps},
        num_samples=args.num_samples, seq_len=seq_len, seed=0, valid_vocab=base_m.valid_vocab,
        diffusion_tokenizer=load_tokenizer(base / "tokenizer"), scorer=sc, scorer_tokenizer=stok,
        eos_id_scorer=stok.eos_id, bos_id_scorer=stok.bos_id, score_batch_size=32,
        max_len=int(sc.model.max_seq_len))
    cell = {(r["model"], r["sampler"], r["steps"]): r for r in rows}
    many = max(args.base_steps)
    summary = []
    for mode in ("ancestral", "greedy"):
        ref = cell[("base", mode, many)]
        for few in args.student_steps:
            st, bf = cell[("student", mode, few)], cell.get(("base", mode, few))
            summary.append({
                "sampler": mode, "few_steps": few, "many_steps": many,
                "base_many_gen_ppl": ref["gen_ppl"], "base_many_entropy": ref["entropy"],
                "student_few_gen_ppl": st["gen_ppl"], "student_few_entropy": st["entropy"],
                "base_few_gen_ppl": bf["gen_ppl"] if bf else None, "base_few_entropy": bf["entropy"] if bf else None,
                "student_closer_than_base_few": (abs(st["gen_ppl"] - ref["gen_ppl"]) < abs(bf["gen_ppl"] - ref["gen_ppl"]))
                if bf else None,
                "sampling_speedup_vs_base_many": ref["sample_seconds"] / st["sample_seconds"],
            })
    extra = {"base": str(base), "student": str(student_dir), "scorer": str(scorer), "seq_len": seq_len,
             "num_samples": args.num_samples, "distill_seconds": t_distill, "summary": summary,
             "total_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    jp, mp = write_quality_table(rows, work / "bench_distill", title="Base (many steps) vs DCD student (few steps)",
                                 extra=extra)
    lines = ["", "| sampler | base T / Gen PPL / ent | student T / Gen PPL / ent | base same T / Gen PPL / ent | "
             "student closer? | sampling speed-up |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['sampler']} | {s['many_steps']} / {s['base_many_gen_ppl']:.2f} / {s['base_many_entropy']:.2f}"
                     f" | {s['few_steps']} / {s['student_few_gen_ppl']:.2f} / {s['student_few_entropy']:.2f} | "
                     f"{s['few_steps']} / {s['base_few_gen_ppl']:.2f} / {s['base_few_entropy']:.2f} | "
                     f"{s['student_closer_than_base_few']} | {s['sampling_speedup_vs_base_many']:.1f}x |")
    with open(mp, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(mp.read_text())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
