"""duo_eval: NELBO perplexity of a Duo model directory on a held-out split, text files or zero-shot sets.

Estimator (docs/method.md §8, docs/evaluation.md): one stratified t per block per pass (strata over the whole split,
a fresh seeded sequence → stratum permutation every pass), log-linear α, f_Duo summed over the split. The headline
perplexity is per **content token** (BOS/EOS/pad not counted in the denominator); the all-token figure (the paper's
convention for wrapped blocks) is printed beside it. Both are upper bounds. ``mc_passes`` passes are averaged and
give a standard error. Writes ``output_dir/metrics.json`` with the estimator, pass count and standard errors.

With ``dataset.packing: pad`` (one sentence per row) a sentence longer than ``block_size − 2`` tokens does not fit:
``dataset.overlong: split`` (default) cuts it into several rows, ``truncate`` drops its tail (with a warning naming
the count); either way the count is written to ``metrics.json``.

The noise process comes from the model folder's metadata (``eval.processes.process_for``): a Duo/UDLM/DCD model is
scored with the uniform-state f_Duo, an MDLM model with the absorbing process and its ``[MASK]`` id
(docs/evaluation.md §0); ``metrics.json`` names it (``process``).

Datasets (``dataset.source``); ``shakespeare``/``files``/``hub`` go through the data builder of the training recipes
(``duo_plugin.data.blocks``: ``heldout_documents`` + ``eval_blocks``):

* ``shakespeare`` (old name ``corpus``, still accepted): the built-in Shakespeare corpus, held-out split = the last
  ``val_fraction`` of the paragraphs, exactly as ``duo_pretrain`` splits it (the validation set of a
  ``duo/tiny_cpu`` run);
* ``files``: local text/jsonl/parquet files (``dataset.files``), the last ``val_fraction`` held out (0 = all);
* ``hub``: ``dataset.hub: {path, name, split, column, ...}`` as ``duo_pretrain``'s ``data.hub``;
* ``zeroshot``: one or more of the paper's seven sets by name (``dataset.name: ptb`` or ``[ptb, lambada]``), from
  the hub/cache or local files (``dataset.data_files`` / ``dataset.local_dir``); no EOS between documents, the last
  partial block kept.

Run::

    tune run duo_eval --config duo/eval_ppl checkpoint=outputs/demo/final
    python -m duo_plugin.recipes.duo_eval --config duo_plugin/configs/duo/eval_ppl.yaml mc_passes=4

Absolute imports only: torchtune runs registered recipes through ``runpy.run_path``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torchtune import config as tt_config

from duo_plugin.recipes.duo_generate import default_seq_len, open_run
from duo_plugin.training.recipe_utils import ANY, ConfigError, check_keys

# Every key ``run`` reads (see duo_plugin/configs/duo/eval_ppl.yaml and eval_zeroshot.yaml); any other key is a typo
# and an error naming the closest valid key, as in duo_pretrain / duo_distill.
SCHEMA: dict[str, Any] = {
    "checkpoint": None, "weights": None, "tokenizer": None, "output_dir": None, "device": None, "dtype": None,
    "seed": None, "block_size": None, "mc_passes": None, "batch_size": None, "max_blocks": None, "t_min": None,
    "alpha_eps": None, "progress_bar": None,
    "dataset": {"source": None, "val_fraction": None, "packing": None, "files": None, "sample_by": None,
                "column": None, "name": None, "data_files": None, "local_dir": None, "max_docs": None,
                "cache_dir": None, "overlong": None, "hub": ANY},
}


def validate_config(cfg: DictConfig) -> None:
    """Reject unknown keys (``ConfigError`` with a "did you mean" hint) and check the required ones are set."""
    check_keys(cfg, SCHEMA, "")
    for req in ("checkpoint", "output_dir", "dataset", "mc_passes", "seed", "batch_size"):
        if cfg.get(req) is None:
            raise ConfigError(f"config key '{req}' is required (see duo_plugin/configs/duo/eval_ppl.yaml)")
    from duo_plugin.training.config_values import EVAL_TYPES, coerce_config

    coerce_config(cfg, EVAL_TYPES)  # block_size=0 / max_blocks=0 (not "default"/"all"), batch_size=abc: name the key
    if cfg.get("dtype") not in (None, "fp32", "bf16"):
        raise ConfigError(f"dtype must be fp32 or bf16 (bf16 autocast on CUDA only), got {cfg.get('dtype')!r}")


def _list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple, ListConfig)):
        return [str(v) for v in x]
    return [str(x)]


def _split_overlong(docs, room: int, overlong: str):
    """``(docs, n_overlong)``: documents longer than ``room`` tokens cut into ``room``-token pieces (``split``) or
    left for ``pad_sentences`` to truncate (``truncate``, with a warning)."""
    from duo_plugin.data import text as data_text

    td = data_text.as_docs(docs)
    lens = [int(b - a) for a, b in zip(td.offsets[:-1], td.offsets[1:])]
    n_long = sum(1 for n in lens if n > room)
    if not n_long:
        return td, 0
    if overlong == "truncate":
        lost = sum(n - room for n in lens if n > room)
        print(f"duo_eval: WARNING: packing=pad truncates {n_long} of {len(lens)} documents longer than "
              f"block_size-2={room} tokens ({lost} tokens not evaluated); set dataset.overlong: split to keep them",
              file=sys.stderr)
        return td, n_long
    if overlong != "split":
        raise ValueError(f"dataset.overlong must be 'split' or 'truncate', got {overlong!r}")
    pieces = []
    for i, n in enumerate(lens):
        d = td.tokens[int(td.offsets[i]) : int(td.offsets[i + 1])].tolist()
        pieces += [d[j : j + room] for j in range(0, max(n, 1), room)] if n > room else [d]
    print(f"duo_eval: packing=pad: {n_long} of {len(lens)} documents are longer than block_size-2={room} tokens; "
          "each is split into several rows (dataset.overlong: split)", file=sys.stderr)
    return data_text.TokenizedDocs.from_lists(pieces), n_long


#: ``dataset.source`` names of earlier releases -> the data builder's name (both work).
SOURCE_ALIASES = {"corpus": "shakespeare"}
#: the set name in metrics.json per data-builder source
_SET_NAMES = {"shakespeare": "shakespeare_heldout", "files": "files", "hub": "hub"}


def _heldout_blocks(docs, tok, block_size: int, frac: float, packing: str, overlong: str = "split", info=None):
    """Evaluation blocks of tokenized documents (the last ``frac`` held out; 0 = all) through the data builder's
    ``eval_blocks``, with the ``packing: pad`` over-long handling (``info`` receives the count)."""
    from duo_plugin.data import text as data_text
    from duo_plugin.data.blocks import eval_blocks

    if packing not in ("wrap", "pad"):
        raise ValueError(f"dataset.packing must be 'wrap' or 'pad', got {packing!r}")
    if frac > 0:
        if len(docs) < 2:
            raise ValueError("a held-out split needs at least 2 documents; set dataset.val_fraction: 0 to use all")
        _, docs = data_text.split_heldout(docs, fraction=frac)
    if packing == "pad":
        docs, n_long = _split_overlong(docs, block_size - 2, overlong)
        if info is not None:
            info["overlong_docs"], info["overlong"] = n_long, overlong
    return eval_blocks(docs, tok, seq_len=block_size, packing=packing)


def _builder_sets(d, tok, block_size: int, source: str, frac: float, packing: str, overlong: str, info):
    """``{set name: blocks}`` of a data-builder source (``duo_plugin.data.blocks``): the held-out documents exactly as
    duo_pretrain's ``data:`` section with the same values splits them, then :func:`_heldout_blocks`."""
    from duo_plugin.data.blocks import heldout_documents

    if packing not in ("wrap", "pad"):
        raise ValueError(f"dataset.packing must be 'wrap' or 'pad', got {packing!r}")
    hub = d.get("hub")
    docs = heldout_documents(tok, val_fraction=frac, key="dataset", source=source, files=_list(d.get("files")) or None,
                             hub=dict(hub) if hub is not None else None, sample_by=str(d.get("sample_by") or "paragraph"),
                             column=str(d.get("column") or "text"), cache_dir=d.get("cache_dir"))
    return {_SET_NAMES[source]: _heldout_blocks(docs, tok, block_size, 0.0, packing, overlong, info)}


