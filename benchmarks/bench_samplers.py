"""Quality–speed frontier of the samplers for one model: Gen PPL, unigram entropy, a distributional distance to
held-out text, NFE and wall time per (sampler, steps); writes JSON, a markdown table and a PNG plot.

    python benchmarks/bench_samplers.py --checkpoint MODEL_DIR --scorer AR_MODEL_DIR --out OUT_DIR \\
        [--num-samples 64] [--steps 8,16,32,64,128,256] [--samplers ancestral,greedy-tail,ancestral-p0.9,psi]

Samplers (all seeded identically; docs/sampling.md):
  ancestral       exact posterior, ancestral noise removal, no nucleus;
  greedy-tail     the same steps, Greedy-Tail noise removal;
  ancestral-p0.9  ancestral with nucleus 0.9 (separates the nucleus effect from Ψ's);
  psi             Ψ-sampler, the official OWT example: max-capped-0.01 in every phase, linear profile, nucleus 0.9
                  (for an MDLM model this is the official MDLM + ReMDM "max-capped" script);
  psi-loop        Ψ-sampler, the official ReMDM-loop example: pure-posterior 45 %, constant-remdm-0.01 50 % held at
                  the time where α = 0.9, pure-posterior; nucleus 0.9.

The model folder's metadata picks the process (Duo/UDLM: uniform state; MDLM: absorbing), so the same samplers
run on either (``scheduler_for_model``).

Metrics:
  Gen PPL         exp(mean NLL) of the samples under the ``--scorer`` causal LM (our AR-objective DiT trained on the same
                  data and tokenizer, scored as it was trained: [BOS] first; without ``--scorer`` an add-one bigram model of the training text is used and the
                  table says so). The held-out text's PPL under the same scorer is reported as the reference.
  entropy         mean per-sample unigram entropy (nats); Gen PPL alone rewards repetitive, low-entropy text.
  bigram JSD      Jensen–Shannon divergence (nats) between the bigram distribution of the samples and that of an
                  equally sized set of held-out blocks; repetitive or off-distribution text raises it, so low entropy
                  cannot game it. ``floor``: the same statistic between two disjoint held-out sets of that size
                  (sampling noise of the metric at this size). MAUVE is not used (not installable offline here).
  NFE, seconds    denoiser calls per sequence; wall time of the ``sample()`` call (all samples).

Held-out text: the last ``--heldout-fraction`` of the Shakespeare documents (the validation split of duo/tiny_cpu),
cut into ``[BOS] + tokens`` blocks of the model's length, or ``--reference FILE`` (plain text).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

SAMPLERS = {
    "ancestral": dict(noise_removal="ancestral"),
    "greedy-tail": dict(noise_removal="greedy"),
    "ancestral-p0.9": dict(noise_removal="ancestral", top_p=0.9),
    "psi": dict(noise_removal="ancestral", top_p=0.9, predictor="psi",
                psi=dict(high_mode="max-capped-0.01", middle_mode="max-capped-0.01", low_mode="max-capped-0.01",
                         high_frac=0.0, middle_frac=0.0, time_profile="linear")),
    "psi-loop": dict(noise_removal="ancestral", top_p=0.9, predictor="psi",
                     psi=dict(high_mode="pure-posterior", middle_mode="constant-remdm-0.01", low_mode="pure-posterior",
                              high_frac=0.45, middle_frac=0.5, time_profile="linear-constant-linear-0.9-inv")),
}


def heldout_blocks(tok, seq_len: int, fraction: float, reference: str | None) -> torch.Tensor:
    if reference:
        docs = [Path(reference).read_text(encoding="utf-8")]
    else:
        from duo_plugin.data.corpora import shakespeare_documents

        docs = shakespeare_documents("text")
        docs = docs[len(docs) - max(1, int(round(fraction * len(docs)))):]
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, add_bos=False, add_eos=False) + [tok.eos_id]
    n = seq_len - 1
    rows = [[tok.bos_id] + ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
    return torch.tensor(rows, dtype=torch.long)


def bigrams(rows: torch.Tensor, skip: set[int]) -> Counter:
    c: Counter = Counter()
    for r in rows.tolist():
        r = [t for t in r if t not in skip]
        c.update(zip(r[:-1], r[1:]))
    return c


def jsd(p: Counter, q: Counter) -> float:
    sp, sq = sum(p.values()), sum(q.values())
    out = 0.0
    for k in set(p) | set(q):
        a, b = p.get(k, 0) / sp, q.get(k, 0) / sq
        m = 0.5 * (a + b)
        out += (0.5 * a * math.log(a / m) if a else 0.0) + (0.5 * b * math.log(b / m) if b else 0.0)
    return out


class BigramScorer:
    """Fallback Gen PPL scorer: add-one bigram model of the given token rows (same tokenizer)."""

    def __init__(self, rows: torch.Tensor, k: int):
        self.k = k
        self.big = bigrams(rows, set())
        self.uni = Counter(t for r in rows.tolist() for t in r[:-1])

    def nll(self, rows: torch.Tensor, skip: set[int]) -> tuple[float, int]:
        tot, n = 0.0, 0
        for r in rows.tolist():
            for a, b in zip(r[:-1], r[1:]):
                if b in skip:
                    continue
                tot -= math.log((self.big.get((a, b), 0) + 1) / (self.uni.get(a, 0) + self.k))
                n += 1
        return tot, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--scorer", default=None, help="AR-objective DiT dir (same tokenizer); default: bigram model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--steps", default="8,16,32,64,128,256")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-fraction", type=float, default=0.02)
    ap.add_argument("--reference", default=None)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, unigram_entropy
    from duo_plugin.recipes.duo_generate import default_seq_len, load_model_and_tokenizer
    from duo_plugin.sampling import DenoiserFn, SamplerOptions, sample, scheduler_for_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_and_tokenizer(a.checkpoint, "ema", None, "cpu")
    L = default_seq_len(model, None)
    held = heldout_blocks(tok, L, a.heldout_fraction, a.reference)
    n = a.num_samples
    if held.shape[0] < 2 * n:
        raise SystemExit(f"only {held.shape[0]} held-out blocks; need 2 x --num-samples = {2 * n}")
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(held.shape[0], generator=g)
    ref_a, ref_b = held[perm[:n]], held[perm[n:2 * n]]
    skip = {tok.bos_id}
    big_ref = bigrams(ref_a, skip)
    floor = jsd(bigrams(ref_b, skip), big_ref)

    if a.scorer:
        from duo_plugin.eval.genppl import load_dit_scorer

        scorer = load_dit_scorer(a.scorer, weights="ema", device="cpu")
        scorer_name = f"AR-objective DiT ({Path(a.scorer).parent.name}/{Path(a.scorer).name}), same tokenizer"

        def gen_ppl(ids):
            return gen_ppl_and_entropy(ids, diffusion_tokenizer=tok, scorer=scorer, scorer_tokenizer=tok,
                                       eos_id_scorer=int(tok.eos_id), batch_size=32, max_len=L,
                                       bos_id_scorer=int(tok.bos_id))["gen_ppl"]
    else:
        from duo_plugin.data.corpora import shakespeare_documents

        docs = shakespeare_documents("text")
        train_docs = docs[: len(docs) - max(1, int(round(a.heldout_fraction * len(docs))))]
        rows = [[tok.bos_id] + tok.encode(d, add_bos=False, add_eos=False) for d in train_docs]
        bs = BigramScorer(torch.cat([torch.tensor(r) for r in rows])[None], int(model.vocab_size))
        scorer_name = "add-one bigram model of the training text (no AR scorer given)"

        def gen_ppl(ids):
            tot, m = bs.nll(ids, skip)
            return math.exp(tot / max(1, m))

    den = DenoiserFn(model)
    ref_ppl = gen_ppl(ref_a)
    ref_ent = float(unigram_entropy(ref_a).mean())
    schedule = LogLinearSchedule(1e-3)
    from duo_plugin._progress import Eta, eta_lines

    results = []
    step_list = [int(s) for s in a.steps.split(",")]
    bar = Eta(True, len(a.samplers.split(",")) * len(step_list), "bench_samplers", unit="cell")
    for name in a.samplers.split(","):
        for steps in step_list:
            opts = SamplerOptions(steps=steps, **SAMPLERS[name])
            t0 = time.perf_counter()
            with eta_lines():  # the sampler's own ETA within a long cell
                res = sample(den, scheduler_for_model(model, opts, schedule=schedule), batch_size=n, seq_len=L,
                             options=opts, prompt=torch.tensor([tok.bos_id]), seed=a.seed, return_trajectory=False,
                             eos_id=int(tok.eos_id))
            sec = time.perf_counter() - t0
            ids = res.tokens
            row = {"sampler": name, "steps": steps, "nfe": res.nfe, "seconds": sec, "gen_ppl": gen_ppl(ids),
                   "entropy": float(unigram_entropy(ids).mean()), "bigram_jsd": jsd(bigrams(ids, skip), big_ref)}
            results.append(row)
            print(json.dumps(row), flush=True)
            bar.update(1)
    meta = {"checkpoint": a.checkpoint, "scorer": scorer_name, "num_samples": n, "seq_len": L, "seed": a.seed,
            "heldout_gen_ppl": ref_ppl, "heldout_entropy": ref_ent, "bigram_jsd_floor": floor,
            "threads": torch.get_num_threads()}
    (out / "bench_samplers.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = [f"Model `{Path(a.checkpoint).parent.name}`, {n} samples of L = {L}, seed {a.seed}; Gen PPL scorer: "
          f"{scorer_name}. Held-out text: Gen PPL {ref_ppl:.1f}, entropy {ref_ent:.2f}; bigram JSD floor (two "
          f"held-out sets of this size) {floor:.3f}.", "",
          "| sampler | steps | NFE | Gen PPL | entropy | bigram JSD | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        md.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['gen_ppl']:.1f} | {r['entropy']:.2f} | "
                  f"{r['bigram_jsd']:.3f} | {r['seconds']:.1f} |")
    (out / "bench_samplers.md").write_text("\n".join(md) + "\n")
    plot(results, meta, out / "bench_samplers.png")
    print("\n".join(md))
    return 0


def plot(results, meta, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional extra "plots"
        print("matplotlib not installed (pip install 'duo-plugin[plots]'): no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["sampler"] for r in results):
        rs = [r for r in results if r["sampler"] == name]
        xs = [r["steps"] for r in rs]
        ax1.plot(xs, [r["gen_ppl"] for r in rs], marker="o", label=name)
        for r in rs:
            ax1.annotate(f"{r['entropy']:.2f}", (r["steps"], r["gen_ppl"]), fontsize=6, xytext=(2, 3),
                         textcoords="offset points")
        ax2.plot(xs, [r["bigram_jsd"] for r in rs], marker="o", label=name)
    ax1.axhline(meta["heldout_gen_ppl"], color="gray", ls="--", lw=1, label="held-out text")
    ax2.axhline(meta["bigram_jsd_floor"], color="gray", ls="--", lw=1, label="floor (held-out vs held-out)")
    for ax, yl in ((ax1, "Gen PPL (labels: unigram entropy)"), (ax2, "bigram JSD to held-out (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps (NFE = steps + 1)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"Sampler frontier, {meta['num_samples']} samples, L = {meta['seq_len']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
