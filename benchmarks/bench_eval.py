"""Evaluation throughput: the packed scoring paths against the previous one-group-at-a-time paths, in one process.

    python benchmarks/bench_eval.py --model DIR [--ar-model DIR] [--items 40] [--mc 32] [--rounds 3] → JSON

Workloads (each timed as CPU seconds of this process, old and new interleaved in every round; the ratio is the
median of the per-round ratios old / new, so > 1 means the new path is faster):

* ``lm_eval``: ``DuoLM.loglikelihood`` (conditional NELBO + one-pass greedy check) on the first ``--items`` items of
  the bundled 4-way task ``duo_shakespeare_next_line`` with M = ``--mc``; old = windows grouped by equal length,
  ``max(1, 64 // M)`` windows and 64 rows per forward, and one forward per greedy check (the code before packing,
  kept below as ``_LegacyDuoLM``); new = the backend's defaults (rows of all requests packed up to
  ``max_batch_tokens``). Also reports the largest per-request difference (same seeds, same noise).
* ``lm_eval_ar``: the same requests scored by an AR (causal) checkpoint: old = equal-length groups of 64 windows and
  one forward per greedy check; new = padded packing with shared context prefixes.
* ``lm_eval_wide``: the same comparison on a randomly initialised DiT at a wider shape (``--wide-dim`` 256, 4 layers,
  K = ``--wide-vocab`` 8,192, L = 128) with synthetic requests (100 context + 8 continuation tokens, 4 choices per
  context): here the output projection and f_Duo at the context positions, which the new path skips, are a large
  part of the work.
* ``duo_eval``: :func:`nelbo_perplexity` on ``--blocks`` blocks, 4 passes, ``batch_size`` 16: old = one pass at a
  time; new = passes share calls (and the output projection / f_Duo run only at counted positions).
* ``duo_eval_padded``: the same with ``packing: pad``-like rows (1/4 to all of each block real): the new path skips
  the output projection and f_Duo at the padding.
* ``genppl``: :func:`causal_nll` of ``--blocks`` × 4 sequences of random lengths: old = ``batch_size`` 8 in the given
  order; new = sorted by length, packed up to the token budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


# ------------------------------------------------------------------------------------------ the previous paths
def _legacy_conditional(den, x0, keep, *, m, batch_size, seed, indices, valid_vocab, schedule, t_min, conditioning):
    from duo_plugin.eval.likelihood import _round_times_and_gens, sequence_nelbo

    b = x0.shape[0]
    tg = [_round_times_and_gens(seed, int(indices[s]), 0, m, t_min, "stratified", torch.device("cpu"))
          for s in range(b)]
    rows = torch.arange(b).repeat_interleave(m)
    times = torch.cat([t for t, _ in tg])
    gens = [g for _, gs in tg for g in gs]
    est = torch.zeros(b * m, dtype=torch.float64)
    for lo in range(0, b * m, batch_size):
        sl = slice(lo, min(b * m, lo + batch_size))
        s = rows[sl]
        est[sl] = sequence_nelbo(den, x0[s], times[sl], gens[sl], score_mask=~keep[s], keep_mask=keep[s],
                                 padding_mask=torch.ones_like(keep[s]), schedule=schedule, valid_vocab=valid_vocab,
                                 conditioning=conditioning)
    return est.view(b, m).mean(1)


def _legacy_class():
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.diffusion.uniform import prior_sample, row_generators
    from duo_plugin.eval.causal import ar_log_probs
    from duo_plugin.eval.likelihood import effective_alpha
    from duo_plugin.integrations.lm_eval import DuoLM, request_index, truncate_left

    def legacy(**kw):
        """A DuoLM whose scorer runs the loops as they were before packing (equal-length groups of windows, one
        greedy forward per request)."""
        lm = DuoLM(**kw)
        sc, rows, schedule = lm.scorer, 64, LogLinearSchedule()
        c = sc.config

        def score_windows(windows, progress=True):
            n = len(windows)
            nelbo = torch.zeros(n, dtype=torch.float64)
            order = sorted(range(n), key=lambda i: -len(windows[i][0]))
            per_call = max(1, rows // (1 if sc.is_ar else c.mc.samples))
            groups, cur = [], []
            for i in order:
                if cur and (len(cur) == per_call or len(windows[i][0]) != len(windows[cur[0]][0])):
                    groups.append(cur)
                    cur = []
                cur.append(i)
            if cur:
                groups.append(cur)
            for grp in groups:
                x0 = torch.tensor([windows[i][0] for i in grp])
                keep = torch.zeros_like(x0, dtype=torch.bool)
                for r, i in enumerate(grp):
                    keep[r, : windows[i][1]] = True
                    keep[r, x0.shape[1] - windows[i][3]:] = True
                if sc.is_ar:
                    logp = ar_log_probs(sc.model, x0, sc.valid_vocab)[:, :-1].cpu()
                    tok = logp.gather(-1, x0[:, 1:, None]).squeeze(-1)
                    nelbo[grp] = -(tok * (~keep[:, 1:])).sum(-1)
                else:
                    nelbo[grp] = _legacy_conditional(
                        sc.denoiser, x0, keep, m=c.mc.samples, batch_size=rows, seed=c.seed,
                        indices=[windows[i][2] for i in grp], valid_vocab=sc.valid_vocab, schedule=schedule,
                        t_min=c.t_min, conditioning=c.conditioning)
            return nelbo, torch.zeros(n, dtype=torch.float64)

        @torch.no_grad()
        def greedy(pairs):
            out = [True] * len(pairs)
            alpha1 = schedule.alpha(torch.ones(1, dtype=torch.float64))
            for r, (ctx, cont) in enumerate(pairs):
                kept, _ = truncate_left(list(ctx), list(cont), sc.windows.room, 1)
                ids = torch.tensor([sc.windows.bos] + kept + list(cont))
                n_keep = 1 + len(kept)
                if sc.is_ar:
                    pred = ar_log_probs(sc.model, ids[None], sc.valid_vocab)[0, n_keep - 1 : -1].argmax(-1)
                    out[r] = bool((pred == ids[n_keep:]).all())
                    continue
                gen = row_generators(c.seed, (1 << 42), [request_index(ids.tolist())])
                z = ids.clone()[None]
                z[0, n_keep:] = prior_sample((1, len(cont)), sc.vocab_size, gen, valid_vocab=sc.valid_vocab)[0]
                a_eff = effective_alpha(alpha1, torch.tensor([n_keep]), torch.tensor([len(cont)]))
                logp = sc.denoiser(z, (-torch.log(a_eff)).to(torch.float32))
                if sc.valid_vocab is not None:
                    logp = logp.masked_fill(~sc.valid_vocab, float("-inf"))
                out[r] = bool((logp[0, n_keep:].argmax(-1) == ids[n_keep:]).all())
            return out

        sc.score_windows, sc.greedy = score_windows, greedy
        return lm

    return legacy


def _legacy_nelbo_ppl(den, blocks, batch_size, passes, seed=0, mask=None):
    from duo_plugin.diffusion.schedules import stratified_times
    from duo_plugin.diffusion.uniform import row_generators
    from duo_plugin.eval.likelihood import sequence_nelbo, stratum_permutation

    n = blocks.shape[0]
    total = 0.0
    for p in range(passes):
        perm = stratum_permutation(seed, p, n)
        for lo in range(0, n, batch_size):
            idx = range(lo, min(n, lo + batch_size))
            t = stratified_times(seed, p, perm[lo : lo + len(idx)], n, t_min=1e-3, dtype=torch.float64)
            kw = {}
            if mask is not None:
                am = mask[lo : lo + batch_size]
                kw = {"score_mask": am, "padding_mask": am}
            total += float(sequence_nelbo(den, blocks[lo : lo + batch_size], t, row_generators(seed, p, idx),
                                          **kw).sum())
    return total


def _legacy_causal_nll(scorer, seqs, eos_id, batch_size):
    total, count = 0.0, 0
    for lo in range(0, len(seqs), batch_size):
        chunk = seqs[lo : lo + batch_size]
        T = max(len(s) for s in chunk)
        toks = torch.full((len(chunk), T), eos_id, dtype=torch.long)
        real = torch.zeros(len(chunk), T, dtype=torch.bool)
        for i, s in enumerate(chunk):
            toks[i, : len(s)] = torch.tensor(s)
            real[i, : len(s)] = True
        logp = torch.log_softmax(scorer(toks).double(), -1)
        nll = -logp[:, :-1].gather(-1, toks[:, 1:, None]).squeeze(-1)
        m = real[:, 1:]
        total += float(nll[m].sum())
        count += int(m.sum())
    return total, count


# ------------------------------------------------------------------------------------------ timing
def interleaved(old, new, rounds):
    """CPU seconds of ``old()`` and ``new()`` in alternating order for ``rounds`` rounds (after one warm-up each)."""
    from duo_plugin._progress import Eta

    bar = Eta(True, 2 * rounds + 2, "bench_eval old/new", unit="run")
    out_old, out_new = old(), new()
    bar.update(2)
    t_old, t_new = [], []
    for r in range(rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            f = old if name == "old" else new
            c0 = time.process_time()
            f()
            (t_old if name == "old" else t_new).append(time.process_time() - c0)
            bar.update(1)
    bar.close()
    ratios = [a / b for a, b in zip(t_old, t_new)]
    return out_old, out_new, {"old_cpu_s": [round(x, 3) for x in t_old], "new_cpu_s": [round(x, 3) for x in t_new],
                              "ratio_old_over_new": round(statistics.median(ratios), 3),
                              "per_round_ratios": [round(x, 3) for x in ratios]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Duo model directory (e.g. a duo/tiny_cpu run's final/)")
    ap.add_argument("--ar-model", default="", help="an objective=ar model directory (lm_eval_ar and genppl)")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--mc", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wide-dim", type=int, default=256)
    ap.add_argument("--wide-vocab", type=int, default=8192)
    ap.add_argument("--wide-requests", type=int, default=16)
    ap.add_argument("--only", default="lm_eval,lm_eval_ar,lm_eval_wide,duo_eval,genppl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging_off()

    from measure_mc_samples import requests

    from duo_plugin.eval.genppl import causal_nll
    from duo_plugin.eval.likelihood import nelbo_perplexity
    from duo_plugin.integrations.lm_eval import DuoLM

    only = set(args.only.split(","))
    reqs, _ = requests(args.items)
    report = {"threads": args.threads, "requests": len(reqs), "mc_samples": args.mc, "rounds": args.rounds,
              "timing": "CPU seconds (time.process_time), old/new interleaved; ratio = median of per-round ratios"}
    legacy = _legacy_class()
    for name, path in (("lm_eval", args.model), ("lm_eval_ar", args.ar_model)):
        if name not in only:
            continue
        if not path or not Path(path).exists():
            report[name] = f"skipped: {path} not found"
            continue
        kw = dict(pretrained=path, mc_samples=args.mc, progress=False, cpu_threads=str(args.threads))
        new_lm, old_lm = DuoLM(**kw), legacy(**kw)
        report.setdefault("model_params", {})[name] = sum(p.numel() for p in new_lm.model.parameters())
        o, n, res = interleaved(lambda: old_lm.loglikelihood(reqs), lambda: new_lm.loglikelihood(reqs), args.rounds)
        diff = max(abs(a[0] - b[0]) / max(1.0, abs(a[0])) for a, b in zip(o, n))
        res.update(max_rel_diff_loglikelihood=float(f"{diff:.3g}"), greedy_agree=sum(a[1] == b[1] for a, b in zip(o, n)),
                   old_requests_per_s=round(len(reqs) / statistics.median(res["old_cpu_s"]), 2),
                   new_requests_per_s=round(len(reqs) / statistics.median(res["new_cpu_s"]), 2))
        report[name] = res
    if "lm_eval_wide" in only:
        report["lm_eval_wide"] = wide(args, legacy)
    if "duo_eval" in only and Path(args.model).exists():
        from duo_plugin.models.checkpoint import load_pretrained
        from duo_plugin.sampling import DenoiserFn

        model = load_pretrained(args.model, weights="ema")
        den = DenoiserFn(model)
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(4, model.vocab_size, (args.blocks, model.max_seq_len), generator=g)
        o, n, res = interleaved(lambda: _legacy_nelbo_ppl(den, blocks, 16, 4),
                                lambda: nelbo_perplexity(den, blocks, batch_size=16, mc_passes=4, progress=False),
                                args.rounds)
        res["rel_diff_total_nelbo"] = float(f"{abs(o - n['nll_per_token_all'] * blocks.numel() * 4) / o:.3g}")
        res["blocks_per_s_new"] = round(4 * args.blocks / statistics.median(res["new_cpu_s"]), 2)
        report["duo_eval"] = res
        # packing=pad: one sentence per row, 1/4 to all of the block real (the rest padding)
        lens = torch.randint(model.max_seq_len // 4, model.max_seq_len + 1, (args.blocks,), generator=g)
        mask = torch.arange(model.max_seq_len)[None] < lens[:, None]
        o, n, res = interleaved(lambda: _legacy_nelbo_ppl(den, blocks, 16, 4, mask=mask),
                                lambda: nelbo_perplexity(den, blocks, mask, batch_size=16, mc_passes=4,
                                                         progress=False), args.rounds)
        res["rel_diff_total_nelbo"] = float(f"{abs(o - n['nll_per_token_all'] * int(mask.sum()) * 4) / o:.3g}")
        res["real_fraction"] = round(float(mask.float().mean()), 3)
        report["duo_eval_padded"] = res
    if "genppl" in only and args.ar_model and Path(args.ar_model).exists():
        from duo_plugin.models.checkpoint import load_pretrained

        ar = load_pretrained(args.ar_model, weights="ema").eval()

        def scorer(toks):
            with torch.no_grad():
                return ar(toks, torch.zeros(toks.shape[0]))

        g = torch.Generator().manual_seed(1)
        lens = torch.randint(8, ar.max_seq_len + 1, (4 * args.blocks,), generator=g).tolist()
        seqs = [torch.randint(4, ar.vocab_size, (n,), generator=g).tolist() for n in lens]
        o, n, res = interleaved(lambda: _legacy_causal_nll(scorer, seqs, 2, 8),
                                lambda: causal_nll(scorer, seqs, 2), args.rounds)
        res["rel_diff_total_nll"] = float(f"{abs(o[0] - n[0]) / o[0]:.3g}")
        res["samples_per_s_new"] = round(len(seqs) / statistics.median(res["new_cpu_s"]), 2)
        report["genppl"] = res
    print(json.dumps(report, indent=1))


def wide(args, legacy):
    from duo_plugin.integrations.lm_eval import DuoLM
    from duo_plugin.models.dit import duo_dit_tiny

    k, length = args.wide_vocab, 128
    torch.manual_seed(0)
    model = duo_dit_tiny(k, length, dim=args.wide_dim, n_layers=4, n_heads=4, cond_dim=64).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)

    class Tok:
        vocab_size, bos_id, eos_id, pad_id = k, 0, 1, None

        def encode(self, text, add_bos=False, add_eos=False):
            return [int(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    g = torch.Generator().manual_seed(2)
    reqs = []
    for i in range(args.wide_requests // 4):
        ctx = torch.randint(2, k, (100,), generator=g).tolist()
        reqs += [(("", ""), ctx, torch.randint(2, k, (8,), generator=g).tolist()) for _ in range(4)]
    kw = dict(model=model, tokenizer=Tok(), mc_samples=args.mc, progress=False, cpu_threads=str(args.threads))
    new_lm, old_lm = DuoLM(**kw), legacy(**kw)
    o, n, res = interleaved(lambda: old_lm._loglikelihood_tokens(reqs), lambda: new_lm._loglikelihood_tokens(reqs),
                            args.rounds)
    res.update(shape={"dim": args.wide_dim, "layers": 4, "vocab": k, "seq_len": 108, "scored": 8},
               params=sum(p.numel() for p in model.parameters()),
               max_rel_diff_loglikelihood=float(f"{max(abs(a[0] - b[0]) / max(1.0, abs(a[0])) for a, b in zip(o, n)):.3g}"),
               old_requests_per_s=round(len(reqs) / statistics.median(res["old_cpu_s"]), 3),
               new_requests_per_s=round(len(reqs) / statistics.median(res["new_cpu_s"]), 3))
    return res


def logging_off():
    import logging

    logging.getLogger("duo_plugin.lm_eval").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
