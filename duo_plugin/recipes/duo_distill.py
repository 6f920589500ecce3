"""duo_distill: Discrete Consistency Distillation (DCD) of a Duo checkpoint into a few-step sampler.

Torchtune-style recipe, a copy-and-modify of ``duo_pretrain`` (duo-method.md §4, paper Sec. 4.2, Alg. 1):

* **Init.** Student θ ← the raw weights of ``init_from`` (a duo model dir; ``init_weights: ema`` takes its EMA
  weights instead, for short CPU runs of a base trained at a high constant LR); its EMA ← that dir's EMA weights
  (``ema.use_warmup: false`` keeps the base EMA from being overwritten by the first updates).
* **Rounds.** Before steps 0, M, 2M, … (M = ``distill.steps_per_round``) the teacher θ⁻ ← θ (the current student
  weights; ``distill.teacher: ema`` uses the student's EMA instead, the paper's Alg. 2 ablation).  δ = δ₀·2^round.
* **Step.** t ~ stratified U[t_min, 1] over the global batch, t ← clip(t + δ, 0, 1), s = t − δ (the reference code's
  convention); γ_u linear over the window (paper: [−4, −1]); ONE Gaussian ε per sequence gives
  z_u = argmax(α̃(γ_u) x + σ̃(γ_u) ε) for u ∈ {t, s}; student sees (z_t, σ_t), teacher (z_s, σ_s) with
  σ = −log T(γ) (duality); loss = mean over tokens of KL(student ‖ teacher) (``distill.kl: bwd``) or the reverse.
* **Evaluation.** After each round (and for the base model first) the student's EMA is sampled at
  ``eval.steps`` with ancestral and Greedy-Tail sampling and scored (Gen PPL by ``eval.scorer`` + entropy):
  ``output_dir/quality_table.{json,md}`` (paper Table 7 layout).  ``evaluate_only: true`` only writes the table for
  ``init_from`` (the "command" form).

Exactness across topology/resume is inherited from duo_pretrain: batch = f(seed, step), time and ε depend on
(seed, step, position in the global batch), loss normalised by the global token count; the teacher's weights are
part of the checkpoint, so a run resumed mid-round continues exactly.

Run::

    tune run duo_distill --config duo/distill_tiny_cpu init_from=outputs/duo_tiny_cpu/final
    python -m duo_plugin.recipes.duo_distill --config duo_plugin/configs/duo/distill_tiny_cpu.yaml
    tune run duo_distill --config duo/distill_tiny_cpu evaluate_only=true init_from=<any duo model dir>
    tune run --nproc_per_node 2 duo_plugin/recipes/duo_distill.py --config <path.yaml>   # FSDP2

Absolute imports only: torchtune runs registered recipes through ``runpy.run_path``.
"""

from __future__ import annotations

import contextlib
import copy
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


