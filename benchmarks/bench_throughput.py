"""Training throughput of the duo/tiny_cpu model configuration (CPU): tokens/s of a full optimizer step (discrete
phase and curriculum phase) and the achieved matmul FLOP/s as a fraction of a plain fp32 ``torch.mm`` measured in
the same run.

Sizes default to duo_plugin/configs/duo/tiny_cpu.yaml: K = 512 (tokenizer.train.vocab_size), L = 64 (data.seq_len),
global batch 32, ``duo_dit_tiny`` (d = 64, 2 layers, 4 heads, cond 32).

FLOPs per step (stated formula): ``6 · N · T + 12 · n_layers · L · d · T`` with T = B·L tokens and N = the parameters
of every matmul weight *excluding the input embedding* (blocks, time conditioning, output projection K·d): 2 FLOPs per
multiply-add, ×3 for forward + backward; the second term is attention scores and values (QKᵀ and AV: 2·L·d each
per token and layer, ×3).  The reference FLOP/s is ``torch.mm`` of (a) the model's largest matmul shape
``[T, d] @ [d, K]`` and (b) a square 1024³ product.

``python benchmarks/bench_throughput.py [--vocab 512 --seq-len 64 --batch 32 --dim 64 --layers 2 --steps 5]`` → JSON.
"""

from __future__ import annotations

import argparse
import json
import time


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    import duo_plugin.kernels as dk
    from duo_plugin.diffusion.losses import curriculum_inputs, duo_nelbo
    from duo_plugin.models.dit import duo_dit_tiny

    torch.set_num_threads(args.threads)
    K, L, B, d = args.vocab, args.seq_len, args.batch, args.dim
    torch.manual_seed(0)
    model = duo_dit_tiny(K, L, dim=d, n_layers=args.layers, n_heads=args.heads, cond_dim=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randint(0, K, (B, L))
    t = torch.rand(B) * 0.9 + 0.05
    alpha, alpha_prime = 1 - t, -torch.ones(B)
    sigma = -torch.log(alpha)
    gamma = torch.full((B,), -2.0)

    def step(mode: str):
        opt.zero_grad(set_to_none=True)
        if mode == "discrete":
            z = torch.where(torch.rand(B, L) < alpha[:, None], x0, torch.randint(0, K, (B, L)))
            f = duo_nelbo(model(z, sigma), z, x0, alpha, alpha_prime)
        elif mode == "curriculum_dense":
            z, soft = curriculum_inputs(x0, gamma, 1e-3, K, torch.Generator().manual_seed(1))
            f = duo_nelbo(model(soft, sigma), z, x0, alpha, alpha_prime)
        else:  # curriculum_fused: chunked soft embedding + chunked fused NELBO
            at, st = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
            emb, z = dk.curriculum_soft_embedding(x0, at, st, 1e-3, torch.arange(B), model.vocab_embed.weight,
                                                  impl="chunked")
            with dk.embedding_override(model.vocab_embed, emb):
                h = model.forward_hidden(z, sigma)
            proj = model.output_projection
            f = dk.fused_duo_nelbo(h, proj.weight, proj.bias, z, x0, alpha, alpha_prime, impl="chunked")
        f.mean().backward()
        opt.step()

    n_all = sum(p.numel() for p in model.parameters())
    n_emb = model.vocab_embed.weight.numel()
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("vocab_embed"))
    tokens = B * L
    flops = 6 * n_matmul * tokens + 12 * args.layers * L * d * tokens

    res = {}
    for mode in ("discrete", "curriculum_dense", "curriculum_fused"):
        s = _time(lambda: step(mode), args.steps)
        res[mode] = {"step_s": round(s, 5), "tokens_per_s": round(tokens / s, 1),
                     "model_gflop_per_s": round(flops / s / 1e9, 3)}

    a = torch.randn(tokens, d)
    w = torch.randn(d, K)
    sq = torch.randn(1024, 1024)
    mm_model = 2 * tokens * d * K / _time(lambda: torch.mm(a, w), 20)
    mm_square = 2 * 1024**3 / _time(lambda: torch.mm(sq, sq), 5)
    for mode in res:
        f_s = res[mode]["model_gflop_per_s"] * 1e9
        res[mode]["fraction_of_mm_model_shape"] = round(f_s / mm_model, 3)
        res[mode]["fraction_of_mm_1024"] = round(f_s / mm_square, 3)
    print(json.dumps({
        "benchmark": "train_throughput_tiny_cpu", "device": "cpu", "threads": args.threads,
        "config": {"vocab": K, "seq_len": L, "batch": B, "dim": d, "layers": args.layers, "heads": args.heads},
        "params": {"total": n_all, "input_embedding": n_emb, "matmul_non_embedding": n_matmul},
        "flops_per_step": flops,
        "flop_formula": "6*N_matmul_excl_input_embedding*tokens + 12*n_layers*L*d*tokens",
        "mm_gflop_per_s": {"model_shape_[T,d]@[d,K]": round(mm_model / 1e9, 3), "square_1024": round(mm_square / 1e9, 3)},
        "results": res,
    }, indent=1))


if __name__ == "__main__":
    main()
