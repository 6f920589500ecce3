"""What duo_pretrain and duo_distill share (the torchtune-facing half; the torch-only half is
:mod:`duo_plugin.training.loop`): run opening, data, optimizer and LR, the optimizer step over the global batch,
full (unsharded) states, resume loading, ``final/`` publishing, logging. Each recipe file keeps its own setup of
models and its loop. Not a recipe itself (torchtune registers only ``duo_*.py``). Absolute imports only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import duo_plugin.integrations.torchtune_tokenizer  # noqa: F401  (registers the 'torchtune' tokenizer descriptor)
from duo_plugin.objectives import ObjectiveContext
from duo_plugin.training import loop
from duo_plugin.training.recipe_utils import (ConfigError, full_optimizer_state, is_block, is_dist, lr_multiplier,
                                             world_rank)
from torchtune import config as tt_config
from torchtune import training as tt_training
from torchtune import utils as tt_utils

__all__ = ["RecipeBase", "build_data", "data_dirs_of", "instantiate", "warn_suspicious_lr", "SUSPICIOUS_LR"]

log = tt_utils.get_logger("INFO")


def build_data(data_cfg: DictConfig, tokenizer, *, seq_len: int, build_val: bool = True,
               drop=("valid_vocab", "pad_mode")):
    """The ``data:`` section → :class:`duo_plugin.data.blocks.TextBlocks` (``_component_`` optional; default
    :func:`duo_plugin.data.text_blocks`, whose arguments are the section's keys)."""
    from duo_plugin.data.blocks import text_blocks

    d = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in drop}
    d["seq_len"] = seq_len
    d.setdefault("source", "files")
    d = {k: v for k, v in d.items() if v is not None}
    try:
        if "_component_" in d:
            return tt_config.instantiate(OmegaConf.create(d), tokenizer, build_val=build_val)
        return text_blocks(tokenizer, build_val=build_val, **d)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def pad_mode_of(cfg) -> str:
    """``data.pad_mode`` of a recipe config (``clean_masked`` when absent); ConfigError naming the key otherwise."""
    from duo_plugin.objectives.base import PAD_MODES

    mode = OmegaConf.select(cfg, "data.pad_mode", default=None) if cfg is not None else None
    mode = "clean_masked" if mode is None else str(mode)
    if mode not in PAD_MODES:
        raise ConfigError(f"data.pad_mode must be one of {', '.join(PAD_MODES)}, got {mode!r} (docs/evaluation.md)")
    return mode


#: ``optimizer.lr`` above this is legal but almost certainly a mistake (AdamW LMs train at ~1e-5..1e-2)
SUSPICIOUS_LR = 1.0


def warn_suspicious_lr(cfg) -> None:
    """WARNING (not an error: the value is legal) for ``optimizer.lr`` > :data:`SUSPICIOUS_LR`."""
    lr = OmegaConf.select(cfg, "optimizer.lr", default=None)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > SUSPICIOUS_LR:
        log.warning("WARNING: optimizer.lr=%g is far above the usual range (1e-5 .. 1e-2 for AdamW); the loss will "
                    "likely explode: lower optimizer.lr (e.g. 3e-4) unless this is deliberate", lr)


def data_dirs_of(cfg) -> tuple:
    """The folders a training config reads as data (``init_from``, ``tokenizer.path``), for
    :func:`duo_plugin.runtime.drop_cwd_from_sys_path`."""
    tok = cfg.get("tokenizer")
    return (cfg.get("init_from"), tok.get("path") if hasattr(tok, "get") else None)


