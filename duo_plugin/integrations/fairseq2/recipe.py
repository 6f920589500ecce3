"""Duo pretraining as a fairseq2 0.8.1 recipe (``fairseq2.recipe.Recipe`` + fairseq2's ``Trainer``).

fairseq2 provides the runner (config file / ``--config`` overrides, output dir, gangs, DDP/FSDP, optimizer,
LR scheduler, grad clipping, resumable checkpoints of model + optimizer + data reader, metrics); this module
provides the ``duo_text`` dataset family (:mod:`.data`) and a ``TrainUnit`` whose loss is the same
``duo_plugin.diffusion`` objective as ``duo_pretrain``:

* times: stratified over the global batch, keyed by (seed, step, position in the global batch)
  (``duo_plugin.training.timesteps``), noise: one generator per sample with the same key;
* curriculum phase (``step <= duo.curriculum_end``, ``duo_plugin.training.curriculum.CurriculumPhase``):
  ``z_t, w/τ = curriculum_inputs(x0, γ_t, τ)``, the model sees the soft input, α_t = T(γ_t) from
  :class:`~duo_plugin.diffusion.DualitySchedule` (optionally a precomputed ``DualityTable``);
* discrete phase: ``z_t = corrupt(x0, α_t)`` with the log-linear schedule;
* loss ``duo_nelbo(log x_θ, z_t, x0, α_t, α'_t)`` summed over real tokens; the trainer divides the gradients
  by the token count (``process_batch`` returns ``(sum, num_tokens)``).

An EMA of the weights (``duo_plugin.training.ema.EMA``, decay 0.9999 with warm-up) is kept by the unit, and
at every fairseq2 checkpoint the model + EMA are exported as a native model directory
``OUTPUT_DIR/native/step_<N>`` (and ``OUTPUT_DIR/native/latest``), which ``load_pretrained``, the sampler and
the lm-eval backend read. The EMA state is restored from the newest export when fairseq2 resumes.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.nn import Module

from fairseq2.composition import register_dataset_family
from fairseq2.metrics import Mean, MetricBag, Sum
from fairseq2.recipe import Recipe, RecipeContext
from fairseq2.recipe.config import (
    ADAMW_OPTIMIZER,
    COSINE_ANNEALING_LR,
    AdamWConfig,
    CommonSection,
    CosineAnnealingLRConfig,
    DatasetSection,
    GangSection,
    LRSchedulerSection,
    MixedPrecisionConfig,
    ModelSection,
    OptimizerSection,
    RegimeSection,
    TrainerSection,
)
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.task import Task
from fairseq2.trainer import TrainStepHookArgs, TrainUnit

from duo_plugin.data.tokenizers import check_vocab, load_tokenizer
from duo_plugin.diffusion import DualitySchedule, LogLinearSchedule, corrupt, curriculum_inputs, duo_nelbo
from duo_plugin.diffusion.duality import DualityTable
from duo_plugin.training.curriculum import CurriculumPhase
from duo_plugin.training.ema import EMA
from duo_plugin.training.timesteps import micro_batch_generators, micro_batch_times

from .data import DUO_TEXT_DATASET, DuoBatch, DuoTextDataset, DuoTextDatasetConfig, open_duo_text_dataset
from .model import save_native

__all__ = ["DuoTrainConfig", "DuoDatasetSection", "DuoObjectiveSection", "DuoTrainRecipe", "DuoTrainUnit"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DuoDatasetSection(DatasetSection):
    tokenizer: Optional[Path] = None
    """A duo tokenizer (directory with ``duo_tokenizer.json``, ``*.model`` or ``tokenizer.json``)."""

    seq_len: int = 1024
    batch_size: int = 32
    """Rows per micro-batch on each rank (global batch = batch_size x world size x accumulation)."""

    mode: str = "wrap"
    """``wrap`` (OWT-style [BOS] ... [EOS] blocks) or ``pad`` (LM1B-style padded sentences)."""

    docs_per_wrap: int = 64
    shuffle_window: int = 10_000
    prefetch: int = 0


@dataclass(kw_only=True)
class DuoObjectiveSection:
    curriculum_start: int = 0
    curriculum_end: int = 500_000
    """Last step (0-based count of finished optimizer steps) of the Gaussian-relaxed curriculum; -1 = none."""

    tau_start: float = 1e-3
    tau_end: float = 1e-3
    gamma_min: float = -3.55
    gamma_max: float = -1.85
    duality_table: Optional[Path] = None
    """``duo-duality build`` output for K_eff; without it T(γ) is integrated on the fly (slow for large K)."""

    t_min: float = 1e-3
    schedule_eps: float = 1e-3
    ema_decay: Optional[float] = 0.9999
    export_native: bool = True
    """Export ``OUTPUT_DIR/native/step_<N>`` (model + EMA) at every fairseq2 checkpoint."""


@dataclass(kw_only=True)
class DuoTrainConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(family="duo", arch="duo_small"))

    dataset: DuoDatasetSection = field(default_factory=lambda: DuoDatasetSection(family=DUO_TEXT_DATASET))

    gang: GangSection = field(default_factory=lambda: GangSection())

    trainer: TrainerSection = field(
        default_factory=lambda: TrainerSection(
            data_parallelism="ddp", max_grad_norm=1.0, mixed_precision=MixedPrecisionConfig(mode="off")
        )
    )

    optimizer: OptimizerSection = field(
        default_factory=lambda: OptimizerSection(
            name=ADAMW_OPTIMIZER, config=AdamWConfig(lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        )
    )

    # Duo: constant LR after a 2,500-step linear warm-up (cosine annealing to final_lr_scale=1.0 is constant).
    lr_scheduler: LRSchedulerSection = field(
        default_factory=lambda: LRSchedulerSection(
            name=COSINE_ANNEALING_LR,
            config=CosineAnnealingLRConfig(num_warmup_steps=2_500, start_lr=0.0, final_lr_scale=1.0),
        )
    )

    regime: RegimeSection = field(
        default_factory=lambda: RegimeSection(
            num_steps=1_000_000, checkpoint_every_n_steps=5_000, keep_last_n_checkpoints=2,
            publish_metrics_every_n_steps=100,
        )
    )

    duo: DuoObjectiveSection = field(default_factory=lambda: DuoObjectiveSection())

    common: CommonSection = field(default_factory=lambda: CommonSection())


class DuoTrainRecipe(Recipe):
    def register(self, container: DependencyContainer) -> None:
        register_dataset_family(
            container, DUO_TEXT_DATASET, DuoTextDataset, DuoTextDatasetConfig, opener=open_duo_text_dataset
        )

    def create_task(self, context: RecipeContext) -> Task:
        config = context.get_config_as(DuoTrainConfig)
        ds = config.dataset
        if ds.tokenizer is None:
            raise ValueError("dataset.tokenizer must name a duo tokenizer (see `duo-tokenizer train`)")
        tokenizer = load_tokenizer(ds.tokenizer)
        dp_model = context.get_data_parallel_model()
        model = context.get_model()
        valid_vocab = check_vocab(tokenizer, int(model.vocab_size))
        if ds.seq_len > int(model.max_seq_len):
            raise ValueError(f"dataset.seq_len={ds.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
        gangs = context.gangs
        num_accumulate = config.trainer.grad_accumulation.num_batches
        dataset = context.get_dataset_as(DuoTextDataset)
        reader = dataset.create_reader(
            tokenizer, gangs, seq_len=ds.seq_len, batch_size=ds.batch_size, mode=ds.mode,
            docs_per_wrap=ds.docs_per_wrap, shuffle_window=ds.shuffle_window, seed=config.common.seed,
            num_accumulate=num_accumulate, prefetch=ds.prefetch,
        )
        unit = DuoTrainUnit(
            dp_model, model, config.duo, valid_vocab=valid_vocab, seed=config.common.seed,
            batch_size=ds.batch_size, world_size=gangs.dp.size, rank=gangs.dp.rank, num_accumulate=num_accumulate,
            tokenizer_descriptor=tokenizer.descriptor(),
        )
        trainer = context.create_trainer(unit, reader)
        if config.duo.export_native:
            exporter = _NativeExporter(unit, context.output_dir / "native", is_rank0=gangs.root.rank == 0,
                                       every_n_steps=config.regime.checkpoint_every_n_steps,
                                       after_n_steps=config.regime.checkpoint_after_n_steps)
            exporter.maybe_restore_ema(context.get_checkpoint_manager())
            unit.exporter = exporter
            trainer.register_checkpoint_save_hook(exporter)
        return trainer

    @property
    def config_kls(self) -> type[object]:
        return DuoTrainConfig


class DuoTrainUnit(TrainUnit[DuoBatch]):
    def __init__(self, dp_model: Module, model: Module, cfg: DuoObjectiveSection, *, valid_vocab: Tensor, seed: int,
                 batch_size: int, world_size: int, rank: int, num_accumulate: int,
                 tokenizer_descriptor: Optional[dict] = None) -> None:
        self._dp_model = dp_model
        self.net = model
        self.cfg = cfg
        self.valid_vocab = valid_vocab
        self.k_eff = int(valid_vocab.sum())
        self.seed = int(seed)
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        self.num_accumulate = int(num_accumulate)
        self.global_batch = self.batch_size * self.world_size * self.num_accumulate
        self.tokenizer_descriptor = tokenizer_descriptor
        self.phase = CurriculumPhase(cfg.curriculum_start, cfg.curriculum_end, cfg.tau_start, cfg.tau_end,
                                     cfg.gamma_min, cfg.gamma_max)
        table = DualityTable.load(cfg.duality_table, vocab_size=self.k_eff) if cfg.duality_table else None
        self.duality = DualitySchedule(self.k_eff, cfg.gamma_min, cfg.gamma_max, table=table)
        self.loglinear = LogLinearSchedule(cfg.schedule_eps)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.ema_step = 0  # optimizer steps folded into the EMA
        self.step_nr = 0
        self._micro = 0
        self.exporter: Optional["_NativeExporter"] = None

    def prepare_metric_bag(self, metric_bag: MetricBag) -> None:
        metric_bag.add("duo_nelbo", Mean())
        metric_bag.add("num_tokens", Sum())

    def set_step_nr(self, step_nr: int) -> None:
        # Called before step ``step_nr`` (1-based): steps 1..step_nr-1 have been applied to the weights.
        self.update_ema(step_nr - 1)
        if self.exporter is not None:
            self.exporter.at_step_boundary(step_nr - 1)
        self.step_nr = int(step_nr)
        self._micro = 0

    def update_ema(self, completed_steps: int) -> None:
        if self.ema is not None and completed_steps > self.ema_step:
            self.ema.update(self.net)
            self.ema_step = int(completed_steps)

    def process_batch(self, batch: DuoBatch, metric_bag: MetricBag) -> tuple[Tensor, int]:
        x0, mask = batch.x0, batch.padding_mask
        B, device = x0.shape[0], x0.device
        step = self.step_nr - 1  # finished optimizer steps (Lightning's global_step)
        first = (self._micro * self.world_size + self.rank) * self.batch_size
        self._micro += 1
        positions = torch.arange(first, first + B)
        t = micro_batch_times(self.seed, step, positions, self.global_batch, self.cfg.t_min, dtype=torch.float64)
        gens = micro_batch_generators(self.seed, step, positions, device=device)
        vv = self.valid_vocab.to(device)
        info = self.phase.at(step)
        if info.phase == "curriculum":
            alpha, alpha_p = self.duality.alpha(t), self.duality.alpha_prime(t)
            z_t, soft = curriculum_inputs(x0, info.gamma(t), info.tau, int(self.net.vocab_size), gens, vv)
            net_in = soft
        else:
            alpha, alpha_p = self.loglinear.alpha(t), self.loglinear.alpha_prime(t)
            z_t = corrupt(x0, alpha.to(device), gens, vv)
            net_in = z_t
        alpha, alpha_p = alpha.to(device), alpha_p.to(device)
        sigma = (-torch.log(alpha)).float()
        log_x = self._dp_model(net_in, sigma, padding_mask=mask)
        per_tok = duo_nelbo(log_x, z_t, x0, alpha, alpha_p, vv)
        if mask is not None:
            per_tok = per_tok * mask
            n = int(mask.sum())
        else:
            n = per_tok.numel()
        loss = per_tok.sum()
        with torch.no_grad():
            metric_bag.get("duo_nelbo", Mean).update(loss.detach() / max(n, 1), weight=n)
            metric_bag.get("num_tokens", Sum).update(torch.tensor(n, device=device))
        return loss, n


class _NativeExporter:
    """Export model + EMA as ``native/step_<N>`` at fairseq2's checkpoint steps; refresh ``native/latest``.

    fairseq2 saves intermediate checkpoints asynchronously, so its "checkpoint saved" hook may fire after
    later steps changed the weights. The export is therefore taken synchronously at the step boundary
    (``at_step_boundary``, called by the unit before the next step) for the regime's checkpoint steps, and
    by the hook only while no later step has started (always the case for the final, blocking checkpoint).
    """

    def __init__(self, unit: DuoTrainUnit, root: Path, *, is_rank0: bool, every_n_steps: Optional[int],
                 after_n_steps: int = 0) -> None:
        self.unit, self.root, self.is_rank0 = unit, Path(root), is_rank0
        self.every, self.after = every_n_steps, int(after_n_steps)
        self.exported: set = set()

    def at_step_boundary(self, completed_steps: int) -> None:
        s = int(completed_steps)
        if s > 0 and self.every and s >= self.after and s % self.every == 0:
            self.export(s)

    def __call__(self, args: TrainStepHookArgs) -> None:
        if self.unit.step_nr == args.step_nr:  # weights are still those of the checkpointed step
            self.export(args.step_nr)

    def export(self, step: int) -> None:
        if step in self.exported:
            return
        self.exported.add(step)
        unit = self.unit
        unit.update_ema(step)  # the EMA includes the step being exported
        if not self.is_rank0:
            return
        ema = unit.ema.shadow if unit.ema is not None else None
        meta = {
            "valid_vocab": unit.valid_vocab,
            "step": int(step),
            "trainer": "fairseq2",
            "tokenizer": unit.tokenizer_descriptor,
            "ema_num_updates": unit.ema.num_updates if unit.ema is not None else None,
        }
        out = self.root / f"step_{step}"
        save_native(unit.net, out, ema_state_dict=ema, metadata=meta)
        if unit.ema is not None:
            torch.save(unit.ema.state_dict(), out / "ema_state.pt")
        latest = self.root / "latest"
        tmp = self.root / ".latest.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        shutil.rmtree(latest, ignore_errors=True)
        tmp.rename(latest)
        log.info("Exported native Duo model directory %s", out)

    def maybe_restore_ema(self, checkpoint_manager) -> None:
        unit = self.unit
        if unit.ema is None:
            return
        step = checkpoint_manager.maybe_get_last_step_number(exclude_model_only=True)
        if step is None:
            return
        self.exported.add(int(step))
        f = self.root / f"step_{step}" / "ema_state.pt"
        if f.exists():
            unit.ema.load_state_dict(torch.load(f, map_location="cpu"))
            unit.ema_step = int(step)
            log.info("Restored the EMA from %s", f)
        else:
            log.warning("Resuming at step %s without %s: the EMA restarts from the current weights", step, f)
