"""Generation speed: Duo (ancestral, Greedy-Tail, Ψ) and MDLM at T steps against an AR model of the same size decoding
with a KV cache (ours, and Hugging Face GPT-2 ``generate`` when ``transformers`` is installed). Random weights: speed
only (the quality side is docs/performance.md "generation").

    python benchmarks/bench_generation.py --out gen.json                 # tiny_cpu and published shapes, L = 1024
    python benchmarks/bench_generation.py --quick                        # tiny_cpu shape at its L = 64, < 2 min

``--quick``: the tiny_cpu shape at its own context L = 64, batches 1 and 16, the T values up to L (T = 1024 > L
would be 16 steps per position; the full run has T = 1024 at L = 1024).

One process; every (method, T) of a cell (shape, batch) runs once per round, methods in a rotating order, so the
ratios against AR compare runs seconds apart on the same machine state. Per record: ``tokens_per_s`` (generated
tokens / wall second), ``latency_s`` (wall seconds of the whole generate call, median over rounds), ``cpu_s``
(process CPU seconds), ``nfe`` (network calls per sequence, counted), ``peak_mb`` (CPU: peak-RSS rise during the
call; CUDA: ``max_memory_allocated`` rise), ``vs_ar`` (AR CPU seconds / this method's, median of per-round
ratios; > 1 = faster than AR; ``vs_ar_wall`` the same on wall time, which on a shared machine includes time other
programs take). NFE closed forms: Duo = T + 1 (T steps + the noise-removal call), MDLM with its x_θ cache ≤ T + 1
(calls only when z changed), AR and GPT-2 = L (the BOS prompt, then one call per new token but the last).

Methods and what they generate: every method produces ``L`` new tokens per sequence. Duo / MDLM denoise ``L``
positions; the AR models get a 1-token prompt (BOS = id 0) and decode ``L`` tokens (``max_seq_len = L + 1``).
Sampling options are the plain ones for all (temperature 1, no top-k / top-p); Ψ uses the official OWT κ modes
(max-capped-0.01, linear grid) without nucleus, so its cost difference to ancestral is the predictor alone.

``--batch-max-steps`` (128) limits the T values of batches > 1 (T = 1024 at B = 16 costs 16x the B = 1 run on a
CPU); ``--published-steps`` limits the T values at the published size (a CPU forward at d = 768, L = 1024 takes ~10 s);
``--published-batches`` the batch sizes where every published method runs, ``--published-ar-batches`` those where
only the AR methods run (Duo at B = 16, L = 1024 is 16x the B = 1 work on a CPU and holds a 3.3 GB fp32 ``[B, L, K]``
output per call). The JSON's ``crossover`` gives, per (shape, batch), the largest measured T at which Duo ancestral
takes fewer CPU seconds than AR with the KV cache (None when it never does), and ``crossover_estimate`` the T where
``(T + 1) × (Duo CPU seconds per NFE)`` equals AR's (from measured numbers; an estimate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import configure_cpu, peak_bytes, reset_peak, rss_bytes  # noqa: E402

import torch  # noqa: E402

SHAPES = {  # the DiT / GPT-2 sizes
    "tiny_cpu": dict(dim=64, n_layers=2, n_heads=4, cond_dim=32, vocab=256),  # configs/duo/tiny_cpu.yaml
    "published": dict(dim=768, n_layers=12, n_heads=12, cond_dim=128, vocab=50258),  # paper small (OWT)
    "unit": dict(dim=16, n_layers=1, n_heads=2, cond_dim=8, vocab=32),  # tests only
}
DUO = {"duo-ancestral": dict(noise_removal="ancestral"), "duo-greedy-tail": dict(noise_removal="greedy"),
       "duo-psi": dict(noise_removal="ancestral", predictor="psi")}
PSI = dict(high_mode="max-capped-0.01", middle_mode="max-capped-0.01", low_mode="max-capped-0.01", high_frac=0.0,
           middle_frac=0.0, time_profile="linear")
DIFFUSION = (*DUO, "mdlm")
ALL_METHODS = (*DIFFUSION, "ar-kv", "hf-gpt2")


def _init_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """GPT-2-style random weights (N(0, 0.02) for every matrix, zero biases): x_θ is a real, non-uniform law."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("bias"):
                p.zero_()
    return model.eval()


