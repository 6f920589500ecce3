"""The report of ``benchmarks/reproduce.py``: statistics over seeds, the claims' verdicts, plots and the Markdown.

Everything here reads the combined results (``docs/reproduction/results.json``: ``{"corpora": {corpus: results}}``)
and nothing else, so every number of the report can be checked against that file.  The rules the verdicts follow:

* a claim is **shown** only if it holds in every (corpus, seed) pair measured, and at least 3 pairs are measured
  (fewer: "not measured enough", whatever the direction); the exact two-sided sign test over the pairs is printed
  beside it (with 6 pairs all in one direction p = 0.031; with 3 pairs the smallest possible p is 0.25, so "every
  seed agrees" is the criterion there);
* every PPL is given with its standard error: validation PPL under the fixed evaluation draws (8 Monte Carlo passes
  over the same 128 validation blocks; AR: exact), Gen PPL over the samples (ratio estimator), zero-shot PPL from
  ``duo_eval`` (diffusion) or over blocks (AR); a seed mean with the standard error over seeds;
* the curriculum speed-up is steps-to-a-target on curves interpolated linearly in log PPL between evaluations.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling study modules

from study import sign_test_p  # noqa: E402  (the exact two-sided sign test, shared with the study's tables)
from study_plot import seed_curves  # noqa: E402  (seeds thin, the seed mean bold)

LABELS = {"ar": "AR", "duo": "Duo", "mdlm": "MDLM", "udlm": "UDLM", "duo_c50": "Duo (curriculum 50 %)",
          "duo_dcd": "Duo+DCD", "sedd_absorb": "SEDD-absorb", "sedd_uniform": "SEDD-uniform", "d3pm": "D3PM"}
COLOURS = {"ar": "tab:gray", "duo": "tab:blue", "mdlm": "tab:green", "udlm": "tab:orange", "duo_c50": "tab:purple",
           "duo_dcd": "tab:cyan", "sedd_absorb": "tab:brown", "sedd_uniform": "tab:pink", "d3pm": "tab:olive"}
CORPUS_NAMES = {"shakespeare": "Shakespeare", "bom": "Book of Mormon", "jargon": "Jargon File"}


# ------------------------------------------------------------------------------------------------------- statistics
def mean_se(vals) -> tuple[float | None, float | None, int]:
    """Mean, standard error of the mean (sample SD / sqrt(n); None for n < 2) and n of the finite values."""
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None), len(v)


def steps_to_target(curve, target: float) -> float | None:
    """The first step at which ``curve`` [(step, PPL), ...] reaches ``target``, interpolating linearly in log PPL
    between consecutive evaluations (the evaluation itself if the first point is already at or below it); None if
    it never does."""
    pts = sorted((int(s), float(p)) for s, p in curve)
    for i, (s, p) in enumerate(pts):
        if p <= target:
            if i == 0:
                return float(s)
            s0, p0 = pts[i - 1]
            frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p))
            return s0 + frac * (s - s0)
    return None


def gap_share(base_few: float, dcd_few: float, base_many: float) -> float | None:
    """The share of the few-step gap (in log Gen PPL) that distillation closes: ``(log G_base(T_few) − log
    G_dcd(T_few)) / (log G_base(T_few) − log G_base(T_many))``; None when there is no gap to close."""
    den = math.log(base_few) - math.log(base_many)
    if not den > 0:
        return None
    return (math.log(base_few) - math.log(dcd_few)) / den


def fmt(v, nd=2, se=None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    s = f"{v:.{nd}f}"
    if se is not None and isinstance(se, (int, float)) and math.isfinite(se):
        s += f" ± {se:.{nd}f}"
    return s


def _p(p: float) -> str:
    return f"{p:.3g}"


# ------------------------------------------------------------------------------------------------------- accessors
def final_fixed(rec: dict) -> tuple[float | None, float | None]:
    """(final PPL under the fixed evaluation draws, its SE in PPL units) of a train record; the run's own final
    evaluation (SE unknown) when it was not re-scored."""
    f = rec.get("final_fixed")
    if f:
        return f["ppl"], f["ppl"] * f["stderr_nll"] if f.get("stderr_nll") is not None else None
    return rec.get("final_ppl"), None


def curve(rec: dict) -> list:
    """The validation curve [(step, PPL)] under the fixed draws (else the run's own), step 0 left out."""
    pts = rec.get("val_fixed") or rec.get("val_ppl") or []
    return [(int(p[0]), float(p[1])) for p in pts if int(p[0]) > 0]


def seeds_of(plan: dict) -> list[int]:
    return list(plan.get("seeds") or [])


def gen_cell(gen: dict, model: str, mode: str, seed: int, T: int) -> dict | None:
    r = (gen.get(f"{model}|{mode}|s{seed}") or {}).get(str(T))
    return r if r and r.get("gen_ppl") else None


# ------------------------------------------------------------------------------------------------------- claims
def paired(values_a: list, values_b: list) -> dict:
    """``a < b`` per pair (None entries dropped): counts, sign test, and whether every pair agrees."""
    pairs = [(a, b) for a, b in zip(values_a, values_b) if a is not None and b is not None]
    lower, higher = sum(a < b for a, b in pairs), sum(a > b for a, b in pairs)
    return {"pairs": len(pairs), "lower": lower, "higher": higher, "p": sign_test_p(lower, higher),
            "all": bool(pairs) and lower == len(pairs)}


def claims(data: dict) -> list[dict]:
    """Every claim's verdict, computed from the combined results only."""
    out = []
    corpora = data.get("corpora", {})

    def over_pairs(fn):
        a, b, where = [], [], []
        for c, d in corpora.items():
            for s in seeds_of(d.get("plan", {})):
                x, y = fn(d, s)
                a.append(x)
                b.append(y)
                where.append(f"{c} s{s}")
        return a, b, where

    def ppl(d, key):
        return final_fixed(d.get("train", {}).get(key, {}))[0]

    for m in ("duo", "duo_c50"):
        a, b, where = over_pairs(lambda d, s, m=m: (ppl(d, f"{m}_s{s}"), ppl(d, f"udlm_s{s}")))
        t = paired(a, b)
        out.append({"id": f"{m}_beats_udlm", "claim": f"{LABELS[m]} reaches a lower validation PPL than UDLM "
                    "(same budget)", **t, "per_pair": dict(zip(where, zip(a, b))),
                    "verdict": verdict(t)})
    # curriculum speed-up at the paper's curriculum share: steps to reach each seed's UDLM final PPL (the claim),
    # and the same at a ladder of PPL levels (fractions of the unigram PPL) for both curriculum lengths
    sp = speedups(corpora, "duo_c50")
    ratios = [x["speedup"] for x in sp if x["speedup"]]
    m_, se_, n_ = mean_se(ratios)
    out.append({"id": "curriculum_speedup", "claim": "with the paper's curriculum share (50 %), Duo reaches UDLM's "
                "final PPL in fewer steps (paper: about 2x)", "per_pair": sp, "mean": m_, "se": se_, "n": n_,
                "ladder": {m: speedup_ladder(corpora, m) for m in ("duo_c50", "duo")},
                "verdict": share_verdict([bool(x["speedup"] and x["speedup"] > 1) for x in sp])})
    # gradient variance: soft < discrete (the paper's comparison) and soft < hard (the relaxation itself)
    for arm, cid, text in (("discrete", "variance_vs_udlm", "the curriculum's gradient variance (top-100 weights) is "
                            "lower than UDLM's"), ("hard", "variance_relaxation", "the Gaussian relaxation itself "
                                                   "lowers it (soft vs hard z_t input, same loss, same t)")):
        a, b, where = [], [], []
        for c, d in corpora.items():
            for key, rec in (d.get("variance") or {}).items():
                st = (rec or {}).get("stats") or {}
                if "soft" in st and arm in st:
                    a.append(st["soft"]["top_k_sum"]["value"])
                    b.append(st[arm]["top_k_sum"]["value"])
                    where.append(f"{c} {key}")
        t = paired(a, b)
        out.append({"id": cid, "claim": text, **t, "per_pair": dict(zip(where, zip(a, b))), "verdict": verdict(t)})
    out += sampling_claims(corpora)
    for ref, text in (("scratch_matched", "for the same total number of training steps (AR pretraining included)"),
                      ("scratch", "for the same number of Duo steps")):
        a, b, where = [], [], []
        for c, d in corpora.items():
            ad = d.get("adapt") or {}
            for k, r in sorted(ad.items()):
                if k.startswith("adapted_s") and (ad.get(f"{ref}_s{k.rsplit('_s', 1)[1]}") or {}).get("final_val_ppl"):
                    a.append(r.get("final_val_ppl"))
                    b.append(ad[f"{ref}_s{k.rsplit('_s', 1)[1]}"]["final_val_ppl"])
                    where.append(f"{c} {k}")
        t = paired(a, b)
        out.append({"id": f"adapt_beats_{ref}", "claim": f"Duo adapted from a pretrained AR model beats Duo from "
                    f"scratch {text}", **t, "per_pair": dict(zip(where, zip(a, b))), "verdict": verdict(t)})
    return out


LADDER = (0.6, 0.5, 0.4, 0.3, 0.25)  # PPL levels as fractions of the unigram PPL of the same validation tokens


def speedups(corpora: dict, method: str, level: float | None = None) -> list[dict]:
    """Per (corpus, seed): steps for UDLM and ``method`` to reach a target PPL on their interpolated curves —
    UDLM's own final PPL (``level`` None) or ``level`` x the unigram PPL — and their ratio (None if either never
    reaches it)."""
    out = []
    for c, d in corpora.items():
        tr = d.get("train", {})
        for s in seeds_of(d.get("plan", {})):
            u, dc = tr.get(f"udlm_s{s}"), tr.get(f"{method}_s{s}")
            if not (u and dc and curve(u) and curve(dc)):
                continue
            target = final_fixed(u)[0] if level is None else level * (u.get("unigram_ppl") or float("nan"))
            su, sd = steps_to_target(curve(u), target), steps_to_target(curve(dc), target)
            out.append({"where": f"{c} s{s}", "target": target, "udlm_steps": su, "duo_steps": sd,
                        "speedup": (su / sd) if su and sd else None})
    return out


def speedup_ladder(corpora: dict, method: str) -> list[dict]:
    """The speed-up over the seeds at every LADDER level: mean ± SE, min, max and how many pairs reached it."""
    rows = []
    for lv in LADDER:
        sp = speedups(corpora, method, lv)
        r = [x["speedup"] for x in sp if x["speedup"]]
        m_, se_, n_ = mean_se(r)
        rows.append({"level": lv, "pairs": len(sp), "reached_by_both": n_, "mean": m_, "se": se_,
                     "min": min(r) if r else None, "max": max(r) if r else None, "per_pair": sp})
    return rows


MIN_PAIRS = 3  # a claim needs at least 3 (corpus, seed) pairs before it can be called either way


def few(n: int) -> str | None:
    """The verdict while fewer than MIN_PAIRS pairs are measured (None once there are enough)."""
    if n == 0:
        return "not measured"
    return f"not measured enough ({n} of the {MIN_PAIRS} pairs needed)" if n < MIN_PAIRS else None


def share_verdict(oks: list[bool]) -> str:
    """``shown`` when every measured pair passes (at least MIN_PAIRS of them), else ``not shown (k of n)``."""
    return few(len(oks)) or ("shown" if all(oks) else f"not shown ({sum(oks)} of {len(oks)})")


def verdict(t: dict) -> str:
    if few(t["pairs"]):
        return few(t["pairs"]) + (f": {t['lower']} lower, {t['higher']} higher so far" if t["pairs"] else "")
    if t["all"]:
        return f"shown (every pair: {t['lower']}/{t['pairs']}; sign test p = {_p(t['p'])})"
    if t["higher"] == t["pairs"]:  # the reverse of the claim in every pair: say so, with the same test
        return f"not shown: the opposite holds in every pair ({t['higher']}/{t['pairs']}; sign test p = {_p(t['p'])})"
    return f"not shown ({t['lower']} of {t['pairs']} pairs; sign test p = {_p(t['p'])})"


DUO_ROWS = (("duo", "ancestral"), ("duo", "greedy"), ("duo_dcd", "ancestral"), ("duo_dcd", "greedy"))


def sampling_claims(corpora: dict) -> list[dict]:
    out = []
    few_steps, many = (8, 16, 32), 256
    rows_sampler, rows_mdlm, rows_dcd = [], [], []
    for c, d in corpora.items():
        gen, plan = d.get("genppl", {}), d.get("plan", {})
        many_c = max(plan.get("gen_steps") or [many])
        few_c = min(plan.get("gen_steps") or [8])
        for s in seeds_of(plan):
            b8, b256 = gen_cell(gen, "duo", "ancestral", s, few_c), gen_cell(gen, "duo", "ancestral", s, many_c)
            if b8 and b256:
                se = math.hypot(b8.get("gen_ppl_stderr") or 0, b256.get("gen_ppl_stderr") or 0)
                rows_sampler.append({"where": f"{c} s{s}", "few": b8["gen_ppl"], "many": b256["gen_ppl"],
                                     "ratio": b8["gen_ppl"] / b256["gen_ppl"],
                                     "clear": b8["gen_ppl"] / b256["gen_ppl"] >= 1.2
                                     and b8["gen_ppl"] - b256["gen_ppl"] > 3 * se})
            for T in few_steps:
                for model, mode in DUO_ROWS:
                    du, md = gen_cell(gen, model, mode, s, T), gen_cell(gen, "mdlm", "greedy", s, T)
                    if du and md:
                        rows_mdlm.append({"where": f"{c} s{s}", "T": T, "model": model, "mode": mode,
                                          "duo": du["gen_ppl"], "duo_entropy": du["entropy"], "mdlm": md["gen_ppl"],
                                          "mdlm_entropy": md["entropy"]})
                b, dc, bm = gen_cell(gen, "duo", "ancestral", s, T), gen_cell(gen, "duo_dcd", "ancestral", s, T), b256
                if b and dc and bm:
                    rows_dcd.append({"where": f"{c} s{s}", "T": T, "base": b["gen_ppl"], "dcd": dc["gen_ppl"],
                                     "base_many": bm["gen_ppl"], "share": gap_share(b["gen_ppl"], dc["gen_ppl"],
                                                                                    bm["gen_ppl"])})
    clear = [r["clear"] for r in rows_sampler]
    out.append({"id": "sampler_limits_few_steps", "claim": "the sampler, not the model, limits Gen PPL at few steps "
                "(base Duo, ancestral: Gen PPL at T = 8 at least 1.2x that at T = 256 and more than 3 SE apart)",
                "per_pair": rows_sampler, "verdict": share_verdict(clear)})
    for T in few_steps:
        for model, mode in DUO_ROWS:
            rs = [r for r in rows_mdlm if r["T"] == T and r["model"] == model and r["mode"] == mode]
            t = paired([r["duo"] for r in rs], [r["mdlm"] for r in rs])
            ent_ok = all(r["duo_entropy"] >= 0.9 * r["mdlm_entropy"] for r in rs)
            v = verdict(t)
            if t["all"] and not ent_ok and not few(t["pairs"]):
                v = "lower Gen PPL but not at a comparable entropy (Duo's < 0.9x MDLM's in some pair)"
            tag = "" if model == "duo" else "_dcd"
            out.append({"id": f"duo{tag}_vs_mdlm_T{T}_{mode}", "claim": f"{LABELS[model]} ({mode}) beats MDLM "
                        f"(undistilled, its own sampler) in Gen PPL at T = {T}", **t, "per_pair": rs, "verdict": v})
    for T in few_steps:
        rs = [r for r in rows_dcd if r["T"] == T]
        shares = [r["share"] for r in rs if r["share"] is not None]
        m_, se_, n_ = mean_se(shares)
        out.append({"id": f"dcd_gap_T{T}", "claim": f"DCD closes most of the few-step gap at T = {T} (share of the "
                    "log Gen PPL gap to T = 256 closed > 0.5 in every pair)", "per_pair": rs, "mean": m_, "se": se_,
                    "n": n_, "verdict": share_verdict([r["share"] is not None and r["share"] > 0.5 for r in rs])})
    return out


# ------------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(ax, title: str, xlabel: str, ylabel: str, legend_size: int = 7) -> None:
    """Log-scale y, title, labels, grid and legend of one panel."""
    ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, out: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_training(corpora: dict, out: Path) -> Path:
    """Validation PPL (fixed draws) vs step, one panel per corpus, one colour per method, seeds thin, mean bold."""
    plt = _plt()
    names = list(corpora)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.5 * max(1, len(names)), 4), squeeze=False)
    for ax, c in zip(axes[0], names):
        tr = corpora[c].get("train", {})
        uni = next((r.get("unigram_ppl") for r in tr.values() if r.get("unigram_ppl")), None)
        for m in ("ar", "mdlm", "udlm", "duo", "duo_c50", "sedd_absorb", "sedd_uniform", "d3pm"):
            cs = [curve(r) for k, r in sorted(tr.items()) if k.rsplit("_s", 1)[0] == m and curve(r)]
            if cs:
                seed_curves(ax, cs, COLOURS[m], f"{LABELS[m]} ({len(cs)} seed{'s' * (len(cs) > 1)})")
        if uni:
            ax.axhline(uni, color="k", ls="--", lw=0.8, label="unigram")
        _finish(ax, CORPUS_NAMES.get(c, c), "training step", "validation PPL (content tokens)")
    return _save(fig, out)