def build_eval_sets(cfg: DictConfig, tok, block_size: int, info=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (blocks Long[N, L], attention_mask Bool[N, L])}`` for the configured dataset (``info``: a dict
    that receives the count of over-long documents with ``packing: pad``)."""
    d = cfg.dataset
    overlong = str(d.get("overlong") or "split")
    src = str(d.get("source") or "corpus")
    src = SOURCE_ALIASES.get(src, src)
    frac = float(d.get("val_fraction") if d.get("val_fraction") is not None else 0.0)
    packing = str(d.get("packing") or "wrap")
    if src in _SET_NAMES:
        return _builder_sets(d, tok, block_size, src, frac, packing, overlong, info)
    if src == "zeroshot":
        from duo_plugin.eval.zeroshot import zeroshot_blocks

        names = _list(d.get("name"))
        if not names:
            raise ValueError("dataset.source=zeroshot needs dataset.name: a set name or a list (ptb, wikitext, lm1b, "
                             "lambada, ag_news, pubmed, arxiv)")
        data_files = d.get("data_files")
        if data_files is not None and len(names) > 1:
            raise ValueError("dataset.data_files applies to one set; evaluate one zero-shot set per run with local files")
        out = {}
        for n in names:
            kw: dict[str, Any] = {}
            if data_files is not None:
                kw["data_files"] = _list(data_files)
            if d.get("local_dir"):
                kw["local_dir"] = str(Path(str(d.local_dir)) / n) if len(names) > 1 else str(d.local_dir)
            if d.get("max_docs"):
                kw["max_docs"] = int(d.max_docs)
            out[n] = zeroshot_blocks(n, tok, block_size, **kw)
        return out
    raise ValueError(f"dataset.source must be shakespeare (alias corpus), files, hub or zeroshot; got {src!r}")


def run(cfg: DictConfig) -> dict:
    """The recipe body (``recipe_main`` = ``@config.parse`` + this); returns the metrics dict."""
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.eval.metrics import NelboSpec, compute_metrics
    from duo_plugin.eval.processes import process_for_model
    from duo_plugin.models.denoiser import DenoiserFn

    validate_config(cfg)
    device, out_dir, model, tok = open_run(cfg)
    if getattr(model, "causal", False):
        raise ValueError(f"{cfg.checkpoint} is a causal (AR) model; duo_eval computes the diffusion NELBO")
    block_size = default_seq_len(model, cfg.get("block_size"))
    if block_size > int(model.max_seq_len):
        raise ValueError(f"block_size={block_size} exceeds the model's max_seq_len={model.max_seq_len}")
    den = DenoiserFn(model, dtype=cfg.get("dtype"))
    schedule = LogLinearSchedule(float(cfg.get("alpha_eps") or 1e-3))
    # the noise process from the model folder's metadata (duo/udlm/dcd: uniform, mdlm: absorbing with its [MASK] id)
    spec = process_for_model(model, str(cfg.checkpoint), schedule=schedule)
    schedule = getattr(spec.process, "schedule", None) or schedule  # a process with its own clock (D3PM) keeps it
    info: dict[str, Any] = {}
    sets = build_eval_sets(cfg, tok, block_size, info)
    metrics: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "weights": str(cfg.get("weights") or "ema"),
                               "process": spec.kind, "block_size": block_size, "mc_passes": int(cfg.mc_passes), "seed": int(cfg.seed),
                               **info, "sets": {}}
    for i, (name, (blocks, mask)) in enumerate(sets.items()):
        if cfg.get("max_blocks"):
            blocks, mask = blocks[: int(cfg.max_blocks)], mask[: int(cfg.max_blocks)]
        t0 = time.perf_counter()
        print(f"duo_eval: set {i + 1}/{len(sets)} {name}: {int(blocks.shape[0])} blocks x {int(cfg.mc_passes)} "
              f"pass(es)", file=sys.stderr, flush=True)
        opts = dict(batch_size=int(cfg.batch_size), mc_passes=int(cfg.mc_passes), seed=int(cfg.seed),
                    valid_vocab=getattr(model, "valid_vocab", None), schedule=schedule,
                    t_min=float(cfg.get("t_min") or 1e-3), device=device, progress=bool(cfg.get("progress_bar", True)),
                    special_ids=(tok.bos_id, tok.eos_id, tok.pad_id), process=spec.process)
        res = compute_metrics(nelbo=NelboSpec(den, blocks, mask, opts))["nelbo"]
        res["blocks"] = int(blocks.shape[0])
        res["seconds"] = time.perf_counter() - t0
        if str(cfg.dataset.get("packing") or "wrap") == "pad" and str(cfg.dataset.get("source") or "corpus") != "zeroshot":
            # pads stay clean and masked from attention: the model is told each sentence's length
            res["estimator"] += "; LENGTH-CONDITIONAL (packing=pad: pads clean and not attended)"
        metrics["sets"][name] = res
        print(f"duo_eval: {name}: NELBO ppl {res['ppl']:.3f} per content token (95% CI {res['ppl_ci'][0]:.3f}-"
              f"{res['ppl_ci'][1]:.3f}; nll/token {res['nll_per_token']:.4f} ± {res['stderr']:.4f} "
              f"[{res['stderr_method']} stderr], {res['tokens']} content tokens); all-token ppl "
              f"{res['ppl_all_tokens']:.3f} ({res['tokens_all']} tokens incl. BOS/EOS); estimator: one stratified t "
              f"per block per pass, {res['passes']} pass(es), {res['seconds']:.1f} s"
              + ("; length-conditional (packing=pad)" if "LENGTH-CONDITIONAL" in res["estimator"] else ""))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@tt_config.parse
def recipe_main(cfg: DictConfig) -> None:
    from duo_plugin.errors import user_errors
    from duo_plugin.runtime import drop_cwd_from_sys_path

    drop_cwd_from_sys_path()  # `tune run` / `python -m` put the working directory (maybe a model folder) on sys.path

    with user_errors("duo_eval"):  # a user error: one line, exit 2 (DUO_DEBUG=1: traceback)
        run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