def build_models(shape: dict, L: int, device, methods) -> dict:
    from duo_plugin.models.dit import DiT

    K = shape["vocab"]
    kw = dict(dim=shape["dim"], n_layers=shape["n_layers"], n_heads=shape["n_heads"], cond_dim=shape["cond_dim"],
              dropout=0.0)
    models = {}
    if any(m in DUO for m in methods):
        models["duo"] = _init_(DiT(K, L, **kw), 0).to(device)
    if "mdlm" in methods:  # K data ids + the [MASK] row; not time-conditioned, so its x_θ cache applies
        models["mdlm"] = _init_(DiT(K + 1, L, time_conditioning=False, **kw), 1).to(device)
    if "ar-kv" in methods:
        models["ar"] = _init_(DiT(K, L + 1, causal=True, time_conditioning=False, **kw), 2).to(device)
    if "hf-gpt2" in methods:
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError:
            return models
        cfg = GPT2Config(vocab_size=K, n_positions=L + 1, n_embd=shape["dim"], n_layer=shape["n_layers"],
                         n_head=shape["n_heads"], bos_token_id=0, eos_token_id=None, pad_token_id=0)
        models["gpt2"] = GPT2LMHeadModel(cfg).eval().to(device)  # its own N(0, 0.02) init, no download
    return models