def instantiate(section: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """``torchtune.config.instantiate`` of the config section ``key`` (model / optimizer / metric_logger): a dotted
    path that does not load or an argument the component does not take is a :class:`ConfigError` naming the key."""
    try:
        return tt_config.instantiate(section, *args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}; fix the {key}.* keys (they are the arguments of "
                          f"{key}._component_={section.get('_component_')})") from None
    except Exception as e:
        if type(e).__name__ != "InstantiationError":
            raise
        raise ConfigError(f"{key}._component_={section.get('_component_')!r} cannot be loaded "
                          f"({' '.join(str(e).split())[:200]}); set it to an importable dotted path") from None


class RecipeBase:
    """Run state and the steps both training recipes take the same way."""

    recipe_name = "duo"

    def _open_run(self, cfg: DictConfig) -> None:
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        from duo_plugin.runtime import check_device

        check_device(cfg.device)  # cuda without CUDA, unknown names: an error naming `device`, never a silent CPU run
        self.device = tt_utils.get_device(cfg.device)
        if self.distributed and not is_dist():
            dist.init_process_group(backend=tt_training.get_distributed_backend(self.device.type))
        self.world_size, self.rank = world_rank()
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.seed = int(cfg.seed)
        self.accum = int(cfg.gradient_accumulation_steps)
        self.autocast_bf16 = cfg.dtype == "bf16" and self.device.type == "cuda"
        self.autocast = loop.autocast_factory(self.autocast_bf16)
        self.last_checkpoint: Path | None = None
        self.metric_logger = None

    def _barrier(self) -> None:
        if is_dist():
            dist.barrier()

    def _open_output(self, *, guard: bool = True) -> None:
        """Create ``output_dir``.  ``guard`` (training): no silent overwrite of an earlier run, ``resume=true`` needs
        a checkpoint, one writer per directory (:mod:`duo_plugin.training.run_dir`); sets ``self.resume_from``."""
        from duo_plugin.training import run_dir

        cfg = self.cfg
        self.resume_from = None
        if guard:
            # the config's own inputs inside output_dir (e.g. ${output_dir}/tokenizer) are not an earlier run
            inputs = ((cfg.get("tokenizer") or {}).get("path"), (cfg.get("data") or {}).get("cache_dir"))
            overwrite = bool(cfg.get("overwrite", False))
            if self.is_rank_zero:  # the lock first: nothing in output_dir changes while another run holds it
                self.resume_from, self._run_lock = run_dir.open_output_dir(self.output_dir, cfg.resume, overwrite,
                                                                           inputs)
            self._barrier()
            if not self.is_rank_zero:  # read-only, after rank 0 prepared the directory
                self.resume_from = run_dir.check_output_dir(self.output_dir, cfg.resume, True, inputs)
        elif self.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self._log_files_before = self._log_files()
        self.metric_logger = instantiate(cfg.metric_logger, "metric_logger") if (self.is_rank_zero and cfg.get(
            "metric_logger")) else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        self._record_log_files()

    def _log_dir(self) -> Path | None:
        d = OmegaConf.select(self.cfg, "metric_logger.log_dir", default=None) if self.cfg.get("metric_logger") else None
        return Path(str(d)) if d else None

    def _log_files(self) -> set:
        d = self._log_dir()
        return {p for p in d.rglob("*") if p.is_file()} if self.is_rank_zero and d is not None and d.is_dir() else set()

    def _record_log_files(self) -> None:
        """Put the files the metric logger created inside ``output_dir`` into the run's manifest (what
        ``overwrite=true`` may remove later; a user's own files in the log folder are never listed)."""
        if not (self.is_rank_zero and getattr(self, "_run_lock", None) is not None):
            return
        from duo_plugin.training import run_dir

        out = self.output_dir.resolve()
        new = []
        written = self._log_files() - getattr(self, "_log_files_before", set())
        if (self.output_dir / "torchtune_config.yaml").is_file():  # the metric logger's log_config writes it
            written.add(self.output_dir / "torchtune_config.yaml")
        for f in written:
            try:
                rel = f.resolve().relative_to(out).as_posix()
            except ValueError:
                continue  # a log folder outside output_dir is not the run's to remove
            if rel.split("/", 1)[0] in run_dir.RUN_ARTIFACTS:
                new.append(rel)
        if new:
            run_dir.record_outputs(self.output_dir, sorted(new))

    def _check_batch_split(self, global_batch_size: int) -> None:
        if global_batch_size % (self.world_size * self.accum) != 0:
            raise ConfigError(
                f"global_batch_size={global_batch_size} is not divisible by world_size×gradient_accumulation_steps"
                f"={self.world_size}×{self.accum}; pick gradient_accumulation_steps so the per-rank micro-batch "
                "global_batch_size / (world_size × accumulation) is an integer")

    def _setup_data(self, *, build_val: bool) -> None:
        from duo_plugin.data.text import GlobalBatchSampler

        blocks = build_data(self.cfg.data, self.tokenizer, seq_len=self.seq_len, build_val=build_val)
        self.train_set, self.val_set = blocks.train, blocks.val
        self.sampler = GlobalBatchSampler(len(self.train_set), self.global_batch_size, seed=self.seed)
        if self.is_rank_zero:
            log.info("data: %d train blocks of %d tokens (%d steps/epoch), %s validation blocks", len(self.train_set),
                     self.seq_len, self.sampler.steps_per_epoch, len(self.val_set) if self.val_set else 0)

    def _shard(self, model: torch.nn.Module, types: set) -> None:
        from functools import partial

        if not types:  # root-only FSDP2 (a time-conditioned DecoderDenoiser calls layer submodules directly)
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, reshard_after_forward=bool(self.cfg.fsdp.reshard_after_forward))
            return
        tt_training.shard_model(model, shard_conditions=[partial(is_block, types=types)], cpu_offload=False,
                                reshard_after_forward=bool(self.cfg.fsdp.reshard_after_forward))

    def _objective_context(self, **extra: Any) -> ObjectiveContext:
        return ObjectiveContext(seed=self.seed, global_batch_size=self.global_batch_size,
                                vocab_size=self.vocab_size, valid_vocab=self.valid_vocab, seq_len=self.seq_len,
                                device=self.device, autocast=self.autocast,
                                log=(lambda msg: log.info("%s", msg)) if self.is_rank_zero else None, extra=extra,
                                pad_mode=pad_mode_of(self.cfg), tokenizer=getattr(self, "tokenizer", None))

    # ------------------------------------------------------------------------------------------ optimizer
    def _setup_optimizer(self) -> None:
        # frozen parameters (LoRA base weights) are not handed to the optimizer
        self.optimizer = instantiate(self.cfg.optimizer, "optimizer",
                                     [p for p in self.model.parameters() if p.requires_grad])
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def _set_lr(self, step: int) -> float:
        ls = self.cfg.lr_scheduler
        f = lr_multiplier(step, name=ls.get("name", "constant_with_warmup"), warmup_steps=int(ls.warmup_steps),
                          max_steps=self.max_steps, min_lr_ratio=float(ls.get("min_lr_ratio", 0.0)))
        return loop.set_lr(self.optimizer, self.base_lrs, f)

    def optimizer_step_on(self, step: int) -> dict:
        """One optimizer step on the global batch of ``step`` with ``self.objective``."""
        micro, local = loop.fetch_micro_batches(self.train_set, self.sampler, step, rank=self.rank,
                                                world_size=self.world_size, accum=self.accum, device=self.device,
                                                count_tokens=self.objective.count_tokens)
        lr = self._set_lr(step)
        loss, n_tokens = loop.accumulate_gradients(self.model, self.objective, micro, local, step,
                                                   world_size=self.world_size, distributed=self.distributed,
                                                   device=self.device)
        loop.check_finite(loss, step, self.last_checkpoint, what=f"loss ({self.objective.phase(step)})")
        clip = self.cfg.clip_grad_norm
        grad_norm = loop.optimizer_step(self.model, self.optimizer, clip_grad_norm=None if clip is None else
                                        float(clip), ema=self.ema)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens}

    # ------------------------------------------------------------------------------------------ states
    def _full_model_state(self, model: torch.nn.Module | None = None) -> dict | None:
        model = self.model if model is None else model
        if self.distributed:
            return tt_training.gather_cpu_state_dict(model, self.is_rank_zero, device=self.device)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _full_optim_state(self) -> dict | None:
        if self.distributed:
            return tt_training.get_full_optimizer_state_dict(self.model, self.optimizer, self.is_rank_zero,
                                                            device=self.device)
        return full_optimizer_state(self.model, self.optimizer)  # name-keyed: resumable on any world size

    def _load_states(self, model_sd: dict, optim_sd: dict, *, strict: bool = True, extra: tuple = ()) -> None:
        """Load model (+ ``extra`` (module, state) pairs) and optimizer state, sharded or not."""
        if self.distributed:
            tt_training.load_from_full_model_state_dict(self.model, model_sd, self.device, strict=strict)
            for module, sd in extra:
                tt_training.load_from_full_model_state_dict(module, sd, self.device, strict=True)
            # torchtune's loader assigns NEW Parameter objects (load_state_dict(assign=True)): rebuild the optimizer
            # over them, or it would keep stepping the stale pre-resume parameters.
            self._setup_optimizer()
            tt_training.load_from_full_optimizer_state_dict(self.model, self.optimizer, optim_sd, self.device)
        else:
            self.model.load_state_dict(model_sd, strict=strict)
            for module, sd in extra:
                module.load_state_dict(sd)
            self.optimizer.load_state_dict(optim_sd)

    def _resume_state(self, resume_keys, *, model_weights: bool = True) -> tuple[Path, dict, dict | None] | None:
        """The checkpoint to resume from, its training state (checked against the config) and, with
        ``model_weights``, its model state dict; or None.  Every file is checked (truncated / corrupt / NaN weights:
        an error naming it); with ``resume=true/auto`` a corrupt latest checkpoint falls back to the previous good
        one with a warning.  ``self.resume_from`` comes from :meth:`_open_output` (run_dir rules)."""
        from duo_plugin.models.checkpoint import load_pretrained
        from duo_plugin.training import checkpointing

        first = getattr(self, "resume_from", None)
        if first is None:
            if self.cfg.resume not in (False, None) and self.is_rank_zero:
                log.info("resume=%s: no checkpoint under %s, starting from the start", self.cfg.resume,
                         self.output_dir / "checkpoints")
            return None

        def load(ck: Path):
            st = checkpointing.load_training_state(ck / "training_state.pt")
            sd = load_pretrained(ck / "model", weights="model", device="cpu").state_dict() if model_weights else None
            checkpointing.check_finite(sd if sd is not None else (st.get("trainable_state") or {}), ck / "model")
            return st, sd

        older = [c for c in reversed(checkpointing.list_checkpoints(self.output_dir)) if c != Path(first)]
        cands = [Path(first)] + (older if self.cfg.resume in (True, "auto") else [])
        ckpt, (state, model_sd) = checkpointing.load_first_good(cands, load, log=log)
        checkpointing.check_resume_compatible(state["config"], OmegaConf.to_container(self.cfg, resolve=True),
                                              resume_keys)
        return Path(ckpt), state, model_sd

    def _restore_rng(self, state: dict) -> None:
        from duo_plugin.training.checkpointing import restore_rng_state

        if state.get("rng") is not None and int(state.get("world_size", 1)) == self.world_size:
            restore_rng_state(state["rng"])

    def _publish_final(self, checkpoint: Path | None) -> Path | None:
        if not self.is_rank_zero or checkpoint is None:
            return None
        return loop.publish_final(self.output_dir, checkpoint)

    def _write_summary(self, summary: dict) -> Path:
        """``output_dir/summary.json`` (atomic; recorded in the run's manifest)."""
        import json

        from duo_plugin._io import atomic_write_text
        from duo_plugin.training import run_dir

        path = self.output_dir / "summary.json"
        atomic_write_text(path, json.dumps(summary, indent=2))
        run_dir.record_outputs(self.output_dir, ["summary.json"])
        return path

    # ------------------------------------------------------------------------------------------ logging
    def _progress_bar(self, desc: str):
        """Training progress with an ETA (rank 0, ``progress_bar: true``): a tqdm bar on a terminal, else a line
        every 30 s on stderr (:class:`duo_plugin._progress.Eta`)."""
        if not (self.is_rank_zero and self.cfg.progress_bar):
            return None
        from duo_plugin._progress import Eta

        return Eta(True, int(self.max_steps), desc, unit="step", initial=int(self.step), dynamic_ncols=True,
                   leave=True)

    def _log(self, metrics: dict, step: int) -> None:
        if self.metric_logger is not None and metrics:
            self.metric_logger.log_dict({k: float(v) for k, v in metrics.items()}, step)

    def cleanup(self) -> None:
        # setup may have failed before these were set: never hide the real error behind an AttributeError
        if getattr(self, "metric_logger", None) is not None:
            self.metric_logger.close()
            self._record_log_files()
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()
