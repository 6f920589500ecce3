"""Measure the lm-eval backend's Monte-Carlo settings on a real multiple-choice task (docs/evaluation.md table).

    python tools/measure_mc_samples.py CHECKPOINT_DIR [--items 60] [--ref 128] [--out table.json]

Task: ``duo_shakespeare_next_line`` (150 four-way items from the held-out Shakespeare paragraphs; requests built
exactly as lm-eval builds them: context + " " + choice). For every setting it reports accuracy, agreement of the
decisions with a high-M reference run (M = ``--ref``, stratified), the fraction of decisions whose top-2 margin is
within 1.96 MC standard errors, the mean per-request MC standard error, the mean MC samples per request and the
wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from duo_plugin.integrations.lm_eval import TASKS_DIR, DuoLM


class Req:
    def __init__(self, ctx, cont, doc_id):
        self.args, self.task_name, self.doc_id = (ctx, cont), "duo_shakespeare_next_line", doc_id


def requests(n_items=None):
    rows = [json.loads(x) for x in (TASKS_DIR / "shakespeare" / "next_line_mc.jsonl").read_text().splitlines()]
    rows = rows[:n_items] if n_items else rows
    reqs, labels = [], []
    for i, r in enumerate(rows):
        reqs += [Req(r["context"], " " + c, i) for c in r["choices"]]
        labels.append(r["label"])
    return reqs, labels


def run(ckpt, labels, reqs, **kw):
    lm = DuoLM(pretrained=ckpt, batch_size=512, progress=False, **kw)
    t0 = time.perf_counter()
    out = lm.loglikelihood(reqs)
    sec = time.perf_counter() - t0
    ll = torch.tensor([x for x, _ in out]).view(len(labels), -1)
    pred = ll.argmax(1)
    s = lm.mc_summary()["duo_shakespeare_next_line"]
    return pred, {"acc": float((pred == torch.tensor(labels)).float().mean()), "seconds": sec,
                  "mean_stderr": s["mean_stderr"], "mc_samples_mean": s["mc_samples_mean"],
                  "frac_within_noise": s["frac_decisions_within_noise"], "mean_nelbo": s["mean_nelbo"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--ref", type=int, default=128)
    ap.add_argument("--items", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reqs, labels = requests(args.items)
    settings = [
        (f"M={args.ref} (reference)", {"mc_samples": args.ref}),
        ("M=8", {"mc_samples": 8}),
        ("M=32", {"mc_samples": 32}),
        ("adaptive: rounds of 16, SE < 1 nat, cap 128", {"mc_samples": 16, "mc_target_stderr": 1.0,
                                                         "mc_max_samples": 128}),
        ("M=32, conditioning=alpha_t", {"mc_samples": 32, "conditioning": "alpha_t"}),
        ("M=32, likelihood=official", {"mc_samples": 32, "likelihood": "official"}),
    ]
    ref_pred, table = None, []
    for name, kw in settings:
        pred, row = run(args.checkpoint, labels, reqs, **kw)
        if ref_pred is None:
            ref_pred = pred
        row.update(setting=name, agree_with_ref=float((pred == ref_pred).float().mean()))
        table.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