class CallCounter:
    """Counts forward calls of a module (the NFE of the HF and AR paths, measured rather than assumed)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def make_call(method: str, models: dict, B: int, L: int, T: int, device):
    """A zero-argument function generating ``B × L`` tokens; returns the NFE per sequence."""
    from duo_plugin.sampling import DenoiserFn, PsiSchedule, sample
    from duo_plugin.sampling.ar_decode import sample_ar
    from duo_plugin.diffusion.absorbing import AbsorbingProcess
    from duo_plugin.sampling.mdlm import sample_mdlm

    if method in DUO:
        m = models["duo"]
        opts = dict(DUO[method])
        if opts.get("predictor") == "psi":
            opts["psi"] = PsiSchedule(**PSI)

        def run():
            den = DenoiserFn(m)
            sample(den, batch_size=B, seq_len=L, vocab_size=m.vocab_size, steps=T, seed=0, device=device,
                   progress=False, **opts)
            return den.nfe
        return run
    if method == "mdlm":
        m = models["mdlm"]

        def run():
            _, nfe = sample_mdlm(DenoiserFn(m), AbsorbingProcess(m.vocab_size, m.vocab_size - 1), batch_size=B,
                                 seq_len=L, steps=T, noise_removal="greedy", time_conditioned=False, seed=0,
                                 device=device, return_nfe=True)
            return int(nfe)
        return run
    if method == "ar-kv":
        m = models["ar"]

        def run():
            counter = CallCounter(m.vocab_embed)
            try:
                out = sample_ar(m, batch_size=B, seq_len=L + 1, prompt=torch.zeros(1, dtype=torch.long), seed=0)
            finally:
                counter.handle.remove()
            assert out.nfe == counter.n
            return counter.n
        return run
    if method == "hf-gpt2":
        m = models["gpt2"]

        def run():
            counter = CallCounter(m.transformer)
            ids = torch.zeros(B, 1, dtype=torch.long, device=device)
            torch.manual_seed(0)
            try:
                with torch.no_grad():
                    out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                     max_new_tokens=L, min_new_tokens=L, pad_token_id=0)
            finally:
                counter.handle.remove()
            assert out.shape == (B, L + 1)
            return counter.n
        return run
    raise ValueError(f"unknown method {method!r}")


def measure(fn, device) -> dict:
    """Wall and CPU seconds, NFE and peak memory rise of one call."""
    import gc

    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak()
        base = rss_bytes()
    c0, t0 = time.process_time(), time.perf_counter()
    nfe = fn()
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated(device) if cuda else peak_bytes()) - base
    return {"wall": wall, "cpu": cpu, "nfe": int(nfe), "peak_mb": round(max(peak, 0) / 2**20, 1)}


def run_cell(shape_name: str, B: int, L: int, steps, methods, rounds: int, device, progress) -> list[dict]:
    """All (method, T) of one (shape, batch) cell, interleaved over ``rounds``; one record each."""
    shape = SHAPES[shape_name]
    models = build_models(shape, L, device, methods)
    jobs = [(m, T) for m in methods if m in DIFFUSION for T in steps]
    jobs += [(m, None) for m in methods if m not in DIFFUSION and (m != "hf-gpt2" or "gpt2" in models)]
    for m in dict.fromkeys(m for m, _ in jobs):  # warm-up at a short length (lazy init, first-call costs)
        make_call(m, models, B, min(L, 16), 1, device)()
    res: dict = {j: [] for j in jobs}
    for r in range(rounds):
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
        for m, T in order:
            res[(m, T)].append(measure(make_call(m, models, B, L, T if T is not None else 0, device), device))
            progress(f"{shape_name} B={B} {m} T={T}: {res[(m, T)][-1]['wall']:.2f} s")
    ar = res.get(("ar-kv", None))
    out = []
    for (m, T), runs in res.items():
        lat = statistics.median(x["wall"] for x in runs)
        rec = {"shape": shape_name, "dim": shape["dim"], "layers": shape["n_layers"], "vocab": shape["vocab"],
               "batch": B, "seq_len": L, "method": m, "T": T, "tokens_per_s": round(B * L / lat, 2),
               "latency_s": round(lat, 6), "cpu_s": round(statistics.median(x["cpu"] for x in runs), 6),
               "nfe": max(x["nfe"] for x in runs), "peak_mb": max(x["peak_mb"] for x in runs), "rounds": len(runs)}
        rec["tokens_per_cpu_s"] = round(B * L / rec["cpu_s"], 2) if rec["cpu_s"] > 0 else None
        if ar:
            rec["vs_ar"] = round(statistics.median(a["cpu"] / max(x["cpu"], 1e-9) for a, x in zip(ar, runs)), 4)
            rec["vs_ar_wall"] = round(statistics.median(a["wall"] / x["wall"] for a, x in zip(ar, runs)), 4)
        out.append(rec)
    return out


def crossovers(records: list[dict]) -> tuple[dict, dict]:
    """Per (shape, batch), on CPU seconds (``cpu_s``; wall time on a shared machine counts other programs): the
    largest T with Duo ancestral faster than AR-KV, and the T where ``(T + 1) × (Duo s per NFE)`` equals AR's time.
    A cell without Duo runs (``--published-ar-batches``) gets only the estimate, from the same shape's smallest
    measured batch scaled linearly in the batch size (``"<T> (batch-scaled)"``)."""
    cross, est = {}, {}
    cells = sorted({(r["shape"], r["batch"]) for r in records})
    for shape, B in cells:
        rs = [r for r in records if r["shape"] == shape and r["batch"] == B]
        ar = [r for r in rs if r["method"] == "ar-kv"]
        duo = sorted((r for r in rs if r["method"] == "duo-ancestral"), key=lambda r: r["T"])
        if not ar:
            continue
        key = f"{shape}/B={B}"
        if duo:
            faster = [r["T"] for r in duo if r["cpu_s"] < ar[0]["cpu_s"]]
            cross[key] = max(faster) if faster else None
            per_nfe = statistics.median(r["cpu_s"] / r["nfe"] for r in duo)
            est[key] = round(ar[0]["cpu_s"] / per_nfe - 1, 1)
            continue
        other = [r for r in records if r["shape"] == shape and r["method"] == "duo-ancestral"]
        if other:
            b0 = min(r["batch"] for r in other)
            per_nfe = statistics.median(r["cpu_s"] / r["nfe"] for r in other if r["batch"] == b0) * B / b0
            est[key] = f"{round(ar[0]['cpu_s'] / per_nfe - 1, 1)} (batch-scaled)"
    return cross, est


def to_markdown(records: list[dict]) -> str:
    """One table row per record: shape, batch, method, T, NFE, CPU s, tokens per CPU s, wall s, peak MiB, vs AR."""
    lines = ["| shape | B | method | T | NFE | CPU s | tokens / CPU s | wall s | peak MiB | vs AR-KV (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['method']} | {r['T'] if r['T'] is not None else '–'} | "
                     f"{r['nfe']} | {r['cpu_s']:.3f} | {r['tokens_per_cpu_s']:.0f} | {r['latency_s']:.3f} | "
                     f"{r['peak_mb']} | {r.get('vs_ar', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def write_summary(args, device, records: list[dict], t_start: float, *, final: bool) -> None:
    """The JSON (``--out`` after every cell, so a long run keeps what it measured; stdout at the end)."""
    cross, est = crossovers(records)
    summary = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
               "threads": torch.get_num_threads(), "rounds": args.rounds, "command": " ".join(sys.argv),
               "complete": final, "wall_s": round(time.time() - t_start, 1), "records": records, "crossover": cross,
               "crossover_estimate": est}
    text = json.dumps(summary, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".md").write_text(to_markdown(records))
    if final:
        print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny_cpu shape only at its L = 64, T <= 64 (< 2 min)")
    p.add_argument("--unit", action="store_true", help="a unit-sized run for tests (seconds)")
    p.add_argument("--shapes", nargs="+", default=["tiny_cpu", "published"], choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 1024])
    p.add_argument("--published-steps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--published-batches", type=int, nargs="+", default=[1])
    p.add_argument("--published-ar-batches", type=int, nargs="*", default=[16],
                   help="published-size batches where only --published-ar-methods run")
    p.add_argument("--published-ar-methods", nargs="+", default=["ar-kv", "hf-gpt2"], choices=["ar-kv", "hf-gpt2"])
    p.add_argument("--published-methods", nargs="+", default=["duo-ancestral", "mdlm", "ar-kv", "hf-gpt2"],
                   choices=ALL_METHODS)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--batch-max-steps", type=int, default=128,
                   help="for batches > 1, only the T values up to this (T = 1024 at B = 16 is 16x the B = 1 run)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick or args.unit:
        args.shapes = ["unit" if args.unit else "tiny_cpu"]
        args.seq_len = 8 if args.unit else 64
        args.batches = [1, 2] if args.unit else [1, 16]
        args.steps = [2, 4] if args.unit else [t for t in args.steps if t <= args.seq_len] or args.steps
    device = torch.device(args.device)
    if device.type == "cpu":
        configure_cpu(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    records = []
    log = lambda s: print(f"[{time.time() - t_start:7.1f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    for shape in args.shapes:
        full = shape == "published"
        steps = args.published_steps if full else args.steps
        methods = [m for m in args.methods if not full or m in args.published_methods]
        for B in (args.published_batches if full else args.batches):
            steps_b = steps if B == 1 else [t for t in steps if t <= args.batch_max_steps]
            records += run_cell(shape, B, args.seq_len, steps_b, methods, args.rounds, device, log)
            write_summary(args, device, records, t_start, final=False)
        for B in (args.published_ar_batches if full else []):
            ar_only = [m for m in methods if m in args.published_ar_methods]
            records += run_cell(shape, B, args.seq_len, steps, ar_only, args.rounds, device, log)
            write_summary(args, device, records, t_start, final=False)
    write_summary(args, device, records, t_start, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
