"""duo_generate: sample text from any model directory the toolkit trains (Duo/UDLM/DCD, MDLM, AR): ancestral /
Greedy-Tail / Ψ, nucleus, prompts, infilling, prompt guidance, block generation beyond the context, variable-length
output; docs/sampling.md.

Sampler: :func:`duo_plugin.sampling.generate` picks the process from the folder's metadata (the scheduler for a
diffusion model, one float64 loop on linspace(1, t_eps, steps + 1), one noise-removal call at t_eps, NFE = steps + 1;
KV-cache decoding for an AR model); the recipe has no process branch. Writes ``output_dir/samples.jsonl`` (one line per sample: text,
ids, steps, mode, prompt index, seed) and ``output_dir/metrics.json`` (NFE, timing, mean unigram entropy, and Gen
PPL when ``genppl`` is configured; Gen PPL is always reported together with entropy).

Run::

    tune run duo_generate --config duo/generate checkpoint=outputs/demo/final
    python -m duo_plugin.recipes.duo_generate --config duo_plugin/configs/duo/generate.yaml steps=32

Prompts: ``prompts: ["To be", "The king"]`` (each gets ``num_samples`` samples; BOS is prepended when ``add_bos``).
Infilling: ``infill: "The king [MASK:6] the queen [MASK] ."`` — the template's text tokens are clamped, each
``[MASK]`` is one free position and ``[MASK:n]`` is n free positions; positions after the template are free too.

Absolute imports only: torchtune runs registered recipes through ``runpy.run_path``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tt_config
from torchtune import utils as tt_utils

from duo_plugin._progress import eta_lines
from duo_plugin.training.recipe_utils import ANY, ConfigError, check_keys

log = logging.getLogger("duo_plugin.recipes.duo_generate")

# Every key ``run`` reads (see duo_plugin/configs/duo/generate.yaml); any other key is a typo and an error naming the
# closest valid key, as in duo_pretrain / duo_distill.
SCHEMA: dict[str, Any] = {
    "checkpoint": None, "weights": None, "tokenizer": None, "output_dir": None, "device": None, "dtype": None,
    "seed": None, "num_samples": None, "batch_size": None, "seq_len": None, "steps": None, "noise_removal": None,
    "top_p": None, "temperature": None, "t_eps": None, "alpha_eps": None, "add_bos": None, "prompts": None,
    "infill": None, "progress_bar": None, "predictor": None, "guidance_weight": None, "posterior_impl": None,
    "psi": {"high_mode": None, "middle_mode": None, "low_mode": None, "high_frac": None, "middle_frac": None,
            "time_profile": None},
    "blocks": {"n_blocks": None, "block_len": None}, "variable_length": None,
    "genppl": {"path": None, "scorer": None, "weights": None, "builder": None, "builder_kwargs": ANY,
               "model_type": None, "tokenizer": None, "eos_id": None, "batch_size": None, "max_len": None},
}


def validate_config(cfg: DictConfig) -> None:
    """Reject unknown keys (``ConfigError`` with a "did you mean" hint) and check the required ones are set."""
    check_keys(cfg, SCHEMA, "")
    for req in ("checkpoint", "output_dir", "steps", "num_samples"):
        if cfg.get(req) is None:
            raise ConfigError(f"config key '{req}' is required (see duo_plugin/configs/duo/generate.yaml)")
    from duo_plugin.training.config_values import GENERATE_TYPES, coerce_config

    coerce_config(cfg, GENERATE_TYPES)  # add_bos=maybe, batch_size=abc: errors naming the key (strict booleans)
    if cfg.get("dtype") not in (None, "fp32", "bf16"):
        raise ConfigError(f"dtype must be fp32 or bf16 (bf16 autocast on CUDA only), got {cfg.get('dtype')!r}")
    sampling_params(cfg)  # top_p / temperature / steps / counts: wrong values are errors naming the key


def sampling_params(cfg: DictConfig) -> dict[str, Any]:
    """The checked numeric options: the sampler's (``steps``, ``top_p``, ``temperature``, ``guidance_weight``,
    ``t_eps``: checked by :class:`~duo_plugin.sampling.SamplerOptions`, never silently replaced, e.g. ``top_p=0`` or
    ``temperature=0`` is an error pointing to ``noise_removal=greedy``) and the recipe's (``num_samples``, ``seed``,
    ``batch_size``, ``seq_len``, ``alpha_eps``)."""
    from duo_plugin.training.config_values import read_float, read_int

    opts = recipe_options(cfg)
    out: dict[str, Any] = {k: getattr(opts, k) for k in ("steps", "top_p", "temperature", "guidance_weight", "t_eps")}
    out["num_samples"] = read_int("num_samples", cfg.get("num_samples"), minimum=1)
    v = cfg.get("alpha_eps")
    out["alpha_eps"] = 1e-3 if v is None else read_float("alpha_eps", v, positive=True)
    for key in ("seed", "batch_size", "seq_len"):
        v = cfg.get(key)
        out[key] = None if v is None else read_int(key, v, minimum=0 if key == "seed" else 1)
    return out


def recipe_options(cfg) -> "SamplerOptions":
    """The :class:`~duo_plugin.sampling.SamplerOptions` of this config (``steps``, ``noise_removal``, ``top_p``,
    ``temperature``, ``t_eps``, ``predictor``, ``psi:``, ``guidance_weight``, ``posterior_impl``, ``blocks:``,
    ``batch_size`` = rows per denoiser call, ``progress_bar``); a bad value is a ``ConfigError`` naming the key."""
    from duo_plugin.sampling import SamplerOptions

    try:
        return SamplerOptions.from_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


_MASK_RE = re.compile(r"\[MASK(?::(\d+))?\]")
_MASK_ANY = re.compile(r"\[MASK\b[^\]\[]*\]?")  # every "[MASK..." marker, well-formed or not


def check_infill_markers(template: str) -> None:
    """Every ``[MASK...`` in an infill template must be ``[MASK]`` or ``[MASK:n]`` with n >= 1 (a malformed marker
    would silently stay literal text)."""
    for m in _MASK_ANY.finditer(template):
        ok = _MASK_RE.fullmatch(m.group(0))
        if ok is None:
            raise ConfigError(f"infill marker {m.group(0)!r} at character {m.start()} is malformed: write [MASK] "
                              "(one position) or [MASK:n] (n positions, n >= 1), closed with ']'")
        if ok.group(1) is not None and int(ok.group(1)) < 1:
            raise ConfigError(f"infill marker {m.group(0)!r} at character {m.start()} asks for 0 positions: use "
                              "[MASK:n] with n >= 1, or remove it")


def open_run(cfg: DictConfig):
    """Common start of the generation/evaluation recipes: ``(device, output_dir (created), model, tokenizer)``."""
    from duo_plugin.runtime import check_device

    check_device(cfg.get("device") or "cpu")  # cuda without CUDA: an error, never a silent CPU run
    device = tt_utils.get_device(str(cfg.get("device") or "cpu"))
    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_and_tokenizer(cfg.checkpoint, cfg.get("weights") or "ema", cfg.get("tokenizer"), device)
    return device, out_dir, model, tok


def load_model_and_tokenizer(checkpoint: str, weights: str, tokenizer_path: Optional[str], device):
    """``load_pretrained`` + the tokenizer: ``tokenizer_path``, else ``<checkpoint>/tokenizer``, else the
    descriptor stored in the checkpoint's metadata."""
    import duo_plugin.integrations.torchtune_tokenizer  # noqa: F401  (registers the 'torchtune' descriptor loader)
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.models.checkpoint import load_pretrained

    ckpt = Path(str(checkpoint))
    if not ckpt.is_dir():
        raise FileNotFoundError(
            f"checkpoint {ckpt} is not a directory: pass checkpoint=<model dir> (e.g. <pretrain output_dir>/final)"
        )
    model = load_pretrained(ckpt, weights=str(weights), device=device)
    if tokenizer_path:
        tok = load_tokenizer(str(tokenizer_path))
    elif (ckpt / "tokenizer").exists():
        tok = load_tokenizer(ckpt / "tokenizer")
    elif isinstance(getattr(model, "duo_metadata", {}).get("tokenizer"), dict):
        tok = load_tokenizer(model.duo_metadata["tokenizer"], base=ckpt)  # files inside the folder only
    else:
        raise FileNotFoundError(f"no tokenizer for {ckpt}: set tokenizer=<path> (dir, .model or tokenizer.json)")
    if int(tok.vocab_size) > int(model.vocab_size):
        raise ValueError(
            f"tokenizer vocab {tok.vocab_size} > model vocab {model.vocab_size}: the tokenizer does not match the model"
        )
    return model, tok


def default_seq_len(model, cfg_value) -> int:
    if cfg_value:
        return int(cfg_value)
    meta = getattr(model, "duo_metadata", {}) or {}
    return int(meta.get("seq_len") or model.max_seq_len)


def build_infill(template: str, tokenizer, seq_len: int, add_bos: bool):
    """Template → ``(clamp_mask Bool[L], clamp_values Long[L])`` (see module docstring)."""
    check_infill_markers(template)
    ids: list[int] = [tokenizer.bos_id] if add_bos else []
    free: list[bool] = [False] * len(ids)
    pos = 0
    for m in _MASK_RE.finditer(template):
        text = template[pos : m.start()]
        if text:
            t = tokenizer.encode(text, add_bos=False, add_eos=False)
            ids += t
            free += [False] * len(t)
        n = int(m.group(1) or 1)
        ids += [0] * n
        free += [True] * n
        pos = m.end()
    tail = template[pos:]
    if tail:
        t = tokenizer.encode(tail, add_bos=False, add_eos=False)
        ids += t
        free += [False] * len(t)
    if len(ids) > seq_len:
        raise ValueError(f"the infill template needs {len(ids)} positions but seq_len={seq_len}")
    if not any(free) and len(ids) == seq_len:
        raise ValueError("the infill template leaves no free position: add [MASK] / [MASK:n] spans")
    mask = torch.zeros(seq_len, dtype=torch.bool)
    vals = torch.zeros(seq_len, dtype=torch.long)
    mask[: len(ids)] = ~torch.tensor(free, dtype=torch.bool)
    vals[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return mask, vals


def load_scorer(gcfg: DictConfig, diffusion_tokenizer, device):
    """(scorer, scorer_tokenizer, eos_id) from the ``genppl`` config section."""
    from duo_plugin.data.tokenizers import load_tokenizer

    kind = str(gcfg.get("scorer") or "dit")
    path = gcfg.get("path")
    if not path:
        raise ValueError("genppl.path is required: a causal scorer checkpoint dir")
    if kind == "hf":  # any local Hugging Face causal-LM dir (e.g. gpt2-large, the paper's scorer); brings its tokenizer
        from duo_plugin.eval.genppl import load_hf_scorer

        scorer = load_hf_scorer(str(path), device=str(device))
        eos = gcfg.get("eos_id")
        return scorer, scorer.tokenizer, int(eos) if eos is not None else scorer.eos_id
    if kind == "dit":
        from duo_plugin.eval.genppl import load_dit_scorer

        scorer = load_dit_scorer(str(path), weights=str(gcfg.get("weights") or "ema"), device=device)
        default_tok = Path(str(path)) / "tokenizer"
    elif kind == "torchtune":
        from duo_plugin.integrations.torchtune_scorer import load_torchtune_scorer

        if not gcfg.get("builder") or not gcfg.get("model_type"):
            raise ValueError("genppl.scorer=torchtune needs genppl.builder (dotpath) and genppl.model_type")
        kw = OmegaConf.to_container(gcfg.get("builder_kwargs") or {}, resolve=True)
        scorer = load_torchtune_scorer(str(gcfg.builder), str(path), model_type=str(gcfg.model_type),
                                       builder_kwargs=kw, device=device)
        default_tok = Path(str(path))
    else:
        raise ValueError(f"genppl.scorer must be 'dit', 'torchtune' or 'hf', got {kind!r}")
    tpath = gcfg.get("tokenizer")
    if tpath:
        stok = load_tokenizer(str(tpath))
    elif default_tok.exists():
        try:
            stok = load_tokenizer(default_tok)
        except FileNotFoundError:
            stok = diffusion_tokenizer
    else:
        stok = diffusion_tokenizer
    eos = gcfg.get("eos_id")
    eos = int(eos) if eos is not None else int(stok.eos_id)
    return scorer, stok, eos


def sampler_options(cfg) -> dict:
    """:func:`recipe_options` as a plain dict (``psi`` as its mapping)."""
    return recipe_options(cfg).as_dict()


def build_jobs(cfg, tok, seq_len: int, n_blocks: int) -> list[dict[str, Any]]:
    """One job per prompt (``prompt_ids``), one for the infill template (``clamp``: a ``sampling.Clamp``), or one
    unconditional job."""
    add_bos = bool(cfg.get("add_bos", True))
    prompts, infill = cfg.get("prompts"), cfg.get("infill")
    if prompts and infill:
        raise ValueError("set either prompts or infill, not both")
    if infill and n_blocks:
        raise ValueError("blocks.n_blocks > 0 generates beyond the context from a prompt; it cannot be combined with "
                         "infill (set blocks.n_blocks=0)")
    if infill:
        from duo_plugin.sampling import Clamp

        m, v = build_infill(str(infill), tok, seq_len, add_bos)
        return [{"prompt": str(infill), "clamp": Clamp(m, v)}]
    if prompts:
        jobs = []
        for p in [prompts] if isinstance(prompts, str) else list(prompts):
            ids = ([tok.bos_id] if add_bos else []) + tok.encode(str(p), add_bos=False, add_eos=False)
            jobs.append({"prompt": str(p), "prompt_ids": torch.tensor(ids, dtype=torch.long)})
        return jobs
    return [{"prompt": None}]


def run(cfg: DictConfig) -> dict:
    """The recipe body (``recipe_main`` = ``@config.parse`` + this); returns the metrics dict."""
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, unigram_entropy
    from duo_plugin.sampling import DenoiserFn, generate, model_kind, trim_at_eos

    validate_config(cfg)
    device, out_dir, model, tok = open_run(cfg)
    seq_len = default_seq_len(model, cfg.get("seq_len"))
    if seq_len > int(model.max_seq_len):
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
    params = sampling_params(cfg)
    opts = recipe_options(cfg)
    steps, mode, num, seed = opts.steps, opts.noise_removal, params["num_samples"], params["seed"] or 0
    eos_id = int(tok.eos_id) if bool(cfg.get("variable_length", False)) else None
    kind = model_kind(model)  # reported only: generate() picks the process from the folder's metadata
    jobs = build_jobs(cfg, tok, seq_len, opts.n_blocks)
    den = DenoiserFn(model, dtype=cfg.get("dtype"))
    schedule = LogLinearSchedule(params["alpha_eps"])
    bos = int(tok.bos_id) if bool(cfg.get("add_bos", True)) else None  # start token of left-to-right decoding

    all_ids, records = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    nfe, lengths_all = 0, []
    for j, job in enumerate(jobs):
        with eta_lines():  # the sampler's bar on a terminal, else an ETA line every 30 s
            res = generate(model, opts, batch_size=num, seq_len=seq_len, prompt=job.get("prompt_ids"),
                           clamp=job.get("clamp"), seed=seed + j,
                           eos_id=eos_id, start_id=bos, denoiser=den, schedule=schedule)
        nfe, tokens = res.nfe, res.tokens
        ids = tokens.cpu()
        all_ids.append(ids)
        p_len = len(job["prompt_ids"]) if job.get("prompt_ids") is not None else 0
        rows, lengths = trim_at_eos(ids, eos_id, start=p_len) if eos_id is not None else (ids.tolist(), None)
        for i, row in enumerate(rows):
            rec = {"text": tok.decode(row), "ids": row, "steps": steps, "mode": mode, "prompt": job["prompt"],
                   "prompt_index": j if job["prompt"] is not None else None, "seed": seed + j}
            if lengths is not None:
                rec["length"] = int(lengths[i])
                lengths_all.append(int(lengths[i]))
            records.append(rec)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ids = torch.cat(all_ids, 0)
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    ent = unigram_entropy(ids)
    metrics: dict[str, Any] = {
        "num_samples": int(ids.shape[0]),
        "seq_len": seq_len,
        "steps": steps,
        "noise_removal": mode,
        "nfe": nfe,
        "objective": str((getattr(model, "duo_metadata", None) or {}).get("objective") or "duo"),
        "process": kind,
        "predictor": opts.predictor,
        "guidance_weight": opts.guidance_weight,
        "n_blocks": opts.n_blocks,
        "tokens_per_sample": int(ids.shape[1]),
        "top_p": opts.top_p,
        "temperature": opts.temperature,
        "seed": seed,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # process CPU time of the sampling (other programs on a shared machine excluded)
        "samples_per_second": ids.shape[0] / max(seconds, 1e-9),
        "entropy": float(ent.mean()),
        "checkpoint": str(cfg.checkpoint),
    }
    if opts.psi is not None:
        metrics["psi"] = dict(vars(opts.psi))
    if lengths_all:
        metrics["mean_length"] = sum(lengths_all) / len(lengths_all)
    gcfg = cfg.get("genppl")
    if gcfg and gcfg.get("path"):
        scorer, stok, eos = load_scorer(gcfg, tok, device)
        # our AR-objective DiTs are trained on [BOS] + text blocks: score them the same way (without the BOS their
        # first positions are far out of distribution and Gen PPL explodes)
        bos = getattr(stok, "bos_id", None) if str(gcfg.get("scorer") or "dit") == "dit" else None
        max_len = int(gcfg.get("max_len") or 1024)
        cap = getattr(getattr(scorer, "model", None), "max_seq_len", None)  # e.g. our AR DiT's training length
        if cap:
            max_len = min(max_len, int(cap))
        g = gen_ppl_and_entropy(ids, diffusion_tokenizer=tok, scorer=scorer, scorer_tokenizer=stok, eos_id_scorer=eos,
                                batch_size=int(gcfg["batch_size"]) if gcfg.get("batch_size") else None,
                                max_batch_tokens=int(gcfg["max_batch_tokens"]) if gcfg.get("max_batch_tokens") else None,
                                max_len=max_len,
                                bos_id_scorer=None if bos is None else int(bos))
        metrics.update({"gen_ppl": g["gen_ppl"], "gen_nll": g["gen_nll"], "gen_nll_stderr": g["gen_nll_stderr"],
                        "gen_ppl_stderr": g["gen_ppl"] * g["gen_nll_stderr"], "gen_ppl_tokens": g["tokens"],
                        "gen_ppl_scorer": g["scorer"]})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = {k: metrics[k] for k in ("num_samples", "steps", "noise_removal", "nfe", "entropy") if k in metrics}
    if "gen_ppl" in metrics:
        summary["gen_ppl"] = metrics["gen_ppl"]
        summary["gen_ppl_scorer"] = metrics["gen_ppl_scorer"]
    print(f"duo_generate: wrote {len(records)} samples to {out_dir / 'samples.jsonl'}; {json.dumps(summary)}")
    return metrics


@tt_config.parse
def recipe_main(cfg: DictConfig) -> None:
    from duo_plugin.errors import user_errors
    from duo_plugin.runtime import drop_cwd_from_sys_path

    drop_cwd_from_sys_path()  # `tune run` / `python -m` put the working directory (maybe a model folder) on sys.path

    with user_errors("duo_generate"):  # a user error: one line, exit 2 (DUO_DEBUG=1: traceback)
        run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
