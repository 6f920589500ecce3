"""Pure diffusion maths for Duo: schedules, the duality operator T, the uniform forward process and posterior,
the NELBO, curriculum inputs and DCD pairs.  See docs/architecture.md for the contract."""

from .duality import DualityTable, discrete_alpha, discrete_alpha_and_prime, discrete_alpha_prime, gamma_window
from .losses import curriculum_inputs, dcd_pair, distillation_kl, duo_nelbo, gaussian_latent
from .schedules import (
    DualitySchedule,
    LogLinearSchedule,
    gamma_at,
    gaussian_coefficients,
    log_linear_alpha,
    log_linear_alpha_prime,
    stratified_times,
)
from .uniform import (
    corrupt,
    num_valid,
    posterior,
    prior_sample,
    row_generators,
    sample_categorical,
    stable_seed,
    valid_ids,
)

__all__ = [
    "DualitySchedule",
    "DualityTable",
    "LogLinearSchedule",
    "corrupt",
    "curriculum_inputs",
    "dcd_pair",
    "discrete_alpha",
    "discrete_alpha_and_prime",
    "discrete_alpha_prime",
    "distillation_kl",
    "duo_nelbo",
    "gamma_at",
    "gamma_window",
    "gaussian_coefficients",
    "gaussian_latent",
    "log_linear_alpha",
    "log_linear_alpha_prime",
    "num_valid",
    "posterior",
    "prior_sample",
    "row_generators",
    "sample_categorical",
    "stable_seed",
    "stratified_times",
    "valid_ids",
]
