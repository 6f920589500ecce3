"""CPU demo of DCD, measured in one command: Gen PPL + entropy of the base model at many steps and at few steps vs
the DCD student at the same few steps, and the wall-clock ratio of sampling.

    python benchmarks/bench_distill.py                                  # everything, assets under outputs/bench_distill
    python benchmarks/bench_distill.py --base DIR --scorer DIR          # reuse a base Duo model and an AR scorer
    python benchmarks/bench_distill.py --base DIR --scorer DIR --base-only        # is there a few-step gap at all?
    python benchmarks/bench_distill.py --base DIR --scorer DIR --skip-distill     # re-evaluate <work>/distill/final

Assets (trained only when the dirs are absent; ``--base-train`` / ``--scorer-train`` are extra ``key=value``
overrides of ``duo/tiny_cpu``): ``<work>/base/final`` (the Duo model to distil) and ``<work>/ar/final``
(``objective=ar`` with the base's tokenizer: the offline Gen PPL scorer). Then ``duo_distill --config
duo/distill_tiny_cpu`` (+ ``--distill-overrides``; per-round table in ``<work>/distill/quality_table.md``) and a
final side-by-side evaluation of the base EMA and the student EMA with the same samplers, the same prior draws
(``--seed``) and the same scorer: ``<work>/bench_distill.{json,md}``; the summary JSON is also printed.

"Closer" is measured in log Gen PPL: |log PPL(student, few) − log PPL(base, many)| <
|log PPL(base, few) − log PPL(base, many)|; always read it next to the entropies (``entropy_gap`` columns).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "duo_plugin" / "configs" / "duo"

# Defaults for the assets when they must be trained here (single-thread CPU, ~15 + ~6 minutes; wall-time caps off
# so the runs are a function of the seed).
BASE_TRAIN = ["max_steps=3000", "max_wall_s=null", "curriculum.steps=300", "eval_every=500", "checkpoint.every=500"]
SCORER_TRAIN = ["objective=ar", "curriculum.steps=0", "max_steps=1000", "max_wall_s=null", "eval_every=500",
                "checkpoint.every=500"]


def _pretrain(out: Path, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "duo_plugin.recipes.duo_pretrain", "--config", str(CFG / "tiny_cpu.yaml"),
           f"output_dir={out}", "progress_bar=false", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "final"


def _log_gap(a: float, b: float) -> float:
    return abs(math.log(a) - math.log(b))


def summarize(rows: list[dict], many: int, few_steps: list[int], student: str | None) -> list[dict]:
    cell = {(r["model"], r["sampler"], r["steps"]): r for r in rows}
    out = []
    for mode in sorted({r["sampler"] for r in rows}, key=["ancestral", "greedy"].index):
        ref = cell[("base", mode, many)]
        for few in few_steps:
            bf = cell.get(("base", mode, few))
            st = cell.get((student, mode, few)) if student else None
            s = {"sampler": mode, "few_steps": few, "many_steps": many,
                 "base_many_gen_ppl": ref["gen_ppl"], "base_many_entropy": ref["entropy"],
                 "base_few_gen_ppl": bf["gen_ppl"] if bf else None, "base_few_entropy": bf["entropy"] if bf else None}
            if st is not None:
                s.update(student_few_gen_ppl=st["gen_ppl"], student_few_entropy=st["entropy"],
                         student_log_gap=_log_gap(st["gen_ppl"], ref["gen_ppl"]),
                         student_entropy_gap=st["entropy"] - ref["entropy"],
                         sampling_speedup_vs_base_many=ref["sample_seconds"] / st["sample_seconds"])
            if bf is not None:
                s.update(base_few_log_gap=_log_gap(bf["gen_ppl"], ref["gen_ppl"]),
                         base_few_entropy_gap=bf["entropy"] - ref["entropy"])
            if st is not None and bf is not None:
                s["student_closer_than_base_few"] = s["student_log_gap"] < s["base_few_log_gap"]
            out.append(s)
    return out


def summary_markdown(summary: list[dict]) -> str:
    f = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["", "| sampler | base T=many: Gen PPL / ent | base T=few: Gen PPL / ent | student T=few: Gen PPL / ent "
             "| student closer? | sampling speed-up (base many / student few) |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['sampler']} | {s['many_steps']}: {f(s['base_many_gen_ppl'])} / {f(s['base_many_entropy'])} | "
            f"{s['few_steps']}: {f(s['base_few_gen_ppl'])} / {f(s['base_few_entropy'])} | "
            f"{s['few_steps']}: {f(s.get('student_few_gen_ppl'))} / {f(s.get('student_few_entropy'))} | "
            f"{s.get('student_closer_than_base_few', '–')} | {f(s.get('sampling_speedup_vs_base_many'), 1)}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "outputs" / "bench_distill"))
    ap.add_argument("--base", default=None, help="base Duo model dir (default: <work>/base/final, trained if missing)")
    ap.add_argument("--scorer", default=None, help="AR-objective model dir (default: <work>/ar/final)")
    ap.add_argument("--base-train", nargs="*", default=BASE_TRAIN, help="duo_pretrain overrides for a missing base")
    ap.add_argument("--scorer-train", nargs="*", default=SCORER_TRAIN, help="overrides for a missing scorer")
    ap.add_argument("--many-steps", type=int, default=256, help="the base model's many-step reference")
    ap.add_argument("--few-steps", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="prior/sampling seed shared by every model")
    ap.add_argument("--distill-overrides", nargs="*", default=[], help="extra key=value for duo_distill")
    ap.add_argument("--skip-distill", action="store_true", help="reuse <work>/distill/final")
    ap.add_argument("--base-only", action="store_true", help="only evaluate the base model (many vs few steps)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = Path(args.base) if args.base else work / "base" / "final"
    if not (base / "duo_config.json").is_file():
        base = _pretrain(work / "base", list(args.base_train))
    scorer = Path(args.scorer) if args.scorer else work / "ar" / "final"
    if not (scorer / "duo_config.json").is_file():
        scorer = _pretrain(work / "ar", [*args.scorer_train, f"tokenizer.path={base / 'tokenizer'}"])

    import torch
    from omegaconf import OmegaConf

    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.eval.genppl import load_dit_scorer
    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.recipes import duo_distill as dd
    from duo_plugin.eval.metrics import GenPPLSpec
    from duo_plugin.training.distill import QualityTableSpec, sample_quality_table, write_quality_table

    seq_len = int(load_pretrained(base, weights="model").duo_metadata.get("seq_len") or 64)
    dist_dir = work / "distill"
    t_distill = None
    student = None
    if not args.base_only:
        if not args.skip_distill:
            cfg = OmegaConf.load(CFG / "distill_tiny_cpu.yaml")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
                f"output_dir={dist_dir}", f"init_from={base}", f"data.seq_len={seq_len}", f"eval.seq_len={seq_len}",
                "eval.scorer.type=dit", f"eval.scorer.path={scorer}", "progress_bar=true", "eval.include_base=false",
                f"eval.num_samples={args.num_samples}", f"eval.seed={args.seed}",
                f"eval.steps=[{','.join(map(str, args.few_steps))}]", *args.distill_overrides]))
            t1 = time.perf_counter()
            dd.run(cfg)
            t_distill = time.perf_counter() - t1
        student = "student"

    sc = load_dit_scorer(scorer)
    stok = load_tokenizer(scorer / "tokenizer")
    base_m = load_pretrained(base, weights="ema")
    models = {"base": base_m}
    steps = {"base": sorted({args.many_steps, *args.few_steps}, reverse=True)}
    if student:
        models[student] = load_pretrained(dist_dir / "final", weights="ema")
        steps[student] = list(args.few_steps)
    torch.manual_seed(args.seed)
    spec = QualityTableSpec(num_samples=args.num_samples, seq_len=seq_len, steps=[], models_steps=steps,
                            seed=args.seed, progress=True)
    genppl = GenPPLSpec(load_tokenizer(base / "tokenizer"), sc, stok, eos_id=int(stok.eos_id), bos_id=stok.bos_id,
                        batch_size=32, max_len=int(sc.model.max_seq_len))
    rows = sample_quality_table(models, spec, genppl, valid_vocab=base_m.valid_vocab)
    summary = summarize(rows, args.many_steps, list(args.few_steps), student)
    extra = {"base": str(base), "student": str(dist_dir / "final") if student else None, "scorer": str(scorer),
             "seq_len": seq_len, "num_samples": args.num_samples, "seed": args.seed,
             "distill_overrides": list(args.distill_overrides), "distill_seconds": t_distill, "summary": summary,
             "total_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    stem = work / ("bench_distill_base" if args.base_only else "bench_distill")
    jp, mp = write_quality_table(rows, stem, title="Base (many / few steps) vs DCD student (few steps)", extra=extra)
    with open(mp, "a") as fh:
        fh.write(summary_markdown(summary))
    print(mp.read_text())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
