"""duo_distill: Discrete Consistency Distillation (DCD) of a Duo checkpoint into a few-step sampler.

Torchtune-style recipe (docs/method.md §4, paper Sec. 4.2, Alg. 1); the loss is :class:`duo_plugin.objectives.
DCDObjective` (built from the ``distill:`` section, or ``objective: {_component_: ...}``), the data
:func:`duo_plugin.data.text_blocks`, the shared steps :mod:`duo_plugin.recipes.common`:

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

    tune run duo_distill --config duo/distill_tiny_cpu init_from=outputs/demo/final
    python -m duo_plugin.recipes.duo_distill --config duo_plugin/configs/duo/distill_tiny_cpu.yaml
    tune run duo_distill --config duo/distill_tiny_cpu evaluate_only=true init_from=<any duo model dir>
    tune run --nproc_per_node 2 duo_plugin/recipes/duo_distill.py --config <path.yaml>   # FSDP2

Absolute imports only: torchtune runs registered recipes through ``runpy.run_path``.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from duo_plugin.objectives import objective_from_config
from duo_plugin.objectives.config import DISTILL_KEYS, legacy_conflicts
from duo_plugin.recipes.common import RecipeBase, log
from duo_plugin.training import loop
from duo_plugin.training.recipe_utils import ANY, COMPONENT, ConfigError, all_ranks_agree, check_keys, is_dist
from torchtune import config as tt_config


SCHEMA: dict[str, Any] = {
    "output_dir": None,
    "seed": None,
    "device": None,
    "dtype": None,
    "init_from": None,
    "init_weights": None,
    "evaluate_only": None,
    "objective": COMPONENT,  # optional: {_component_: duo_plugin.objectives.DCDObjective, ...} instead of distill.*
    "tokenizer": {"path": None},
    "data": {
        "_component_": None,
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
    "overwrite": None,  # true: a fresh run may replace an earlier run in output_dir (training/run_dir.py)
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
    "overwrite": False,
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
    cfg = cfg.copy()
    for key in missing_keys(cfg):  # '???' in the config: what the user must set, named before anything reads it
        if key == "eval.scorer.path":  # needed by the hf / dit scorers only (eval.scorer.type=none: entropy only)
            check_scorer(OmegaConf.create({"type": OmegaConf.select(cfg, "eval.scorer.type"), "path": None}),
                         on_disk=False)
            OmegaConf.update(cfg, key, None)
            continue
        if key == "init_from":
            raise ConfigError("init_from is required: the duo model directory to distil (e.g. the 'final' dir that "
                              "`tune run duo_pretrain --config duo/tiny_cpu` writes: outputs/demo/final)")
        raise ConfigError(f"config key '{key}' is required (it is ??? in the config): set {key}=...")
    check_keys(cfg, SCHEMA, "")
    if cfg.get("objective") is not None:
        bad = legacy_conflicts(OmegaConf.to_container(cfg, resolve=False), DISTILL_KEYS)
        if bad:
            raise ConfigError(bad[0])
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    from duo_plugin.training.config_values import DISTILL_TYPES, check_data_source, coerce_config

    coerce_config(merged, DISTILL_TYPES)  # a wrong type names the key
    check_data_source(merged)  # data.files with data.source=shakespeare would be ignored: name both keys
    from duo_plugin.recipes.common import warn_suspicious_lr

    warn_suspicious_lr(merged)
    if not merged.get("init_from"):
        raise ConfigError("init_from is required: the duo model directory to distil (e.g. the 'final' dir that "
                          "`tune run duo_pretrain --config duo/tiny_cpu` writes: outputs/demo/final)")
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
    if merged.eval.scorer.type not in ("none", "dit", "torchtune", "hf"):
        raise ConfigError(f"eval.scorer.type must be none, dit (an AR-objective duo model dir), torchtune or hf (a "
                          f"local Hugging Face causal-LM dir, e.g. gpt2-large), got {merged.eval.scorer.type!r}")
    if scorer_needed(merged):
        check_scorer(merged.eval.scorer, on_disk=False)
    if merged.resume not in (False, True, "auto") and not isinstance(merged.resume, str):
        raise ConfigError("resume must be false, true/'auto' (latest checkpoint in output_dir) or a checkpoint dir")
    return merged


#: what ``eval.scorer.path`` must be, per scorer type (the error messages name it)
SCORER_PATHS = {
    "hf": ("a GPT-2 Large-compatible local Hugging Face causal-LM dir (the paper's Gen PPL scorer: a downloaded "
           "gpt2-large with config.json, weights and tokenizer files)", "config.json"),
    "dit": ("an AR-objective duo model dir (`duo_pretrain objective=ar`; scripts/demo trains outputs/demo_ar/final)",
            "duo_config.json"),
}


def missing_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is OmegaConf's mandatory marker ``???``."""
    out = []
    if not OmegaConf.is_dict(node):
        return out
    for key in node.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            out.append(full)
        else:
            out.extend(missing_keys(node[key], full))
    return out


