"""duo_pretrain: train a Duo uniform-state diffusion LM (or its AR baseline) from scratch or from a checkpoint.

One readable torchtune-style recipe (duo-method.md §1, §3, §6, §8):

* **Curriculum phase** (steps ``[0, curriculum.steps)``; paper Eq. 21, duo-method.md §3.1): per sequence a stratified
  t over the *global* batch, γ_t = γ_min + t(γ_max − γ_min), one Gaussian latent w = α̃ x + σ̃ ε; the network sees the
  soft input w/τ, the loss is the discrete NELBO f_Duo (Eq. 17) at z_t = argmax(w) with α = T(α̃(γ_t)) and
  α' = dT/dγ · (γ_max − γ_min); σ = −log α conditions the network.
* **Discrete phase** (steps ``>= curriculum.steps``): log-linear α_t = 1 − (1 − ε)t, hard z_t = corrupt(x0, α_t).
* **AR baseline** (``objective: ar``): the same backbone built with ``causal: true``, next-token cross-entropy.

Exactness across topology/resume: each global step takes the global batch from the data sampler (a pure function of
(seed, step)); a sample's time comes from ``stratified_times(seed, step, position, N)`` and its noise from
``row_generators(seed, step, position)`` where ``position`` ∈ [0, N) is its place in the global batch; the loss is the
SUM over a micro-batch's valid tokens divided by the number of valid tokens in the GLOBAL batch, and gradients are
summed over micro-steps and ranks (FSDP2's reduce-scatter average is undone by scaling the loss by the world size).
Hence 1 process vs N processes vs any accumulation split, and a run resumed at any step, give the same losses (up to
float summation order).  Dropout > 0 breaks this: dropout masks come from each rank's global RNG.

Run::

    tune run duo_pretrain --config duo/tiny_cpu                       # once registered
    python -m duo_plugin.recipes.duo_pretrain --config duo_plugin/configs/duo/tiny_cpu.yaml max_steps=50
    tune run --nproc_per_node 2 duo_plugin/recipes/duo_pretrain.py --config <path.yaml>   # FSDP2 (gloo on CPU)

Absolute imports only: torchtune runs registered recipes through ``runpy.run_path``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf

from duo_plugin.training.recipe_utils import (ANY, COMPONENT, ConfigError, all_ranks_agree, check_keys,
                                             full_optimizer_state, full_tensor, is_block, is_dist,
                                             lr_multiplier, masked_token_sum, world_rank)
from torchtune import config as tt_config
from torchtune import training as tt_training
from torchtune import utils as tt_utils

log = tt_utils.get_logger("INFO")

# ----------------------------------------------------------------------------------------------------------------
# Config schema. Sections marked COMPONENT are instantiated via ``_component_`` (their keys are checked against the
# component's signature by instantiate); every other key must appear here, so a typo is an error naming the fix.
# ----------------------------------------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "output_dir": None,
    "seed": None,
    "device": None,
    "dtype": None,  # fp32 | bf16 (bf16 = autocast on CUDA only; CPU always runs fp32)
    "objective": None,  # duo | ar
    "tokenizer": {"path": None, "train": {"vocab_size": None, "model_type": None}},
    "data": {
        "source": None,  # shakespeare | files | hub
        "files": None,
        "hub": ANY,
        "seq_len": None,
        "packing": None,  # wrap | pad
        "sample_by": None,  # files: document | paragraph | line
        "val_fraction": None,
        "val_docs": None,  # hold out exactly this many last documents (OWT: 100000); overrides val_fraction
        "cache_dir": None,
        "valid_vocab": {"include_pad": None, "include_special": None},
    },
    "model": COMPONENT,
    "init_from": None,
    "init_weights": None,  # which weights of init_from: ema | model
    "global_batch_size": None,
    "gradient_accumulation_steps": None,
    "eval_batch_size": None,
    "max_steps": None,
    "optimizer": COMPONENT,
    "lr_scheduler": {"name": None, "warmup_steps": None, "min_lr_ratio": None},
    "clip_grad_norm": None,
    "ema": {"decay": None},
    "schedule": {"alpha_eps": None, "t_min": None},
    "curriculum": {"steps": None, "tau": None, "gamma_min": None, "gamma_max": None, "table": None,
                   "table_points": None,
                   "input": None, "topk": None, "table_cache": None},  # issue 8: dense|topk input, T-table cache
    # issue 8 (LLM adaptation): attention-mask annealing and which parameters train (see docs/llm-adaptation.md)
    "adapt": {"attn_anneal_steps": None, "attn_anneal_mode": None, "trainable": None},
    "eval_every": None,
    "eval_max_batches": None,
    "checkpoint": {"every": None, "keep_last": None},
    "resume": None,
    "compile": None,
    "enable_activation_checkpointing": None,
    "fsdp": {"reshard_after_forward": None},
    "metric_logger": COMPONENT,
    "log_every": None,
    "progress_bar": None,
    "max_wall_s": None,
    # issue 9 (fused kernels): auto|dense|reference|chunked|triton per path; see duo_plugin/kernels/select.py
    "kernels": {"curriculum_input": None, "nelbo": None, "auto_min_row_elements": None, "ram_fraction": None,
                "memory_budget_mb": None},
    "cpu_threads": None,  # auto | N intra-op threads on CPU (duo_plugin/runtime.py)
}

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "dtype": "fp32",
    "objective": "duo",
    "init_from": None,
    "init_weights": "ema",
    "gradient_accumulation_steps": 1,
    "clip_grad_norm": 1.0,
    "ema": {"decay": 0.9999},
    "schedule": {"alpha_eps": 1e-3, "t_min": 1e-3},
    "curriculum": {"steps": 0, "tau": 1e-3, "gamma_min": None, "gamma_max": None, "table": None,
                   "table_points": 1025, "input": "dense", "topk": 64, "table_cache": False},
    "adapt": {"attn_anneal_steps": 0, "attn_anneal_mode": "window", "trainable": "auto"},
    "lr_scheduler": {"name": "constant_with_warmup", "warmup_steps": 0, "min_lr_ratio": 0.0},
    "eval_every": 0,
    "eval_max_batches": None,
    "checkpoint": {"every": 0, "keep_last": 2},
    "resume": False,
    "compile": False,
    "enable_activation_checkpointing": False,
    "fsdp": {"reshard_after_forward": True},
    "log_every": 1,
    "progress_bar": True,
    "max_wall_s": None,
    # issue 9: `auto` keeps the dense paths at small L*K on CPU (the existing behaviour), fused where it pays off
    "kernels": {"curriculum_input": "auto", "nelbo": "auto", "auto_min_row_elements": 1 << 22, "ram_fraction": 0.25,
                "memory_budget_mb": None},
    "cpu_threads": "auto",
}


# Keys that must equal the checkpoint's on resume (everything that changes the loss sequence; "kernels" too: the fused
# curriculum input draws a different noise stream than the dense one).  Not listed, free to change:
# gradient_accumulation_steps, world size, eval/checkpoint/logging cadence, compile, AC, and max_steps (except with
# lr_scheduler.name=cosine, whose LR sequence depends on max_steps: see check_resume_max_steps).
RESUME_KEYS = ("seed", "objective", "model", "init_from", "global_batch_size", "optimizer", "lr_scheduler",
               "clip_grad_norm", "ema", "schedule", "curriculum", "data.seq_len", "data.packing", "data.source",
               "data.files", "data.hub", "data.val_fraction", "data.val_docs", "data.sample_by", "data.valid_vocab",
               "adapt", "kernels")


def check_resume_max_steps(saved_cfg: Any, cfg: Any) -> None:
    """A cosine LR decays to ``min_lr_ratio`` at ``max_steps``: resuming with another ``max_steps`` would change every
    later LR (not the run that was checkpointed), so refuse it.  ``constant_with_warmup`` does not depend on it."""
    if str((cfg.get("lr_scheduler") or {}).get("name")) != "cosine":
        return
    old, new = saved_cfg.get("max_steps"), cfg.get("max_steps")
    if old is not None and new is not None and int(old) != int(new):
        raise ConfigError(
            f"cannot resume: lr_scheduler.name=cosine decays over max_steps, and max_steps changed from {int(old)} "
            f"(checkpoint) to {int(new)} (config), which changes the LR sequence; set max_steps={int(old)} to resume, "
            "or start a fresh run (new output_dir) with the new max_steps")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check key names (suggesting the closest valid key), fill defaults, check values. Returns a new config."""
    check_keys(cfg, SCHEMA, "")
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    for req in ("output_dir", "tokenizer", "data", "model", "global_batch_size", "max_steps", "optimizer"):
        if OmegaConf.select(merged, req) is None:
            raise ConfigError(f"config key '{req}' is required (see duo_plugin/configs/duo/tiny_cpu.yaml)")
    if merged.objective not in ("duo", "ar"):
        raise ConfigError(f"objective must be 'duo' or 'ar', got {merged.objective!r}")
    if merged.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype must be fp32 or bf16, got {merged.dtype!r}")
    if int(merged.global_batch_size) < 1 or int(merged.gradient_accumulation_steps) < 1:
        raise ConfigError("global_batch_size and gradient_accumulation_steps must be >= 1")
    if int(merged.max_steps) < 0:
        raise ConfigError(f"max_steps must be >= 0, got {merged.max_steps}")
    if merged.lr_scheduler.name not in ("constant_with_warmup", "cosine"):
        raise ConfigError(f"lr_scheduler.name must be constant_with_warmup or cosine, got {merged.lr_scheduler.name!r}")
    c = merged.curriculum
    if int(c.steps) > 0:
        if merged.objective == "ar":
            raise ConfigError("curriculum.steps must be 0 for objective: ar (the curriculum is a diffusion objective)")
        if not (float(c.tau) > 0):
            raise ConfigError(f"curriculum.tau must be > 0 (paper: 1e-3), got {c.tau}")
        if (c.gamma_min is None) != (c.gamma_max is None):
            raise ConfigError("set both curriculum.gamma_min and curriculum.gamma_max, or neither (default: "
                              "duality.gamma_window(K))")
    # --- issue 9 (kernels) begin
    from duo_plugin.kernels.select import KERNEL_CHOICES

    for key in ("curriculum_input", "nelbo"):
        if merged.kernels[key] not in KERNEL_CHOICES:
            raise ConfigError(f"kernels.{key} must be one of {KERNEL_CHOICES}, got {merged.kernels[key]!r}")
    if not (0 < float(merged.kernels.ram_fraction) <= 1):
        raise ConfigError(f"kernels.ram_fraction must be in (0, 1], got {merged.kernels.ram_fraction!r}")
    # --- issue 9 (kernels) end
    from duo_plugin.runtime import choose_cpu_threads

    try:
        choose_cpu_threads(merged.cpu_threads, n_params=0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if merged.resume not in (False, True, "auto") and not isinstance(merged.resume, str):
        raise ConfigError("resume must be false, true/'auto' (latest checkpoint in output_dir) or a checkpoint dir")
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Small pure helpers (tested directly)
# ----------------------------------------------------------------------------------------------------------------


def ar_token_nll(log_probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Next-token NLL ``[B, L-1]``: −log p(x_{l+1} | x_{≤l}) from causal ``log_probs[B, L, K]`` (fp32)."""
    return -log_probs[:, :-1].gather(-1, x0[:, 1:, None]).squeeze(-1).float()


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
class DuoPretrainRecipe:
    """Setup → train → (validate, checkpoint) → summary. See the module docstring for the method."""

    def __init__(self, cfg: DictConfig):
        self.cfg = validate_config(cfg)
        cfg = self.cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = tt_utils.get_device(cfg.device)
        if self.distributed and not is_dist():
            backend = tt_training.get_distributed_backend(self.device.type)
            dist.init_process_group(backend=backend)
        self.world_size, self.rank = world_rank()
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.seed = int(cfg.seed)
        self.objective = cfg.objective
        self.accum = int(cfg.gradient_accumulation_steps)
        self.global_batch_size = int(cfg.global_batch_size)
        if self.global_batch_size % (self.world_size * self.accum) != 0:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by world_size×gradient_accumulation_steps"
                f"={self.world_size}×{self.accum}; pick gradient_accumulation_steps so the per-rank micro-batch "
                "global_batch_size / (world_size × accumulation) is an integer")
        self.max_steps = int(cfg.max_steps)
        self.curriculum_steps = int(cfg.curriculum.steps)
        self.autocast_bf16 = cfg.dtype == "bf16" and self.device.type == "cuda"
        if cfg.dtype == "bf16" and self.device.type != "cuda" and self.is_rank_zero:
            log.info("dtype=bf16 requested on %s: bf16 autocast is CUDA-only, running fp32", self.device.type)
        self.step = 0
        self.tokens_seen = 0
        self.last_val: dict | None = None
        self.first_val: dict | None = None
        self.losses: list[float] = []  # per completed step (restored on resume)
        self.phases: list[str] = []
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if self.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.metric_logger = tt_config.instantiate(cfg.metric_logger) if (self.is_rank_zero and cfg.get(
            "metric_logger")) else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        self._setup_tokenizer()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_schedules()
        self._maybe_resume()

    def _barrier(self) -> None:
        if is_dist():
            dist.barrier()

    def _setup_tokenizer(self) -> None:
        from duo_plugin.data.tokenizers import load_tokenizer, train_sentencepiece

        tcfg = self.cfg.tokenizer
        path = Path(str(tcfg.path))
        if not path.exists():
            train = tcfg.get("train")
            if not train or not train.get("vocab_size"):
                raise FileNotFoundError(
                    f"tokenizer not found at {path}; point tokenizer.path at a tokenizer directory/file, or set "
                    "tokenizer.train.vocab_size to train a SentencePiece tokenizer on the training corpus")
            if self.is_rank_zero:
                corpus_file = self.output_dir / "tokenizer_corpus.txt"
                corpus_file.write_text("\n".join(self._documents()), encoding="utf-8")
                kw = {"model_type": train.model_type} if train.get("model_type") else {}
                train_sentencepiece([corpus_file], int(train.vocab_size), path, **kw)
                corpus_file.unlink()
                log.info("trained a SentencePiece tokenizer (vocab %d) at %s", int(train.vocab_size), path)
            self._barrier()
        self.tokenizer = load_tokenizer(path)

    def _documents(self) -> list[str]:
        """Raw training documents (only used to train a tokenizer)."""
        d = self.cfg.data
        src = d.get("source") or "files"
        if src == "shakespeare":
            from duo_plugin.data.corpora import shakespeare_documents

            return shakespeare_documents()
        from duo_plugin.data.text import load_documents

        if src == "files":
            return load_documents(self._files())
        hub = dict(OmegaConf.to_container(d.hub, resolve=True))
        return load_documents(hub.pop("path"), **hub)

    def _files(self) -> list[str]:
        files = self.cfg.data.get("files")
        if not files:
            raise ConfigError("data.source=files needs data.files: [path, ...] (text/jsonl/parquet files)")
        files = [str(f) for f in (files if isinstance(files, (list, ListConfig)) else [files])]
        import glob

        missing = [f for f in files if not Path(f).exists() and not glob.glob(f)]
        if missing:
            raise FileNotFoundError(f"data.files not found: {missing}; fix the paths in data.files")
        return files

    def _setup_data(self) -> None:
        """Documents → tokenize once (cached) → held-out split (last documents) → blocks → datasets."""
        from duo_plugin.data import text as data_text

        d = self.cfg.data
        self.seq_len = int(d.seq_len)
        src = d.get("source") or "files"
        cache = d.get("cache_dir")
        if src == "shakespeare":
            from duo_plugin.data.corpora import load_shakespeare

            docs = load_shakespeare(self.tokenizer, unit="paragraph", cache_dir=cache)
        elif src == "files":
            docs = data_text.load_tokenized(self._files(), self.tokenizer, cache_dir=cache,
                                            sample_by=d.get("sample_by") or "paragraph")
        elif src == "hub":
            hub = dict(OmegaConf.to_container(d.hub, resolve=True))
            docs = data_text.load_tokenized(hub.pop("path"), self.tokenizer, cache_dir=cache, **hub)
        else:
            raise ConfigError(f"data.source must be shakespeare, files or hub; got {src!r}")
        if len(docs) == 0 or docs.num_tokens == 0:
            raise ValueError("empty dataset: the data source produced no tokens; check data.files / data.source")
        frac = float(d.get("val_fraction") or 0.0)
        n_val = int(d.get("val_docs") or 0)
        val_docs = None
        if frac > 0 or n_val > 0:
            if len(docs) < 2:
                raise ValueError("a held-out split needs at least 2 documents; add text or set data.val_fraction: 0")
            split = {"num_heldout": n_val} if n_val > 0 else {"fraction": frac}
            docs, val_docs = data_text.split_heldout(docs, **split)
        tok = self.tokenizer
        packing = d.get("packing") or "wrap"
        if packing == "wrap":
            blocks = data_text.wrap_blocks(docs, self.seq_len, tok.bos_id, tok.eos_id)
            self.train_set = data_text.TokenBlockDataset(blocks)
            if val_docs is not None:
                vb, vm = data_text.wrap_blocks(val_docs, self.seq_len, tok.bos_id, tok.eos_id, drop_remainder=False,
                                               return_mask=True)
                self.val_set = data_text.TokenBlockDataset(vb, vm)
        elif packing == "pad":
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            self.train_set = data_text.TokenBlockDataset(*data_text.pad_sentences(docs, self.seq_len, tok.bos_id,
                                                                                   tok.eos_id, pad))
            if val_docs is not None:
                self.val_set = data_text.TokenBlockDataset(*data_text.pad_sentences(val_docs, self.seq_len,
                                                                                     tok.bos_id, tok.eos_id, pad))
        else:
            raise ConfigError(f"data.packing must be 'wrap' or 'pad', got {packing!r}")
        if val_docs is None:
            self.val_set = None
        self.sampler = data_text.GlobalBatchSampler(len(self.train_set), self.global_batch_size, seed=self.seed)
        if self.is_rank_zero:
            log.info("data: %d train blocks of %d tokens (%d steps/epoch), %s validation blocks", len(self.train_set),
                     self.seq_len, self.sampler.steps_per_epoch, len(self.val_set) if self.val_set else 0)

    def _build_model(self, vocab_size: int) -> torch.nn.Module:
        mcfg = self.cfg.model
        extra = {}
        for key, value in (("vocab_size", vocab_size), ("max_seq_len", self.seq_len)):
            if mcfg.get(key) is None:
                extra[key] = value
        if self.objective == "ar" and "causal" not in mcfg:
            extra["causal"] = True
        return tt_config.instantiate(mcfg, **extra)

    def _setup_model(self) -> None:
        from duo_plugin.data.tokenizers import check_vocab

        cfg = self.cfg
        init_from = cfg.get("init_from")
        # Same seed on every rank BEFORE any rank offset: identical random init everywhere.
        torch.manual_seed(self.seed)
        if init_from:
            model = self._load_init_from(Path(str(init_from)))
        else:
            model = self._build_model(int(self.tokenizer.vocab_size))
            init = getattr(model, "init_weights", None)  # from-scratch init, for backbones that define one
            if callable(init):
                init()
        k = int(model.vocab_size)
        vv = cfg.data.get("valid_vocab") or {}
        self.valid_vocab = check_vocab(self.tokenizer, k, include_pad=bool(vv.get("include_pad", False)),
                                       include_special=bool(vv.get("include_special", False)))
        if self.seq_len > int(model.max_seq_len):
            raise ValueError(
                f"data.seq_len={self.seq_len} exceeds the model's max_seq_len={int(model.max_seq_len)}; lower "
                f"data.seq_len or set model.max_seq_len >= {self.seq_len}")
        if self.objective == "ar" and not getattr(model, "causal", False):
            raise ConfigError("objective: ar needs a causal backbone; set model.causal: true")
        self.vocab_size = k
        self.k_eff = int(self.valid_vocab.sum())
        self._adapt_setup(model)  # issue 8: trainable params (LoRA), annealing/top-k checks, vocabulary report
        if cfg.enable_activation_checkpointing:
            blocks = self._block_types(model)
            tt_training.set_activation_checkpointing(model, auto_wrap_policy=blocks)
        model.to(self.device)
        if self.distributed:
            from torch.distributed.fsdp import FSDPModule  # noqa: F401  (import check)

            tt_training.shard_model(
                model,
                # issue 8: a time-conditioned DecoderDenoiser calls layer submodules directly (per-layer FSDP hooks
                # would be bypassed), so only the root is sharded then.
                shard_conditions=[partial(is_block, types=set() if getattr(model, "time_conditioning", False)
                                          and hasattr(model, "decoder") else self._block_types(model))],
                cpu_offload=False,
                reshard_after_forward=bool(cfg.fsdp.reshard_after_forward),
            )
        if cfg.compile:
            for block in self._blocks(model):
                block.compile()
        self.model = model
        self.valid_vocab = self.valid_vocab.to(self.device)
        # --- issue 9 (kernels) begin: which curriculum-input / NELBO paths this run uses (topology-independent)
        from duo_plugin.kernels.select import choose_paths

        kc = cfg.kernels
        why: dict = {}
        try:
            budget = kc.get("memory_budget_mb")
            self.kernel_paths = choose_paths(str(kc.curriculum_input), str(kc.nelbo), model=model,
                                             device=self.device, seq_len=int(cfg.data.seq_len), vocab_size=k,
                                             soft_input=str(cfg.curriculum.get("input", "dense")),
                                             auto_min_row_elements=int(kc.auto_min_row_elements),
                                             micro_batch_rows=self.global_batch_size // (self.world_size * self.accum),
                                             ram_fraction=float(kc.get("ram_fraction", 0.25)),
                                             memory_budget_bytes=None if budget is None else int(float(budget) * 2**20),
                                             explain=why)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.is_rank_zero:
            log.info("kernels: curriculum_input=%s, nelbo=%s (auto would be %s: %s)",
                     self.kernel_paths["curriculum_input"], self.kernel_paths["nelbo"], why.get("auto"),
                     why.get("reason"))
        # --- issue 9 (kernels) end
        from duo_plugin.training.ema import EMA

        self.ema = EMA(model, decay=float(cfg.ema.decay)) if cfg.ema and cfg.ema.get("decay") else None
        n = sum(p.numel() for p in model.parameters())
        if self.device.type == "cpu":  # intra-op threads + denormal flushing (duo_plugin/runtime.py)
            from duo_plugin.runtime import configure_cpu

            local_ws = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            choice = configure_cpu(cfg.cpu_threads, n_params=n, local_world_size=local_ws)
            if self.is_rank_zero:
                log.info("%s", choice.log_line())
        if self.is_rank_zero:
            log.info("model: %s, K=%d (K_eff=%d), params=%.2fM", type(model).__name__, k, self.k_eff, n / 1e6)

    # ---------------------------------------------------------------- issue 8 (LLM adaptation), see training/adapt.py
    def _adapt_setup(self, model: torch.nn.Module) -> None:
        """Trainable parameters (``adapt.trainable``: auto = LoRA-only for LoRA models, else all; lora; all),
        checks of the annealing / top-k options, and the vocabulary report."""
        a, c = self.cfg.adapt, self.cfg.curriculum
        if a.attn_anneal_mode not in ("window", "random"):
            raise ConfigError(f"adapt.attn_anneal_mode must be 'window' or 'random', got {a.attn_anneal_mode!r}")
        self.anneal_steps = int(a.attn_anneal_steps or 0)
        if self.anneal_steps > 0 and not hasattr(model, "decoder"):
            raise ConfigError("adapt.attn_anneal_steps > 0 needs a torchtune-decoder denoiser (duo_plugin.models."
                              "duo_llama3_2 / duo_qwen2_5 ...); set adapt.attn_anneal_steps: 0 for the DiT")
        if c.get("input", "dense") not in ("dense", "topk"):
            raise ConfigError(f"curriculum.input must be 'dense' or 'topk', got {c.input!r}")
        if c.get("input") == "topk" and int(c.topk) < 1:
            raise ConfigError(f"curriculum.topk must be >= 1, got {c.topk}")
        trainable = a.trainable
        if trainable not in ("auto", "all", "lora"):
            raise ConfigError(f"adapt.trainable must be auto, all or lora, got {trainable!r}")
        is_lora = getattr(model, "_duo_lora", None) is not None
        if trainable == "lora" and not is_lora:
            raise ConfigError("adapt.trainable=lora needs a LoRA model (model._component_: duo_plugin.models."
                              "duo_lora_llama3_2 / duo_lora_qwen2_5)")
        if is_lora and trainable in ("auto", "lora"):
            from torchtune.modules.peft import get_adapter_params, set_trainable_params

            names = set(get_adapter_params(model))
            extra = getattr(model, "extra_state_dict", dict)()  # adaLN (time conditioning) trains with LoRA
            names |= {n for n, _ in model.named_parameters() if n in extra}
            set_trainable_params(model, names)
        if self.is_rank_zero:
            from duo_plugin.training.adapt import describe_valid_vocab

            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in model.parameters())
            log.info("%s; trainable params %.2fM of %.2fM", describe_valid_vocab(self.valid_vocab.cpu(),
                     int(self.tokenizer.vocab_size)), n_train / 1e6, n_all / 1e6)

    def _anneal_mask(self, step: int, seq_len: int) -> torch.Tensor | None:
        """Bool [L, L] attention mask for ``step`` while annealing causal → full, else None (flash path)."""
        if getattr(self, "anneal_steps", 0) <= 0:
            return None
        from duo_plugin.diffusion.uniform import stable_seed
        from duo_plugin.training.adapt import anneal_progress, annealed_attention_mask

        prog = anneal_progress(step, self.anneal_steps)
        mode = str(self.cfg.adapt.attn_anneal_mode)
        gen = torch.Generator().manual_seed(stable_seed(self.seed, step, 0xA77E)) if mode == "random" else None
        m = annealed_attention_mask(seq_len, prog, mode=mode, generator=gen)
        return None if m is None else m.to(self.device)
    # ---------------------------------------------------------------- end issue 8

    def _load_init_from(self, src: Path) -> torch.nn.Module:
        """``init_from``: a duo model dir (``duo_config.json``; weights per ``init_weights``, fresh optimizer — the
        paper's OWT stage 2) or an HF checkpoint dir (``config.json``) loaded into the ``model:`` denoiser."""
        if not src.exists():
            raise FileNotFoundError(f"init_from={src} does not exist; point it at a model directory "
                                    "(output_dir/final, a checkpoint's model/ dir, or an HF checkpoint dir)")
        if (src / "duo_config.json").is_file():
            from duo_plugin.models.checkpoint import load_pretrained

            return load_pretrained(src, weights=str(self.cfg.init_weights), device="cpu")
        if (src / "config.json").is_file():
            from duo_plugin.models.hf_checkpoint import load_hf_checkpoint

            # issue 8: the embedding size comes from the checkpoint's config.json (e.g. Qwen's padded 151,936 rows
            # vs ~151,665 tokenizer ids), not from the tokenizer; padded rows are excluded by valid_vocab.
            hf_vocab = json.loads((src / "config.json").read_text()).get("vocab_size")
            model = self._build_model(int(hf_vocab or self.tokenizer.vocab_size))
            return load_hf_checkpoint(model, src)
        raise FileNotFoundError(f"init_from={src} holds neither duo_config.json (a duo model dir) nor config.json "
                                "(an HF checkpoint dir)")

    @staticmethod
    def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
        for name in ("blocks", "layers"):
            mods = getattr(model, name, None)
            if isinstance(mods, torch.nn.ModuleList):
                return list(mods)
        inner = getattr(model, "decoder", None)
        if inner is not None:
            return DuoPretrainRecipe._blocks(inner)
        return []

    @classmethod
    def _block_types(cls, model: torch.nn.Module) -> set[type]:
        return {type(b) for b in cls._blocks(model)}

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        # issue 8: frozen parameters (LoRA base weights) are not handed to the optimizer
        self.optimizer = tt_config.instantiate(cfg.optimizer, [p for p in self.model.parameters() if p.requires_grad])
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def _set_lr(self, step: int) -> float:
        ls = self.cfg.lr_scheduler
        f = lr_multiplier(step, name=ls.name, warmup_steps=int(ls.warmup_steps), max_steps=self.max_steps,
                          min_lr_ratio=float(ls.min_lr_ratio))
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f

    def _setup_schedules(self) -> None:
        from duo_plugin.diffusion.schedules import DualitySchedule, LogLinearSchedule

        s = self.cfg.schedule
        self.loglinear = LogLinearSchedule(eps=float(s.alpha_eps))
        self.t_min = float(s.t_min)
        self.duality = None
        c = self.cfg.curriculum
        from duo_plugin.training.curriculum import CurriculumPhase

        if self.curriculum_steps > 0:
            from duo_plugin.diffusion import duality

            if c.gamma_min is None:
                gmin, gmax = duality.gamma_window(self.k_eff)
            else:
                gmin, gmax = float(c.gamma_min), float(c.gamma_max)
            if c.table:
                table = duality.DualityTable.load(str(c.table), vocab_size=self.k_eff)
            elif c.get("table_cache"):  # issue 8: on-disk cache keyed by (K_eff, range, points)
                cache_dir = None if c.table_cache is True else str(c.table_cache)
                table = duality.DualityTable.cached(self.k_eff, gmin, gmax, num_points=int(c.table_points),
                                                    cache_dir=cache_dir)
            else:
                table = duality.DualityTable.build(self.k_eff, gmin, gmax, num_points=int(c.table_points))
            self.duality = DualitySchedule(self.k_eff, gmin, gmax, table=table)
            # Steps 0 .. curriculum.steps-1 are curriculum steps (CurriculumPhase counts completed steps, inclusive).
            self.curriculum = CurriculumPhase(0, self.curriculum_steps - 1, float(c.tau), float(c.tau), gmin, gmax)
            if self.is_rank_zero:
                log.info("curriculum: %d steps, tau=%g, gamma in [%.4f, %.4f] -> alpha in [%.3f, %.3f]",
                         self.curriculum_steps, float(c.tau), gmin, gmax,
                         float(self.duality.alpha(torch.tensor(1.0))), float(self.duality.alpha(torch.tensor(0.0))))
        else:
            self.curriculum = CurriculumPhase(0, -1)

    def phase(self, step: int) -> str:
        """'curriculum' for steps < curriculum.steps, else 'discrete' ('ar' for the AR objective)."""
        if self.objective == "ar":
            return "ar"
        return self.curriculum.phase(step)

    # ------------------------------------------------------------------------------------------------ loss
    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_loss_sum(self, x0: torch.Tensor, mask: torch.Tensor, positions: list[int], step: int,
                        phase: str) -> torch.Tensor:
        """Σ over this micro-batch's valid tokens of the per-token loss (fp32 scalar, differentiable)."""
        from duo_plugin.diffusion.losses import curriculum_inputs, duo_nelbo
        from duo_plugin.diffusion.schedules import gaussian_coefficients, stratified_times
        from duo_plugin.diffusion.uniform import corrupt, row_generators

        if phase == "ar":
            b = x0.shape[0]
            kw = {"padding_mask": mask} if not bool(mask.all()) else {}
            with self._autocast():
                log_p = self.model(x0, torch.zeros(b, device=self.device), **kw)
            nll = ar_token_nll(log_p, x0)
            return masked_token_sum(nll, mask[:, 1:] & mask[:, :-1])
        t = stratified_times(self.seed, step, positions, self.global_batch_size, self.t_min, dtype=torch.float64)
        gens = row_generators(self.seed, step, positions, device=self.device)
        padded = not bool(mask.all())
        override = contextlib.nullcontext()  # issue 9: embedding_override when the fused curriculum input is used
        if phase == "curriculum":
            sched = self.duality
            gamma = sched.gamma(t).to(self.device)
            if self.cfg.curriculum.get("input", "dense") == "topk":  # issue 8: sparse top-k soft input
                from duo_plugin.training.adapt import topk_curriculum_inputs

                z_t, model_in = topk_curriculum_inputs(x0, gamma, float(self.cfg.curriculum.tau),
                                                       int(self.cfg.curriculum.topk), self.vocab_size, gens,
                                                       self.valid_vocab)
            elif self.kernel_paths["curriculum_input"] != "dense":  # issue 9: fused soft embedding, counter noise
                from duo_plugin import kernels

                at, st = gaussian_coefficients(gamma)
                seeds = kernels.row_seeds(self.seed, step, positions, device=self.device)
                emb_module = kernels.input_embedding(self.model)
                emb, z_t = kernels.curriculum_soft_embedding(
                    x0, at.float(), st.float(), float(self.cfg.curriculum.tau), seeds, emb_module.weight,
                    self.valid_vocab, impl=self.kernel_paths["curriculum_input"])
                override = kernels.embedding_override(emb_module, emb)
                model_in = z_t  # ids feed the (discarded) embedding lookup
            else:
                z_t, model_in = curriculum_inputs(x0, gamma, float(self.cfg.curriculum.tau), self.vocab_size, gens,
                                                  self.valid_vocab)
        else:
            sched = self.loglinear
            z_t = corrupt(x0, sched.alpha(t).to(self.device), gens, self.valid_vocab)
            if padded:  # padding stays as is (as in eval.likelihood); it is neither attended to nor scored
                z_t = torch.where(mask, z_t, x0)
            model_in = z_t
        alpha = sched.alpha(t).to(self.device)
        alpha_prime = sched.alpha_prime(t).to(self.device)
        sigma = (-torch.log(alpha)).float()
        kw = {"padding_mask": mask} if padded else {}
        am = self._anneal_mask(step, x0.shape[1])  # issue 8: causal -> full attention annealing (None once annealed)
        if am is not None:
            kw["attn_mask"] = am
        if self.kernel_paths["nelbo"] != "dense":  # issue 9: fused projection + NELBO on the hidden states
            from duo_plugin import kernels

            with override, self._autocast():
                h = self.model.forward_hidden(model_in, sigma, **kw)
                w, bias = kernels.projection_params(self.model)
                nelbo = kernels.fused_duo_nelbo(h, w, bias, z_t, x0, alpha, alpha_prime, self.valid_vocab,
                                                impl=self.kernel_paths["nelbo"])
            return masked_token_sum(nelbo, mask)
        with override, self._autocast():
            log_x = self.model(model_in, sigma, **kw)
        nelbo = duo_nelbo(log_x.float(), z_t, x0, alpha, alpha_prime, self.valid_vocab)
        return masked_token_sum(nelbo, mask)

    def _count_tokens(self, mask: torch.Tensor) -> int:
        return int((mask[:, 1:] & mask[:, :-1]).sum()) if self.objective == "ar" else int(mask.sum())

    def _fetch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.train_set.batch(indices)
        return b["tokens"].to(self.device), b["attention_mask"].to(self.device)

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of ``step``. Returns metrics (loss = global mean per token)."""
        phase = self.phase(step)
        from duo_plugin.data.text import shard

        batch_idx = self.sampler.indices(step)  # the global batch: N dataset indices, a function of (seed, step)
        micro = []
        local_tokens = 0
        for m in range(self.accum):
            idx, pos = shard(batch_idx, self.rank, self.world_size, m, self.accum)
            x0, mask = self._fetch(idx)
            micro.append((x0, mask, pos))
            local_tokens += self._count_tokens(mask)
        n_tok = torch.tensor([local_tokens], dtype=torch.float64)
        if is_dist():
            n_tok = n_tok.to(self.device)
            dist.all_reduce(n_tok)
        n_global = float(n_tok.item())
        if n_global <= 0:
            raise ValueError(f"step {step}: the global batch has no valid tokens; check data.packing / padding")
        lr = self._set_lr(step)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x0, mask, pos) in enumerate(micro):
            if self.distributed and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            s = self._micro_loss_sum(x0, mask, pos, step, phase)
            loss = s / n_global
            # FSDP2 averages gradients over ranks; × world size turns that into the sum (= 1-process gradient).
            (loss * self.world_size).backward()
            loss_sum += loss.detach().double()
        if is_dist():
            dist.all_reduce(loss_sum)
        loss_value = float(loss_sum.item())
        if not math.isfinite(loss_value):
            ckpt = self.last_checkpoint or "none yet"
            raise FloatingPointError(
                f"non-finite loss {loss_value} at step {step} (phase {phase}); stopping without saving. Last good "
                f"checkpoint: {ckpt}. Lower optimizer.lr, raise lr_scheduler.warmup_steps or set clip_grad_norm, then "
                "resume (resume=true)")
        grad_norm = None
        if self.cfg.clip_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg.clip_grad_norm))
            grad_norm = float(full_tensor(gn))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.tokens_seen += int(n_global)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_global), "phase": phase}

    # ------------------------------------------------------------------------------------------------ validation
    def evaluate(self) -> dict:
        """Validation perplexity on the held-out split with EMA weights.

        Diffusion: the true discrete NELBO (log-linear α, one stratified t per sequence over the split, no curriculum;
        duo-method.md §8) via :func:`duo_plugin.eval.likelihood.nelbo_perplexity`.  AR: exp(mean next-token NLL).
        Every rank evaluates the same full split (FSDP forwards need all ranks); the numbers agree across ranks.
        """
        if self.val_set is None:
            return {}
        cfg = self.cfg
        blocks, mask = self.val_set.blocks, self.val_set.attention_mask
        if mask is None:
            mask = torch.ones_like(blocks, dtype=torch.bool)
        max_b = cfg.get("eval_max_batches")
        bs = int(cfg.get("eval_batch_size") or max(1, self.global_batch_size // (self.world_size * self.accum)))
        if max_b:
            blocks, mask = blocks[: int(max_b) * bs], mask[: int(max_b) * bs]
        ctx = self.ema.swap_into(self.model) if self.ema is not None else contextlib.nullcontext()
        self.model.eval()
        with ctx, torch.no_grad(), self._autocast():
            if self.objective == "ar":
                tot, n = 0.0, 0
                for lo in range(0, blocks.shape[0], bs):
                    x0, m = blocks[lo:lo + bs].to(self.device), mask[lo:lo + bs].to(self.device)
                    kw = {"padding_mask": m} if not bool(m.all()) else {}
                    log_p = self.model(x0, torch.zeros(x0.shape[0], device=self.device), **kw)
                    tm = m[:, 1:] & m[:, :-1]
                    tot += float(masked_token_sum(ar_token_nll(log_p, x0).double(), tm))
                    # per content token, as the diffusion NELBO: every target's NLL over the non-special targets
                    tk = self.tokenizer
                    content = tm & (x0[:, 1:] != tk.bos_id) & (x0[:, 1:] != tk.eos_id)
                    if tk.pad_id is not None:
                        content &= x0[:, 1:] != tk.pad_id
                    n += int(content.sum())
                nll = tot / max(n, 1)
            else:
                from duo_plugin.eval.likelihood import nelbo_perplexity

                # content-token NELBO (BOS/EOS/pad not counted; the all-token figure is kept beside it)
                tk = self.tokenizer
                res = nelbo_perplexity(self.model, blocks, mask, batch_size=bs, seed=self.seed,
                                       valid_vocab=self.valid_vocab, schedule=self.loglinear, t_min=self.t_min,
                                       device=self.device, progress=False,
                                       special_ids=(tk.bos_id, tk.eos_id, tk.pad_id))
                nll = float(res["nll_per_token"])
                nll_all = float(res["nll_per_token_all"])
        self.model.train()
        out = {"val_nll": nll, "val_ppl": math.exp(min(nll, 700.0))}
        if self.objective != "ar":
            out["val_ppl_all_tokens"] = math.exp(min(nll_all, 700.0))
        if self.first_val is None:
            self.first_val = dict(out, step=self.step)
        self.last_val = dict(out, step=self.step)
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        if self.distributed:
            return tt_training.gather_cpu_state_dict(self.model, self.is_rank_zero, device=self.device)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _full_optim_state(self) -> dict | None:
        if self.distributed:
            return tt_training.get_full_optimizer_state_dict(self.model, self.optimizer, self.is_rank_zero,
                                                            device=self.device)
        return full_optimizer_state(self.model, self.optimizer)  # name-keyed: resumable on any world size

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """Atomic step checkpoint ``output_dir/checkpoints/step_XXXXXXXX/{model/, training_state.pt}``."""
        from duo_plugin.training import checkpointing

        model_sd = self._full_model_state()
        ema_sd = self.ema.full_state_dict(self.model) if self.ema is not None else None
        optim_sd = self._full_optim_state()
        path = None
        if self.is_rank_zero:
            def write(tmp_dir: Path) -> None:
                model_dir = tmp_dir / "model"
                self._save_model_dir(model_dir, model_sd, ema_sd)
                checkpointing.save_training_state(tmp_dir / "training_state.pt", {
                    "step": self.step, "tokens_seen": self.tokens_seen, "optimizer": optim_sd,
                    "ema": ema_sd, "phase": self.phase(self.step), "losses": self.losses, "phases": self.phases,
                    "first_val": self.first_val, "last_val": self.last_val,
                    "config": OmegaConf.to_container(self.cfg, resolve=True),
                    "world_size": self.world_size, "rng": checkpointing.capture_rng_state(),
                    # a LoRA model's dir is saved MERGED (reloads as the full model): keep its own trainable
                    # (unmerged LoRA / adaLN) tensors for resume; frozen base weights come from init_from again
                    "trainable_state": self._trainable_state(model_sd),
                })
            path = checkpointing.save_step_checkpoint(self.output_dir, self.step, writer=write,
                                                      keep_last=int(self.cfg.checkpoint.keep_last))
            self.last_checkpoint = path
        self._barrier()
        return path

    def _trainable_state(self, model_sd: dict) -> dict | None:
        """LoRA models only: the trainable entries of the (gathered, unmerged) model state dict, else None."""
        if getattr(self.model, "_duo_lora", None) is None:
            return None
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in model_sd.items() if k in names}

    def _save_model_dir(self, model_dir: Path, model_sd: dict, ema_sd: dict | None) -> None:
        from duo_plugin.models.checkpoint import save_pretrained

        unwrapped = self._cpu_model_with(model_sd)
        save_pretrained(unwrapped, model_dir, ema_state_dict=(ema_sd or {}).get("shadow"), metadata={
            "valid_vocab": self.valid_vocab.cpu(), "tokenizer": self.tokenizer.descriptor(),
            "step": self.step, "objective": self.objective, "seq_len": self.seq_len,
        })
        self.tokenizer.save(model_dir / "tokenizer")

    def _cpu_model_with(self, model_sd: dict) -> torch.nn.Module:
        if not self.distributed and not self.cfg.compile:
            return self.model
        init_from = self.cfg.get("init_from")
        # issue 8: an HF-checkpoint init_from (no duo_config.json) is rebuilt from the model: config
        m = self._build_model(self.vocab_size) if not init_from or not (
            Path(str(init_from)) / "duo_config.json").is_file() else None
        if m is None:
            from duo_plugin.models.checkpoint import load_pretrained

            m = load_pretrained(Path(str(self.cfg.init_from)), weights="model", device="cpu")
        m.load_state_dict(model_sd)
        return m

    def _maybe_resume(self) -> None:
        from duo_plugin.training import checkpointing

        r = self.cfg.resume
        if r is False or r is None:
            return
        root = self.output_dir / "checkpoints"
        ckpt = checkpointing.latest_checkpoint(self.output_dir) if r in (True, "auto") else Path(str(r))
        if ckpt is None:
            if self.is_rank_zero:
                log.info("resume=%s but no checkpoint under %s: starting from scratch", r, root)
            return
        state = checkpointing.load_training_state(Path(ckpt) / "training_state.pt")
        checkpointing.check_resume_compatible(state["config"], OmegaConf.to_container(self.cfg, resolve=True),
                                              RESUME_KEYS)
        check_resume_max_steps(state["config"], OmegaConf.to_container(self.cfg, resolve=True))
        from duo_plugin.models.checkpoint import load_pretrained

        if getattr(self.model, "_duo_lora", None) is not None:
            # LoRA: model/ holds merged weights of the full twin; restore the unmerged trainable tensors instead
            if state.get("trainable_state") is None:
                raise ValueError(f"{ckpt} holds no unmerged LoRA weights (trainable_state); it cannot resume a LoRA "
                                 "run exactly: start a new run with init_from=<that checkpoint's model dir>")
            model_sd, strict = dict(state["trainable_state"]), False
            frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
            if set(model_sd) != {n for n, _ in self.model.named_parameters()} - frozen:
                raise ValueError(f"{ckpt}: trainable_state does not match this model's trainable parameters")
        else:
            model_sd = load_pretrained(Path(ckpt) / "model", weights="model", device="cpu").state_dict()
            strict = True
        if self.distributed:
            tt_training.load_from_full_model_state_dict(self.model, model_sd, self.device, strict=strict)
            # torchtune's loader assigns NEW Parameter objects (load_state_dict(assign=True)): rebuild the optimizer
            # over them, or it would keep stepping the stale pre-resume parameters.
            self._setup_optimizer()
            tt_training.load_from_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                                           self.device)
        else:
            self.model.load_state_dict(model_sd, strict=strict)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"{ckpt} holds no EMA state but ema.decay is set; set ema.decay: null to resume it")
            self.ema.load_full_state_dict(state["ema"], self.model, self.device)
        from duo_plugin.training.checkpointing import restore_rng_state

        if state.get("rng") is not None and int(state.get("world_size", 1)) == self.world_size:
            restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.losses = list(state.get("losses", []))
        self.phases = list(state.get("phases", []))
        self.first_val, self.last_val = state.get("first_val"), state.get("last_val")
        self.last_checkpoint = Path(ckpt)
        if self.is_rank_zero:
            log.info("resumed from %s at step %d (phase %s)", ckpt, self.step, self.phase(self.step))

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        eval_every, ckpt_every = int(cfg.eval_every), int(cfg.checkpoint.every)
        pbar = None
        if self.is_rank_zero and cfg.progress_bar:
            from tqdm import tqdm

            pbar = tqdm(total=self.max_steps, initial=self.step, desc="duo_pretrain", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        if eval_every > 0 and self.first_val is None:
            self._log(self.evaluate(), self.step)
        val_ppl = self.last_val["val_ppl"] if self.last_val else float("nan")
        while self.step < self.max_steps:
            step = self.step
            if step == self.curriculum_steps and step > 0 and self.is_rank_zero:
                log.info("step %d: curriculum -> discrete phase (log-linear schedule, hard z_t)", step)
            ts = time.perf_counter()
            m = self.train_step(step)
            dt = time.perf_counter() - ts
            self.step = step + 1
            self.losses.append(m["loss"])
            self.phases.append(m["phase"])
            metrics = {"loss": m["loss"], "lr": m["lr"], "tokens_per_second": m["tokens"] / max(dt, 1e-9),
                       "curriculum": 1.0 if m["phase"] == "curriculum" else 0.0}
            if m["grad_norm"] is not None:
                metrics["grad_norm"] = m["grad_norm"]
            if eval_every > 0 and (self.step % eval_every == 0 or self.step == self.max_steps):
                metrics.update(self.evaluate())
                val_ppl = metrics["val_ppl"]
            if self.step % int(cfg.log_every) == 0 or "val_ppl" in metrics:
                self._log(metrics, self.step)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss']:.3f}", ppl=f"{val_ppl:.1f}",
                                 tok_s=f"{metrics['tokens_per_second']:.0f}", phase=m["phase"])
            if ckpt_every > 0 and self.step % ckpt_every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
            if cfg.max_wall_s and all_ranks_agree(time.perf_counter() - t0 > float(cfg.max_wall_s), self.device):
                if self.is_rank_zero:
                    log.info("max_wall_s=%s reached at step %d: stopping early", cfg.max_wall_s, self.step)
                break
        if pbar is not None:
            pbar.close()
        if eval_every > 0 and (self.last_val is None or self.last_val["step"] != self.step):
            self._log(self.evaluate(), self.step)  # e.g. stopped early by max_wall_s
        final_ckpt = self.save_checkpoint(final=True)
        final_dir = None
        if self.is_rank_zero:
            final_dir = self.output_dir / "final"
            tmp = self.output_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(Path(final_ckpt) / "model", tmp)
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp, final_dir)
        summary = {
            "steps": self.step, "tokens": self.tokens_seen, "wall_time_s": time.perf_counter() - t0,
            "final_loss": self.losses[-1] if self.losses else None,
            "first_val": self.first_val, "final_val": self.last_val,
            "final_val_ppl": self.last_val["val_ppl"] if self.last_val else None,
            "checkpoint": str(final_ckpt) if final_ckpt else None,
            "model_dir": str(final_dir) if final_dir else None,
            "world_size": self.world_size, "objective": self.objective,
            "curriculum_steps": self.curriculum_steps,
            "losses": self.losses, "phases": self.phases,
        }
        if self.is_rank_zero:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"duo_pretrain: done: {self.step} steps; final model dir: {final_dir}; summary: "
                  f"{self.output_dir / 'summary.json'}", flush=True)
        return summary

    def _log(self, metrics: dict, step: int) -> None:
        if self.metric_logger is not None and metrics:
            self.metric_logger.log_dict({k: float(v) for k, v in metrics.items()}, step)

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()


def run(cfg: DictConfig) -> dict:
    """Run the whole recipe in-process and return the summary (tests and scripts call this)."""
    recipe = DuoPretrainRecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


@tt_config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Train a Duo diffusion LM. Config keys: see duo_plugin/configs/duo/tiny_cpu.yaml."""
    try:
        run(cfg)
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
