"""Training utilities: EMA, atomic step checkpoints and resume, curriculum phase, topology-free time draws."""

from duo_plugin.training.ema import EMA  # noqa: F401
from duo_plugin.training.checkpointing import (  # noqa: F401
    capture_rng_state,
    check_resume_compatible,
    latest_checkpoint,
    load_training_state,
    restore_rng_state,
    save_step_checkpoint,
    save_training_state,
)
from duo_plugin.training.curriculum import CurriculumPhase, PhaseInfo  # noqa: F401
from duo_plugin.diffusion.schedules import micro_batch_generators, micro_batch_times  # noqa: F401  (moved)