def scorer_needed(cfg) -> bool:
    """True when the run scores samples (base row, a row per round, or ``evaluate_only``)."""
    return bool(cfg.evaluate_only or cfg.eval.every_round or cfg.eval.include_base)


def check_scorer(scfg, *, on_disk: bool) -> None:
    """ConfigError (one line: the key and the fix) when ``eval.scorer`` names a path-based scorer (``hf``, ``dit``)
    without a path, or (``on_disk``) with a path that does not hold one. Run before training, so a missing scorer is
    reported before any step, not at the first evaluation."""
    if scfg.type not in SCORER_PATHS:
        return
    what, marker = SCORER_PATHS[scfg.type]
    fix = "set eval.scorer.path=/path/to/it, or eval.scorer.type=none (entropy only, no Gen PPL)"
    if OmegaConf.is_missing(scfg, "path") or not scfg.get("path"):
        raise ConfigError(f"eval.scorer.path is required for eval.scorer.type={scfg.type}: {what}; {fix}")
    p = Path(str(scfg.path))
    if on_disk and not (p / marker).is_file():
        raise ConfigError(f"eval.scorer.path={p} is not {what} (no {marker} there); {fix}")


def build_scorer(scfg, device) -> tuple[Any, Any, int, int | None, int | None] | None:
    """``eval.scorer`` → (scorer callable, scorer tokenizer, eos id, bos id or None, scorer context length or None),
    or None for type 'none'.

    * ``dit``: ``path`` = a duo model dir of an AR-objective DiT (``duo_pretrain objective: ar``); tokenizer from
      ``tokenizer`` or ``path/tokenizer``.
    * ``torchtune``: ``builder`` (dotpath) + ``checkpoint_dir`` (HF format) + ``model_type``; ``tokenizer`` is a
      tokenizer path for :func:`duo_plugin.data.tokenizers.load_tokenizer`.
    * ``hf``: ``path`` = a local Hugging Face causal-LM dir (e.g. ``gpt2-large``, the paper's scorer) loaded by
      :func:`duo_plugin.eval.genppl.load_hf_scorer` (extra ``hf``), with its own tokenizer and no BOS, exactly as
      ``duo_generate genppl.scorer=hf`` scores.
    """
    from duo_plugin.data.tokenizers import load_tokenizer

    kind = scfg.type
    if kind == "none":
        return None
    if kind == "hf":
        if not scfg.path:
            raise ConfigError("eval.scorer.type=hf needs eval.scorer.path: a local Hugging Face causal-LM dir "
                              "(config.json + weights + tokenizer files, e.g. a downloaded gpt2-large)")
        from duo_plugin.eval.genppl import load_hf_scorer

        hf = load_hf_scorer(str(scfg.path), device=str(device))
        return hf, hf.tokenizer, int(hf.eos_id), None, int(hf.max_len)
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


