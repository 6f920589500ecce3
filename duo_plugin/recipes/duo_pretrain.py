"""duo_pretrain: train a Duo uniform-state diffusion LM (or its AR baseline) from scratch or from a checkpoint.

A torchtune-style recipe: setup (tokenizer, data, model, optimizer, objective), loop, validation, checkpoint,
resume, log. The training objective is a library component (docs/method.md §7): ``objective: duo`` builds
:class:`duo_plugin.objectives.DuoObjective` from the ``schedule:``/``curriculum:``/``kernels:``/``adapt:`` sections
(curriculum phase for steps ``[0, curriculum.steps)``, then the discrete NELBO), ``objective: ar`` builds
:class:`~duo_plugin.objectives.ARObjective` (same backbone, causal), and ``objective: {_component_: ...}`` any
objective with its arguments inline. The data come from ``data:`` (:func:`duo_plugin.data.text_blocks`).

Exactness across topology/resume (docs/method.md §6): each global step takes the global batch from the data sampler
(a pure function of (seed, step)); the objective keys every random draw by (seed, step, position in the global
batch); the loss is the SUM over a micro-batch's valid tokens divided by the number of valid tokens in the GLOBAL
batch, and gradients are summed over micro-steps and ranks (:mod:`duo_plugin.training.loop`). Hence 1 process vs N
processes vs any accumulation split, and a run resumed at any step, give the same losses (up to float summation
order). Dropout > 0 breaks this: dropout masks come from each rank's global RNG.

Run::

    tune run duo_pretrain --config duo/tiny_cpu                       # once registered
    python -m duo_plugin.recipes.duo_pretrain --config duo_plugin/configs/duo/tiny_cpu.yaml max_steps=50
    tune run --nproc_per_node 2 duo_plugin/recipes/duo_pretrain.py --config <path.yaml>   # FSDP2 (gloo on CPU)

Absolute imports only: torchtune runs registered recipes through ``runpy.run_path``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from duo_plugin.eval.likelihood import nelbo_perplexity
from duo_plugin.objectives import ar_token_nll, objective_from_config  # noqa: F401  (ar_token_nll: re-export)
from duo_plugin.objectives.config import PRETRAIN_KEYS, legacy_conflicts
from duo_plugin.recipes.common import RecipeBase, instantiate, log
from duo_plugin.training import loop
from duo_plugin.training.recipe_utils import (ANY, COMPONENT, ConfigError, all_ranks_agree, check_keys,  # noqa: F401
                                             is_dist, lr_multiplier, masked_token_sum)
from torchtune import config as tt_config
from torchtune import training as tt_training

# ----------------------------------------------------------------------------------------------------------------
# Config schema. Sections marked COMPONENT are instantiated via ``_component_`` (their keys are checked against the
# component's signature by instantiate); every other key must appear here, so a typo is an error naming the fix.
# ----------------------------------------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "output_dir": None,
    "seed": None,
    "device": None,
    "dtype": None,  # fp32 | bf16 (bf16 = autocast on CUDA only; CPU always runs fp32)
    "objective": ANY,  # duo | ar | {_component_: duo_plugin.objectives.DuoObjective, ...}
    "tokenizer": {"path": None, "train": {"vocab_size": None, "model_type": None, "byte_fallback": None,
                                          "user_defined_symbols": None}},
    "data": {
        "_component_": None,  # optional; default duo_plugin.data.text_blocks (the keys below are its arguments)
        "source": None,  # shakespeare | files | hub
        "files": None,
        "hub": ANY,
        "seq_len": None,
        "packing": None,  # wrap | pad
        "pad_mode": None,  # clean_masked | official: what pads are for the objective (docs/evaluation.md)
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
                   "input": None, "topk": None, "table_cache": None},  # dense|topk input, T-table cache
    # LLM adaptation: attention-mask annealing and which parameters train (see docs/llm-adaptation.md)
    "adapt": {"attn_anneal_steps": None, "attn_anneal_mode": None, "trainable": None},
    "eval_every": None,
    "eval_max_batches": None,
    "checkpoint": {"every": None, "keep_last": None},
    "resume": None,
    "overwrite": None,  # true: a fresh run may replace an earlier run in output_dir (training/run_dir.py)
    "compile": None,
    "enable_activation_checkpointing": None,
    "fsdp": {"reshard_after_forward": None},
    "metric_logger": COMPONENT,
    "log_every": None,
    "progress_bar": None,
    "max_wall_s": None,
    # fused kernels: auto|dense|reference|chunked|triton per path; see duo_plugin/kernels/select.py
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
    "overwrite": False,
    "compile": False,
    "enable_activation_checkpointing": False,
    "fsdp": {"reshard_after_forward": True},
    "log_every": 1,
    "progress_bar": True,
    "max_wall_s": None,
    # `auto`: dense while it fits the memory budget and is faster, fused otherwise (duo_plugin/kernels/select.py)
    "kernels": {"curriculum_input": "auto", "nelbo": "auto", "auto_min_row_elements": 1 << 22, "ram_fraction": 0.25,
                "memory_budget_mb": None},
    "cpu_threads": "auto",
}


# Keys that must equal the checkpoint's on resume (everything that changes the loss sequence; "kernels" too: the fused
# curriculum input draws a different noise stream than the dense one).  Not listed, free to change:
# gradient_accumulation_steps, world size, eval/checkpoint/logging cadence, compile, AC, and max_steps (except with
# lr_scheduler.name=cosine, whose LR sequence depends on max_steps: see check_resume_max_steps).
RESUME_KEYS = ("seed", "objective", "model", "init_from", "global_batch_size", "optimizer", "lr_scheduler",
               "clip_grad_norm", "ema", "schedule", "curriculum", "data.seq_len", "data.packing", "data.pad_mode", "data.source",
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
    if isinstance(cfg.get("objective"), (dict, DictConfig)):
        raw = OmegaConf.to_container(cfg, resolve=False)
        bad = legacy_conflicts(raw, PRETRAIN_KEYS)
        if bad:
            raise ConfigError(bad[0])
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    from duo_plugin.training.config_values import PRETRAIN_TYPES, check_data_source, coerce_config

    coerce_config(merged, PRETRAIN_TYPES)  # max_steps=abc, optimizer.lr=fast, global_batch_size=31.9: name the key
    check_data_source(merged)  # data.files with data.source=shakespeare would be ignored: name both keys
    for req in ("output_dir", "tokenizer", "data", "model", "global_batch_size", "max_steps", "optimizer"):
        if OmegaConf.select(merged, req) is None:
            raise ConfigError(f"config key '{req}' is required (see duo_plugin/configs/duo/tiny_cpu.yaml)")
    if merged.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype must be fp32 or bf16, got {merged.dtype!r}")
    if int(merged.global_batch_size) < 1 or int(merged.gradient_accumulation_steps) < 1:
        raise ConfigError("global_batch_size and gradient_accumulation_steps must be >= 1")
    if int(merged.max_steps) < 0:
        raise ConfigError(f"max_steps must be >= 0, got {merged.max_steps}")
    if merged.lr_scheduler.name not in ("constant_with_warmup", "cosine"):
        raise ConfigError(f"lr_scheduler.name must be constant_with_warmup or cosine, got {merged.lr_scheduler.name!r}")
    if merged.init_weights not in ("ema", "model"):
        raise ConfigError(f"init_weights must be 'ema' or 'model' (which weights of init_from), got "
                          f"{merged.init_weights!r}")
    if merged.adapt.trainable not in ("auto", "all", "lora"):
        raise ConfigError(f"adapt.trainable must be auto, all or lora, got {merged.adapt.trainable!r}")
    from duo_plugin.runtime import choose_cpu_threads

    try:
        choose_cpu_threads(merged.cpu_threads, n_params=0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if merged.resume not in (False, True, "auto") and not isinstance(merged.resume, str):
        raise ConfigError("resume must be false, true/'auto' (latest checkpoint in output_dir) or a checkpoint dir")
    from duo_plugin.recipes.common import pad_mode_of, warn_suspicious_lr

    pad_mode_of(merged)
    warn_suspicious_lr(merged)
    build_objective(merged)  # the objective's own checks (curriculum / kernels / adapt values), naming the key
    return merged


def build_objective(cfg: DictConfig):
    """The run's objective (see the module docstring); ValueError → ConfigError naming the key."""
    try:
        return objective_from_config(OmegaConf.to_container(cfg, resolve=True), recipe="pretrain")
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
class DuoPretrainRecipe(RecipeBase):
    """Setup → train → (validate, checkpoint) → summary. See the module docstring."""

    def __init__(self, cfg: DictConfig):
        self.cfg = validate_config(cfg)
        cfg = self.cfg
        self.objective = build_objective(cfg)
        self._open_run(cfg)
        self.global_batch_size = int(cfg.global_batch_size)
        self._check_batch_split(self.global_batch_size)
        self.max_steps = int(cfg.max_steps)
        if cfg.dtype == "bf16" and self.device.type != "cuda" and self.is_rank_zero:
            log.info("dtype=bf16 requested on %s: bf16 autocast is CUDA-only, running fp32", self.device.type)
        self.step = 0
        self.tokens_seen = 0
        self.last_val: dict | None = None
        self.first_val: dict | None = None
        self.losses: list[float] = []  # per completed step (restored on resume)
        self.phases: list[str] = []

    # the objective's schedules / kernel paths, for inspection
    @property
    def duality(self):
        return getattr(self.objective, "duality", None)

    @property
    def kernel_paths(self) -> dict:
        return getattr(self.objective, "kernel_paths", {})

    def phase(self, step: int) -> str:
        return self.objective.phase(step)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._open_output()
        self._setup_tokenizer()
        self.seq_len = int(self.cfg.data.seq_len)
        self._setup_data(build_val=True)
        self._setup_model()
        self._setup_optimizer()
        self._maybe_resume()

    def _setup_tokenizer(self) -> None:
        from duo_plugin.data.blocks import text_documents
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
                d = OmegaConf.to_container(self.cfg.data, resolve=True)
                corpus_file.write_text("\n".join(text_documents(**{k: v for k, v in d.items() if v is not None})),
                                       encoding="utf-8")
                kw = {k: OmegaConf.to_object(train[k]) if OmegaConf.is_config(train[k]) else train[k]
                      for k in ("model_type", "byte_fallback", "user_defined_symbols") if train.get(k) is not None}
                train_sentencepiece([corpus_file], int(train.vocab_size), path, **kw)
                corpus_file.unlink()
                log.info("trained a SentencePiece tokenizer (vocab %d) at %s", int(train.vocab_size), path)
            self._barrier()
        self.tokenizer = load_tokenizer(path)

    def _build_model(self, vocab_size: int) -> torch.nn.Module:
        mcfg = self.cfg.model
        extra = {}
        # an HF init_from: architecture from its config.json unless the user set the key (see _load_init_from)
        arch = [(k, v) for k, v in getattr(self, "hf_arch", {}).items() if k != "vocab_size"]
        for key, value in (("vocab_size", vocab_size), ("max_seq_len", self.seq_len), *arch):
            if mcfg.get(key) is None:
                extra[key] = value
        if getattr(self.objective, "causal", False) and "causal" not in mcfg:
            extra["causal"] = True
        return instantiate(mcfg, "model", **extra)

    def _setup_model(self) -> None:
        from duo_plugin.data.tokenizers import check_vocab
        from duo_plugin.objectives.base import vocab_options
        from duo_plugin.recipes.common import pad_mode_of

        cfg = self.cfg
        init_from = cfg.get("init_from")
        # Same seed on every rank BEFORE any rank offset: identical random init everywhere.
        torch.manual_seed(self.seed)
        if init_from:
            model = self._load_init_from(Path(str(init_from)))
        else:
            self._check_memory(lambda: self._build_model(int(self.tokenizer.vocab_size)), "model.*")
            model = self._build_model(int(self.tokenizer.vocab_size))
            init = getattr(model, "init_weights", None)  # from-scratch init, for backbones that define one
            if callable(init):
                init()
        k = int(model.vocab_size)
        vv = cfg.data.get("valid_vocab") or {}
        duo_src = init_from if init_from and (Path(str(init_from)) / "duo_config.json").is_file() else None
        try:  # official pad mode: every tokenizer id is an ordinary id (objectives.base.vocab_options)
            inc_pad, inc_special = vocab_options(pad_mode_of(cfg), vv.get("include_pad"), vv.get("include_special"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.valid_vocab = check_vocab(self.tokenizer, k, include_pad=inc_pad, include_special=inc_special,
                                       model_source=duo_src)
        if self.seq_len > int(model.max_seq_len):
            fix = (f"set model.max_seq_len >= {self.seq_len}" if duo_src is None else
                   f"the model loaded from init_from={duo_src} has a fixed max_seq_len")  # model.* does not apply
            raise ConfigError(
                f"data.seq_len={self.seq_len} exceeds the model's max_seq_len={int(model.max_seq_len)}; lower "
                f"data.seq_len to <= {int(model.max_seq_len)} ({fix})")
        self.vocab_size = k
        self.k_eff = int(self.valid_vocab.sum())
        self._set_trainable(model)
        if cfg.enable_activation_checkpointing:
            tt_training.set_activation_checkpointing(model, auto_wrap_policy=loop.block_types(model))
        model.to(self.device)
        if self.distributed:
            # A time-conditioned DecoderDenoiser calls layer submodules directly (per-layer FSDP hooks would be
            # bypassed), so only the root is sharded then.
            self._shard(model, set() if getattr(model, "time_conditioning", False) and hasattr(model, "decoder")
                        else loop.block_types(model))
        if cfg.compile:
            for block in loop.model_blocks(model):
                block.compile()
        self.model = model
        self.valid_vocab = self.valid_vocab.to(self.device)
        try:
            self.objective.setup(model, self._objective_context(
                micro_batch_rows=self.global_batch_size // (self.world_size * self.accum)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # the process's data ids are what the model folder records (MDLM drops a reused [MASK] token from them)
        proc_vocab = getattr(getattr(self.objective, "process", None), "valid_vocab", None)
        self.valid_vocab = self.valid_vocab if proc_vocab is None else proc_vocab
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

    def _check_memory(self, build, what: str) -> None:
        """Parameter, optimizer and activation memory of the model ``build()`` makes, from its config (built on the
        meta device) against the device's free memory: one line naming the sizes instead of an allocation failure."""
        from duo_plugin.errors import UserError
        from duo_plugin.models.checkpoint import check_training_memory

        rows = max(1, self.global_batch_size // (self.world_size * self.accum))
        try:
            check_training_memory(build, rows=rows, seq_len=self.seq_len, device=self.device,
                                  what=f"training the model of {what}", ema=bool((self.cfg.ema or {}).get("decay")))
        except UserError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build the model of {what} ({type(e).__name__}: {e}); check the model.* keys "
                              "against the builder's arguments") from None

    def _set_trainable(self, model: torch.nn.Module) -> None:
        """``adapt.trainable``: auto = LoRA-only for LoRA models (+ adaLN), else all; lora; all. Logs the
        vocabulary report (docs/llm-adaptation.md)."""
        trainable = self.cfg.adapt.trainable
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

    def _load_init_from(self, src: Path) -> torch.nn.Module:
        """``init_from``: a duo model dir (``duo_config.json``; weights per ``init_weights``, fresh optimizer — the
        paper's OWT stage 2) or an HF checkpoint dir (``config.json``) loaded into the ``model:`` denoiser."""
        if not src.exists():
            raise FileNotFoundError(f"init_from={src} does not exist; point it at a model directory "
                                    "(output_dir/final, a checkpoint's model/ dir, or an HF checkpoint dir)")
        if (src / "duo_config.json").is_file():
            from duo_plugin.data.tokenizers import check_same_tokenizer
            from duo_plugin.models.checkpoint import load_pretrained
            from duo_plugin.training.checkpointing import check_finite

            model = load_pretrained(src, weights=str(self.cfg.init_weights), device="cpu")
            # the checkpoint stores its tokenizer (descriptor + sha256): another one would re-map every token id
            check_same_tokenizer(getattr(model, "duo_metadata", {}).get("tokenizer"), self.tokenizer, src)
            check_finite(model.state_dict(), src)
            return model
        if (src / "config.json").is_file():
            from duo_plugin.models.hf_checkpoint import load_hf_checkpoint
            from duo_plugin.training.adapt import architecture_from_hf_config

            # The architecture comes from the checkpoint's config.json (the embedding size too, e.g. Qwen's padded
            # 151,936 rows vs ~151,665 tokenizer ids; padded rows are excluded by valid_vocab); model.* keys in the
            # config override it (and are logged).
            from duo_plugin.models.checkpoint import read_folder_json

            hf_cfg = read_folder_json(src / "config.json", what=f"init_from={src}")  # data: nothing names code
            if not isinstance(hf_cfg, dict):
                raise ConfigError(f"{src / 'config.json'} must hold a JSON object (an HF model config)")
            hf_vocab = hf_cfg.get("vocab_size")
            self.hf_arch = architecture_from_hf_config(hf_cfg, component=self.cfg.model.get("_component_"),
                                                       where=str(src / "config.json"))
            if self.is_rank_zero:
                user = {k: self.cfg.model[k] for k in self.hf_arch if self.cfg.model.get(k) is not None}
                log.info("model architecture from %s: %s%s", src / "config.json", self.hf_arch,
                         f"; overridden by model.*: {user}" if user else "")
            self._check_memory(lambda: self._build_model(int(hf_vocab or self.tokenizer.vocab_size)),
                               str(src / "config.json"))
            model = self._build_model(int(hf_vocab or self.tokenizer.vocab_size))
            return load_hf_checkpoint(model, src)
        raise FileNotFoundError(f"init_from={src} holds neither duo_config.json (a duo model dir) nor config.json "
                                "(an HF checkpoint dir)")

    # ------------------------------------------------------------------------------------------------ step
    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of ``step``. Returns metrics (loss = global mean per token)."""
        m = self.optimizer_step_on(step)
        self.tokens_seen += m["tokens"]
        return dict(m, phase=self.objective.phase(step))

    # ------------------------------------------------------------------------------------------------ validation
    def evaluate(self) -> dict:
        """Validation NLL/perplexity per content token on the held-out split with EMA weights
        (``objective.validation_nll``: the true discrete NELBO for diffusion, next-token NLL for AR). Every rank evaluates the same full split (FSDP
        forwards need all ranks); the numbers agree across ranks."""
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
        tk = self.tokenizer
        with ctx, torch.no_grad(), self.autocast():
            # per content token (BOS/EOS/pad not counted); the all-token figure, where given, is kept beside it
            res = self.objective.validation_nll(self.model, blocks, mask, batch_size=bs,
                                                special_ids=(tk.bos_id, tk.eos_id, tk.pad_id),
                                                nelbo_perplexity=nelbo_perplexity)
        self.model.train()
        nll = float(res["nll"])
        out = {"val_nll": nll, "val_ppl": math.exp(min(nll, 700.0))}
        if res.get("nll_all") is not None:
            out["val_ppl_all_tokens"] = math.exp(min(float(res["nll_all"]), 700.0))
        if self.first_val is None:
            self.first_val = dict(out, step=self.step)
        self.last_val = dict(out, step=self.step)
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, final: bool = False) -> Path | None:
        """Atomic step checkpoint ``output_dir/checkpoints/step_XXXXXXXX/{model/, training_state.pt}``."""
        from duo_plugin.training import checkpointing

        model_sd = self._full_model_state()
        ema_sd = self.ema.full_state_dict(self.model) if self.ema is not None else None
        optim_sd = self._full_optim_state()
        path = None
        if self.is_rank_zero:
            def write(tmp_dir: Path) -> None:
                self._save_model_dir(tmp_dir / "model", model_sd, ema_sd)
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
        from duo_plugin.training.checkpointing import canonical_name

        names = {canonical_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in model_sd.items() if canonical_name(k) in names}

    def _save_model_dir(self, model_dir: Path, model_sd: dict, ema_sd: dict | None) -> None:
        from duo_plugin.models.checkpoint import save_pretrained

        unwrapped = self._cpu_model_with(model_sd)
        save_pretrained(unwrapped, model_dir, ema_state_dict=(ema_sd or {}).get("shadow"), metadata={
            "valid_vocab": self.valid_vocab.cpu(), "tokenizer": self.tokenizer.descriptor(),
            "step": self.step, "objective": self.objective.name, "seq_len": self.seq_len,
            **({"mask_id": int(self.objective.process.mask_id)}
               if getattr(getattr(self.objective, "process", None), "mask_id", None) is not None else {}),
            **dict(getattr(self.objective, "extra_metadata", None) or {}),  # e.g. D3PM's number of steps
        })
        self.tokenizer.save(model_dir / "tokenizer")

    def _cpu_model_with(self, model_sd: dict) -> torch.nn.Module:
        if not self.distributed and not self.cfg.compile:
            return self.model
        init_from = self.cfg.get("init_from")
        # an HF-checkpoint init_from (no duo_config.json) is rebuilt from the model: config
        if not init_from or not (Path(str(init_from)) / "duo_config.json").is_file():
            m = self._build_model(self.vocab_size)
        else:
            from duo_plugin.models.checkpoint import load_pretrained

            m = load_pretrained(Path(str(init_from)), weights="model", device="cpu")
        m.load_state_dict(model_sd)
        return m

    def _maybe_resume(self) -> None:
        lora = getattr(self.model, "_duo_lora", None) is not None
        found = self._resume_state(RESUME_KEYS, model_weights=not lora)
        if found is None:
            return
        ckpt, state, loaded_sd = found
        check_resume_max_steps(state["config"], OmegaConf.to_container(self.cfg, resolve=True))
        from duo_plugin.training import checkpointing

        if lora:
            # LoRA: model/ holds merged weights of the full twin; restore the unmerged trainable tensors instead
            if state.get("trainable_state") is None:
                raise ValueError(f"{ckpt} holds no unmerged LoRA weights (trainable_state); it cannot resume a LoRA "
                                 "run exactly: start a new run with init_from=<that checkpoint's model dir>")
            model_sd, strict = checkpointing.canonical_state_dict(state["trainable_state"]), False
            named = checkpointing.canonical_named_parameters(self.model)
            if set(model_sd) != {n for n, p in named.items() if p.requires_grad}:
                raise ValueError(f"{ckpt}: trainable_state does not match this model's trainable parameters")
        else:
            model_sd, strict = loaded_sd, True
        self._load_states(model_sd, state["optimizer"], strict=strict)
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"{ckpt} holds no EMA state but ema.decay is set; set ema.decay: null to resume it")
            self.ema.load_full_state_dict(state["ema"], self.model, self.device)
        self._restore_rng(state)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.losses = list(state.get("losses", []))
        self.phases = list(state.get("phases", []))
        self.first_val, self.last_val = state.get("first_val"), state.get("last_val")
        self.last_checkpoint = ckpt
        if self.is_rank_zero:
            log.info("resumed from %s at step %d (phase %s)", ckpt, self.step, self.phase(self.step))

    #: the first steps watched for an exploding loss; the rise over the first step's loss, sustained for RUN steps
    EXPLODE_WINDOW, EXPLODE_FACTOR, EXPLODE_RUN = 50, 1.3, 5

    def _warn_if_loss_explodes(self) -> None:
        """A learning rate far too high (``optimizer.lr=1e6``) can train a dead model with finite losses: warn once
        when, within the first :data:`EXPLODE_WINDOW` steps, :data:`EXPLODE_RUN` consecutive losses all exceed
        ``EXPLODE_FACTOR`` x the first step's loss (same objective phase; single noisy steps do not count).  A
        warning, not an error: the input is legal."""
        n, k = len(self.losses), self.EXPLODE_RUN
        if getattr(self, "_explode_warned", False) or n <= k or n > self.EXPLODE_WINDOW or not self.is_rank_zero:
            return
        first, recent = self.losses[0], self.losses[-k:]
        if set(self.phases[-k:]) == {self.phases[0]} and min(recent) > self.EXPLODE_FACTOR * first > 0:
            self._explode_warned = True
            log.warning("WARNING: the loss rose from %.4g at step 1 to %.4g at step %d and stays there: "
                        "optimizer.lr=%s is likely far too high (the model is diverging); lower optimizer.lr (e.g. "
                        "3e-4) or raise lr_scheduler.warmup_steps", first, recent[-1], n, self.cfg.optimizer.get("lr"))

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        eval_every, ckpt_every = int(cfg.eval_every), int(cfg.checkpoint.every)
        pbar = self._progress_bar("duo_pretrain")
        if eval_every > 0 and self.first_val is None:
            self._log(self.evaluate(), self.step)
        val_ppl = self.last_val["val_ppl"] if self.last_val else float("nan")
        while self.step < self.max_steps:
            step = self.step
            if step > 0 and self.phase(step) != self.phase(step - 1) and self.is_rank_zero:
                log.info("step %d: %s -> %s phase", step, self.phase(step - 1), self.phase(step))
            ts = time.perf_counter()
            m = self.train_step(step)
            dt = time.perf_counter() - ts
            self.step = step + 1
            self.losses.append(m["loss"])
            self.phases.append(m["phase"])
            self._warn_if_loss_explodes()
            metrics = {"loss": m["loss"], "lr": m["lr"], "tokens_per_second": m["tokens"] / max(dt, 1e-9),
                       "curriculum": 1.0 if m["phase"] == "curriculum" else 0.0}
            if m["grad_norm"] is not None:
                metrics["grad_norm"] = m["grad_norm"]
            if eval_every > 0 and (self.step % eval_every == 0 or self.step == self.max_steps):
                metrics.update(self.evaluate())  # {} without a held-out split (data.val_fraction: 0)
                val_ppl = metrics.get("val_ppl", val_ppl)
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
        final_dir = self._publish_final(final_ckpt)
        summary = {
            "steps": self.step, "tokens": self.tokens_seen, "wall_time_s": time.perf_counter() - t0,
            "final_loss": self.losses[-1] if self.losses else None,
            "first_val": self.first_val, "final_val": self.last_val,
            "final_val_ppl": self.last_val["val_ppl"] if self.last_val else None,
            "checkpoint": str(final_ckpt) if final_ckpt else None,
            "model_dir": str(final_dir) if final_dir else None,
            "world_size": self.world_size, "objective": self.objective.name,
            "curriculum_steps": int(getattr(self.objective, "curriculum_steps", 0)),
            "losses": self.losses, "phases": self.phases,
        }
        if self.is_rank_zero:
            self._write_summary(summary)
            print(f"duo_pretrain: done: {self.step} steps; final model dir: {final_dir}; summary: "
                  f"{self.output_dir / 'summary.json'}", flush=True)
        return summary


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
    from duo_plugin.errors import user_errors
    from duo_plugin.recipes.common import data_dirs_of
    from duo_plugin.runtime import drop_cwd_from_sys_path

    try:
        with user_errors("duo_pretrain"):  # a user error: one line, exit 2 (DUO_DEBUG=1: traceback)
            # `tune run` / `python -m` put the working directory on sys.path: dropped when it is a model folder
            # (data), kept otherwise (a `_component_` may name the user's own code there, as `tune run` intends)
            drop_cwd_from_sys_path(only_if_data=True, data_dirs=data_dirs_of(cfg))
            run(cfg)
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