def _gen_rows(d: dict) -> dict:
    """``{(model, mode): {seed: {T: cell}}}`` of one corpus's Gen PPL results."""
    rows: dict = {}
    for label, cells in (d.get("genppl") or {}).items():
        if label.startswith("_") or "|" not in label:
            continue
        model, mode, s = label.split("|")
        rows.setdefault((model, mode), {})[int(s[1:])] = {int(t): c for t, c in cells.items()
                                                         if t.isdigit() and c.get("gen_ppl")}
    return rows


def plot_genppl(corpora: dict, out_steps: Path, out_entropy: Path) -> None:
    """Gen PPL vs T (seeds thin, seed mean bold) and Gen PPL vs entropy (seed means, T written at each point)."""
    plt = _plt()
    names = list(corpora)
    for out, kind in ((out_steps, "steps"), (out_entropy, "entropy")):
        fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6 * max(1, len(names)), 4.4), squeeze=False)
        for ax, c in zip(axes[0], names):
            styles = {"ancestral": "-", "greedy": "--"}
            for (model, mode), by_seed in sorted(_gen_rows(corpora[c]).items()):
                col = COLOURS.get(model, "k")
                Ts = sorted(set.intersection(*[set(v) for v in by_seed.values()])) if by_seed else []
                if not Ts:
                    continue
                mean_g = [statistics.fmean(by_seed[s][T]["gen_ppl"] for s in by_seed) for T in Ts]
                mean_h = [statistics.fmean(by_seed[s][T]["entropy"] for s in by_seed) for T in Ts]
                lab = f"{LABELS.get(model, model)} ({mode}, {len(by_seed)} seed{'s' * (len(by_seed) > 1)})"
                if kind == "steps":
                    for s, cells in by_seed.items():
                        ts = sorted(cells)
                        ax.plot(ts, [cells[t]["gen_ppl"] for t in ts], color=col, ls=styles[mode], lw=0.6, alpha=0.5)
                    ax.plot(Ts, mean_g, color=col, ls=styles[mode], lw=2, marker="o", ms=3, label=lab)
                else:
                    ax.plot(mean_h, mean_g, color=col, ls=styles[mode], lw=1, marker="o", ms=3, label=lab)
                    for h, g, T in zip(mean_h, mean_g, Ts):
                        ax.annotate(str(T), (h, g), fontsize=6, xytext=(2, 2), textcoords="offset points")
            ref = (corpora[c].get("genppl") or {}).get("_references", {}).get("held_out_text")
            if ref:
                if kind == "steps":
                    ax.axhline(ref["gen_ppl"], color="k", ls=":", lw=1, label="held-out text")
                else:
                    ax.plot([ref["entropy"]], [ref["gen_ppl"]], "k*", ms=9, label="held-out text")
            if kind == "steps":
                ax.set_xscale("log", base=2)
            _finish(ax, CORPUS_NAMES.get(c, c), "sampling steps T" if kind == "steps" else
                    "mean unigram entropy of a sample (nats)", "Gen PPL (AR seed-0 scorer)", legend_size=6)
        _save(fig, out)


