"""Does σ-conditioning help when adapting a pretrained AR LLM to Duo?  A CPU-scale measurement for the default of
``model.time_conditioning`` in ``duo/llama3_2_1b_adapt`` and ``duo/qwen2_5_0_5b_adapt`` (docs/llm-adaptation.md).

    python benchmarks/bench_adapt_time_conditioning.py --out outputs/bench_adapt_tc

1. Tiny Llama-3.2- and Qwen-2.5-shaped decoders (torchtune builders) are pretrained *causally* (next-token loss) on
   the built-in Shakespeare paragraphs with a SentencePiece tokenizer trained on them, then written as local HF
   checkpoints (as tests/recipes/test_adapt_recipe.py writes them): a small "pretrained AR LLM".
2. Each is adapted with the SHIPPED adapt config (only paths, tiny shapes, CPU and a short schedule overridden),
   with ``time_conditioning`` false and true, for every seed; the held-out NELBO (content tokens, the recipe's
   validation: same blocks and same noise seed for both variants, so the comparison is paired) is read at every
   ``--eval-every`` steps.
3. The parameter overhead of the conditioning (σ embedder + one adaLN-zero ``Linear(cond_dim, 6d)`` per layer + the
   final ``Linear(cond_dim, 2d)``) is computed for the real Llama-3.2-1B and Qwen2.5-0.5B sizes by building exactly
   those modules.

Writes ``<out>/bench_adapt_time_conditioning.json`` and ``.md``; progress with an ETA on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "duo_plugin" / "configs" / "duo"
STEM = {"llama": "llama3_2_1b_adapt", "qwen": "qwen2_5_0_5b_adapt"}
# published sizes (HF config.json of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-0.5B)
REAL = {"llama": dict(name="Llama-3.2-1B", layers=16, d=2048, params=1_235_814_400),
        "qwen": dict(name="Qwen2.5-0.5B", layers=24, d=896, params=494_032_768)}


def shape(k: int, seq: int) -> dict:
    return dict(vocab_size=k, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=192,
                max_seq_len=seq)


def build_decoder(family: str, shp: dict, seed: int):
    torch.manual_seed(seed)
    if family == "llama":
        from torchtune.models.llama3_2 import llama3_2

        return llama3_2(**shp)
    from torchtune.models.qwen2 import qwen2

    return qwen2(**shp, tie_word_embeddings=True)


def write_hf(dec, family: str, shp: dict, out: Path) -> Path:
    from safetensors.torch import save_file

    dims = dict(num_heads=shp["num_heads"], num_kv_heads=shp["num_kv_heads"], dim=shp["embed_dim"])
    sd = {k: v.detach().clone() for k, v in dec.state_dict().items()}
    if family == "llama":
        from torchtune.models.convert_weights import tune_to_hf

        hf = tune_to_hf(sd, **dims)
    else:
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(sd, tie_word_embeddings=True, **dims)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "num_attention_heads": shp["num_heads"], "num_key_value_heads": shp["num_kv_heads"],
        "hidden_size": shp["embed_dim"], "tie_word_embeddings": True, "vocab_size": shp["vocab_size"]}))
    return out


def pretrain_ar(family: str, shp: dict, blocks: torch.Tensor, steps: int, lr: float, seed: int) -> tuple:
    """Causal next-token training of the bare torchtune decoder; returns (decoder, last-50-step mean loss)."""
    from duo_plugin._progress import Eta

    dec = build_decoder(family, shp, seed)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = Eta(True, steps, f"AR pretrain {family}", unit="step")
    losses = []
    for s in range(steps):
        x = blocks[torch.randint(0, blocks.shape[0], (32,), generator=g)]
        logits = dec(x[:, :-1])  # torchtune decoders are causal without a mask
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        opt.step()
        losses.append(float(loss))
        bar.update(1)
    bar.close()
    return dec.eval(), statistics.mean(losses[-50:])


def adapt_cfg(family: str, hf_dir: Path, tok: Path, corpus: Path, out: Path, shp: dict, *, tc: bool, seed: int,
              args) -> "OmegaConf":
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG_DIR / f"{STEM[family]}.yaml")
    model = {k: v for k, v in shp.items() if k != "vocab_size"}
    model.update(_component_=f"duo_plugin.models.{'duo_llama3_2' if family == 'llama' else 'duo_qwen2_5'}",
                 shift=True, time_conditioning=bool(tc))
    if family == "qwen":
        model["tie_word_embeddings"] = True
    upd = {
        "output_dir": str(out), "seed": seed, "device": "cpu", "dtype": "fp32", "init_from": str(hf_dir),
        "tokenizer.path": str(tok), "data.files": [str(corpus)], "data.seq_len": args.seq_len,
        "data.val_fraction": 0.03, "data.cache_dir": str(out.parent / "cache"), "data.sample_by": "paragraph",
        "model": model, "global_batch_size": 16, "gradient_accumulation_steps": 1, "eval_batch_size": 64,
        "max_steps": args.steps, "optimizer.lr": args.lr, "optimizer.fused": False, "lr_scheduler.warmup_steps": 10,
        "ema.decay": 0.99, "curriculum.steps": args.curriculum, "curriculum.topk": 16,
        "curriculum.table_points": 257, "curriculum.table_cache": str(out.parent / "duality_cache"),
        "eval_every": args.eval_every, "eval_max_batches": None, "checkpoint.every": 0,
        "enable_activation_checkpointing": False, "progress_bar": True, "log_every": 10, "overwrite": True,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")},
    }
    for k, v in upd.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def val_curve(out: Path) -> dict:
    """{step: val_nll} from the DiskLogger log."""
    import re

    curve = {}
    for f in sorted((out / "logs").glob("*.txt")):
        for line in f.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line.strip())
            if m:
                parts = dict(p.split(":", 1) for p in m.group(2).split() if ":" in p)
                if "val_nll" in parts:
                    curve[int(m.group(1))] = float(parts["val_nll"])
    return curve


def overhead(family: str, cond_dim: int = 128, freq_dim: int = 256) -> dict:
    """Parameters the time conditioning adds at the real size: built module by module (as DecoderDenoiser does)."""
    from duo_plugin.models.dit import TimestepEmbedder

    r = REAL[family]
    n_sigma = sum(p.numel() for p in TimestepEmbedder(cond_dim, freq_dim, 10_000.0).parameters())
    n_layer = sum(p.numel() for p in torch.nn.Linear(cond_dim, 6 * r["d"]).parameters())
    n_final = sum(p.numel() for p in torch.nn.Linear(cond_dim, 2 * r["d"]).parameters())
    extra = n_sigma + r["layers"] * n_layer + n_final
    # training state per parameter: bf16 weight copy is the param itself in fp32 here (fp32 master + AdamW m, v + EMA)
    return {"model": r["name"], "base_params": r["params"], "extra_params": extra,
            "extra_fraction": extra / r["params"], "extra_train_state_mb_fp32_adamw_ema": extra * 16 / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench_adapt_tc"))
    ap.add_argument("--families", default="llama,qwen")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ar-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--curriculum", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--paragraphs", type=int, default=4000)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from duo_plugin.data.corpora import shakespeare_documents
    from duo_plugin.data.text import wrap_blocks
    from duo_plugin.data.tokenizers import load_tokenizer, train_sentencepiece
    from duo_plugin.recipes import duo_pretrain as dp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = out / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text("\n\n".join(shakespeare_documents("paragraph")[: args.paragraphs]) + "\n", encoding="utf-8")
    tok_dir = out / "tokenizer"
    if not tok_dir.is_dir():
        train_sentencepiece([corpus], 512, tok_dir)
    tok = load_tokenizer(tok_dir)
    k = int(tok.vocab_size) + 64  # padded embedding rows, as the real checkpoints have
    docs = [tok.encode(p, add_bos=False, add_eos=False) for p in corpus.read_text().split("\n\n") if p.strip()]
    n_train = len(docs) - max(1, int(0.03 * len(docs)))  # the AR model never sees the held-out tail either
    blocks = wrap_blocks(docs[:n_train], args.seq_len + 1, tok.bos_id, tok.eos_id)
    shp = shape(k, args.seq_len + 1)
    results = {"args": vars(args), "runs": [], "ar": {}, "overhead": {}}
    seeds = [int(s) for s in args.seeds.split(",")]
    for fam in args.families.split(","):
        results["overhead"][fam] = overhead(fam)
        hf_dir = out / f"hf_{fam}"
        dec, ar_loss = pretrain_ar(fam, shp, blocks, args.ar_steps, 3e-3, seed=0)
        write_hf(dec, fam, shp, hf_dir)
        results["ar"][fam] = {"train_loss_last50": ar_loss}
        for seed in seeds:
            for tc in (False, True):
                run_dir = out / f"{fam}_tc{int(tc)}_s{seed}"
                ts = time.perf_counter()
                summ = dp.run(adapt_cfg(fam, hf_dir, tok_dir, corpus, run_dir, shp, tc=tc, seed=seed, args=args))
                row = {"family": fam, "time_conditioning": tc, "seed": seed, "wall_s": time.perf_counter() - ts,
                       "final_val_nll": summ["final_val"]["val_nll"], "curve": val_curve(run_dir),
                       "final_train_loss": summ["final_loss"]}
                results["runs"].append(row)
                print(json.dumps({k2: v for k2, v in row.items() if k2 != "curve"}), flush=True)
    results["total_s"] = time.perf_counter() - t0
    (out / "bench_adapt_time_conditioning.json").write_text(json.dumps(results, indent=2))
    md = ["| family | seed | val NELBO/token, tc=false | tc=true | difference (true - false) |", "|---|---:|---:|---:|---:|"]
    for fam in args.families.split(","):
        for seed in seeds:
            a = [r for r in results["runs"] if r["family"] == fam and r["seed"] == seed]
            f = next(r["final_val_nll"] for r in a if not r["time_conditioning"])
            t = next(r["final_val_nll"] for r in a if r["time_conditioning"])
            md.append(f"| {fam} | {seed} | {f:.4f} | {t:.4f} | {t - f:+.4f} |")
    md += ["", "| model | base params | added by time conditioning | fraction | + fp32 AdamW/EMA state |",
           "|---|---:|---:|---:|---:|"]
    for o in results["overhead"].values():
        md.append(f"| {o['model']} | {o['base_params']:,} | {o['extra_params']:,} | {100 * o['extra_fraction']:.2f} % "
                  f"| {o['extra_train_state_mb_fp32_adamw_ema']:.0f} MiB |")
    (out / "bench_adapt_time_conditioning.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