class DuoDistillRecipe(RecipeBase):
    """Setup → (evaluate base) → rounds of DCD steps with teacher refresh → evaluate after each round → summary."""

    def __init__(self, cfg: DictConfig):
        self.cfg = validate_config(cfg)
        cfg = self.cfg
        try:
            self.objective = objective_from_config(OmegaConf.to_container(cfg, resolve=True), recipe="distill")
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
        self.schedule = self.objective.schedule
        self._open_run(cfg)
        self.init_from = Path(str(cfg.init_from))
        self.max_steps = int(cfg.max_steps) if cfg.max_steps is not None else self.schedule.total_steps
        self.step = 0
        self.losses: list[float] = []
        self.events: list[dict] = []  # teacher refreshes: {"step", "round", "delta", "source"}
        self.quality_rows: list[dict] = []

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if not self.init_from.is_dir() or not (self.init_from / "duo_config.json").is_file():
            raise FileNotFoundError(
                f"init_from={self.init_from} is not a duo model directory (no duo_config.json); point it at the "
                "'final' dir of a duo_pretrain run (e.g. outputs/demo/final) or a checkpoint's model/ dir")
        if scorer_needed(cfg):
            check_scorer(cfg.eval.scorer, on_disk=True)  # before any step: the scorer the table needs is there
        self._open_output(guard=not cfg.evaluate_only)  # training: run_dir rules (no silent overwrite, lock)
        self._setup_tokenizer()
        self._setup_model()
        if cfg.evaluate_only:
            return
        self.seq_len = int(cfg.data.seq_len) if cfg.data.get("seq_len") else int(self.base_meta.get("seq_len") or 0)
        if self.seq_len <= 0:
            raise ConfigError("data.seq_len is required (the init_from model records no seq_len)")
        self.global_batch_size = int(cfg.global_batch_size)
        self._check_batch_split(self.global_batch_size)
        self._setup_data(build_val=False)
        self._setup_optimizer()
        self.objective.setup(self.model, self._objective_context(teacher=self.teacher))
        self.gamma_min, self.gamma_max = self.objective.gamma_min, self.objective.gamma_max
        self._maybe_resume()

    def _setup_tokenizer(self) -> None:
        from duo_plugin.data.tokenizers import load_tokenizer

        path = Path(str(self.cfg.tokenizer.path)) if self.cfg.tokenizer.path else self.init_from / "tokenizer"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found at {path}; set tokenizer.path (duo_pretrain saves it as "
                                    "<model dir>/tokenizer)")
        self.tokenizer = load_tokenizer(path)

    def _setup_model(self) -> None:
        from duo_plugin.models.checkpoint import load_pretrained
        from duo_plugin.training.ema import EMA

        cfg = self.cfg
        torch.manual_seed(self.seed)
        base = load_pretrained(self.init_from, weights=str(cfg.init_weights), device="cpu")
        self.base_meta = dict(getattr(base, "duo_metadata", {}) or {})
        from duo_plugin.data.tokenizers import check_same_tokenizer

        check_same_tokenizer(self.base_meta.get("tokenizer"), self.tokenizer, self.init_from)  # no silent re-map
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
                self._shard(m, loop.block_types(m))
            if cfg.compile:
                for block in loop.model_blocks(m):
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

    # ------------------------------------------------------------------------------------------------ DCD step
    def refresh_teacher(self, step: int) -> None:
        """θ⁻ ← θ (current student weights) or θ⁻ ← EMA(θ) (``distill.teacher: ema``)."""
        from duo_plugin.training.distill import copy_weights_

        source = self.cfg.distill.teacher
        copy_weights_(self.teacher, self.model)
        if source == "ema":
            self.ema.copy_to(self.teacher)
        self.events.append({"step": step, "round": self.schedule.round_of(step), "delta": self.schedule.delta(step),
                            "source": source})

    def train_step(self, step: int) -> dict:
        """Teacher refresh at round starts, then one optimizer step on the global batch of ``step``."""
        if self.schedule.refreshes_teacher(step):
            self.refresh_teacher(step)
        m = self.optimizer_step_on(step)
        return dict(m, delta=self.schedule.delta(step), round=self.schedule.round_of(step))

    # ------------------------------------------------------------------------------------------------ evaluation
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
        from duo_plugin.eval.metrics import GenPPLSpec
        from duo_plugin.training.distill import QualityTableSpec, sample_quality_table, write_quality_table

        if not self.is_rank_zero or not models:
            return []
        e = self.cfg.eval
        if not hasattr(self, "_scorer"):
            self._scorer = build_scorer(e.scorer, self.device)
        sc = self._scorer
        seq_len = int(e.seq_len or getattr(self, "seq_len", 0) or self.base_meta.get("seq_len") or 0)
        if seq_len <= 0:
            raise ConfigError("eval.seq_len is required (the model records no seq_len)")
        spec = QualityTableSpec(num_samples=int(e.num_samples), seq_len=seq_len, steps=[int(s) for s in e.steps],
                                samplers=list(e.samplers), seed=int(e.seed),
                                batch_size=int(e.batch_size) if e.batch_size else None,
                                progress=bool(self.cfg.progress_bar))
        genppl = GenPPLSpec(self.tokenizer, sc[0] if sc else None, sc[1] if sc else None,
                            eos_id=sc[2] if sc else None, bos_id=sc[3] if sc else None,
                            batch_size=int(e.score_batch_size),
                            max_len=min(int(e.max_len), sc[4]) if sc and sc[4] else int(e.max_len))
        rows = sample_quality_table(models, spec, genppl, valid_vocab=self.valid_vocab, device=self.device)
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
        optim_sd = self._full_optim_state()
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
        found = self._resume_state(RESUME_KEYS)
        if found is None:
            return
        ckpt, state, model_sd = found
        self._load_states(model_sd, state["optimizer"], extra=((self.teacher, state["teacher"]),))
        if self.ema is not None:
            full = state["ema"]
            self.ema.load_full_state_dict({**self.ema.state_dict(), "shadow": full["shadow"]}, self.model, self.device)
            self.ema.num_updates = int(full["num_updates"])
        self._restore_rng(state)
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        self.events = list(state.get("events", []))
        self.quality_rows = list(state.get("quality_rows", []))
        self.last_checkpoint = ckpt
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
        pbar = self._progress_bar("duo_distill")
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
        final_dir = self._publish_final(final_ckpt)
        summary = {"steps": self.step, "wall_time_s": time.perf_counter() - t0, "losses": self.losses,
                   "events": self.events, "quality_rows": self.quality_rows,
                   "gamma_window": [self.gamma_min, self.gamma_max], "checkpoint": str(final_ckpt),
                   "model_dir": str(final_dir) if final_dir else None,
                   "quality_table": str(self.output_dir / "quality_table.md") if self.quality_rows else None}
        if self.is_rank_zero:
            self._write_summary(summary)
            print(f"duo_distill: done: {self.step} steps; student model dir: {final_dir}; table: "
                  f"{summary['quality_table']}", flush=True)
        return summary

    def _evaluate_student(self, name: str) -> None:
        m = self._eval_model()
        if self.is_rank_zero:
            self.evaluate_quality({name: m})
        self._barrier()


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
    from duo_plugin.errors import user_errors
    from duo_plugin.recipes.common import data_dirs_of
    from duo_plugin.runtime import drop_cwd_from_sys_path

    try:
        with user_errors("duo_distill"):  # a user error: one line, exit 2 (DUO_DEBUG=1: traceback)
            # `tune run` / `python -m` put the working directory on sys.path: dropped when it is a model folder
            # (data), kept otherwise (a `_component_` may name the user's own code there, as `tune run` intends)
            drop_cwd_from_sys_path(only_if_data=True, data_dirs=data_dirs_of(cfg))
            run(cfg)
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(recipe_main())
