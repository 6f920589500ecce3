"""Sampler step (float64 posterior + categorical draw, chunked) overhead relative to the model forward, and the
dense reference posterior+draw, CPU.  ``python benchmarks/bench_sampler.py [--vocab 50258 --seq-len 1024]`` → JSON.

``--full-sample``: time a whole ``duo_plugin.sampling.sample(...)`` call per ``posterior_impl`` (``--impls``; tiny
DiT, default L=256, ``--steps 16``, ancestral noise removal) and split it into time inside the denoiser (the model
forwards) and the rest (the sampler); ``<impl>_sampler_overhead_vs_forward`` = sampler time / denoiser time, i.e.
the per-step sampler overhead relative to one forward.
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
    from duo_plugin.models.dit import duo_dit_tiny

    torch.set_num_threads(cfg["threads"])
    K, L, Bsz = cfg["vocab"], cfg["seq_len"], cfg["batch"]

    def setup():
        torch.manual_seed(0)
        model = duo_dit_tiny(K, L, dim=cfg["dim"], n_layers=cfg["layers"]).eval()
        z = torch.randint(0, K, (Bsz, L))
        with torch.no_grad():
            model.output_projection.weight.normal_(0, 0.02)
            lx = model(z, torch.full((Bsz,), 0.5))
        return model, z, lx

    if cfg["mode"].startswith("sample:"):
        return print(json.dumps(full_sample(cfg, cfg["mode"].split(":", 1)[1])))

    def step(s):
        model, z, lx = s
        with torch.no_grad():
            if cfg["mode"] == "forward":
                model(z, torch.full((Bsz,), 0.5))
            elif cfg["mode"] == "mixture":
                dk.posterior_sample_step(lx, z, cfg["alpha_t"], cfg["alpha_s"], torch.arange(Bsz), 7,
                                         impl="chunked", method="mixture")
            else:
                impl = "reference" if cfg["mode"] == "dense" else "chunked"
                dk.posterior_sample_step(lx, z, cfg["alpha_t"], cfg["alpha_s"], torch.arange(Bsz), 7, impl=impl)

    print(json.dumps(measure(setup, step, cfg["repeats"])))


def full_sample(cfg, impl):
    import time

    import torch

    from duo_plugin.models.dit import duo_dit_tiny
    from duo_plugin.sampling import DenoiserFn, sample

    torch.set_num_threads(cfg["threads"])
    K, L, Bsz = cfg["vocab"], cfg["seq_len"], cfg["batch"]
    torch.manual_seed(0)
    model = duo_dit_tiny(K, L, dim=cfg["dim"], n_layers=cfg["layers"]).eval()
    with torch.no_grad():
        model.output_projection.weight.normal_(0, 0.02)
    fn = DenoiserFn(model)
    spent = [0.0]

    def timed(z, sigma):
        t0 = time.perf_counter()
        out = fn(z, sigma)
        spent[0] += time.perf_counter() - t0
        return out

    kw = dict(batch_size=Bsz, seq_len=L, vocab_size=K, steps=cfg["steps"], seed=0, progress=False,
              posterior_impl=impl, top_p=cfg["top_p"])
    sample(timed, None, **dict(kw, steps=1))  # warm-up
    best = None
    for _ in range(cfg["repeats"]):
        spent[0] = 0.0
        t0 = time.perf_counter()
        sample(timed, None, **kw)
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, spent[0])
    total, den = best
    nfe = cfg["steps"] + 1
    return {"time_s": round(total, 4), "denoiser_s": round(den, 4), "sampler_s": round(total - den, 4),
            "nfe": nfe, "sampler_per_step_s": round((total - den) / nfe, 5),
            "overhead_vs_forward": ratio(total - den, den)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--alpha-t", type=float, default=0.5)
    p.add_argument("--alpha-s", type=float, default=0.6, help="0.5 -> 0.6 ~ a 10-step sampler; closer = more steps")
    p.add_argument("--modes", nargs="+", default=["forward", "chunked", "mixture", "dense"])
    p.add_argument("--full-sample", action="store_true", help="time whole sample() calls per posterior_impl")
    p.add_argument("--impls", nargs="+", default=["dense", "chunked", "mixture"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.full_sample:
        base = dict(vocab=args.vocab, seq_len=args.seq_len if "--seq-len" in sys.argv else 256, batch=args.batch,
                    dim=args.dim, layers=args.layers, repeats=args.repeats, threads=args.threads, steps=args.steps,
                    top_p=args.top_p)
        r = {i: run_isolated(__file__, dict(base, mode=f"sample:{i}")) for i in args.impls}
        print(json.dumps({"benchmark": "sampler_full_sample", "device": "cpu", "config": base, **r,
                          **{f"{i}_sampler_overhead_vs_forward": r[i]["overhead_vs_forward"] for i in r}}, indent=1))
        return
    base = dict(vocab=args.vocab, seq_len=args.seq_len, batch=args.batch, dim=args.dim, layers=args.layers,
                repeats=args.repeats, threads=args.threads, alpha_t=args.alpha_t, alpha_s=args.alpha_s)
    r = {m: run_isolated(__file__, dict(base, mode=m)) for m in args.modes}
    rt = {m: r[m]["time_s"] for m in r}
    nan = float("nan")
    print(json.dumps({"benchmark": "sampler_step", "device": "cpu", "config": base, **r,
                      **{f"{m}_overhead_vs_forward": ratio(rt[m], rt["forward"]) if "forward" in rt else nan
                         for m in rt if m != "forward"},
                      "target_overhead": 0.10}, indent=1))


if __name__ == "__main__":
    main()
