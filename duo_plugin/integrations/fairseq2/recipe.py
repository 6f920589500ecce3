"""Duo pretraining as a fairseq2 0.8.1 recipe (``fairseq2.recipe.Recipe`` + fairseq2's ``Trainer``).

fairseq2 provides the runner (config file / ``--config`` overrides, output dir, gangs, DDP/FSDP, optimizer,
LR scheduler, grad clipping, resumable checkpoints of model + optimizer + data reader, metrics); this module
provides the ``duo_text`` dataset family (:mod:`.data`) and a ``TrainUnit`` whose loss is the SAME object as
``duo_pretrain``'s: :class:`duo_plugin.objectives.DuoObjective` (docs/method.md §7), configured from the ``duo:``
section with the reference code's phase switch (curriculum while ``step <= duo.curriculum_end``, τ annealed
log-linearly from ``tau_start`` to ``tau_end``) and the dense input/NELBO paths. Times and noise are keyed by
(seed, step, position in the global batch); ``process_batch`` returns ``(Σ loss over real tokens, #real tokens)``
and the trainer divides the gradients by the token count.

An EMA of the weights (``duo_plugin.training.ema.EMA``, decay 0.9999 with warm-up) is kept by the unit, and
at every fairseq2 checkpoint the model + EMA are exported as a native model directory
``OUTPUT_DIR/native/step_<N>`` (and ``OUTPUT_DIR/native/latest``), which ``load_pretrained``, the sampler and
the lm-eval backend read. The EMA state is restored from the newest export when fairseq2 resumes.
"""

from __future__ import annotations

import logging
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

from duo_plugin._io import publish_copy
from duo_plugin.data.tokenizers import check_vocab, load_tokenizer
from duo_plugin.objectives import DuoObjective, ObjectiveContext
from duo_plugin.training.ema import EMA

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

    duality_table_points: Optional[int] = None
    """Without ``duality_table``: build an interpolation table with this many points at start-up (None: exact T)."""

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
            tokenizer_descriptor=tokenizer.descriptor(), seq_len=ds.seq_len,
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


def make_objective(cfg: DuoObjectiveSection) -> DuoObjective:
    """The ``duo:`` section as the library objective (reference-code curriculum switch and τ anneal; dense paths,
    which work through any data-parallel wrapper)."""
    return DuoObjective(curriculum_start=cfg.curriculum_start, curriculum_end=cfg.curriculum_end, tau=cfg.tau_start,
                        tau_end=cfg.tau_end, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max,
                        table=str(cfg.duality_table) if cfg.duality_table else None,
                        table_points=cfg.duality_table_points, alpha_eps=cfg.schedule_eps, t_min=cfg.t_min,
                        kernels_curriculum_input="dense", kernels_nelbo="dense")


def _device_of(model: Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class DuoTrainUnit(TrainUnit[DuoBatch]):
    def __init__(self, dp_model: Module, model: Module, cfg: DuoObjectiveSection, *, valid_vocab: Tensor, seed: int,
                 batch_size: int, world_size: int, rank: int, num_accumulate: int,
                 tokenizer_descriptor: Optional[dict] = None, seq_len: int = 0) -> None:
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
        self.objective = make_objective(cfg)
        self.objective.setup(model, ObjectiveContext(
            seed=self.seed, global_batch_size=self.global_batch, vocab_size=int(model.vocab_size),
            valid_vocab=valid_vocab.to(_device_of(model)), seq_len=int(seq_len), device=_device_of(model)))
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
        if mask is None:
            mask = torch.ones_like(x0, dtype=torch.bool)
        loss, n, _ = self.objective(self._dp_model, x0, mask, positions, step)
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
        publish_copy(out, self.root / "latest")
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
            unit.ema.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
            unit.ema_step = int(step)
            log.info("Restored the EMA from %s", f)
        else:
            log.warning("Resuming at step %s without %s: the EMA restarts from the current weights", step, f)
