"""Discrete Consistency Distillation (DCD; paper Sec. 4.2, Alg. 1; docs/method.md §4): the recipe's helpers.

The method itself (schedule, times, pairs, per-token loss and :class:`~duo_plugin.objectives.DCDObjective`) lives
in :mod:`duo_plugin.objectives.dcd` and is re-exported here; this module adds the teacher refresh and the
steps-vs-quality evaluation. No torchtune.

* :class:`DistillSchedule`: rounds of ``steps_per_round`` steps; the teacher is refreshed (θ⁻ ← θ, the *current
  student weights*, or the student's EMA for the paper's Alg. 2 ablation) before steps 0, M, 2M, …; the time gap
  δ = δ₀ · 2^round (1/512, 1/256, … over the paper's 5 rounds).
* :func:`distill_times`: the reference code's time convention — t stratified over the global batch in [t_min, 1],
  then ``t ← clip(t + δ, 0, 1)`` and ``s = t − δ`` (the paper writes s = max(t − δ, 0) with t ~ U[0, 1]; the code's
  shift puts a small point mass at t = 1 and keeps s ≥ t_min).  Times are linear in γ over the distillation window.
* :func:`distill_gamma_window`: the window (paper: γ ∈ [−4, −1] for GPT-2's K = 50,258).  For another vocabulary
  the default is the γ window with the same *discrete* α range, T_K(γ) ∈ [T_50258(−1), T_50258(−4)].
* :func:`dcd_batch`: one deterministic discrete trajectory per sequence from ONE Gaussian ε (``dcd_pair``), the
  student input z_t, the teacher input z_s, and the conditioning σ = −log T(γ) of each (duality, paper Eq. 11).
* :func:`dcd_token_losses`: per-token KL(student(z_t) ‖ teacher(z_s)) (``"bwd"``, default) or the reverse (``"fwd"``).
* :func:`copy_weights_`: teacher refresh (works for plain and FSDP2-sharded models sharded the same way).
* :func:`sample_quality_table` / :func:`quality_table_markdown`: Gen PPL + entropy at a list of step counts for
  ancestral and Greedy-Tail sampling, laid out like the paper's Table 7.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from duo_plugin.objectives.dcd import (  # noqa: F401  (the method lives in objectives/dcd.py; re-exported here)
    PAPER_GAMMA_WINDOW,
    PAPER_VOCAB_SIZE,
    DCDBatch,
    DistillSchedule,
    dcd_batch,
    dcd_token_losses,
    distill_gamma_window,
    distill_times,
    paper_alpha_window,
)

__all__ = [
    "PAPER_GAMMA_WINDOW",
    "PAPER_VOCAB_SIZE",
    "DistillSchedule",
    "distill_times",
    "paper_alpha_window",
    "distill_gamma_window",
    "DCDBatch",
    "dcd_batch",
    "dcd_token_losses",
    "copy_weights_",
    "sample_quality_table",
    "QualityTableSpec",
    "quality_table_markdown",
    "write_quality_table",
]



def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """dst ← src for every parameter and buffer (by name; local shards for FSDP2 models sharded alike)."""
    from duo_plugin.training.checkpointing import canonical_name  # wrappers (AC, compile) may differ between the two

    sp, dp = ({canonical_name(n): p for n, p in m.named_parameters()} for m in (src, dst))
    sb, db = ({canonical_name(n): b for n, b in m.named_buffers()} for m in (src, dst))
    if set(sp) != set(dp) or set(sb) != set(db):
        raise ValueError("copy_weights_: teacher and student have different parameter/buffer names; build the "
                         "teacher as a copy of the student (same builder, same wrapping)")
    for name, p in dp.items():
        _local(p.data).copy_(_local(sp[name].data))
    for name, b in db.items():
        _local(b).copy_(_local(sb[name]))


# ---------------------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class QualityTableSpec:
    """What the steps-vs-quality table samples: ``steps`` per model (``models_steps`` overrides it per model name),
    the noise-removal ``samplers`` (``"ancestral"`` and/or ``"greedy"``, i.e. Greedy-Tail), ``num_samples``
    sequences of ``seq_len`` tokens per cell from ``seed``, sampled ``batch_size`` rows at a time (None: all at once),
    with an ETA line when ``progress``."""

    num_samples: int
    seq_len: int
    steps: Sequence[int] = ()
    samplers: Sequence[str] = ("ancestral", "greedy")
    seed: int = 0
    batch_size: Optional[int] = None
    models_steps: Optional[Mapping[str, Sequence[int]]] = None
    progress: bool = False

    def __post_init__(self):
        for name in self.samplers:
            if name not in ("ancestral", "greedy"):
                raise ValueError(f"samplers must be 'ancestral' and/or 'greedy' (Greedy-Tail), got {name!r}")

    def steps_of(self, model_name: str) -> Sequence[int]:
        return (self.models_steps or {}).get(model_name, self.steps)


def sample_quality_table(models: Mapping[str, nn.Module], spec: QualityTableSpec, genppl=None, *,
                         valid_vocab: Optional[torch.Tensor] = None, device=None, schedule=None) -> list[dict]:
    """Gen PPL + entropy for every (model, sampler, steps) of ``spec`` (:class:`QualityTableSpec`): one row per cell.

    Samples come from :func:`duo_plugin.sampling.samplers.sample` (float64 posterior, log-linear α unless
    ``schedule``, NFE = steps + 1) with ``spec.seed`` (row b uses ``row_generators(seed, 0, [b])``, so every model
    sees the same prior draws), ids restricted to ``valid_vocab``. ``genppl``: how samples are scored
    (:class:`duo_plugin.eval.metrics.GenPPLSpec`); without one, or without its ``scorer``, only entropy is reported
    (``gen_ppl`` None). ``spec.progress``: an ETA over the cells and within each sampling run (a tqdm bar on a
    terminal, else a line every 30 s on stderr; :mod:`duo_plugin._progress`).

    Row keys: model, sampler, steps, nfe, gen_ppl, gen_nll, entropy, n_samples, sample_seconds.
    """
    from duo_plugin.eval.metrics import GenPPLSpec, compute_metrics
    from duo_plugin.sampling.samplers import DenoiserFn, sample

    if genppl is None:
        genppl = GenPPLSpec(None, batch_size=8)
    if genppl.scorer is not None and (genppl.diffusion_tokenizer is None or genppl.scorer_tokenizer is None
                                      or genppl.eos_id is None):
        raise ValueError("Gen PPL needs GenPPLSpec.diffusion_tokenizer, .scorer_tokenizer and .eos_id with its scorer")
    from duo_plugin._progress import Eta, eta_lines

    rows = []
    num_samples, progress = int(spec.num_samples), spec.progress
    cells = sum(len(spec.steps_of(m)) for m in models) * len(spec.samplers)
    bar = Eta(progress, cells, "duo_distill quality table", unit="cell")
    for mname, model in models.items():
        den = DenoiserFn(model)
        k = int(model.vocab_size)
        for n_steps in spec.steps_of(mname):
            for mode in spec.samplers:
                t0 = time.perf_counter()
                with eta_lines():
                    toks = sample(den, schedule, batch_size=num_samples, seq_len=int(spec.seq_len), vocab_size=k,
                                  steps=int(n_steps), noise_removal=mode, valid_vocab=valid_vocab,
                                  seed=int(spec.seed), device=device, chunk_size=spec.batch_size, progress=progress)
                dt = time.perf_counter() - t0
                row = {"model": mname, "sampler": mode, "steps": int(n_steps), "nfe": int(n_steps) + 1,
                       "n_samples": int(num_samples), "sample_seconds": dt}
                r = compute_metrics(samples=toks, genppl=genppl)["gen"]
                row.update(gen_ppl=r["gen_ppl"], gen_nll=r["gen_nll"], entropy=r["entropy"])
                if genppl.scorer is not None:
                    row.update(gen_ppl_scorer=r["scorer"])
                rows.append(row)
                bar.set_postfix(model=mname, sampler=mode, T=int(n_steps))
                bar.update(1)
    bar.close()
    return rows


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return "–"
    ppl = "n/a" if row.get("gen_ppl") is None else f"{row['gen_ppl']:.2f}"
    return f"{ppl} / {row['entropy']:.2f}"


def quality_table_markdown(rows: Sequence[dict], title: str = "") -> str:
    """Table 7 layout: one line per (model, steps), columns ancestral | Greedy-Tail, cells ``Gen PPL / entropy``."""
    by = {}
    order = []
    for r in rows:
        key = (r["model"], r["steps"])
        if key not in by:
            by[key] = {}
            order.append(key)
        by[key][r["sampler"]] = r
    lines = [f"### {title}", ""] if title else []
    lines += ["| model | T (steps) | ancestral Gen PPL / entropy | Greedy-Tail Gen PPL / entropy | sampling s (anc.) |",
              "|---|---|---|---|---|"]
    for key in order:
        cells = by[key]
        anc = cells.get("ancestral")
        secs = f"{anc['sample_seconds']:.2f}" if anc else "–"
        lines.append(f"| {key[0]} | {key[1]} | {_cell(anc)} | {_cell(cells.get('greedy'))} | {secs} |")
    scorers = sorted({str(r["gen_ppl_scorer"]) for r in rows if r.get("gen_ppl_scorer")})
    if scorers:  # a Gen PPL is only comparable with Gen PPLs from the same scorer
        lines += ["", f"Gen PPL scorer: {', '.join(scorers)}; entropy: mean per-sample unigram entropy (nats)."]
    return "\n".join(lines) + "\n"


def write_quality_table(rows: Sequence[dict], out_stem, title: str = "", extra: Optional[dict] = None) -> tuple[Path, Path]:
    """Write ``<out_stem>.json`` (rows + extra) and ``<out_stem>.md`` (Table 7 layout). Returns both paths."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    jp, mp = stem.with_suffix(".json"), stem.with_suffix(".md")
    payload = {"rows": list(rows), **(extra or {})}
    tmp = jp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(jp)
    mp.write_text(quality_table_markdown(rows, title))
    return jp, mp