SCHEMA: dict[str, Any] = {
    "output_dir": None,
    "seed": None,
    "device": None,
    "dtype": None,
    "init_from": None,
    "init_weights": None,
    "evaluate_only": None,
    "tokenizer": {"path": None},
    "data": {
        "source": None, "files": None, "hub": ANY, "seq_len": None, "packing": None, "sample_by": None,
        "val_fraction": None, "val_docs": None, "cache_dir": None,
    },
    "global_batch_size": None,
    "gradient_accumulation_steps": None,
    "max_steps": None,
    "distill": {"rounds": None, "steps_per_round": None, "delta0": None, "growth": None, "gamma_min": None,
                "gamma_max": None, "t_min": None, "kl": None, "teacher": None, "table_points": None},
    "optimizer": COMPONENT,
    "lr_scheduler": {"warmup_steps": None},
    "clip_grad_norm": None,
    "ema": {"decay": None, "use_warmup": None, "init": None},
    "eval": {"every_round": None, "include_base": None, "steps": None, "samplers": None, "num_samples": None,
             "batch_size": None, "seq_len": None, "seed": None, "max_len": None, "score_batch_size": None,
             "scorer": {"type": None, "path": None, "weights": None, "builder": None, "builder_kwargs": ANY,
                        "checkpoint_dir": None, "model_type": None, "tokenizer": None, "bos": None}},
    "checkpoint": {"every": None, "keep_last": None},
    "resume": None,
    "compile": None,
    "fsdp": {"reshard_after_forward": None},
    "metric_logger": COMPONENT,
    "log_every": None,
    "progress_bar": None,
    "max_wall_s": None,
}

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "dtype": "fp32",
    "evaluate_only": False,
    "init_weights": "model",
    "tokenizer": {"path": None},
    "gradient_accumulation_steps": 1,
    "max_steps": None,
    "distill": {"rounds": 5, "steps_per_round": 10000, "delta0": 1.0 / 512, "growth": 2.0, "gamma_min": -4.0,
                "gamma_max": -1.0, "t_min": 1e-3, "kl": "bwd", "teacher": "student", "table_points": 1025},
    "lr_scheduler": {"warmup_steps": 500},
    "clip_grad_norm": 1.0,
    "ema": {"decay": 0.999, "use_warmup": False, "init": "checkpoint"},
    "eval": {"every_round": True, "include_base": True, "steps": [1024, 256, 64, 32, 16, 8],
             "samplers": ["ancestral", "greedy"], "num_samples": 16, "batch_size": None, "seq_len": None, "seed": 0,
             "max_len": 1024, "score_batch_size": 8,
             "scorer": {"type": "none", "path": None, "weights": "ema", "builder": None, "builder_kwargs": None,
                        "checkpoint_dir": None, "model_type": "LLAMA3_2", "tokenizer": None, "bos": True}},
    "checkpoint": {"every": 0, "keep_last": 2},
    "resume": False,
    "compile": False,
    "fsdp": {"reshard_after_forward": True},
    "log_every": 1,
    "progress_bar": True,
    "max_wall_s": None,
}

