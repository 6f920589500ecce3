"""Curriculum training step (fused vs dense) versus a plain discrete step: peak memory and time, CPU.

One fresh subprocess per configuration; peak memory = peak RSS during the step minus RSS after setup.
``python benchmarks/bench_curriculum.py [--vocab 50258 --seq-len 1024 --batch 1 --dim 64 --layers 2 --loss dense]``
Prints one JSON object; ratios are against the discrete step and the dense curriculum step of the same run.
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
    from duo_plugin.diffusion.losses import curriculum_inputs, duo_nelbo
    from duo_plugin.models.dit import duo_dit_tiny

    torch.set_num_threads(cfg["threads"])
    K, L, Bsz, tau = cfg["vocab"], cfg["seq_len"], cfg["batch"], 1e-3

    def setup():
        torch.manual_seed(0)
        model = duo_dit_tiny(K, L, dim=cfg["dim"], n_layers=cfg["layers"], n_heads=4, cond_dim=32)
        with torch.no_grad():  # non-zero output layer so that the loss has a real gradient
            model.output_projection.weight.normal_(0, 0.02)
        x0 = torch.randint(0, K, (Bsz, L))
        return model, x0

    def loss_of(model, x_in, z, x0, a, ap, sigma, override=None):
        import contextlib

        ctx = dk.embedding_override(model.vocab_embed, override) if override is not None else contextlib.nullcontext()
        with ctx:
            if cfg["loss"] == "fused":
                h = model.forward_hidden(x_in, sigma)
                proj = model.output_projection
                f = dk.fused_duo_nelbo(h, proj.weight, proj.bias, z, x0, a, ap, impl="chunked")
            else:
                f = duo_nelbo(model(x_in, sigma), z, x0, a, ap)
        return f.mean()

    def step(state):
        model, x0 = state
        model.zero_grad(set_to_none=True)
        a = torch.full((Bsz,), 0.6)
        ap = torch.full((Bsz,), -1.0)
        sigma = -torch.log(a)
        gamma = torch.full((Bsz,), -2.5)
        at, st = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
        if cfg["mode"] == "discrete":
            z = torch.where(torch.rand(Bsz, L) < 0.6, x0, torch.randint(0, K, (Bsz, L)))
            loss = loss_of(model, z, z, x0, a, ap, sigma)
        elif cfg["mode"] == "dense":
            z, soft = curriculum_inputs(x0, gamma, tau, K, torch.Generator().manual_seed(1))
            loss = loss_of(model, soft, z, x0, a, ap, sigma)
            del soft
        else:
            seeds = torch.arange(Bsz, dtype=torch.int64)
            emb, z = dk.curriculum_soft_embedding(x0, at, st, tau, seeds, model.vocab_embed.weight, impl="chunked")
            loss = loss_of(model, z, z, x0, a, ap, sigma, override=emb)
        loss.backward()

    print(json.dumps(measure(setup, step, cfg["repeats"])))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, nargs="+", default=[50258])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--loss", choices=["dense", "fused"], default="dense")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    report = {"benchmark": "curriculum_step", "device": "cpu", "results": []}
    for k in args.vocab:
        base = dict(vocab=k, seq_len=args.seq_len, batch=args.batch, dim=args.dim, layers=args.layers,
                    loss=args.loss, repeats=args.repeats, threads=args.threads)
        r = {m: run_isolated(__file__, dict(base, mode=m)) for m in ("discrete", "dense", "fused")}
        report["results"].append({
            "config": base, **r,
            "fused_vs_discrete": {"memory": ratio(r["fused"]["peak_delta_mb"], r["discrete"]["peak_delta_mb"]),
                                  "time": ratio(r["fused"]["time_s"], r["discrete"]["time_s"])},
            "dense_vs_discrete": {"memory": ratio(r["dense"]["peak_delta_mb"], r["discrete"]["peak_delta_mb"]),
                                  "time": ratio(r["dense"]["time_s"], r["discrete"]["time_s"])},
            "targets": {"memory": 1.15, "time": 1.3},
        })
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
