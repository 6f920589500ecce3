"""Did the model learn anything? Content-token perplexity next to a unigram baseline of the same tokens.

A diffusion LM first learns the token marginal: its NELBO perplexity falls from ~K to about the unigram perplexity
of the data and can stay there for a long time (docs/demo-investigation.md).  A falling validation PPL therefore
reads as learning even when the model ignores its context.  This module puts the two numbers side by side:

* **model**: the validation NELBO (Duo; :func:`duo_plugin.eval.likelihood.nelbo_perplexity`, per content token) or
  next-token NLL (``objective=ar``) per *content* token (BOS/EOS/PAD/UNK are not counted; they stay in the input),
  with ``passes`` Monte Carlo passes of stratified times for Duo;
* **unigram**: the perplexity of the same validation content tokens under a unigram model fitted on the training
  split (add-``smoothing`` counts over the content vocabulary) — the best any model that ignores context can expect
  to do on held-out text, up to the fit.

``python -m duo_plugin.eval.learning OUTPUT_DIR`` reads ``OUTPUT_DIR/torchtune_config.yaml`` (written by
``duo_pretrain``) and ``OUTPUT_DIR/final``, rebuilds the same held-out split and prints/writes ``learning.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["content_mask", "unigram_ppl", "content_ppl", "split_blocks", "learning_report", "read_log_curve",
           "plot_training_curve", "main"]


def content_mask(blocks: torch.Tensor, mask: Optional[torch.Tensor], special_ids: Sequence[int]) -> torch.Tensor:
    """``Bool[N, L]``: real (``mask``) positions whose id is not one of ``special_ids``."""
    keep = torch.ones_like(blocks, dtype=torch.bool) if mask is None else mask.bool().clone()
    for s in special_ids:
        keep &= blocks != int(s)
    return keep


def unigram_ppl(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int, special_ids: Sequence[int] = (),
                smoothing: float = 1.0) -> float:
    """Perplexity of the 1-D ``val_ids`` under the add-``smoothing`` unigram of ``train_ids`` over the
    ``vocab_size - len(special_ids)`` content ids (special ids are dropped from both)."""
    special = torch.tensor(sorted({int(s) for s in special_ids}), dtype=torch.long)
    tr = train_ids.reshape(-1).long()
    va = val_ids.reshape(-1).long()
    if special.numel():
        tr = tr[~torch.isin(tr, special)]
        va = va[~torch.isin(va, special)]
    if va.numel() == 0:
        raise ValueError("no content token to score")
    counts = torch.bincount(tr, minlength=vocab_size).double() + float(smoothing)
    if special.numel():
        counts[special] = 0.0
    logp = counts.log() - counts.sum().log()
    return math.exp(-float(logp[va].mean()))


def _ar_content_nll(model, blocks, mask, score, batch_size, device) -> tuple[float, int]:
    tot, n = 0.0, 0
    for lo in range(0, blocks.shape[0], batch_size):
        x0 = blocks[lo:lo + batch_size].to(device)
        m = mask[lo:lo + batch_size].to(device)
        sc = score[lo:lo + batch_size].to(device)
        kw = {"padding_mask": m} if not bool(m.all()) else {}
        log_p = model(x0, torch.zeros(x0.shape[0], device=device), **kw)
        nll = -log_p[:, :-1].gather(-1, x0[:, 1:, None]).squeeze(-1).double()
        tm = sc[:, 1:] & m[:, :-1]
        tot += float((nll * tm).sum())
        n += int(tm.sum())
    return tot / max(n, 1), n


def content_ppl(model, blocks: torch.Tensor, mask: torch.Tensor, special_ids: Sequence[int], *,
                objective: str = "duo", passes: int = 4, seed: int = 0, valid_vocab=None, t_min: float = 1e-3,
                alpha_eps: float = 1e-3, batch_size: int = 64, device="cpu") -> dict:
    """Per-content-token perplexity of ``blocks`` (``mask``: real positions; ``special_ids`` are not content).

    Duo: :func:`duo_plugin.eval.likelihood.nelbo_perplexity` with ``special_ids`` (the NELBO of the blocks divided by
    the number of content tokens, an upper bound; ``passes`` Monte Carlo passes, standard error between passes).
    AR: exp of the mean next-token NLL of content targets."""
    model.eval()
    if objective == "ar":
        score = content_mask(blocks, mask, special_ids)
        with torch.no_grad():
            nll, n = _ar_content_nll(model, blocks, mask, score, batch_size, device)
        return {"ppl": math.exp(nll), "nll": nll, "stderr": 0.0, "tokens": n, "passes": 1}
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.eval.likelihood import nelbo_perplexity
    from duo_plugin.models.denoiser import DenoiserFn

    r = nelbo_perplexity(DenoiserFn(model), blocks, mask, batch_size=batch_size, mc_passes=int(passes), seed=seed,
                         valid_vocab=valid_vocab, schedule=LogLinearSchedule(eps=alpha_eps), t_min=t_min,
                         device=device, progress=False, special_ids=list(special_ids))
    return {"ppl": r["ppl"], "nll": r["nll_per_token"], "stderr": r["stderr"], "tokens": r["tokens"],
            "passes": r["passes"], "ppl_all_tokens": r["ppl_all_tokens"]}


def split_blocks(cfg, tokenizer):
    """(train_ids 1-D, val_blocks, val_mask) exactly as ``duo_pretrain`` builds them from ``cfg.data`` (the data
    builder ``data._component_``, default :func:`duo_plugin.data.text_blocks`)."""
    from omegaconf import OmegaConf

    from duo_plugin.data.blocks import text_blocks

    d = OmegaConf.to_container(cfg.data, resolve=True)
    comp = d.pop("_component_", None)
    builder = text_blocks
    if comp:  # the run's own data builder (a dotted path the user put in their config)
        import importlib

        mod, _, name = str(comp).rpartition(".")
        builder = getattr(importlib.import_module(mod), name)
    tb = builder(tokenizer, **{k: v for k, v in d.items() if v is not None})
    if tb.val is None:
        raise ValueError("learning report: the run has no held-out split (data.val_fraction / data.val_docs)")
    vm = tb.val.attention_mask
    if vm is None:
        vm = torch.ones_like(tb.val.blocks, dtype=torch.bool)
    return tb.train.blocks.reshape(-1), tb.val.blocks, vm


def learning_report(out_dir, *, passes: int = 4, max_val_blocks: Optional[int] = None, weights: str = "ema",
                    model_dir=None) -> dict:
    """Model content-token PPL vs the unigram PPL of the same validation tokens for a ``duo_pretrain`` run."""
    from omegaconf import OmegaConf

    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.models.checkpoint import decode_valid_vocab, load_pretrained, read_duo_config

    out = Path(out_dir)
    cfg_file = out / "torchtune_config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: pass the output_dir of a duo_pretrain run")
    cfg = OmegaConf.load(cfg_file)
    final = Path(model_dir) if model_dir else out / "final"
    dcfg = read_duo_config(final)
    tok = load_tokenizer(final / "tokenizer")
    model = load_pretrained(final, weights=weights).eval()
    special = sorted({int(s) for s in (dcfg.get("metadata", {}).get("tokenizer", {}).get("special_ids") or [])}
                     | {i for i in (tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None)) if i is not None})
    train_ids, vb, vm = split_blocks(cfg, tok)
    if max_val_blocks:
        vb, vm = vb[:max_val_blocks], vm[:max_val_blocks]
    score = content_mask(vb, vm, special)
    objective = "ar" if getattr(model, "causal", False) else "duo"  # a causal backbone is scored next-token
    valid = decode_valid_vocab(dcfg.get("valid_vocab"), model.vocab_size)
    s = cfg.get("schedule") or {}
    res = content_ppl(model, vb, vm, special, objective=objective, passes=passes, seed=int(cfg.get("seed") or 0),
                      valid_vocab=valid, t_min=float(s.get("t_min", 1e-3)), alpha_eps=float(s.get("alpha_eps", 1e-3)))
    uni = unigram_ppl(train_ids, vb[score], model.vocab_size, special)
    report = {"objective": objective, "model_ppl": res["ppl"], "model_nll": res["nll"], "model_nll_stderr":
              res["stderr"], "passes": res["passes"], "unigram_ppl": uni, "content_tokens": int(score.sum()),
              "beats_unigram": bool(res["ppl"] < uni), "ratio": res["ppl"] / uni,
              "step": dcfg.get("metadata", {}).get("step")}
    return report


def format_report(r: dict) -> str:
    bound = "NELBO (upper bound)" if r["objective"] != "ar" else "next-token"
    verdict = (f"beats the unigram baseline by {100 * (1 - r['ratio']):.0f}%" if r["beats_unigram"]
               else "does NOT beat the unigram baseline: the model has not learned to use context yet")
    return (f"validation content tokens ({r['content_tokens']}): model {bound} PPL {r['model_ppl']:.1f} vs unigram PPL "
            f"{r['unigram_ppl']:.1f} -> {verdict}")


def plateau_advice(report: dict, *, steps: int, max_steps: int, val_curve: Sequence[tuple[int, float]] = (),
                   escape_ratio: float = 0.8) -> list[str]:
    """What to change when a run has not left the unigram plateau (docs/small-scale-training.md): ``[]`` when the
    model is at least ``1 - escape_ratio`` below the unigram PPL, else advice lines.  ``val_curve``: the run's
    ``(step, validation PPL)`` evaluations (``read_log_curve(...)["val_ppl"]``), read for the trend of the last half."""
    ratio = float(report["ratio"])
    if ratio <= escape_ratio:
        return []
    lines = [f"the model is {'above' if ratio >= 1 else f'only {100 * (1 - ratio):.0f}% below'} the unigram "
             f"PPL (a model that has left the plateau is >= {100 * (1 - escape_ratio):.0f}% below it)."]
    if steps < max_steps:
        lines.append(f"training stopped at step {steps} of {max_steps} (max_wall_s): rerun with max_wall_s=null.")
    curve = sorted((int(s), float(v)) for s, v in val_curve if int(s) > 0)
    half = [v for s, v in curve if s >= curve[-1][0] / 2] if curve else []
    falling = len(half) >= 2 and half[-1] < 0.9 * half[0]
    if falling:
        lines.append(f"its validation PPL is still falling ({half[0]:.1f} -> {half[-1]:.1f} over the last half): "
                     f"train longer, e.g. max_steps={2 * max(steps, 1)} (resume=true continues this run).")
    else:
        lines.append("its validation PPL is flat: with 32 sequences per step the gradient is mostly noise on the "
                     "plateau (its noise scale is larger than the batch), so whether and when a diffusion model "
                     "leaves it depends on the seed and the corpus. Use a larger batch: global_batch_size=128 "
                     "(--config duo/small_cpu, duo/udlm_small_cpu or duo/mdlm_small_cpu), with "
                     "gradient_accumulation_steps if memory is short; a wider model alone does not help "
                     "(docs/small-scale-training.md).")
    lines.append("a tokenizer with fewer pieces (tokenizer.train.vocab_size) also shortens the plateau: the uniform "
                 "noise spreads over fewer ids (docs/demo-investigation.md).")
    return lines


def read_log_curve(log_dir) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from torchtune ``DiskLogger`` files (``Step N | key:value ...`` lines)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(log_dir).glob("*.txt")):
        for line in f.read_text().splitlines():
            if not line.startswith("Step ") or " | " not in line:
                continue
            head, _, rest = line.partition(" | ")
            try:
                step = int(head.split()[1])
            except (IndexError, ValueError):
                continue
            for item in rest.split():
                key, _, val = item.partition(":")
                try:
                    curves.setdefault(key, []).append((step, float(val)))
                except ValueError:
                    pass
    return curves


def plot_training_curve(out_dir, png=None, unigram_ppl: Optional[float] = None) -> Optional[Path]:
    """Training loss and validation PPL of a ``duo_pretrain`` run (``out_dir/logs``) as a PNG (default
    ``out_dir/training_curve.png``), with the unigram perplexity as a reference line.  Needs matplotlib (the
    ``plots`` extra: ``pip install -e '.[plots]'``); returns None without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out = Path(out_dir)
    c = read_log_curve(out / "logs")
    png = Path(png) if png else out / "training_curve.png"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if c.get("loss"):
        a1.plot(*zip(*c["loss"]), lw=0.8)
    a1.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    if c.get("val_ppl"):
        a2.plot(*zip(*c["val_ppl"]), marker="o", label="validation PPL (all tokens)")
    if unigram_ppl:
        a2.axhline(unigram_ppl, color="gray", ls="--", label=f"unigram PPL of content tokens ({unigram_ppl:.0f})")
    a2.set(xlabel="step", ylabel="perplexity", yscale="log", title="validation")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m duo_plugin.eval.learning", description=__doc__.split("\n")[0])
    ap.add_argument("output_dir", help="a duo_pretrain output_dir (holds torchtune_config.yaml and final/)")
    ap.add_argument("--passes", type=int, default=4, help="Monte Carlo passes of the NELBO (Duo)")
    ap.add_argument("--max-val-blocks", type=int, default=None)
    ap.add_argument("--model-dir", default=None, help="default: OUTPUT_DIR/final")
    a = ap.parse_args(argv)
    try:
        r = learning_report(a.output_dir, passes=a.passes, max_val_blocks=a.max_val_blocks, model_dir=a.model_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (Path(a.output_dir) / "learning.json").write_text(json.dumps(r, indent=2))
    print(format_report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
