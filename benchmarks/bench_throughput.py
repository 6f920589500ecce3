"""Training throughput of the DiT on CPU: achieved model FLOP/s of a full optimizer step (forward, backward, AdamW,
EMA update) against ``torch.mm`` measured in the same rounds, at several widths.

Everything is timed interleaved in one process (CPU time, median per round): for each width ``d`` the step with
the dense loss (``model(...)`` + ``duo_nelbo``), the step with the fused chunked NELBO (``forward_hidden`` +
``fused_duo_nelbo``) and a square ``1024³`` fp32 ``torch.mm``.  FLOPs per step (stated formula):
``6 · N · T + 12 · n_layers · L · d · T`` with T = B·L tokens and N = the parameters of every matmul weight
excluding the input embedding (blocks, time conditioning, output projection K·d); the second term is attention
(QKᵀ and AV, 2·L·d per token and layer each, ×3 for forward + backward).

``python benchmarks/bench_throughput.py [--dims 256 512 768 --layers 4 --vocab 8192 --seq-len 256 --batch 2]``
→ JSON (``fraction_of_mm`` per width and loss path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import configure_cpu, interleaved  # noqa: E402


def build(K, L, B, d, layers, seed=0):
    import torch

    from duo_plugin.models.dit import DiT
    from duo_plugin.training.ema import EMA

    torch.manual_seed(seed)
    model = DiT(K, L, dim=d, n_layers=layers, n_heads=max(1, d // 64), cond_dim=128, dropout=0.0)
    with torch.no_grad():  # non-zero output layer / adaLN so every matmul has a real gradient
        model.output_layer.linear.weight.normal_(0, 0.02)
        for blk in model.blocks:
            blk.adaLN_modulation.weight.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, decay=0.999)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (B, L), generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    alpha, alpha_prime = 1 - t, -torch.ones(B)
    z = torch.where(torch.rand(B, L, generator=g) < alpha[:, None], x0, torch.randint(0, K, (B, L), generator=g))
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("vocab_embed"))
    flops = 6 * n_matmul * B * L + 12 * layers * L * d * B * L
    return model, opt, ema, (x0, z, alpha, alpha_prime, -torch.log(alpha)), flops


def step(model, opt, ema, batch, loss: str):
    import duo_plugin.kernels as dk
    from duo_plugin.diffusion.losses import duo_nelbo

    x0, z, alpha, alpha_prime, sigma = batch
    opt.zero_grad(set_to_none=True)
    if loss == "dense":
        f = duo_nelbo(model(z, sigma), z, x0, alpha, alpha_prime)
    else:
        h = model.forward_hidden(z, sigma)
        proj = model.output_projection
        f = dk.fused_duo_nelbo(h, proj.weight, proj.bias, z, x0, alpha, alpha_prime, impl=loss)
    f.mean().backward()
    opt.step()
    ema.update(model)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--losses", nargs="+", default=["dense", "chunked"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    configure_cpu(args.threads)
    sq = torch.randn(1024, 1024)
    mm_flops = 2 * 1024**3
    out = {"benchmark": "train_throughput", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
           "config": {"vocab": args.vocab, "seq_len": args.seq_len, "batch": args.batch, "layers": args.layers,
                      "heads": "d // 64", "cond_dim": 128},
           "flop_formula": "6*N_matmul_excl_input_embedding*tokens + 12*n_layers*L*d*tokens", "results": []}
    for d in args.dims:
        model, opt, ema, batch, flops = build(args.vocab, args.seq_len, args.batch, d, args.layers)
        variants = {"mm1024": lambda: torch.mm(sq, sq)}
        for loss in args.losses:
            variants[loss] = lambda loss=loss: step(model, opt, ema, batch, loss)
        t = interleaved(variants, reference="mm1024", rounds=args.rounds)
        mm_rate = mm_flops / t["mm1024"]["cpu_s"]
        res = {"dim": d, "flops_per_step": flops, "mm_gflop_per_s": round(mm_rate / 1e9, 2)}
        for loss in args.losses:
            rate = flops / t[loss]["cpu_s"]
            # median per-round ratio: (flops / t_step) / (mm_flops / t_mm) = flops/mm_flops / ratio
            res[loss] = {"step_cpu_s": t[loss]["cpu_s"], "tokens_per_cpu_s": round(args.batch * args.seq_len / t[loss]["cpu_s"], 1),
                         "model_gflop_per_s": round(rate / 1e9, 2),
                         "fraction_of_mm": round(flops / mm_flops / t[loss]["ratio"], 3)}
        out["results"].append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
        del model, opt, ema
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
