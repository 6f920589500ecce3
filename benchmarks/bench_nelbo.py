"""Fused NELBO (projection + log-softmax + f_Duo, chunked) versus dense logits: forward + backward, CPU.

Time: the variants run interleaved in one process (median of per-round CPU-time ratios against ``dense``);
memory: each variant's peak RSS delta in its own fresh subprocess.  Every ratio is reported with its shape
(``d`` matters: at small ``d`` the vocabulary passes dominate, at large ``d`` the three matmuls do).

``python benchmarks/bench_nelbo.py [--vocab 50258 --tokens 1024 256 --dim 64 768 --impl chunked --rounds 5]`` → JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import configure_cpu, interleaved, measure_memory, ratio, run_isolated  # noqa: E402

TARGETS = {"time": 1.2, "memory": 0.5}


def _setup(cfg):
    import torch

    K, n, d = cfg["vocab"], cfg["tokens"], cfg["dim"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, n, d, generator=g).requires_grad_()
    W = (torch.randn(K, d, generator=g) * 0.05).requires_grad_()
    b = torch.zeros(K, requires_grad=True)
    x0 = torch.randint(0, K, (1, n), generator=g)
    z = torch.where(torch.rand(1, n, generator=g) < 0.5, x0, torch.randint(0, K, (1, n), generator=g))
    a = torch.rand(1, n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return h, W, b, z, x0, a


def _step(state, impl):
    import duo_plugin.kernels as dk

    h, W, b, z, x0, a = state
    for t in (h, W, b):
        t.grad = None
    dk.fused_duo_nelbo(h, W, b, z, x0, a, -1.0, impl=impl).mean().backward()


def worker(cfg):
    configure_cpu(cfg["threads"])
    print(json.dumps(measure_memory(lambda: _setup(cfg), lambda s: _step(s, cfg["impl"]))))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, nargs="+", default=[50258])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 256], help="B·L tokens per step")
    p.add_argument("--dim", type=int, nargs="+", default=[64, 768])
    p.add_argument("--impl", default="chunked")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    configure_cpu(args.threads)
    report = {"benchmark": "fused_nelbo", "device": "cpu", "threads": args.threads, "targets": TARGETS,
              "method": "time: interleaved, median per-round CPU-time ratio vs dense; memory: fresh subprocesses",
              "results": []}
    for K in args.vocab:
        for n in args.tokens:
            for d in args.dim:
                cfg = dict(vocab=K, tokens=n, dim=d, threads=args.threads)
                st = _setup(cfg)
                t = interleaved({"dense": lambda: _step(st, "reference"), "fused": lambda: _step(st, args.impl)},
                                reference="dense", rounds=args.rounds)
                del st
                res = {"config": dict(cfg, impl=args.impl), "time": t, "fused_vs_dense": {"time": t["fused"]["ratio"]}}
                if not args.no_memory:
                    mem = {m: run_isolated(__file__, dict(cfg, impl=i))
                           for m, i in (("dense", "reference"), ("fused", args.impl))}
                    res["memory"] = mem
                    res["fused_vs_dense"]["memory"] = ratio(mem["fused"]["peak_delta_mb"], mem["dense"]["peak_delta_mb"])
                r = res["fused_vs_dense"]
                r["meets_targets"] = r["time"] <= TARGETS["time"] and r.get("memory", 0) <= TARGETS["memory"]
                report["results"].append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