# Keys that must equal the checkpoint's on resume (everything that changes the loss sequence).
RESUME_KEYS = ("seed", "init_from", "init_weights", "global_batch_size", "distill", "optimizer", "lr_scheduler",
               "clip_grad_norm",
               "ema", "data.seq_len", "data.packing", "data.source", "data.files", "data.hub", "data.val_fraction",
               "data.val_docs", "data.sample_by")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check key names (suggesting the closest valid key), fill defaults, check values. Returns a new config."""
    check_keys(cfg, SCHEMA, "")
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    if not merged.get("init_from"):
        raise ConfigError("init_from is required: the duo model directory to distil (e.g. the 'final' dir that "
                          "`tune run duo_pretrain --config duo/tiny_cpu` writes: outputs/duo_tiny_cpu/final)")
    need = ("output_dir",) if merged.evaluate_only else ("output_dir", "data", "global_batch_size", "optimizer")
    for req in need:
        if OmegaConf.select(merged, req) is None:
            raise ConfigError(f"config key '{req}' is required (see duo_plugin/configs/duo/distill_tiny_cpu.yaml)")
    if merged.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype must be fp32 or bf16, got {merged.dtype!r}")
    d = merged.distill
    if d.kl not in ("bwd", "fwd"):
        raise ConfigError(f"distill.kl must be 'bwd' (KL(student||teacher), paper default) or 'fwd', got {d.kl!r}")
    if d.teacher not in ("student", "ema"):
        raise ConfigError(f"distill.teacher must be 'student' (Alg. 1, default) or 'ema' (Alg. 2), got {d.teacher!r}")
    if merged.init_weights not in ("model", "ema"):
        raise ConfigError(f"init_weights must be 'model' (the base's raw weights, paper) or 'ema', got "
                          f"{merged.init_weights!r}")
    if merged.ema.init not in ("checkpoint", "student"):
        raise ConfigError(f"ema.init must be 'checkpoint' (the base model's EMA) or 'student', got {merged.ema.init!r}")
    if d.teacher == "ema" and not merged.ema.get("decay"):
        raise ConfigError("distill.teacher=ema needs an EMA: set ema.decay (e.g. 0.999)")
    for s in merged.eval.samplers:
        if s not in ("ancestral", "greedy"):
            raise ConfigError(f"eval.samplers entries must be 'ancestral' or 'greedy', got {s!r}")
    if merged.eval.scorer.type not in ("none", "dit", "torchtune"):
        raise ConfigError(f"eval.scorer.type must be none, dit (an AR-objective duo model dir) or torchtune, got "
                          f"{merged.eval.scorer.type!r}")
    if merged.resume not in (False, True, "auto") and not isinstance(merged.resume, str):
        raise ConfigError("resume must be false, true/'auto' (latest checkpoint in output_dir) or a checkpoint dir")
    return merged


def build_scorer(scfg, device) -> tuple[Any, Any, int, int | None, int | None] | None:
    """``eval.scorer`` → (scorer callable, scorer tokenizer, eos id, bos id or None, scorer context length or None),
    or None for type 'none'.

    * ``dit``: ``path`` = a duo model dir of an AR-objective DiT (``duo_pretrain objective: ar``); tokenizer from
      ``tokenizer`` or ``path/tokenizer``.
    * ``torchtune``: ``builder`` (dotpath) + ``checkpoint_dir`` (HF format) + ``model_type``; ``tokenizer`` is a
      tokenizer path for :func:`duo_plugin.data.tokenizers.load_tokenizer`.
    """
    from duo_plugin.data.tokenizers import load_tokenizer

    kind = scfg.type
    if kind == "none":
        return None
    if kind == "dit":
        if not scfg.path:
            raise ConfigError("eval.scorer.type=dit needs eval.scorer.path: a duo model dir trained with "
                              "`duo_pretrain objective=ar` (same tokenizer family)")
        from duo_plugin.eval.genppl import load_dit_scorer

        scorer = load_dit_scorer(str(scfg.path), weights=str(scfg.weights or "ema"), device=str(device))
        tok_path = scfg.tokenizer or str(Path(str(scfg.path)) / "tokenizer")
    else:
        if not scfg.builder or not scfg.checkpoint_dir or not scfg.tokenizer:
            raise ConfigError("eval.scorer.type=torchtune needs eval.scorer.builder (dotpath), checkpoint_dir (HF "
                              "format, local) and tokenizer (path)")
        from duo_plugin.integrations.torchtune_scorer import load_torchtune_scorer

        kw = OmegaConf.to_container(scfg.builder_kwargs, resolve=True) if scfg.builder_kwargs else None
        scorer = load_torchtune_scorer(str(scfg.builder), str(scfg.checkpoint_dir), model_type=str(scfg.model_type),
                                       builder_kwargs=kw, device=device)
        tok_path = scfg.tokenizer
    if not Path(str(tok_path)).exists():
        raise FileNotFoundError(f"scorer tokenizer {tok_path} not found; set eval.scorer.tokenizer")
    tok = load_tokenizer(str(tok_path))
    bos = tok.bos_id if scfg.get("bos", True) else None
    max_len = getattr(getattr(scorer, "model", None), "max_seq_len", None)  # scored sequences are cut to this
    return scorer, tok, int(tok.eos_id), bos, (int(max_len) if max_len else None)


class DuoDistillRecipe:
    """Setup → (evaluate base) → rounds of DCD steps with teacher refresh → evaluate after each round → summary."""

    def __init__(self, cfg: DictConfig):
        self.cfg = validate_config(cfg)
        cfg = self.cfg
        from duo_plugin.training.distill import DistillSchedule

        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = tt_utils.get_device(cfg.device)
        if self.distributed and not is_dist():
            dist.init_process_group(backend=tt_training.get_distributed_backend(self.device.type))
        self.world_size, self.rank = world_rank()
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.init_from = Path(str(cfg.init_from))
        self.seed = int(cfg.seed)
        self.accum = int(cfg.gradient_accumulation_steps)
        d = cfg.distill
        self.schedule = DistillSchedule(int(d.rounds), int(d.steps_per_round), float(d.delta0), float(d.growth))
        self.max_steps = int(cfg.max_steps) if cfg.max_steps is not None else self.schedule.total_steps
        self.autocast_bf16 = cfg.dtype == "bf16" and self.device.type == "cuda"
        self.step = 0
        self.losses: list[float] = []
        self.events: list[dict] = []  # teacher refreshes: {"step", "round", "delta", "source"}
        self.quality_rows: list[dict] = []
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if not self.init_from.is_dir() or not (self.init_from / "duo_config.json").is_file():
            raise FileNotFoundError(
                f"init_from={self.init_from} is not a duo model directory (no duo_config.json); point it at the "
                "'final' dir of a duo_pretrain run (e.g. outputs/duo_tiny_cpu/final) or a checkpoint's model/ dir")
        if self.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.metric_logger = tt_config.instantiate(cfg.metric_logger) if (self.is_rank_zero and cfg.get(
            "metric_logger")) else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        self._setup_tokenizer()
        self._setup_model()
        if cfg.evaluate_only:
            return
        self._setup_data()
        self._setup_optimizer()
        self._setup_distill()
        self._maybe_resume()

    def _barrier(self) -> None:
        if is_dist():
            dist.barrier()

    def _setup_tokenizer(self) -> None:
        from duo_plugin.data.tokenizers import load_tokenizer

        path = Path(str(self.cfg.tokenizer.path)) if self.cfg.tokenizer.path else self.init_from / "tokenizer"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found at {path}; set tokenizer.path (duo_pretrain saves it as "
                                    "<model dir>/tokenizer)")
        self.tokenizer = load_tokenizer(path)

    def _files(self) -> list[str]:
        files = self.cfg.data.get("files")
        if not files:
            raise ConfigError("data.source=files needs data.files: [path, ...] (text/jsonl/parquet files)")
        return [str(f) for f in (files if isinstance(files, (list, ListConfig)) else [files])]

    def _setup_data(self) -> None:
        """Documents → tokenize once (cached) → drop the held-out split (last documents) → training blocks."""
        from duo_plugin.data import text as data_text

        d = self.cfg.data
        self.seq_len = int(d.seq_len) if d.get("seq_len") else int(self.base_meta.get("seq_len") or 0)
        if self.seq_len <= 0:
            raise ConfigError("data.seq_len is required (the init_from model records no seq_len)")
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
        frac, n_val = float(d.get("val_fraction") or 0.0), int(d.get("val_docs") or 0)
        if (frac > 0 or n_val > 0) and len(docs) >= 2:
            docs, _ = data_text.split_heldout(docs, **({"num_heldout": n_val} if n_val > 0 else {"fraction": frac}))
        tok = self.tokenizer
        packing = d.get("packing") or "wrap"
        if packing == "wrap":
            self.train_set = data_text.TokenBlockDataset(data_text.wrap_blocks(docs, self.seq_len, tok.bos_id,
                                                                               tok.eos_id))
        elif packing == "pad":
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            self.train_set = data_text.TokenBlockDataset(*data_text.pad_sentences(docs, self.seq_len, tok.bos_id,
                                                                                   tok.eos_id, pad))
        else:
            raise ConfigError(f"data.packing must be 'wrap' or 'pad', got {packing!r}")
        gbs = int(self.cfg.global_batch_size)
        if gbs % (self.world_size * self.accum) != 0:
            raise ConfigError(f"global_batch_size={gbs} is not divisible by world_size×gradient_accumulation_steps="
                              f"{self.world_size}×{self.accum}")
        self.global_batch_size = gbs
        self.sampler = data_text.GlobalBatchSampler(len(self.train_set), gbs, seed=self.seed)
        if self.is_rank_zero:
            log.info("data: %d blocks of %d tokens", len(self.train_set), self.seq_len)

    def _setup_model(self) -> None:
        from duo_plugin.models.checkpoint import load_pretrained
        from duo_plugin.training.ema import EMA

        cfg = self.cfg
        torch.manual_seed(self.seed)
        base = load_pretrained(self.init_from, weights=str(cfg.init_weights), device="cpu")
        self.base_meta = dict(getattr(base, "duo_metadata", {}) or {})
        if self.base_meta.get("objective", "duo") != "duo":
            raise ConfigError(f"init_from={self.init_from} was trained with objective={self.base_meta['objective']!r}; "
                              "DCD distils a Duo diffusion model (objective: duo)")
        self.valid_vocab = base.valid_vocab if base.valid_vocab is not None else torch.ones(base.vocab_size,
                                                                                            dtype=torch.bool)
        self.vocab_size = int(base.vocab_size)
        self.k_eff = int(self.valid_vocab.sum())
        if cfg.evaluate_only:
            self.model = base.to(self.device)
            self.ema = None
            self.teacher = None
            return
        # EMA shadow source: the base model's EMA weights (falls back to the raw weights when it has none).
        ema_src = load_pretrained(self.init_from, weights="ema", device="cpu") if cfg.ema.init == "checkpoint" else base
        ema_sd = {k: v.detach().clone() for k, v in ema_src.state_dict().items()}
        teacher = copy.deepcopy(base)
        for m in (base, teacher):
            m.to(self.device)
            if self.distributed:
                tt_training.shard_model(m, shard_conditions=[partial(is_block, types=self._block_types(m))],
                                        cpu_offload=False,
                                        reshard_after_forward=bool(cfg.fsdp.reshard_after_forward))
            if cfg.compile:
                for block in self._blocks(m):
                    block.compile()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.model, self.teacher = base, teacher
        self.valid_vocab = self.valid_vocab.to(self.device)
        self.ema = None
        if cfg.ema and cfg.ema.get("decay"):
            self.ema = EMA(self.model, decay=float(cfg.ema.decay), use_warmup=bool(cfg.ema.use_warmup))
            self.ema.load_full_state_dict({**self.ema.state_dict(), "shadow": {k: ema_sd[k] for k in self.ema.shadow}},
                                          self.model, self.device)
        if self.is_rank_zero:
            log.info("student/teacher from %s: K=%d (K_eff=%d)", self.init_from, self.vocab_size, self.k_eff)

    @staticmethod
    def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
        for name in ("blocks", "layers"):
            mods = getattr(model, name, None)
            if isinstance(mods, torch.nn.ModuleList):
                return list(mods)
        inner = getattr(model, "decoder", None)
        return DuoDistillRecipe._blocks(inner) if inner is not None else []

    @classmethod
    def _block_types(cls, model: torch.nn.Module) -> set[type]:
        return {type(b) for b in cls._blocks(model)}

    def _setup_optimizer(self) -> None:
        self.optimizer = tt_config.instantiate(self.cfg.optimizer, self.model.parameters())
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def _set_lr(self, step: int) -> float:
        f = lr_multiplier(step, warmup_steps=int(self.cfg.lr_scheduler.warmup_steps))
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f

    def _setup_distill(self) -> None:
        from duo_plugin.diffusion.duality import DualityTable
        from duo_plugin.training.distill import distill_gamma_window

        d = self.cfg.distill
        self.gamma_min, self.gamma_max = distill_gamma_window(self.k_eff, d.gamma_min, d.gamma_max)
        self.t_min = float(d.t_min)
        self.table = DualityTable.build(self.k_eff, self.gamma_min, self.gamma_max, num_points=int(d.table_points))
        if self.is_rank_zero:
            a = self.table.alpha(torch.tensor([self.gamma_min, self.gamma_max], dtype=torch.float64))
            log.info("distillation window gamma in [%.4f, %.4f] -> discrete alpha in [%.4f, %.4f]; %d rounds x %d "
                     "steps, delta0=%g, teacher=%s, kl=%s", self.gamma_min, self.gamma_max, float(a[1]), float(a[0]),
                     self.schedule.rounds, self.schedule.steps_per_round, self.schedule.delta0, d.teacher, d.kl)

    # ------------------------------------------------------------------------------------------------ DCD step
    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def refresh_teacher(self, step: int) -> None:
        """θ⁻ ← θ (current student weights) or θ⁻ ← EMA(θ) (``distill.teacher: ema``)."""
        from duo_plugin.training.distill import copy_weights_

        source = self.cfg.distill.teacher
        copy_weights_(self.teacher, self.model)
        if source == "ema":
            self.ema.copy_to(self.teacher)
        self.events.append({"step": step, "round": self.schedule.round_of(step), "delta": self.schedule.delta(step),
                            "source": source})

    def _micro_loss_sum(self, x0, mask, positions, step) -> torch.Tensor:
        from duo_plugin.diffusion.uniform import row_generators
        from duo_plugin.training.distill import dcd_batch, dcd_token_losses, distill_times

        t, s = distill_times(self.seed, step, positions, self.global_batch_size, self.schedule.delta(step), self.t_min)
        gens = row_generators(self.seed, step, positions, device=self.device)
        b = dcd_batch(x0, t, s, gamma_min=self.gamma_min, gamma_max=self.gamma_max, alpha_fn=self.table.alpha,
                      vocab_size=self.vocab_size, generator=gens, valid_vocab=self.valid_vocab)
        padded = not bool(mask.all())
        if padded:  # padding stays clean and is neither attended to nor scored
            b = b._replace(z_t=torch.where(mask, b.z_t, x0), z_s=torch.where(mask, b.z_s, x0))
        kl = dcd_token_losses(self.model, self.teacher, b, direction=self.cfg.distill.kl,
                              padding_mask=mask if padded else None, autocast=self._autocast)
        return masked_token_sum(kl, mask)

    def train_step(self, step: int) -> dict:
        """Refresh the teacher if a round starts here, then one optimizer step on the global batch of ``step``."""
        from duo_plugin.data.text import shard

        if self.schedule.refreshes_teacher(step):
            self.refresh_teacher(step)
        batch_idx = self.sampler.indices(step)
        micro, local_tokens = [], 0
        for m in range(self.accum):
            idx, pos = shard(batch_idx, self.rank, self.world_size, m, self.accum)
            bt = self.train_set.batch(idx)
            x0, mask = bt["tokens"].to(self.device), bt["attention_mask"].to(self.device)
            micro.append((x0, mask, pos))
            local_tokens += int(mask.sum())
        n_tok = torch.tensor([local_tokens], dtype=torch.float64, device=self.device)
        if is_dist():
            dist.all_reduce(n_tok)
        n_global = float(n_tok.item())
        lr = self._set_lr(step)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x0, mask, pos) in enumerate(micro):
            if self.distributed and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = self._micro_loss_sum(x0, mask, pos, step) / n_global
            (loss * self.world_size).backward()  # FSDP2 averages over ranks; × world size makes it the sum
            loss_sum += loss.detach().double()
        if is_dist():
            dist.all_reduce(loss_sum)
        loss_value = float(loss_sum.item())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite distillation loss at step {step}; last good checkpoint: "
                                     f"{self.last_checkpoint or 'none yet'}. Lower optimizer.lr and resume")
        grad_norm = None
        if self.cfg.clip_grad_norm is not None:
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                          float(self.cfg.clip_grad_norm))))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "delta": self.schedule.delta(step),
                "round": self.schedule.round_of(step)}

    # ------------------------------------------------------------------------------------------------ evaluation
    def _full_model_state(self, model) -> dict:
        if self.distributed:
            return tt_training.gather_cpu_state_dict(model, self.is_rank_zero, device=self.device)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _eval_model(self) -> torch.nn.Module | None:
        """Unsharded copy of the student with its EMA weights (rank 0; collective under FSDP)."""
        from duo_plugin.models.checkpoint import load_pretrained

        sd = self._full_model_state(self.model)
        ema = self.ema.full_state_dict(self.model) if self.ema is not None else None
        if not self.is_rank_zero:
            return None
        m = load_pretrained(self.init_from, weights="model", device="cpu")
        m.load_state_dict({**sd, **(ema["shadow"] if ema else {})})
        return m.to(self.device).eval()

    def evaluate_quality(self, models: dict) -> list[dict]:
        """Gen PPL + entropy rows for ``{name: model}`` (rank 0), appended to the table files."""
        from duo_plugin.training.distill import sample_quality_table, write_quality_table

        if not self.is_rank_zero or not models:
            return []
        e = self.cfg.eval
        if not hasattr(self, "_scorer"):
            self._scorer = build_scorer(e.scorer, self.device)
        sc = self._scorer
        seq_len = int(e.seq_len or getattr(self, "seq_len", 0) or self.base_meta.get("seq_len") or 0)
        if seq_len <= 0:
            raise ConfigError("eval.seq_len is required (the model records no seq_len)")
        rows = sample_quality_table(
            models, steps=[int(s) for s in e.steps], samplers=list(e.samplers), num_samples=int(e.num_samples),
            seq_len=seq_len, seed=int(e.seed), valid_vocab=self.valid_vocab, diffusion_tokenizer=self.tokenizer,
            scorer=sc[0] if sc else None, scorer_tokenizer=sc[1] if sc else None,
            eos_id_scorer=sc[2] if sc else None, bos_id_scorer=sc[3] if sc else None,
            score_batch_size=int(e.score_batch_size),
            max_len=min(int(e.max_len), sc[4]) if sc and sc[4] else int(e.max_len),
            batch_size=int(e.batch_size) if e.batch_size else None, device=self.device)
        for r in rows:
            r["step"] = self.step
        self.quality_rows.extend(rows)
        write_quality_table(self.quality_rows, self.output_dir / "quality_table",
                            title=f"Gen PPL / entropy vs sampling steps ({self.init_from.name})",
                            extra={"init_from": str(self.init_from), "scorer": OmegaConf.to_container(e.scorer),
                                   "num_samples": int(e.num_samples), "seq_len": seq_len})
        for r in rows:
            log.info("eval %s %s T=%d: gen_ppl=%s entropy=%.3f (%.1fs)", r["model"], r["sampler"], r["steps"],
                     "n/a" if r["gen_ppl"] is None else f"{r['gen_ppl']:.2f}", r["entropy"], r["sample_seconds"])
        return rows

    def evaluate_only(self) -> dict:
        from duo_plugin.models.checkpoint import load_pretrained

        model = load_pretrained(self.init_from, weights="ema", device=str(self.device))
        rows = self.evaluate_quality({"base": model})
        return {"rows": rows, "table": str(self.output_dir / "quality_table.md")}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        from duo_plugin.models.checkpoint import load_pretrained, save_pretrained
        from duo_plugin.training import checkpointing

        model_sd = self._full_model_state(self.model)
        teacher_sd = self._full_model_state(self.teacher)
        ema_sd = self.ema.full_state_dict(self.model) if self.ema is not None else None
        optim_sd = (tt_training.get_full_optimizer_state_dict(self.model, self.optimizer, self.is_rank_zero,
                                                              device=self.device)
                    if self.distributed else full_optimizer_state(self.model, self.optimizer))
        path = None
        if self.is_rank_zero:
            def write(tmp: Path) -> None:
                m = load_pretrained(self.init_from, weights="model", device="cpu")
                m.load_state_dict(model_sd)
                meta = dict(self.base_meta)
                meta.update(valid_vocab=self.valid_vocab.cpu(), step=self.step, distilled_from=str(self.init_from),
                            distill={"round": self.schedule.round_of(max(self.step - 1, 0)),
                                     "delta": self.schedule.delta(max(self.step - 1, 0)),
                                     "teacher": self.cfg.distill.teacher, "kl": self.cfg.distill.kl})
                save_pretrained(m, tmp / "model", ema_state_dict=(ema_sd or {}).get("shadow"), metadata=meta)
                self.tokenizer.save(tmp / "model" / "tokenizer")
                checkpointing.save_training_state(tmp / "training_state.pt", {
                    "step": self.step, "optimizer": optim_sd, "ema": ema_sd, "teacher": teacher_sd,
                    "losses": self.losses, "events": self.events, "quality_rows": self.quality_rows,
                    "config": OmegaConf.to_container(self.cfg, resolve=True), "world_size": self.world_size,
                    "rng": checkpointing.capture_rng_state()})
            path = checkpointing.save_step_checkpoint(self.output_dir, self.step, writer=write,
                                                      keep_last=int(self.cfg.checkpoint.keep_last))
            self.last_checkpoint = path
        self._barrier()
        return path

    def _maybe_resume(self) -> None:
        from duo_plugin.models.checkpoint import load_pretrained
        from duo_plugin.training import checkpointing

        r = self.cfg.resume
        if r is False or r is None:
            return
        ckpt = checkpointing.latest_checkpoint(self.output_dir) if r in (True, "auto") else Path(str(r))
        if ckpt is None:
            if self.is_rank_zero:
                log.info("resume=%s but no checkpoint under %s: starting from init_from", r, self.output_dir)
            return
        state = checkpointing.load_training_state(Path(ckpt) / "training_state.pt")
        checkpointing.check_resume_compatible(state["config"], OmegaConf.to_container(self.cfg, resolve=True),
                                              RESUME_KEYS)
        model_sd = load_pretrained(Path(ckpt) / "model", weights="model", device="cpu").state_dict()
        if self.distributed:
            tt_training.load_from_full_model_state_dict(self.model, model_sd, self.device, strict=True)
            tt_training.load_from_full_model_state_dict(self.teacher, state["teacher"], self.device, strict=True)
            # torchtune's loader assigns NEW Parameter objects (load_state_dict(assign=True)): rebuild the optimizer
            # over them, or it would keep stepping the stale pre-resume parameters.
            self._setup_optimizer()
            tt_training.load_from_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                                           self.device)
        else:
            self.model.load_state_dict(model_sd)
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            full = state["ema"]
            self.ema.load_full_state_dict({**self.ema.state_dict(), "shadow": full["shadow"]}, self.model, self.device)
            self.ema.num_updates = int(full["num_updates"])
        if state.get("rng") is not None and int(state.get("world_size", 1)) == self.world_size:
            checkpointing.restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        self.events = list(state.get("events", []))
        self.quality_rows = list(state.get("quality_rows", []))
        self.last_checkpoint = Path(ckpt)
        if self.is_rank_zero:
            log.info("resumed from %s at step %d (round %d)", ckpt, self.step, self.schedule.round_of(self.step))

    # ------------------------------------------------------------------------------------------------ loop
    def _round_name(self, step_done: int) -> str:
        return f"round{self.schedule.round_of(step_done - 1) + 1}"

    def train(self) -> dict:
        cfg = self.cfg
        if cfg.evaluate_only:
            return self.evaluate_only()
        t0 = time.perf_counter()
        ckpt_every = int(cfg.checkpoint.every)
        if cfg.eval.include_base and self.step == 0 and not self.quality_rows:
            from duo_plugin.models.checkpoint import load_pretrained

            if self.is_rank_zero:
                self.evaluate_quality({"base": load_pretrained(self.init_from, weights="ema",
                                                               device=str(self.device))})
            self._barrier()
        pbar = None
        if self.is_rank_zero and cfg.progress_bar:
            from tqdm import tqdm

            pbar = tqdm(total=self.max_steps, initial=self.step, desc="duo_distill", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        while self.step < self.max_steps:
            step = self.step
            ts = time.perf_counter()
            m = self.train_step(step)
            dt = time.perf_counter() - ts
            self.step = step + 1
            self.losses.append(m["loss"])
            metrics = {"loss": m["loss"], "lr": m["lr"], "delta": m["delta"], "round": m["round"],
                       "step_seconds": dt}
            if m["grad_norm"] is not None:
                metrics["grad_norm"] = m["grad_norm"]
            if self.step % int(cfg.log_every) == 0:
                self._log(metrics, self.step)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss']:.4f}", round=m["round"] + 1, delta=f"{m['delta']:.4g}")
            if cfg.eval.every_round and self.schedule.ends_round(step):
                self._evaluate_student(self._round_name(self.step))
            if ckpt_every > 0 and self.step % ckpt_every == 0 and self.step < self.max_steps:
                self.save_checkpoint()
            if cfg.max_wall_s and all_ranks_agree(time.perf_counter() - t0 > float(cfg.max_wall_s), self.device):
                if self.is_rank_zero:
                    log.info("max_wall_s=%s reached at step %d: stopping early", cfg.max_wall_s, self.step)
                break
        if pbar is not None:
            pbar.close()
        if cfg.eval.every_round and self.step > 0 and not any(
                r["step"] == self.step and r["model"] != "base" for r in self.quality_rows):
            self._evaluate_student(f"step{self.step}")  # max_steps / max_wall_s ended mid-round
        final_ckpt = self.save_checkpoint()
        final_dir = None
        if self.is_rank_zero:
            final_dir = self.output_dir / "final"
            tmp = self.output_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(Path(final_ckpt) / "model", tmp)
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp, final_dir)
        summary = {"steps": self.step, "wall_time_s": time.perf_counter() - t0, "losses": self.losses,
                   "events": self.events, "quality_rows": self.quality_rows,
                   "gamma_window": [self.gamma_min, self.gamma_max], "checkpoint": str(final_ckpt),
                   "model_dir": str(final_dir) if final_dir else None,
                   "quality_table": str(self.output_dir / "quality_table.md") if self.quality_rows else None}
        if self.is_rank_zero:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"duo_distill: done: {self.step} steps; student model dir: {final_dir}; table: "
                  f"{summary['quality_table']}", flush=True)
        return summary

    def _evaluate_student(self, name: str) -> None:
        m = self._eval_model()
        if self.is_rank_zero:
            self.evaluate_quality({name: m})
        self._barrier()

    def _log(self, metrics: dict, step: int) -> None:
        if self.metric_logger is not None and metrics:
            self.metric_logger.log_dict({k: float(v) for k, v in metrics.items()}, step)

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()


def run(cfg: DictConfig) -> dict:
    """Run the whole recipe in-process and return the summary (tests and scripts call this)."""
    recipe = DuoDistillRecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


@tt_config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Distil a Duo model with DCD. Config keys: see duo_plugin/configs/duo/distill_tiny_cpu.yaml."""
    try:
        run(cfg)
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
