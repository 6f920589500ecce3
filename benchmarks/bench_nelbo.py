"""Fused NELBO (projection + log-softmax + f_Duo, chunked) versus dense logits: peak memory and time of fwd+bwd.

``python benchmarks/bench_nelbo.py [--vocab 50258 --seq-len 1024 --batch 1 --dim 64 --impl chunked]`` → JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import measure, ratio, run_isolated  # noqa: E402


def worker(cfg):
    import torch

    import duo_plugin.kernels as dk

    torch.set_num_threads(cfg["threads"])
    K, L, Bsz, d = cfg["vocab"], cfg["seq_len"], cfg["batch"], cfg["dim"]

    def setup():
        torch.manual_seed(0)
        h = torch.randn(Bsz, L, d, requires_grad=True)
        W = (torch.randn(K, d) * 0.05).requires_grad_()
        b = torch.zeros(K, requires_grad=True)
        x0 = torch.randint(0, K, (Bsz, L))
        z = torch.where(torch.rand(Bsz, L) < 0.5, x0, torch.randint(0, K, (Bsz, L)))
        return h, W, b, z, x0

    def step(s):
        h, W, b, z, x0 = s
        for t in (h, W, b):
            t.grad = None
        impl = "reference" if cfg["mode"] == "dense" else cfg["impl"]
        dk.fused_duo_nelbo(h, W, b, z, x0, 0.5, -1.0, impl=impl).mean().backward()

    print(json.dumps(measure(setup, step, cfg["repeats"])))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, nargs="+", default=[50258])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--impl", default="chunked")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    report = {"benchmark": "fused_nelbo", "device": "cpu", "results": []}
    for k in args.vocab:
        base = dict(vocab=k, seq_len=args.seq_len, batch=args.batch, dim=args.dim, impl=args.impl,
                    repeats=args.repeats, threads=args.threads)
        r = {m: run_isolated(__file__, dict(base, mode=m)) for m in ("dense", "fused")}
        report["results"].append({"config": base, **r,
                                  "fused_vs_dense": {"memory": ratio(r["fused"]["peak_delta_mb"], r["dense"]["peak_delta_mb"]),
                                                     "time": ratio(r["fused"]["time_s"], r["dense"]["time_s"])},
                                  "targets": {"memory": 0.25}})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
