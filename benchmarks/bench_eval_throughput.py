"""lm-eval backend throughput on the tiny model: rows (request × MC sample) per second, before / after, one process.

    python benchmarks/bench_eval_throughput.py [--items 200 --docs 200 --mc 8 --rounds 2] [--quick] → JSON

Workload (the one behind the "18 minutes" report): ``--items`` 4-way multiple-choice items (``loglikelihood``:
context of 20–45 tokens, continuations of 3–12 tokens, greedy check on) plus ``--docs`` rolling documents of
40–160 tokens (``loglikelihood_rolling``), on a seeded random ``duo_dit_tiny`` (K = 256, L = 64, the ``duo/tiny_cpu``
shape), M = ``--mc`` samples per request. Both paths score every request with the same packed engine, noise and
values (checked: the largest per-request difference is reported); they differ in what the backend on ``main`` did
not do:

* ``before``: torch's default intra-op threads (one per core, OpenMP threads that spin while waiting), as
  ``lm_eval --model duo`` ran on ``main``;
* ``after``: the backend applies the project's CPU policy (``cpu_threads=auto``, :mod:`duo_plugin.runtime`: one
  thread for a model this small) -- on a shared machine two spinning threads starve each other.

Rounds alternate the order (before/after, after/before); rows/s are wall-clock (the contention is what is measured);
the ratio is the median of the per-round ratios after/before (> 1: the new path is faster). The machine's 1-minute
load average is recorded at the start and the end: the ratio depends on it (on an idle multi-core machine the two
paths are close).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class IdTok:
    def __init__(self, k):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = k, 0, 1, None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


class Req:
    def __init__(self, args, task, doc_id=None):
        self.args, self.task_name, self.doc_id = args, task, doc_id


def workload(items: int, docs: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(str(int(v)) for v in torch.randint(2, k, (n,), generator=g))

    mc = []
    for i in range(items):
        ctx = toks(20, 46)
        mc += [Req((ctx, " " + toks(3, 13)), "mc4", i) for _ in range(4)]
    return mc, [Req((toks(40, 161),), "rolling") for _ in range(docs)]


def model(k: int, length: int):
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(0)
    m = duo_dit_tiny(k, length)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    m.duo_metadata = {"objective": "duo"}
    return m.eval()


def run(lm, mc, docs):
    """``(rows, wall s, cpu s, values)`` of one pass over the workload."""
    lm.scorer.recorder.samples_used.clear()
    w0, c0 = time.perf_counter(), time.process_time()
    out = [ll for ll, _ in lm.loglikelihood(mc)] + lm.loglikelihood_rolling(docs)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return sum(lm.scorer.recorder.samples_used), wall, cpu, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--mc", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="20 items, 20 documents, M = 4, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.docs, args.mc, args.rounds = 20, 20, 4, 1
    from duo_plugin.integrations.lm_eval import DuoLM
    from duo_plugin.runtime import choose_cpu_threads

    default_threads = torch.get_num_threads()  # what the backend on main ran with
    k, length = 256, 64
    m = model(k, length)
    after_threads = choose_cpu_threads("auto", n_params=sum(p.numel() for p in m.parameters())).threads
    lm = DuoLM(model=m, tokenizer=IdTok(k), mc_samples=args.mc, progress="false", cpu_threads=str(after_threads))
    mc, docs = workload(args.items, args.docs, k)
    load0 = os.getloadavg()[0]
    res = {"before": [], "after": []}
    vals = {}
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            torch.set_num_threads(default_threads if name == "before" else after_threads)
            rows, wall, cpu, out = run(lm, mc, docs)
            res[name].append({"rows": rows, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                              "rows_per_s": round(rows / wall, 1)})
            vals[name] = out
    ratios = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(res["after"], res["before"])]
    diff = max(abs(a - b) for a, b in zip(vals["before"], vals["after"]))
    report = {
        "workload": {"items_4way": args.items, "requests": len(mc), "rolling_docs": args.docs, "mc_samples": args.mc,
                     "model": f"duo_dit_tiny K={k} L={length}", "params": sum(p.numel() for p in m.parameters())},
        "threads": {"before": default_threads, "after": after_threads},
        "loadavg_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
        **res,
        "ratio_rows_per_s_after_over_before": round(statistics.median(ratios), 2),
        "per_round_ratios": [round(x, 2) for x in ratios],
        "max_abs_diff_per_request": diff,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
