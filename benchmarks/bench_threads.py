"""Intra-op threads and the OpenMP wait policy on CPU, with and without a concurrent CPU-bound process.

For each model size and condition (``idle`` = whatever else the machine runs, ``load`` = plus one busy-looping
process started by this script) a fresh worker (the wait policy is read when OpenMP starts) times a full training
step (forward, backward, AdamW) with 1 and with N threads interleaved (wall time, median per round: thread
contention is what is measured here).  Reports steps/s and the ratio N-thread / 1-thread time; the default of
``cpu_threads: auto`` (duo_plugin/runtime.py) follows from these numbers.

``python benchmarks/bench_threads.py [--threads 2 --rounds 5]`` → JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = {  # name: (K, L, B, d, layers)
    "tiny_d64": (512, 64, 32, 64, 2),
    "d256": (8192, 128, 2, 256, 4),
}


def worker(cfg):
    import torch

    from duo_plugin.diffusion.losses import duo_nelbo
    from duo_plugin.models.dit import DiT

    torch.set_flush_denormal(True)
    K, L, B, d, layers = SIZES[cfg["size"]]
    torch.manual_seed(0)
    model = DiT(K, L, dim=d, n_layers=layers, n_heads=max(1, d // 64), cond_dim=32 if d < 128 else 128, dropout=0.0)
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, K, (B, L))
    alpha = torch.full((B,), 0.6)

    def step():
        opt.zero_grad(set_to_none=True)
        duo_nelbo(model(x0, -torch.log(alpha)), x0, x0, alpha, -torch.ones(B)).mean().backward()
        opt.step()

    counts = [1, cfg["threads"]]
    times = {n: [] for n in counts}
    for r in range(cfg["rounds"] + 1):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            torch.set_num_threads(n)
            reps = cfg["reps"]
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            if r:  # round 0 warms up
                times[n].append((time.perf_counter() - t0) / reps)
    res = {f"threads_{n}": {"steps_per_s": round(1 / statistics.median(times[n]), 2)} for n in counts}
    res["ratio_time_N_over_1"] = round(statistics.median(
        [a / b for a, b in zip(times[cfg["threads"]], times[1])]), 3)
    res["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    out = {"benchmark": "cpu_threads", "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
           "results": []}
    for size in args.sizes:
        for cond in ("idle", "load"):
            for policy in ("default", "PASSIVE"):
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
                if policy == "PASSIVE":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "load" else None
                try:
                    cfg = {"size": size, "threads": args.threads, "rounds": args.rounds,
                           "reps": 3 if size == "tiny_d64" else 1}
                    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                                       text=True, env=env)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                if r.returncode != 0:
                    raise RuntimeError(r.stderr[-2000:])
                res = {"size": size, "condition": cond, "omp_wait_policy": policy,
                       **json.loads(r.stdout.strip().splitlines()[-1])}
                out["results"].append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