def plot_adapt(corpora: dict, out: Path) -> Path | None:
    plt = _plt()
    runs = [(c, k, r) for c, d in corpora.items() for k, r in (d.get("adapt") or {}).items()
            if isinstance(r, dict) and r.get("val_ppl")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    cols = {"adapted": "tab:red", "scratch_matched": "tab:blue", "scratch": "tab:gray"}
    seen = set()
    for c, k, r in runs:
        name = k.rsplit("_s", 1)[0]
        lab = f"{c}: {name}" if (c, name) not in seen else None
        seen.add((c, name))
        pts = [(int(s), float(v)) for s, v in r["val_ppl"]]
        ax.plot([s for s, _ in pts], [v for _, v in pts], color=cols.get(name, "k"), lw=1, label=lab)
    _finish(ax, "Llama-architecture Duo: adapted from AR vs from scratch", "Duo training step", "validation PPL")
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------------- markdown
def _ppl_table(d: dict) -> list[str]:
    tr, plan = d.get("train", {}), d.get("plan", {})
    seeds = seeds_of(plan)
    L = ["| method | " + " | ".join(f"seed {s}: final PPL ± SE" for s in seeds)
         + " | mean ± SE over seeds | / unigram | escape step per seed | CPU min per run |",
         "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    uni = next((r.get("unigram_ppl") for r in tr.values() if r.get("unigram_ppl")), None)
    for m in ("ar", "mdlm", "udlm", "duo", "duo_c50", "sedd_absorb", "sedd_uniform", "d3pm"):
        recs = {s: tr.get(f"{m}_s{s}") for s in seeds + list(plan.get("baseline_seeds") or [])}
        recs = {s: r for s, r in recs.items() if r and "dir" in r and "error" not in r}
        if not recs:
            continue
        cells = [fmt(final_fixed(recs[s])[0], 2, final_fixed(recs[s])[1]) if s in recs else "—" for s in seeds]
        m_, se_, _ = mean_se(final_fixed(r)[0] for r in recs.values())
        cpu = [r["cpu_s"] / 60 for r in recs.values() if r.get("cpu_s")]
        L.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {fmt(m_, 2, se_)} | "
                 f"{fmt(m_ / uni if m_ and uni else None)} | "
                 + ", ".join(str(r.get("escape_step_fixed") or r.get("escape_step") or "never") for r in recs.values())
                 + f" | {fmt(max(cpu) if cpu else None, 1)} |")
    if uni:
        L += ["", f"Unigram (fitted on the training split) on the same validation content tokens: PPL {uni:.2f}."]
    return L


def _gen_table(d: dict) -> list[str]:
    rows, plan = _gen_rows(d), d.get("plan", {})
    Ts = sorted({T for by_seed in rows.values() for cells in by_seed.values() for T in cells})
    if not Ts:
        return ["Not run."]
    L = ["| model (noise removal) | seeds | " + " | ".join(f"T={T}" for T in Ts) + " |", "|---|---|" + "---|" * len(Ts)]
    for (model, mode), by_seed in sorted(rows.items()):
        cells = []
        for T in Ts:
            vals = [by_seed[s][T] for s in sorted(by_seed) if T in by_seed[s]]
            if not vals:
                cells.append("—")
                continue
            m_, se_, n_ = mean_se(v["gen_ppl"] for v in vals)
            if n_ == 1:
                se_ = vals[0].get("gen_ppl_stderr")
            h = statistics.fmean(v["entropy"] for v in vals)
            cells.append(f"{fmt(m_, 1, se_)} (H {h:.2f})")
        L.append(f"| {LABELS.get(model, model)} ({mode}) | {len(by_seed)} | " + " | ".join(cells) + " |")
    refs = (d.get("genppl") or {}).get("_references") or {}
    for name, lab in (("held_out_text", "held-out text"), ("unigram_samples", "unigram samples")):
        r = refs.get(name)
        if r:
            L.append(f"| reference: {lab} | — | " + " | ".join([f"{fmt(r['gen_ppl'], 1, r.get('gen_ppl_stderr'))} "
                                                                 f"(H {r['entropy']:.2f})"] * len(Ts)) + " |")
    L += ["", f"{plan.get('gen_samples')} samples per cell (the same prior draws for every model), length 64, scored "
          "by the AR model of seed 0 (every seed); mean ± SE over seeds (one seed: ± the SE over its samples). H = mean "
          "unigram entropy of a sample (nats): a low Gen PPL at a low H is repetitive text."]
    return L


def _zeroshot_table(d: dict) -> list[str]:
    zs = d.get("zeroshot") or {}
    if zs.get("_skipped"):
        return [zs["_skipped"]]
    L = [f"Text: {zs.get('_text', '?')}.", "", "| model | process | PPL per seed (± SE) | mean ± SE over seeds | tokens |",
         "|---|---|---|---|---|"]
    groups: dict = {}
    for k, r in zs.items():
        if not k.startswith("_") and isinstance(r, dict) and r.get("ppl"):
            groups.setdefault(k.rsplit("_s", 1)[0], []).append((int(k.rsplit("_s", 1)[1]), r))
    for m, rs in sorted(groups.items()):
        rs.sort()
        cells = ", ".join(f"s{s}: {fmt(r['ppl'], 2, r['ppl'] * r['stderr'] if r.get('stderr') else None)}"
                          for s, r in rs)
        m_, se_, _ = mean_se(r["ppl"] for _, r in rs)
        L.append(f"| {LABELS.get(m, m)} | {rs[0][1].get('process')} | {cells} | {fmt(m_, 2, se_)} | "
                 f"{rs[0][1].get('tokens')} |")
    return L


def _variance_table(d: dict) -> list[str]:
    var = {k: v for k, v in (d.get("variance") or {}).items() if isinstance(v, dict) and v.get("stats")}
    if not var:
        return ["Not run."]
    L = ["| seed | steps | arm | top-100 per-weight variance (sum) ± SE | / soft [95 % CI] | trace ± SE | / soft "
         "[95 % CI] | mean ‖g‖ |", "|---|---|---|---|---|---|---|---|"]
    for k, rec in sorted(var.items()):
        for arm, st in rec["stats"].items():
            r = (rec.get("ratios") or {}).get(f"{arm}/soft") or {}

            def ci(x):
                return f"{x['value']:.3g} [{x['ci95'][0]:.3g}, {x['ci95'][1]:.3g}]" if x else "—"

            L.append(f"| {k} | {rec['window'][0]}–{rec['window'][1]} | {arm} | {st['top_k_sum']['value']:.4g} ± "
                     f"{st['top_k_sum']['se']:.2g} | {ci(r.get('top_k_sum'))} | {st['trace']['value']:.4g} ± "
                     f"{st['trace']['se']:.2g} | {ci(r.get('trace'))} | {st['grad_norm_mean']['value']:.4g} |")
    L += ["", "Arms (benchmarks/repro_variance.py): soft = the curriculum loss as trained (Duo, curriculum 50 %); hard "
          "= the same loss, t, z_t and α with the hard z_t as the network input (the control for the Gaussian "
          "relaxation); discrete = UDLM's own training gradient on its own trajectory; discrete_at_duo = the discrete "
          "log-linear loss at the Duo run's weights. Per-weight variance of the full gradient across the window's "
          "steps; SE and CI from a moving-block bootstrap over steps (the same resamples for every arm)."]
    return L


def _adapt_table(d: dict) -> list[str]:
    ad = d.get("adapt") or {}
    rows = [(k, r) for k, r in sorted(ad.items()) if isinstance(r, dict) and "final_val_ppl" in r and "_s" in k
            and not k.startswith("ar_")]
    if not rows:
        return ["Not run."]
    L = ["| run | steps (Duo) | val PPL at its step 0 | final val PPL |", "|---|---|---|---|"]
    for k, r in rows:
        L.append(f"| {k} | {r.get('steps')} | {fmt(r.get('first_val_ppl'))} | {fmt(r.get('final_val_ppl'))} |")
    for k, r in sorted(ad.items()):
        if k.startswith("ar_") and isinstance(r, dict):
            L.append(f"| AR Llama pretraining ({k}) | — | — | {fmt(r.get('final_val_ppl'))} (AR, exact) |")
    L += ["", "adapted = AR pretraining + Duo adaptation; scratch_matched = Duo from scratch for the AR + adaptation "
          "steps (the same total compute); scratch = Duo from scratch for the adaptation steps only."]
    return L


def status_lines(corpora: dict) -> list[str]:
    """Per corpus: how much of the plan is in the results (a long run is reported while it is still going)."""
    L = ["| corpus | training runs | DCD models | Gen PPL cells | zero-shot models | variance seeds | adaptation runs |",
         "|---|---|---|---|---|---|---|"]
    for c, d in corpora.items():
        plan = d.get("plan", {})
        seeds, bseeds = seeds_of(plan), list(plan.get("baseline_seeds") or [])
        base = ("sedd_absorb", "sedd_uniform", "d3pm")

        def planned(key):  # "<model>_s<seed>" or "<model>|<mode>|s<seed>" of a seed the plan runs
            model, seed = (key.split("|")[0], key.split("|")[-1][1:]) if "|" in key else key.rsplit("_s", 1)
            return seed.isdigit() and int(seed) in (bseeds if model in base else seeds)

        n_train = 5 * len(seeds) + 3 * len(bseeds)
        got_train = sum(1 for k, r in (d.get("train") or {}).items() if planned(k) and "study_key" in r)
        got_dcd = sum(1 for k, r in (d.get("distill") or {}).items() if planned(k) and "summary" in r)
        n_gen = 6 * len(plan.get("gen_steps") or []) * len(seeds) + 3 * len(plan.get("baseline_gen_steps") or []) \
            * len(bseeds)
        got_gen = sum(len([t for t in v if t.isdigit() and int(t) in (plan.get("gen_steps") or [])
                           + (plan.get("baseline_gen_steps") or [])])
                      for k, v in (d.get("genppl") or {}).items() if not k.startswith("_") and planned(k))
        got_zs = sum(1 for k, r in (d.get("zeroshot") or {}).items() if not k.startswith("_") and planned(k)
                     and (r or {}).get("ppl"))
        got_var = sum(1 for k, r in (d.get("variance") or {}).items() if isinstance(r, dict) and r.get("stats")
                      and k[1:].isdigit() and int(k[1:]) in (plan.get("var_seeds") or []))
        adapt_planned = c in (plan.get("adapt_corpora") or [c])
        got_ad = sum(1 for k, r in (d.get("adapt") or {}).items() if isinstance(r, dict) and "final_val_ppl" in r
                     and not k.startswith("ar_"))
        L.append(f"| {CORPUS_NAMES.get(c, c)} | {got_train}/{n_train} | {got_dcd}/{len(seeds)} | {got_gen}/{n_gen} | "
                 f"{got_zs}/{n_train + len(seeds)} | {got_var}/{len(plan.get('var_seeds') or [])} | "
                 + (f"{got_ad}/{3 * len(plan.get('adapt_seeds') or [])}" if adapt_planned else "not planned") + " |")
    L += ["", "A verdict only uses the pairs measured so far; \"not measured\" means no pair yet."]
    return L


READING_TAG = re.compile(r"\[claim ([A-Za-z0-9_]+): (shown|not shown|not measured|mixed)\]")


def verdict_word(v: str) -> str:
    """The verdict class of a generated verdict line: shown | not shown | not measured | mixed (a lower Gen PPL at
    a lower entropy)."""
    if v.startswith("shown"):
        return "shown"
    if v.startswith("not measured"):
        return "not measured"
    if v.startswith("lower Gen PPL but not"):
        return "mixed"
    return "not shown"


def check_reading(text: str, verdicts: list[dict]) -> list[str]:
    """Every ``[claim <id>: <verdict>]`` tag of the hand-written reading against the generated verdicts: the lines
    where they disagree (an unknown id counts as a disagreement)."""
    got = {v["id"]: verdict_word(v["verdict"]) for v in verdicts}
    bad = []
    for cid, word in READING_TAG.findall(text):
        if got.get(cid) != word:
            bad.append(f"the reading says {cid}: {word}; the results say {got.get(cid, 'no such claim')}")
    return bad


def write_report(data: dict, report: Path, figs: Path, quick: bool = False, reading: Path | None = None
                 ) -> list[dict]:
    import os

    corpora = data.get("corpora", {})
    figs.mkdir(parents=True, exist_ok=True)
    plot_training(corpora, figs / "training_vs_steps.png")
    plot_genppl(corpora, figs / "genppl_vs_steps.png", figs / "genppl_vs_entropy.png")
    adapt_png = plot_adapt(corpora, figs / "adaptation.png")
    verdicts = claims(data)
    data["claims"] = verdicts
    rel = lambda p: os.path.relpath(p, report.parent)  # noqa: E731
    L = ["# Reproducing the paper's claims at CPU scale" + (" (`--quick` smoke run: numbers meaningless)"
                                                            if quick else ""), "",
         "Generated by `python benchmarks/reproduce.py` from `docs/reproduction/results.json` (do not edit by hand; "
         "rerun it). Every number comes from `tune run` subprocesses of the shipped recipes and configs; the rules "
         "of the verdicts are in `benchmarks/reproduce_report.py`'s docstring.", "",
         "## Verdicts", ""]
    for v in verdicts:
        extra = ""
        if v.get("mean") is not None:
            extra = f" — mean {fmt(v['mean'], 2, v.get('se'))} over {v.get('n')}"
        L.append(f"- **{v['claim']}**: {v['verdict']}{extra}.")
    if reading is not None and reading.is_file():
        text = reading.read_text(encoding="utf-8")
        bad = check_reading(text, verdicts)
        L += ["", "## Reading (hand-written: `docs/reproduction/reading.md`)", ""]
        if bad:
            L += ["**The reading is out of date: it disagrees with the results here:** " + "; ".join(bad) + ".", ""]
        L += [text.strip()]
    L += ["", "## Status (what this report covers)", "", *status_lines(corpora)]
    L += ["", "## Validation perplexity", "", f"![training curves]({rel(figs / 'training_vs_steps.png')})", ""]
    for c, d in corpora.items():
        plan = d.get("plan", {})
        L += [f"### {CORPUS_NAMES.get(c, c)}", "",
              f"Small configs (`duo/*small_cpu`: batch {128 if plan.get('tag') != 'quick' else '16'}, "
              f"{plan.get('steps')} steps), seeds {seeds_of(plan)}; baselines seeds {plan.get('baseline_seeds')}. "
              "Final PPL under the fixed evaluation draws (the same t and noise for every run) ± the standard error "
              "of those draws; AR is exact. Content tokens only (BOS/EOS not counted) for every row.", "",
              *_ppl_table(d), ""]
    L += ["## Curriculum speed-up and gradient variance", ""]
    for v in verdicts:
        if v["id"] == "curriculum_speedup" and v["per_pair"]:
            L += ["| corpus, seed | target (UDLM final PPL) | UDLM steps | Duo (curriculum 50 %) steps | speed-up |",
                  "|---|---|---|---|---|"]
            L += [f"| {x['where']} | {fmt(x['target'])} | {fmt(x['udlm_steps'], 0)} | {fmt(x['duo_steps'], 0)} | "
                  f"{fmt(x['speedup'])} |" for x in v["per_pair"]]
            L += ["", "Speed-up (UDLM steps / Duo steps) at PPL levels given as a fraction of the unigram PPL, over "
                  "the (corpus, seed) pairs that reach the level (curves interpolated in log PPL between the "
                  "evaluations every 100 steps):", "",
                  "| Duo variant | level (× unigram) | pairs reaching it (both) | mean ± SE | min – max |",
                  "|---|---|---|---|---|"]
            for m, rows in v["ladder"].items():
                L += [f"| {LABELS[m]} | {r['level']} | {r['reached_by_both']}/{r['pairs']} | "
                      f"{fmt(r['mean'], 2, r['se'])} | {fmt(r['min'])} – {fmt(r['max'])} |" for r in rows]
            L.append("")
    for c, d in corpora.items():
        L += [f"### Gradient variance across training steps, {CORPUS_NAMES.get(c, c)}", "", *_variance_table(d), ""]
    L += ["## Generation: Gen PPL and entropy vs sampling steps", "",
          f"![Gen PPL vs steps]({rel(figs / 'genppl_vs_steps.png')})",
          f"![Gen PPL vs entropy]({rel(figs / 'genppl_vs_entropy.png')})", ""]
    for c, d in corpora.items():
        L += [f"### {CORPUS_NAMES.get(c, c)}", "", *_gen_table(d), ""]
    for v in verdicts:
        if v["id"].startswith("dcd_gap") and v["per_pair"]:
            L.append(f"DCD gap share at T = {v['per_pair'][0]['T']}: " + "; ".join(
                f"{x['where']} {fmt(x['share'])}" for x in v["per_pair"]) + ".")
    L += ["", "## Zero-shot perplexity (held-out text, never trained on)", ""]
    for c, d in corpora.items():
        L += [f"### {CORPUS_NAMES.get(c, c)}", "", *_zeroshot_table(d), ""]
    L += ["## Adapting a pretrained AR checkpoint vs Duo from scratch", ""]
    if adapt_png:
        L += [f"![adaptation]({rel(adapt_png)})", ""]
    for c, d in corpora.items():
        if d.get("adapt"):
            L += [f"### {CORPUS_NAMES.get(c, c)}", "", *_adapt_table(d), ""]
    L += ["## Commands", "", "```"]
    for c, d in corpora.items():
        L += d.get("invocations") or []
        for sec in ("train", "distill", "zeroshot", "adapt"):
            L += [r["command"] for r in (d.get(sec) or {}).values() if isinstance(r, dict) and r.get("command")]
        ex = (d.get("genppl") or {}).get("_command_example")
        if ex:
            L.append(ex)
    L.append("```")
    text = "\n".join(L) + "\n"
    repo = str(Path(__file__).resolve().parents[1])
    text = text.replace(repo + "/", "")  # no machine paths in the report
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    return verdicts
