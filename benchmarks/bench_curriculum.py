"""Curriculum training step (dense / fused chunked / sparse top-k input) versus a plain discrete step: peak memory
and time, CPU; plus the measured approximation error of the top-k soft input.

Time: all modes interleaved in one process (median of per-round CPU-time ratios against ``discrete``); memory: one
fresh subprocess per mode (peak RSS during a step minus RSS before it).  Ratios are reported with ``d``.
``python benchmarks/bench_curriculum.py [--vocab 50258 --seq-len 1024 --batch 1 --dim 64 768 --layers 2 --loss dense
--modes discrete dense fused topk --topk 64 8]``
Prints one JSON object; ratios are against the discrete step of the same run.

Modes: ``discrete`` (hard z_t), ``dense`` (``losses.curriculum_inputs``: [B, L, K] logits into the model),
``fused`` (``kernels.curriculum_soft_embedding``, impl=chunked, counter-based noise over all K ids),
``topk`` (``adapt.topk_curriculum_inputs``: O(k) per token, ``SoftTopK`` → ``F.embedding_bag``; one run per
``--topk`` value). The top-k NELBO path is the one the recipe uses with ``curriculum.input: topk`` (model + duo_nelbo;
``--loss fused`` feeds ``SoftTopK`` to ``forward_hidden`` + ``fused_duo_nelbo`` instead).

``approximation`` (one extra subprocess, dense float64 on a sample of tokens): for each γ, τ, k, the softmax mass
that the dense soft input softmax(w/τ) puts outside the top-k of w, and the L1 distance between the dense soft
embedding softmax(w/τ) @ E and the top-k soft embedding Σ_top softmax(top-k w/τ) E (E: the benchmark model's
embedding matrix). The top-k values of the dense w are, in law, exactly what ``topk_curriculum_inputs`` draws.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import configure_cpu, interleaved, measure_memory, ratio, run_isolated

TAU = 1e-3
GAMMA = -2.5  # timed steps: mid curriculum window ([-3.55, -1.85] OWT, [-3.5, -1.75] LM1B)


def topk_approximation(w, tau: float, k: int, weight):
    """Per-token error of the top-k soft input against the dense one, from a dense latent ``w [N, K]`` (−inf =
    invalid id) and an embedding matrix ``weight [K, d]``. float64 throughout.

    Returns a dict of ``[N]`` float64 tensors:
    ``log_mass_out`` = log Σ_{j ∉ top-k(w)} softmax(w/τ)_j (−inf when nothing is outside; exact even where the mass
    underflows), ``mass_out`` = its exp, ``l1`` = ‖softmax(w/τ) @ E − Σ_{j ∈ top-k} softmax(top-k w/τ)_j E_j‖₁,
    ``dense_l1_norm`` = ‖softmax(w/τ) @ E‖₁.
    """
    import torch

    logits = w.double() / tau
    k = min(int(k), logits.shape[-1])
    E = weight.detach().double()
    lse_all = torch.logsumexp(logits, dim=-1)
    top_vals, top_ids = logits.topk(k, dim=-1)
    outside = logits.scatter(-1, top_ids, float("-inf"))
    log_mass_out = torch.logsumexp(outside, dim=-1) - lse_all
    emb_dense = torch.softmax(logits, dim=-1) @ E
    emb_topk = (torch.softmax(top_vals, dim=-1)[..., None] * E[top_ids]).sum(-2)
    return {"log_mass_out": log_mass_out, "mass_out": log_mass_out.exp(),
            "l1": (emb_dense - emb_topk).abs().sum(-1), "dense_l1_norm": emb_dense.abs().sum(-1)}


def _summary(stats) -> dict:
    import torch

    lm = stats["log_mass_out"]
    log10 = lm / math.log(10.0)
    finite = log10[torch.isfinite(log10)]
    return {
        "mass_out_mean": float(stats["mass_out"].mean()),
        "mass_out_max": float(stats["mass_out"].max()),
        "log10_mass_out_median": float(finite.median()) if finite.numel() else float("-inf"),
        "log10_mass_out_max": float(finite.max()) if finite.numel() else float("-inf"),
        "l1_mean": float(stats["l1"].mean()),
        "l1_max": float(stats["l1"].max()),
        "l1_rel_mean": float((stats["l1"] / stats["dense_l1_norm"]).mean()),
        "l1_rel_max": float((stats["l1"] / stats["dense_l1_norm"]).max()),
    }


def _model(cfg):
    import torch

    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(0)
    model = duo_dit_tiny(cfg["vocab"], cfg["seq_len"], dim=cfg["dim"], n_layers=cfg["layers"], n_heads=4,
                         cond_dim=32)
    with torch.no_grad():  # non-zero output layer so that the loss has a real gradient
        model.output_projection.weight.normal_(0, 0.02)
    return model


def approximation_worker(cfg):
    import torch

    from duo_plugin.diffusion.losses import gaussian_latent
    from duo_plugin.models.dit import SoftTopK, embed_inputs

    torch.set_num_threads(cfg["threads"])
    K, n = cfg["vocab"], cfg["approx_tokens"]
    E = _model(cfg).vocab_embed.weight.detach()
    x0 = torch.randint(0, K, (1, n), generator=torch.Generator().manual_seed(2))
    out = {"tokens": n, "vocab": K, "cases": []}
    for gamma in cfg["approx_gammas"]:
        w = gaussian_latent(x0, gamma, K, torch.Generator().manual_seed(3))[0]  # fp32 [n, K], as the dense path
        for tau in cfg["approx_taus"]:
            for k in cfg["topk"]:
                s = _summary(topk_approximation(w, tau, k, E))
                # what the model actually receives in fp32: dense softmax(w/τ) @ E vs embedding_bag of the top-k
                with torch.no_grad():
                    dense32 = embed_inputs((w / tau)[None], E)[0]
                    tv, ti = w.topk(k, dim=-1)
                    sparse32 = embed_inputs(SoftTopK(ti[None], torch.softmax(tv.double() / tau, -1).float()[None]),
                                            E)[0]
                s["fp32_l1_max"] = float((dense32 - sparse32).abs().sum(-1).max())
                out["cases"].append({"gamma": gamma, "tau": tau, "k": k, **s})
    print(json.dumps(out))


def _make_step(cfg):
    import contextlib

    import torch

    import duo_plugin.kernels as dk
    from duo_plugin.diffusion.losses import curriculum_inputs, duo_nelbo
    from duo_plugin.training.adapt import topk_curriculum_inputs

    K, L, Bsz, tau = cfg["vocab"], cfg["seq_len"], cfg["batch"], TAU
    nelbo_impl = cfg.get("nelbo_impl", "chunked")

    def setup():
        model = _model(cfg)
        x0 = torch.randint(0, K, (Bsz, L), generator=torch.Generator().manual_seed(5))
        return model, x0

    def loss_of(model, x_in, z, x0, a, ap, sigma, override=None):
        ctx = dk.embedding_override(model.vocab_embed, override) if override is not None else contextlib.nullcontext()
        with ctx:
            if cfg["loss"] == "fused":
                h = model.forward_hidden(x_in, sigma)
                proj = model.output_projection
                f = dk.fused_duo_nelbo(h, proj.weight, proj.bias, z, x0, a, ap, impl=nelbo_impl)
            else:
                f = duo_nelbo(model(x_in, sigma), z, x0, a, ap)
        return f.mean()

    def step(state, mode, k=None):
        model, x0 = state
        model.zero_grad(set_to_none=True)
        a = torch.full((Bsz,), 0.6)
        ap = torch.full((Bsz,), -1.0)
        sigma = -torch.log(a)
        gamma = torch.full((Bsz,), GAMMA)
        at, st = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
        gen = torch.Generator().manual_seed(1)
        if mode == "discrete":
            z = torch.where(torch.rand(Bsz, L, generator=gen) < 0.6, x0, torch.randint(0, K, (Bsz, L), generator=gen))
            loss = loss_of(model, z, z, x0, a, ap, sigma)
        elif mode == "dense":
            z, soft = curriculum_inputs(x0, gamma, tau, K, gen)
            loss = loss_of(model, soft, z, x0, a, ap, sigma)
            del soft
        elif mode == "topk":
            z, soft = topk_curriculum_inputs(x0, gamma, tau, k, K, gen)
            loss = loss_of(model, soft, z, x0, a, ap, sigma)
        else:
            seeds = torch.arange(Bsz, dtype=torch.int64)
            emb, z = dk.curriculum_soft_embedding(x0, at, st, tau, seeds, model.vocab_embed.weight,
                                                  impl=cfg.get("curriculum_impl", "chunked"))
            loss = loss_of(model, z, z, x0, a, ap, sigma, override=emb)
        loss.backward()

    return setup, step


def worker(cfg):
    if cfg["mode"] == "approx":
        return approximation_worker(cfg)
    configure_cpu(cfg["threads"])
    setup, step = _make_step(cfg)
    print(json.dumps(measure_memory(setup, lambda st: step(st, cfg["mode"], cfg.get("k")))))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, nargs="+", default=[50258])
    p.add_argument("--seq-len", type=int, nargs="+", default=[1024],
                   help="one value, or one per --vocab entry (e.g. --vocab 50258 151936 --seq-len 1024 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, nargs="+", default=[64, 768])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--loss", choices=["dense", "fused"], default="dense")
    p.add_argument("--modes", nargs="+", choices=["discrete", "dense", "fused", "topk"],
                   default=["discrete", "dense", "fused", "topk"])
    p.add_argument("--topk", type=int, nargs="+", default=[64, 8], help="k values for the topk mode (default 64 8)")
    p.add_argument("--approx-tokens", type=int, default=64, help="tokens in the approximation sample (0: skip)")
    p.add_argument("--approx-gammas", type=float, nargs="+", default=[-3.55, GAMMA, -1.75])
    p.add_argument("--approx-taus", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if "discrete" not in args.modes:
        args.modes = ["discrete", *args.modes]
    lens = args.seq_len if len(args.seq_len) == len(args.vocab) else [args.seq_len[0]] * len(args.vocab)
    report = {"benchmark": "curriculum_step", "device": "cpu", "tau": TAU, "gamma": GAMMA,
              "targets_vs_discrete": {"memory": 1.15, "time": 1.3}, "results": []}
    configure_cpu(args.threads)
    for K, L, d in [(K, L, d) for K, L in zip(args.vocab, lens) for d in args.dim]:
        base = {"vocab": K, "seq_len": L, "batch": args.batch, "dim": d, "layers": args.layers,
                "loss": args.loss, "threads": args.threads}
        names = [(f"topk{k}", "topk", k) for k in args.topk] if "topk" in args.modes else []
        names = [(m, m, None) for m in args.modes if m != "topk"] + names
        setup, step = _make_step(base)
        state = setup()
        t = interleaved({n: (lambda m=m, k=k: step(state, m, k)) for n, m, k in names}, reference="discrete",
                        rounds=args.rounds)
        del state
        res = {"config": base, "time": t}
        mem = {}
        if not args.no_memory:
            mem = {n: run_isolated(__file__, dict(base, mode=m, k=k)) for n, m, k in names}
            res["memory"] = mem
        for n, _, _ in names:
            if n == "discrete":
                continue
            r = {"time": t[n]["ratio"]}
            if mem:
                r["memory"] = ratio(mem[n]["peak_delta_mb"], mem["discrete"]["peak_delta_mb"])
            r["meets_targets"] = r["time"] <= 1.3 and r.get("memory", 0) <= 1.15
            res[f"{n}_vs_discrete"] = r
        print(json.dumps({k: v for k, v in res.items() if k.endswith("_vs_discrete")} | {"config": base}),
              file=sys.stderr, flush=True)
        if args.approx_tokens > 0:
            res["approximation"] = run_isolated(__file__, dict(
                base, mode="approx", topk=args.topk, approx_tokens=args.approx_tokens,
                approx_gammas=args.approx_gammas, approx_taus=args.approx_taus))
        report["results"].append(res)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
