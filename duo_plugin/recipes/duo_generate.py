"""duo_generate: sample text from a Duo model directory (ancestral / Greedy-Tail / Ψ, nucleus, prompts, infilling,
prompt guidance, block generation beyond the context, variable-length output; docs/sampling.md).

Sampler: docs/sampling.md (exact float64 USDM posterior on linspace(1, t_eps, steps + 1), log-linear α, one
noise-removal call at t_eps; NFE = steps + 1). Writes ``output_dir/samples.jsonl`` (one line per sample: text,
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
    sampling_params(cfg)  # top_p / temperature / steps / counts: wrong values are errors naming the key


def sampling_params(cfg: DictConfig) -> dict[str, Any]:
    """The checked numeric sampling options.  A value is never silently replaced: ``top_p`` must be in (0, 1]
    (1 = no nucleus truncation) and ``temperature`` > 0 (1 = the model's distribution); ``top_p=0`` or
    ``temperature=0`` is an error pointing to ``noise_removal=greedy`` for deterministic final tokens."""
    from duo_plugin.training.config_values import read_float, read_int

    out: dict[str, Any] = {"steps": read_int("steps", cfg.get("steps"), minimum=1),
                           "num_samples": read_int("num_samples", cfg.get("num_samples"), minimum=1)}
    top_p = cfg.get("top_p")
    out["top_p"] = 1.0 if top_p is None else read_float("top_p", top_p)
    if not 0.0 < out["top_p"] <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] (1 = no nucleus truncation), got {top_p!r}; for deterministic "
                          "final tokens use noise_removal=greedy")
    temp = cfg.get("temperature")
    out["temperature"] = 1.0 if temp is None else read_float("temperature", temp)
    if not out["temperature"] > 0.0:
        raise ConfigError(f"temperature must be > 0 (1 = the model's distribution), got {temp!r}; temperature=0 is "
                          "not greedy decoding here: use noise_removal=greedy for deterministic final tokens")
    gw = cfg.get("guidance_weight")
    out["guidance_weight"] = 1.0 if gw is None else read_float("guidance_weight", gw)  # 0 = unconditional, kept
    for key, default in (("t_eps", 1e-5), ("alpha_eps", 1e-3)):
        v = cfg.get(key)
        out[key] = default if v is None else read_float(key, v, positive=True)
    for key in ("seed", "batch_size", "seq_len"):
        v = cfg.get(key)
        out[key] = None if v is None else read_int(key, v, minimum=0 if key == "seed" else 1)
    return out

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
        tok = load_tokenizer(model.duo_metadata["tokenizer"])
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
    """The sampler keys shared by duo_generate and the lm-eval backend: ``predictor``, ``psi`` (a mapping of
    :class:`~duo_plugin.sampling.PsiSchedule` keys), ``guidance_weight``, ``posterior_impl`` and ``blocks``
    (``n_blocks``, ``block_len``) → keyword arguments (``n_blocks`` / ``block_len`` for :func:`sample_blocks`)."""
    from duo_plugin.sampling import PsiSchedule

    predictor = str(cfg.get("predictor") or "ancestral")
    if predictor not in ("ancestral", "psi"):
        raise ConfigError(f"predictor must be 'ancestral' or 'psi', got {predictor!r}")
    psi_cfg = cfg.get("psi")
    psi = None
    if predictor == "psi":
        raw = OmegaConf.to_container(psi_cfg, resolve=True) if isinstance(psi_cfg, DictConfig) else dict(psi_cfg or {})
        try:
            psi = PsiSchedule.from_config(raw)
        except ValueError as e:
            raise ConfigError(f"psi: {e}") from None
    blocks = cfg.get("blocks") or {}
    n_blocks = int(blocks.get("n_blocks") or 0)
    block_len = blocks.get("block_len")
    if n_blocks and not block_len:
        raise ConfigError("blocks.n_blocks > 0 needs blocks.block_len (tokens added per block, < seq_len)")
    return {"predictor": predictor, "psi": psi, "guidance_weight": (1.0 if cfg.get("guidance_weight") is None else
                                                            float(cfg.get("guidance_weight"))),
            "posterior_impl": str(cfg.get("posterior_impl") or "auto"), "n_blocks": n_blocks,
            "block_len": int(block_len or 0)}


def model_objective(model) -> str:
    """The training objective recorded in the model folder's metadata (``duo`` when absent: older folders)."""
    meta = getattr(model, "duo_metadata", {}) or {}
    return str(meta.get("objective") or "duo")


def mdlm_mask_id(model) -> int:
    """The [MASK] id of an MDLM model: ``mask_id`` in its metadata, else its last embedding row
    (``objectives.mdlm``); it must not be a data id."""
    meta = getattr(model, "duo_metadata", {}) or {}
    mask_id = int(meta["mask_id"]) if meta.get("mask_id") is not None else int(model.vocab_size) - 1
    valid = getattr(model, "valid_vocab", None)
    if valid is not None and bool(valid[mask_id]):
        raise ValueError(f"the model folder says objective 'mdlm' but its [MASK] row {mask_id} is a valid token id, not "
                         "a [MASK] row: the folder's metadata does not match the model")
    return mask_id


def check_mdlm_options(opts: dict, n_blocks: int) -> None:
    """The absorbing sampler has no Ψ predictor, prompt guidance, block generation or posterior variants."""
    if opts["predictor"] != "ancestral":
        raise ConfigError("predictor=psi is for uniform-state (Duo/UDLM) models; this model was trained with the MDLM "
                          "objective: set predictor=ancestral")
    if opts["guidance_weight"] != 1.0:
        raise ConfigError("guidance_weight is for uniform-state (Duo/UDLM) models; set guidance_weight=1.0 for an MDLM "
                          "model")
    if n_blocks:
        raise ConfigError("blocks.n_blocks > 0 is for uniform-state (Duo/UDLM) models; set blocks.n_blocks=0 for an "
                          "MDLM model")
    if opts["posterior_impl"] != "auto":
        raise ConfigError("posterior_impl selects a uniform-state posterior; set posterior_impl=auto for an MDLM model")


def sample_mdlm_rows(den, schedule, *, num: int, chunk: int, seq_len: int, vocab_size: int, mask_id: int, steps: int,
                     mode: str, time_conditioned: bool, valid, temperature: float, top_p: float, seed: int,
                     t_eps: float, device, clamp_mask=None, clamp_values=None):
    """``sample_mdlm`` over ``num`` rows in chunks of ``chunk``; row i always uses ``row_generators(seed, 0, [i])``,
    so the samples do not depend on ``chunk``. Returns ``(tokens Long[num, L], nfe = the most calls of a chunk)``."""
    from duo_plugin.diffusion.uniform import row_generators
    from duo_plugin.sampling.mdlm import sample_mdlm

    out, nfe = [], 0
    for lo in range(0, num, chunk):
        hi = min(num, lo + chunk)
        z, n = sample_mdlm(den, schedule, batch_size=hi - lo, seq_len=seq_len, vocab_size=vocab_size,
                           mask_id=mask_id, steps=steps, noise_removal=mode, time_conditioned=time_conditioned,
                           valid_vocab=valid, temperature=temperature, top_p=top_p,
                           generator=row_generators(seed, 0, range(lo, hi), device=device), t_eps=t_eps,
                           device=device, return_nfe=True, clamp_mask=clamp_mask, clamp_values=clamp_values)
        out.append(z)
        nfe = max(nfe, int(n))
    return torch.cat(out, 0), nfe


def generate_ar(model, job: dict, kw: dict, cfg, *, infill: bool, n_blocks: int, bos_id):
    """Sample an ``objective: ar`` model token by token with its KV cache (prompt, or [BOS] alone); the diffusion
    keys (``steps``, ``noise_removal``, ``predictor``, ``psi``, ``posterior_impl``) do not apply to it."""
    from duo_plugin.sampling.ar_decode import sample_ar

    if infill or n_blocks or str(kw.get("predictor")) != "ancestral" or float(kw.get("guidance_weight")) != 1.0:
        raise ConfigError("this model was trained with objective: ar and is sampled left to right: infill, blocks, "
                          "predictor=psi and guidance_weight do not apply (remove them)")
    prompt = job.get("prompt_ids")
    if prompt is None and cfg.get("add_bos", True):
        prompt = torch.tensor([int(bos_id)], dtype=torch.long)
    with eta_lines():
        return sample_ar(model, batch_size=kw["batch_size"], seq_len=kw["seq_len"], prompt=prompt,
                         temperature=kw["temperature"], top_p=kw["top_p"], valid_vocab=kw["valid_vocab"],
                         seed=kw["seed"], chunk_size=kw["chunk_size"], progress=kw["progress"])


def run(cfg: DictConfig) -> dict:
    """The recipe body (``recipe_main`` = ``@config.parse`` + this); returns the metrics dict."""
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, unigram_entropy
    from duo_plugin.sampling import DenoiserFn, sample, sample_blocks, trim_at_eos

    validate_config(cfg)
    device, out_dir, model, tok = open_run(cfg)
    seq_len = default_seq_len(model, cfg.get("seq_len"))
    if seq_len > int(model.max_seq_len):
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
    den = DenoiserFn(model, dtype=cfg.get("dtype"))
    steps = int(cfg.steps)
    mode = str(cfg.get("noise_removal") or "ancestral")
    num = int(cfg.num_samples)
    seed = int(cfg.get("seed") or 0)
    add_bos = bool(cfg.get("add_bos", True))
    schedule = LogLinearSchedule(float(cfg.get("alpha_eps") or 1e-3))
    valid = getattr(model, "valid_vocab", None)
    opts = sampler_options(cfg)
    n_blocks, block_len = opts.pop("n_blocks"), opts.pop("block_len")
    variable_length = bool(cfg.get("variable_length", False))
    eos_id = int(tok.eos_id) if variable_length else None
    objective = model_objective(model)
    mask_id = None
    if objective == "mdlm":  # absorbing process (docs/baselines.md): the [MASK] row is the model's last row
        check_mdlm_options(opts, n_blocks)
        mask_id = mdlm_mask_id(model)

    prompts = cfg.get("prompts")
    infill = cfg.get("infill")
    if prompts and infill:
        raise ValueError("set either prompts or infill, not both")
    if infill and n_blocks:
        raise ValueError("blocks.n_blocks > 0 generates beyond the context from a prompt; it cannot be combined with "
                         "infill (set blocks.n_blocks=0)")
    jobs: list[dict[str, Any]] = []
    if infill:
        m, v = build_infill(str(infill), tok, seq_len, add_bos)
        jobs.append({"prompt": str(infill), "clamp_mask": m, "clamp_values": v})
    elif prompts:
        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in plist:
            ids = ([tok.bos_id] if add_bos else []) + tok.encode(str(p), add_bos=False, add_eos=False)
            jobs.append({"prompt": str(p), "prompt_ids": torch.tensor(ids, dtype=torch.long)})
    else:
        jobs.append({"prompt": None})

    all_ids, records = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    nfe, lengths_all = 0, []
    for j, job in enumerate(jobs):
        kw = dict(
            batch_size=num, seq_len=seq_len, vocab_size=int(model.vocab_size), steps=steps,
            noise_removal=mode, top_p=float(cfg.get("top_p") or 1.0), temperature=float(cfg.get("temperature") or 1.0),
            prompt=job.get("prompt_ids"), valid_vocab=valid, seed=seed + j, t_eps=float(cfg.get("t_eps") or 1e-5),
            device=device, chunk_size=int(cfg.get("batch_size") or num), progress=bool(cfg.get("progress_bar", True)),
            eos_id=eos_id, **opts,
        )
        if mask_id is not None:
            cm, cv = job.get("clamp_mask"), job.get("clamp_values")
            if job.get("prompt_ids") is not None:
                pids = job["prompt_ids"]
                if len(pids) > seq_len:
                    raise ValueError(f"the prompt has {len(pids)} tokens but seq_len={seq_len}")
                cm = torch.zeros(seq_len, dtype=torch.bool)
                cm[: len(pids)] = True
                cv = torch.zeros(seq_len, dtype=torch.long)
                cv[: len(pids)] = pids
            tokens, nfe = sample_mdlm_rows(
                den, schedule, num=num, chunk=kw["chunk_size"], seq_len=seq_len, vocab_size=int(model.vocab_size),
                mask_id=mask_id, steps=steps, mode=mode, time_conditioned=bool(getattr(model, "time_conditioning",
                True)), valid=valid, temperature=kw["temperature"], top_p=kw["top_p"], seed=seed + j,
                t_eps=kw["t_eps"], device=device, clamp_mask=cm, clamp_values=cv)
            res = None
        elif objective == "ar":  # KV-cache decoding (sampling/ar_decode.py); NFE = seq_len - prompt length
            res = generate_ar(model, job, kw, cfg, infill=bool(infill), n_blocks=n_blocks, bos_id=tok.bos_id)
        else:
            with eta_lines():  # the sampler's bar on a terminal, else an ETA line every 30 s
                if n_blocks:
                    res = sample_blocks(den, schedule, n_blocks=n_blocks, block_len=block_len, **kw)
                else:
                    res = sample(den, schedule, clamp_mask=job.get("clamp_mask"),
                                 clamp_values=job.get("clamp_values"), return_trajectory=True, **kw)
        if res is not None:
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
        "objective": objective,
        "process": "absorbing" if mask_id is not None else ("causal" if objective == "ar" else "uniform"),
        "predictor": opts["predictor"],
        "guidance_weight": opts["guidance_weight"],
        "n_blocks": n_blocks,
        "tokens_per_sample": int(ids.shape[1]),
        "top_p": float(cfg.get("top_p") or 1.0),
        "temperature": float(cfg.get("temperature") or 1.0),
        "seed": seed,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # process CPU time of the sampling (other programs on a shared machine excluded)
        "samples_per_second": ids.shape[0] / max(seconds, 1e-9),
        "entropy": float(ent.mean()),
        "checkpoint": str(cfg.checkpoint),
    }
    if opts["psi"] is not None:
        metrics["psi"] = dict(vars(opts["psi"]))
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
        metrics.update({"gen_ppl": g["gen_ppl"], "gen_nll": g["gen_nll"], "gen_ppl_tokens": g["tokens"],
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

    with user_errors("duo_generate"):  # a user error: one line, exit 2 (DUO_DEBUG=1: traceback)
        run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
