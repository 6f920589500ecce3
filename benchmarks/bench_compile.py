"""``compile: true`` on the CPU: time ratio compiled / eager of a train step, a sampler step and an eval forward, and
how far the compiled numbers are from eager (the recipes compile each transformer block: ``block.compile()``).

    python benchmarks/bench_compile.py --shapes tiny d768 --rounds 5 --out compile.json
    TORCHINDUCTOR_COMPILE_THREADS=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) \
        python benchmarks/bench_compile.py --shapes tiny --compile-cost      # compile CPU seconds, cold / warm cache

Shapes: ``tiny`` = configs/duo/tiny_cpu.yaml (DiT d = 64, 2 layers, 4 heads, cond 32, K = 256, L = 64, batch 32);
``d768`` = the published width with fewer layers and a shorter context so that the CPU rounds fit (d = 768, 12 heads,
cond 128, K = 50,258, ``--d768-layers`` layers (4), L = 256, batch 2; the blocks are the same as at 12 layers, only
their share of the step grows with depth). Tasks, eager and compiled interleaved in one process (median CPU seconds,
median per-round ratio compiled / eager, < 1 = compile is faster):

* ``train``: corrupt (uniform, log-linear α) → forward → dense Duo NELBO → backward → AdamW step;
* ``sampler``: ``sampling.sample(steps=2)`` (3 denoiser calls + the mixture posterior draws);
* ``eval``: a no-grad eval-mode forward of a batch (the NELBO evaluation's network call).

Numerics: ``train_loss_max_rel_diff`` (the first 3 train losses from the same initial weights and data),
``eval_max_abs_diff`` (log-probs), ``sampler_tokens_equal`` (fraction of equal sampled ids). ``compile_s``: wall
seconds of the first compiled call of each task. If torch.compile fails, the error is recorded instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import configure_cpu, interleaved  # noqa: E402

import torch  # noqa: E402

SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, cond_dim=32, vocab=256, seq_len=64, batch=32),
    "d768": dict(dim=768, n_layers=4, n_heads=12, cond_dim=128, vocab=50258, seq_len=256, batch=2),
    "unit": dict(dim=16, n_layers=1, n_heads=2, cond_dim=8, vocab=32, seq_len=8, batch=2),
}


def build(shape: dict):
    from duo_plugin.models.dit import DiT
    from duo_plugin.training.loop import model_blocks

    torch.manual_seed(0)
    eager = DiT(shape["vocab"], shape["seq_len"], dim=shape["dim"], n_layers=shape["n_layers"],
                n_heads=shape["n_heads"], cond_dim=shape["cond_dim"], dropout=0.0)
    with torch.no_grad():  # non-zero output layer and adaLN so every path carries signal
        g = torch.Generator().manual_seed(1)
        for n, p in eager.named_parameters():
            if "adaLN" in n or "output_layer" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    compiled = copy.deepcopy(eager)
    for block in model_blocks(compiled):  # what duo_pretrain / duo_distill do with compile: true
        block.compile()
    return eager, compiled


def train_step_fn(model, shape, seed=0):
    from duo_plugin.diffusion.losses import duo_nelbo
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.diffusion.uniform import corrupt

    sched = LogLinearSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, L, K = shape["batch"], shape["seq_len"], shape["vocab"]
    state = {"step": 0}

    def step():
        g = torch.Generator().manual_seed(seed * 1000 + state["step"])
        state["step"] += 1
        x0 = torch.randint(0, K, (B, L), generator=g)
        t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
        a, ap = sched.alpha(t), sched.alpha_prime(t)
        z = corrupt(x0, a, g, vocab_size=K)
        model.train()
        loss = duo_nelbo(model(z, (-torch.log(a)).float()), z, x0, a, ap).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def sampler_fn(model, shape):
    from duo_plugin.sampling import DenoiserFn, sample

    def run():
        return sample(DenoiserFn(model), batch_size=shape["batch"], seq_len=shape["seq_len"], vocab_size=shape["vocab"],
                      steps=2, seed=0, progress=False)
    return run


def eval_fn(model, shape, x):
    def run():
        model.eval()
        with torch.no_grad():
            return model(x, torch.full((x.shape[0],), 0.5))
    return run


def _first_call_s(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 2)


def measure_shape(name: str, shape: dict, rounds: int) -> dict:
    out: dict = {"shape": name, **shape}
    eager, compiled = build(shape)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq_len"]), generator=torch.Generator().manual_seed(2))
    try:
        e_fn, c_fn = eval_fn(eager, shape, x), eval_fn(compiled, shape, x)
        out["compile_s"] = {"eval": _first_call_s(c_fn)}
        out["eval_max_abs_diff"] = float((e_fn() - c_fn()).abs().max())
        s_e, s_c = sampler_fn(eager, shape), sampler_fn(compiled, shape)
        out["compile_s"]["sampler"] = _first_call_s(s_c)
        out["sampler_tokens_equal"] = float((s_e() == s_c()).double().mean())
        # numerics of training from identical weights, then the timed rounds continue those runs
        t_e, t_c = train_step_fn(eager, shape), train_step_fn(compiled, shape)
        t0 = time.perf_counter()
        le, lc = [t_e() for _ in range(3)], [t_c() for _ in range(3)]
        out["compile_s"]["train"] = round(time.perf_counter() - t0, 2)
        out["train_losses"] = {"eager": le, "compiled": lc}
        out["train_loss_max_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(le, lc))
    except Exception as e:  # noqa: BLE001 - torch.compile unusable here: record why
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
        return out
    for task, (fe, fc) in {"train": (t_e, t_c), "sampler": (s_e, s_c), "eval": (e_fn, c_fn)}.items():
        r = interleaved({"eager": fe, "compiled": fc}, "eager", rounds=rounds, warmup=1)
        out[task] = {"eager_cpu_s": r["eager"]["cpu_s"], "compiled_cpu_s": r["compiled"]["cpu_s"],
                     "ratio": r["compiled"]["ratio"]}
    return out


def compile_cost(name: str) -> dict:
    """CPU seconds of the first train step with compiled blocks minus an eager step, in this process with Inductor
    compiling in-process (``TORCHINDUCTOR_COMPILE_THREADS=1``, set by ``--compile-cost`` before torch loads), with a
    fresh and then a warm Inductor cache (``TORCHINDUCTOR_CACHE_DIR``, a new temp dir)."""
    import os

    shape = SHAPES[name]
    out = {"shape": name, "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")}
    for cache in ("cold", "warm"):
        torch._dynamo.reset()
        eager, compiled = build(shape)
        t_e, t_c = train_step_fn(eager, shape), train_step_fn(compiled, shape)
        t_e()
        c0 = time.process_time()
        t_e()
        eager_s = time.process_time() - c0
        c0 = time.process_time()
        t_c()
        out[f"first_compiled_step_cpu_s_{cache}"] = round(time.process_time() - c0 - eager_s, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny", "d768"], choices=sorted(SHAPES))
    p.add_argument("--d768-layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--compile-cost", action="store_true",
                   help="only the compile time (CPU s) of the train step per shape, cold and warm Inductor cache")
    args = p.parse_args(argv)
    configure_cpu(args.threads)
    if args.compile_cost:
        print(json.dumps([compile_cost(s) for s in args.shapes], indent=1))
        return 0
    SHAPES["d768"]["n_layers"] = args.d768_layers
    t0 = time.time()
    res = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "command": " ".join(sys.argv),
           "results": [measure_shape(s, SHAPES[s], args.rounds) for s in args.shapes]}
    res["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
