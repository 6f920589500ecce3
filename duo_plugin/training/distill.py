"""Discrete Consistency Distillation (DCD; Duo paper Sec. 4.2, Alg. 1; duo-method.md §4) — the pure logic.

Everything a distillation recipe needs besides I/O, kept free of torchtune so it can be tested directly:

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

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from duo_plugin.diffusion.losses import dcd_pair, distillation_kl
from duo_plugin.diffusion.schedules import gamma_at, stratified_times

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
    "quality_table_markdown",
    "write_quality_table",
]

PAPER_GAMMA_WINDOW = (-4.0, -1.0)  # distillation window of the reference code (configs/algo/distillation.yaml)
PAPER_VOCAB_SIZE = 50258  # GPT-2 + [PAD], the vocabulary that window was chosen for


# ---------------------------------------------------------------------------------------------------------- rounds
@dataclass(frozen=True)
class DistillSchedule:
    """Round structure of DCD (paper: 5 rounds × 10K steps, δ₀ = 1/512, doubling each round).

    Steps are 0-based optimizer steps.  Round ``r`` covers steps ``[r M, (r + 1) M)``; steps past the last round stay
    in the last round (same δ, no further refresh).
    """

    rounds: int = 5
    steps_per_round: int = 10_000
    delta0: float = 1.0 / 512
    growth: float = 2.0

    def __post_init__(self):
        if int(self.rounds) < 1 or int(self.steps_per_round) < 1:
            raise ValueError(f"need rounds >= 1 and steps_per_round >= 1, got {self.rounds}, {self.steps_per_round}")
        if not (0.0 < float(self.delta0) < 1.0):
            raise ValueError(f"delta0 must lie in (0, 1) (paper: 1/512), got {self.delta0}")
        if not float(self.growth) >= 1.0:
            raise ValueError(f"growth must be >= 1 (paper: 2), got {self.growth}")
        if self.delta0 * self.growth ** (self.rounds - 1) >= 1.0:
            raise ValueError(f"the last round's delta {self.delta0 * self.growth ** (self.rounds - 1)} is >= 1; use "
                             "fewer rounds or a smaller delta0 (the pair (t, s) must lie inside [0, 1])")

    @property
    def total_steps(self) -> int:
        return int(self.rounds) * int(self.steps_per_round)

    def round_of(self, step: int) -> int:
        """0-based round of optimizer step ``step``."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(int(step) // int(self.steps_per_round), int(self.rounds) - 1)

    def delta(self, step: int) -> float:
        """δ used at step ``step``: δ₀ · growth^round."""
        return float(self.delta0) * float(self.growth) ** self.round_of(step)

    def refreshes_teacher(self, step: int) -> bool:
        """True if the teacher is set to the student's weights *before* step ``step`` (steps 0, M, …, (rounds−1)M)."""
        return int(step) % int(self.steps_per_round) == 0 and int(step) < self.total_steps

    def ends_round(self, step: int) -> bool:
        """True if step ``step`` is the last step of a round (evaluate after it)."""
        return (int(step) + 1) % int(self.steps_per_round) == 0 and int(step) < self.total_steps


def distill_times(seed: int, step: int, positions, global_batch_size: int, delta: float,
                  t_min: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Student/teacher times (float64 ``[n]``) of the samples at ``positions`` of the global batch of ``step``.

    t ~ stratified U[t_min, 1] (one stratum per global-batch position, :func:`stratified_times`),
    ``t ← clip(t + δ, 0, 1)``, ``s = t − δ`` (reference code convention), so t − s = δ exactly and s ≥ t_min.
    """
    if not (0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    t = stratified_times(seed, step, positions, global_batch_size, t_min, dtype=torch.float64)
    t = (t + float(delta)).clamp(0.0, 1.0)
    return t, t - float(delta)


@functools.lru_cache(maxsize=None)
def paper_alpha_window() -> tuple[float, float]:
    """(α_min, α_max) = (T(−1), T(−4)) at K = 50,258: the discrete signal range of the paper's distillation window."""
    from duo_plugin.diffusion.duality import discrete_alpha

    a = discrete_alpha(torch.tensor(PAPER_GAMMA_WINDOW, dtype=torch.float64), PAPER_VOCAB_SIZE)
    return float(a[1]), float(a[0])


def distill_gamma_window(k_eff: int, gamma_min: Optional[float] = None,
                         gamma_max: Optional[float] = None) -> tuple[float, float]:
    """The distillation γ window.  Both given: used as is (paper: −4, −1).  Both None: the window whose discrete α
    range equals the paper's (:func:`paper_alpha_window`) for this K_eff (for K_eff = 50,258 that is [−4, −1])."""
    if (gamma_min is None) != (gamma_max is None):
        raise ValueError("set both distill.gamma_min and distill.gamma_max, or neither (null: the paper's discrete "
                         "alpha range for this vocabulary)")
    if gamma_min is not None:
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(f"need finite gamma_min < gamma_max, got [{gamma_min}, {gamma_max}]")
        return float(gamma_min), float(gamma_max)
    from duo_plugin.diffusion.duality import gamma_window

    a_min, a_max = paper_alpha_window()
    return gamma_window(int(k_eff), alpha_min=a_min, alpha_max=a_max)


# ---------------------------------------------------------------------------------------------------------- pairs
class DCDBatch(NamedTuple):
    """Inputs of one DCD step: student sees (z_t, sigma_t), teacher sees (z_s, sigma_s)."""

    z_t: torch.Tensor  # Long[B, L]
    z_s: torch.Tensor  # Long[B, L]
    sigma_t: torch.Tensor  # Float[B]  = -log T(gamma_t)
    sigma_s: torch.Tensor  # Float[B]  = -log T(gamma_s)
    gamma_t: torch.Tensor  # float64 [B]
    gamma_s: torch.Tensor  # float64 [B]


def dcd_batch(x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor, *, gamma_min: float, gamma_max: float,
              alpha_fn: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, generator,
              valid_vocab: Optional[torch.Tensor] = None) -> DCDBatch:
    """DCD inputs for clean ids ``x0 Long[B, L]`` at times ``t ≥ s`` (``[B]``, linear in γ over the window).

    z_u = argmax(α̃(γ_u) onehot(x0) + σ̃(γ_u) ε) with ONE ε per sequence shared by u = t and u = s
    (:func:`duo_plugin.diffusion.losses.dcd_pair`); σ_u = −log α(γ_u) with ``alpha_fn`` = T (the duality map for
    K_eff, e.g. ``DualityTable.alpha`` or ``lambda g: discrete_alpha(g, K_eff)``).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64)
    if bool((s > t).any()):
        raise ValueError("dcd_batch needs s <= t (the teacher sees the less noisy time)")
    gt = gamma_at(t, gamma_min, gamma_max).to(x0.device)
    gs = gamma_at(s, gamma_min, gamma_max).to(x0.device)
    z_t, z_s = dcd_pair(x0, gt, gs, vocab_size, generator, valid_vocab)
    tiny = torch.finfo(torch.float64).tiny
    sig_t = (-torch.log(torch.as_tensor(alpha_fn(gt), dtype=torch.float64).clamp_min(tiny))).float()
    sig_s = (-torch.log(torch.as_tensor(alpha_fn(gs), dtype=torch.float64).clamp_min(tiny))).float()
    return DCDBatch(z_t, z_s, sig_t.to(x0.device), sig_s.to(x0.device), gt, gs)


def dcd_token_losses(student: Callable, teacher: Callable, batch: DCDBatch, *, direction: str = "bwd",
                     padding_mask: Optional[torch.Tensor] = None, autocast=None) -> torch.Tensor:
    """Per-token distillation loss ``float32 [B, L]``: KL(student(z_t, σ_t) ‖ teacher(z_s, σ_s)) for ``"bwd"``
    (paper Eq. 23 / code ``kl-bwd``), KL(teacher ‖ student) for ``"fwd"``.  The teacher runs under ``no_grad``."""
    import contextlib

    kw = {"padding_mask": padding_mask} if padding_mask is not None else {}
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with torch.no_grad(), ctx():
        lt = teacher(batch.z_s, batch.sigma_s, **kw)
    with ctx():
        ls = student(batch.z_t, batch.sigma_t, **kw)
    return distillation_kl(ls.float(), lt.float(), direction)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """dst ← src for every parameter and buffer (by name; local shards for FSDP2 models sharded alike)."""
    sp, dp = dict(src.named_parameters()), dict(dst.named_parameters())
    sb, db = dict(src.named_buffers()), dict(dst.named_buffers())
    if set(sp) != set(dp) or set(sb) != set(db):
        raise ValueError("copy_weights_: teacher and student have different parameter/buffer names; build the "
                         "teacher as a copy of the student (same builder, same wrapping)")
    for name, p in dp.items():
        _local(p.data).copy_(_local(sp[name].data))
    for name, b in db.items():
        _local(b).copy_(_local(sb[name]))


# ---------------------------------------------------------------------------------------------------------- eval
def sample_quality_table(
    models: Mapping[str, nn.Module],
    *,
    steps: Sequence[int],
    samplers: Sequence[str] = ("ancestral", "greedy"),
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    valid_vocab: Optional[torch.Tensor] = None,
    diffusion_tokenizer=None,
    scorer: Optional[Callable] = None,
    scorer_tokenizer=None,
    eos_id_scorer: Optional[int] = None,
    bos_id_scorer: Optional[int] = None,
    score_batch_size: int = 8,
    max_len: int = 1024,
    batch_size: Optional[int] = None,
    device=None,
    schedule=None,
    models_steps: Optional[Mapping[str, Sequence[int]]] = None,
) -> list[dict]:
    """Gen PPL + entropy for every (model, sampler, steps): one row per cell.

    Samples come from :func:`duo_plugin.sampling.samplers.sample` (float64 posterior, log-linear α, NFE = steps + 1)
    with ``seed`` (row b uses ``row_generators(seed, 0, [b])``, so every model sees the same prior draws).
    Without a ``scorer`` only entropy is reported (``gen_ppl`` None).  ``models_steps`` overrides ``steps`` per model.

    Row keys: model, sampler, steps, nfe, gen_ppl, gen_nll, entropy, n_samples, sample_seconds.
    """
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, unigram_entropy
    from duo_plugin.sampling.samplers import DenoiserFn, sample

    for name in samplers:
        if name not in ("ancestral", "greedy"):
            raise ValueError(f"samplers must be 'ancestral' and/or 'greedy' (Greedy-Tail), got {name!r}")
    if scorer is not None and (diffusion_tokenizer is None or scorer_tokenizer is None or eos_id_scorer is None):
        raise ValueError("Gen PPL needs diffusion_tokenizer, scorer_tokenizer and eos_id_scorer with the scorer")
    rows = []
    for mname, model in models.items():
        den = DenoiserFn(model)
        k = int(model.vocab_size)
        for n_steps in (models_steps or {}).get(mname, steps):
            for mode in samplers:
                t0 = time.perf_counter()
                toks = sample(den, schedule, batch_size=int(num_samples), seq_len=int(seq_len), vocab_size=k,
                              steps=int(n_steps), noise_removal=mode, valid_vocab=valid_vocab, seed=int(seed),
                              device=device, chunk_size=batch_size, progress=False)
                dt = time.perf_counter() - t0
                row = {"model": mname, "sampler": mode, "steps": int(n_steps), "nfe": int(n_steps) + 1,
                       "n_samples": int(num_samples), "sample_seconds": dt}
                if scorer is not None:
                    r = gen_ppl_and_entropy(toks.cpu(), diffusion_tokenizer=diffusion_tokenizer, scorer=scorer,
                                            scorer_tokenizer=scorer_tokenizer, eos_id_scorer=int(eos_id_scorer),
                                            batch_size=int(score_batch_size), max_len=int(max_len),
                                            bos_id_scorer=bos_id_scorer)
                    row.update(gen_ppl=r["gen_ppl"], gen_nll=r["gen_nll"], entropy=r["entropy"],
                               gen_ppl_scorer=r["scorer"])
                else:
                    row.update(gen_ppl=None, gen_nll=None, entropy=float(unigram_entropy(toks.cpu()).mean()))
                rows.append(row)
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
