"""Sampling schedulers: the noise process and the update rule, separate from the loop and the network.

A *noise process* knows the signal schedule α_t, the prior, the exact posterior q(z_s | z_t, x) and the forward
marginal q_α(· | x): it is the one class per process of :mod:`duo_plugin.diffusion.process`
(:class:`~duo_plugin.diffusion.process.UniformProcess`, re-exported here; the absorbing process is
:class:`~duo_plugin.diffusion.absorbing.AbsorbingProcess`, with its scheduler in :mod:`.mdlm`). A *scheduler* owns the update rule: from the denoiser's
log x_θ(z_t) at time t it draws z_s, in float64 (``step(log_x_theta, t, s, z, generator)``, diffusers-style).

* :class:`AncestralScheduler`: z_s ~ q(z_s | z_t, x_θ) (optionally guided, see below).
* :class:`PsiScheduler`: the Ψ-sampler of "Diffusion Duality, Chapter II" (docs/sampling.md §Ψ-samplers)

      q_Ψ(z_s | z_t) = κ_t q(z_s | z_t, x_θ) + (1 − κ_t) Σ_x q(x | z_t, x_θ) q_{α_s}(z_s | x),

  i.e. κ_t times the ancestral posterior plus (1 − κ_t) times "predict to time 0, then re-noise to α_s", with κ_t
  from :class:`PsiSchedule` (modes and time profiles spelled as in the official code).

Prompt guidance (classifier-free guidance without labels): with ``guidance_weight`` w ≠ 1 the step also receives
the denoiser's prediction for the *unconditional* input (the loop replaces the clamped prompt positions with prior
noise) and draws from the guided posterior ∝ q_cond^w · q_uncond^(1−w) (ids where either posterior is 0 get
probability 0; a position where that leaves nothing falls back to the conditional posterior). For Ψ both the time-s
and the time-0 posteriors are guided before mixing. w = 1 never calls the unconditional model.

Randomness comes from a :class:`StepNoise`: the torch generator(s) for ``posterior_impl="dense"`` (race of
exponentials from :func:`~duo_plugin.diffusion.uniform.sample_categorical`), and the per-row counter-stream seeds plus
the step index for the kernel paths (``"chunked"``: counter race; ``"mixture"``: stay / x_θ / uniform coin). The
ancestral paths are exactly those of the pre-scheduler sampler (same seeds, same samples; tests/sampling/
test_golden.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from duo_plugin.diffusion.process import UniformProcess
from duo_plugin.diffusion.uniform import sample_categorical
from duo_plugin.kernels import posterior_sample_step
from duo_plugin.kernels.sampler import posterior_mixture_sample, race_sample_rows

from .base import Scheduler, SchedulerBase, StepNoise, check_alpha_grid, time_grid

__all__ = [
    "PSI_MODES",
    "TIME_PROFILES",
    "POSTERIOR_IMPLS",
    "PREDICTORS",
    "Scheduler",
    "SchedulerBase",
    "StepNoise",
    "UniformProcess",
    "XThetaFilter",
    "AncestralScheduler",
    "PsiScheduler",
    "PsiSchedule",
    "make_scheduler",
    "guided_posterior",
    "psi_mode_kappas",
]

POSTERIOR_IMPLS = ("auto", "dense", "chunked", "mixture")
PREDICTORS = ("ancestral", "psi")
PSI_MODES = ("pure-posterior", "pure-pc", "constant-<eta>", "constant-remdm-<eta>", "max-capped-<eta>",
             "max-rescale-<eta>")
TIME_PROFILES = ("linear", "linear-constant-linear-<c>", "linear-constant-linear-<alpha>-inv")
_WORKSPACE = 1 << 20  # float64 elements per chunk of rows for the non-dense paths (8 MiB)
_F64 = torch.float64


def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature on log x_θ: ``log_softmax(log x_θ / T)`` (float64 ``[..., K]``). T = 1 is the identity."""
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lp = log_probs.to(_F64)
    if float(temperature) == 1.0:
        return lp
    return torch.log_softmax(lp / float(temperature), dim=-1)


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filter on probability vectors ``[..., K]``: keep the smallest set of ids whose mass is ≥ p, renormalise.

    Ids are ranked by probability (ties broken by sort order); id i of the ranking is kept iff the mass of the ids
    ranked before it is < p, so the argmax is always kept. ``top_p >= 1`` returns the input unchanged. float64 out.
    """
    p = float(top_p)
    if not (0.0 < p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    probs = probs.to(_F64)
    if p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < p * sorted_p.sum(-1, keepdim=True)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    out = torch.where(keep, probs, torch.zeros((), dtype=_F64, device=probs.device))
    return out / out.sum(-1, keepdim=True)


class XThetaFilter:
    """log x_θ rows ``[..., K]`` → float64 probabilities: temperature, drop ids outside ``valid_vocab``
    (renormalise), nucleus (top-p). Acts row by row."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, valid_vocab: Optional[torch.Tensor] = None):
        if not (0.0 < float(top_p) <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.top_p, self.valid_vocab = float(temperature), float(top_p), valid_vocab
        self.plain = self.temperature == 1.0 and self.top_p >= 1.0

    def __call__(self, lp: torch.Tensor) -> torch.Tensor:
        probs = apply_temperature(lp, self.temperature).exp()
        if self.valid_vocab is not None:
            vv = self.valid_vocab.to(probs.device)
            probs = torch.where(vv, probs, torch.zeros((), dtype=_F64, device=probs.device))
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
        return nucleus_filter(probs, self.top_p)


def guided_posterior(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """∝ cond^w · uncond^(1−w) over the last axis (float64), 0 wherever either is 0; rows where nothing is left keep
    the (normalised) conditional posterior. ``weight == 1`` returns ``cond`` unchanged."""
    w = float(weight)
    cond, uncond = cond.to(_F64), uncond.to(_F64)
    if w == 1.0:
        return cond
    zero = (cond <= 0) | (uncond <= 0)
    logits = w * cond.clamp_min(torch.finfo(_F64).tiny).log() + (1 - w) * uncond.clamp_min(torch.finfo(_F64).tiny).log()
    logits = torch.where(zero, torch.full((), -math.inf, dtype=_F64, device=cond.device), logits)
    empty = zero.all(-1, keepdim=True)
    out = torch.softmax(torch.where(empty, torch.zeros((), dtype=_F64, device=cond.device), logits), -1)
    return torch.where(empty, cond / cond.sum(-1, keepdim=True).clamp_min(torch.finfo(_F64).tiny), out)


class AncestralScheduler(SchedulerBase):
    """z_s ~ q(z_s | z_t, x_θ) (paper Eq. 4), float64, x_θ filtered by :class:`XThetaFilter`; optional guidance.

    Args:
        process: the noise process (:class:`UniformProcess`).
        posterior_impl: ``"auto"`` (``"mixture"``; ``"chunked"`` when guided) | ``"dense"`` | ``"chunked"`` |
            ``"mixture"`` (see :func:`duo_plugin.sampling.sample`). Guidance (w ≠ 1) cannot use ``"mixture"``.
        temperature, top_p: the x_θ filter. guidance_weight: w of the guided posterior (1 = conditional).
        reuse_x_theta: the denoiser ignores σ, so the loop may reuse x_θ while z is unchanged (:class:`Scheduler`).
    """

    predictor = "ancestral"

    def __init__(self, process: UniformProcess, *, posterior_impl: str = "auto", temperature: float = 1.0,
                 top_p: float = 1.0, guidance_weight: float = 1.0, workspace: int = _WORKSPACE,
                 reuse_x_theta: bool = False):
        if posterior_impl not in POSTERIOR_IMPLS:
            raise ValueError(f"posterior_impl must be one of {POSTERIOR_IMPLS}, got {posterior_impl!r}")
        w = float(guidance_weight)
        if not math.isfinite(w):
            raise ValueError(f"guidance_weight must be a finite number, got {guidance_weight}")
        if w != 1.0 and posterior_impl == "mixture":
            raise ValueError("guidance_weight != 1 needs posterior_impl 'dense' or 'chunked' ('auto' picks chunked): "
                             "the guided posterior is not a stay / x_θ / uniform mixture")
        self.process = process
        self.impl = ("chunked" if w != 1.0 else "mixture") if posterior_impl == "auto" else posterior_impl
        self.filter = XThetaFilter(temperature, top_p, process.valid_vocab)
        self.guidance_weight = w
        self.workspace = int(workspace)
        self.reuse_x_theta = bool(reuse_x_theta)

    @property
    def uses_counter_stream(self) -> bool:
        return self.impl != "dense"

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        """The grid of times ``float64 [steps + 1]`` from 1 to ``t_eps`` (step i goes from entry i to i + 1); α_t
        must lie in (0, 1] on it."""
        grid = time_grid(steps, t_eps)
        check_alpha_grid(self.process, grid, low_open=True, high_open=False)
        return grid

    def kappa(self, index: int) -> float:
        """Weight of the ancestral posterior at step ``index`` (1 for the ancestral sampler)."""
        return 1.0

    def step(self, log_x_theta: torch.Tensor, t, s, z: torch.Tensor, generator: StepNoise, *,
             log_x_theta_uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One update ``z_t → z_s`` (``Long[B, L]``) from ``log_x_theta = log x_θ(z_t, σ_t)`` ``[B, L, K]``.

        ``z`` must hold valid ids everywhere (the loop fills clamped positions and re-clamps after the step)."""
        p = self.process
        return self._draw(log_x_theta, z, p.alpha(t), p.alpha(s), generator, self.kappa(generator.index),
                          log_x_theta_uncond)

    def final(self, log_x_theta: torch.Tensor, t, z: torch.Tensor, generator: StepNoise, mode: str, *,
              log_x_theta_uncond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The noise-removal call at ``t`` (= t_eps): ``"ancestral"`` draws from the posterior with α_s = 1 (κ = 1
        for every predictor); ``"greedy"`` (Greedy-Tail) returns argmax of the filtered conditional x_θ."""
        if mode == "greedy":
            return self.greedy(log_x_theta)
        if mode != "ancestral":
            raise ValueError(f"noise-removal mode must be 'ancestral' or 'greedy', got {mode!r}")
        return self._draw(log_x_theta, z, self.process.alpha(t), torch.ones((), dtype=_F64), generator, 1.0,
                          log_x_theta_uncond)

    def greedy(self, log_x_theta: torch.Tensor) -> torch.Tensor:
        b, l, k = log_x_theta.shape
        if self.impl == "dense":
            return self.filter(log_x_theta).argmax(-1)
        lx = log_x_theta.reshape(b * l, k)
        rows = max(1, self.workspace // k)
        return torch.cat([self.filter(lx[i:i + rows]).argmax(-1) for i in range(0, b * l, rows)]).view(b, l)

    # ---------------------------------------------------------------------------------------------- the laws
    def law(self, z, log_x_theta, alpha_t, alpha_s, kappa: float = 1.0, log_x_theta_uncond=None) -> torch.Tensor:
        """The step's law ``float64 [..., L, K]``: κ q(z_s | z_t, x_θ) + (1 − κ) q_{α_s}(q(x | z_t, x_θ)), each
        posterior guided when ``log_x_theta_uncond`` is given and w ≠ 1 (dense; used by the dense and chunked paths)."""
        p, f = self.process, self.filter
        guided = log_x_theta_uncond is not None and self.guidance_weight != 1.0

        def post(a_s):
            q = p.posterior(z, f(log_x_theta), alpha_t, a_s)
            if guided:
                q = guided_posterior(q, p.posterior(z, f(log_x_theta_uncond), alpha_t, a_s), self.guidance_weight)
            return q

        q = post(alpha_s)
        if kappa < 1.0:
            q = kappa * q + (1.0 - kappa) * p.marginal(post(torch.ones((), dtype=_F64)), alpha_s)
        return q

    def _draw(self, lx, z, alpha_t, alpha_s, noise: StepNoise, kappa: float, lxu=None) -> torch.Tensor:
        guided = lxu is not None and self.guidance_weight != 1.0
        valid = self.process.valid_vocab
        probs_fn = None if self.filter.plain else self.filter
        if not guided and kappa == 1.0:  # the ancestral posterior: the original streams of each impl
            if self.impl == "dense":
                return sample_categorical(self.process.posterior(z, self.filter(lx), alpha_t, alpha_s),
                                          noise.generator)
            return posterior_sample_step(
                lx, z, alpha_t.item(), alpha_s.item(), noise.seeds, noise.index, valid, impl="chunked",
                method="race" if self.impl == "chunked" else "mixture", probs_fn=probs_fn,
            )
        if self.impl == "mixture":  # Ψ without guidance is still a stay / x_θ / uniform mixture
            return posterior_mixture_sample(lx, z, alpha_t.item(), alpha_s.item(), noise.seeds, noise.index, valid,
                                            workspace=self.workspace, probs_fn=probs_fn, kappa=kappa)
        if self.impl == "dense":
            return sample_categorical(self.law(z, lx, alpha_t, alpha_s, kappa, lxu), noise.generator)
        b, l, k = lx.shape
        zf, lxf = z.reshape(1, -1), lx.reshape(1, -1, k)
        lxuf = lxu.reshape(1, -1, k) if guided else None

        def rows(i, j):
            return self.law(zf[:, i:j], lxf[:, i:j], alpha_t, alpha_s, kappa,
                            None if lxuf is None else lxuf[:, i:j])[0]

        return race_sample_rows(rows, b, l, k, noise.seeds, noise.index, lx.device, self.workspace)


# ------------------------------------------------------------------------------------------------------ Ψ
_ETA_MODES = ("constant-remdm-", "max-capped-", "max-rescale-", "constant-")
_LCL = re.compile(r"^linear-constant-linear-([0-9.eE+-]+?)(-inv)?$")


def _parse_mode(mode: str) -> tuple[str, Optional[float]]:
    mode = str(mode)
    if mode in ("pure-posterior", "pure-pc"):
        return mode, None
    for prefix in _ETA_MODES:
        if mode.startswith(prefix):
            try:
                eta = float(mode[len(prefix):])
            except ValueError:
                break
            if not (math.isfinite(eta) and eta >= 0):
                break
            return prefix[:-1], eta
    raise ValueError(f"unknown Ψ mode {mode!r}: use one of {', '.join(PSI_MODES)} (e.g. max-capped-0.01)")


def psi_mode_kappas(mode: str, times: torch.Tensor, alpha: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """κ for the grid points ``times`` (float64 ``[n]``) of one phase, as the official code computes them:
    pure-posterior 1, pure-pc 0, constant-η η; the schedule-dependent modes take σ from consecutive pairs
    (α_t, α_s) of the phase — max-capped σ = min(η, (1 − α_s)/α_t), max-rescale σ = η · min(η, (1 − α_s)/α_t),
    constant-remdm σ = η — then κ = clip(1 − σ/(1 − α_s), 0, 1), and the phase's last point gets κ = 1."""
    kind, eta = _parse_mode(mode)
    n = int(times.numel())
    if kind == "pure-posterior":
        return torch.ones(n, dtype=_F64)
    if kind == "pure-pc":
        return torch.zeros(n, dtype=_F64)
    if kind == "constant":
        return torch.full((n,), float(eta), dtype=_F64)
    if n == 0:
        return torch.zeros(0, dtype=_F64)
    a = alpha(times.to(_F64))
    a_t, a_s = a[:-1], a[1:]
    cap = torch.minimum(torch.full_like(a_t, eta), (1 - a_s) / a_t.clamp_min(torch.finfo(_F64).tiny))
    if kind == "max-capped":
        sigma = torch.where(a_t == 0, torch.full_like(a_t, eta), cap)
    elif kind == "max-rescale":
        sigma = torch.where(a_t > 0, cap, torch.ones_like(a_t)) * eta
    else:  # constant-remdm
        sigma = torch.full_like(a_t, eta)
    kappa = torch.clip(1 - sigma / (1 - a_s), 0.0, 1.0)
    return torch.cat([kappa, torch.ones(1, dtype=_F64)])


@dataclass(frozen=True)
class PsiSchedule:
    """Ψ-sampler settings (names and spelling of the official ``sampling.psi`` config).

    ``high_mode`` / ``middle_mode`` / ``low_mode``: one of ``pure-posterior`` (κ = 1: ancestral), ``pure-pc``
    (κ = 0: predict-then-renoise), ``constant-<η>`` (κ = η), ``constant-remdm-<η>``, ``max-capped-<η>``,
    ``max-rescale-<η>`` (ReMDM-like, from σ_t; see :func:`psi_mode_kappas`). ``high_frac`` / ``middle_frac``: the
    fractions of the grid's ``steps + 1`` points (rounded) in the high and middle phases; the rest is low.
    ``time_profile``: ``linear`` (the uniform grid) or ``linear-constant-linear-<c>`` (linear from 1 to c over the
    high phase, constant c over the middle phase, linear from c to t_eps), ``c`` a time, or an α with the
    ``-inv`` suffix (``linear-constant-linear-0.9-inv``: c = the time where α_t = 0.9).
    """

    high_mode: str = "pure-posterior"
    middle_mode: str = "pure-posterior"
    low_mode: str = "pure-posterior"
    high_frac: float = 0.2
    middle_frac: float = 0.6
    time_profile: str = "linear"

    def __post_init__(self):
        for m in (self.high_mode, self.middle_mode, self.low_mode):
            _parse_mode(m)
        hf, mf = float(self.high_frac), float(self.middle_frac)
        if not (0.0 <= hf <= 1.0 and 0.0 <= mf <= 1.0 and hf + mf <= 1.0 + 1e-12):
            raise ValueError(f"Ψ high_frac and middle_frac must lie in [0, 1] with sum <= 1; got {hf}, {mf}")
        self._profile()

    def _profile(self) -> tuple[Optional[float], bool]:
        if self.time_profile == "linear":
            return None, False
        m = _LCL.match(str(self.time_profile))
        if not m:
            raise ValueError(f"unknown Ψ time_profile {self.time_profile!r}: use one of {', '.join(TIME_PROFILES)}")
        c = float(m.group(1))
        if not (0.0 < c < 1.0):
            raise ValueError(f"Ψ time_profile constant must lie in (0, 1), got {c}")
        return c, bool(m.group(2))

    def _split(self, n: int) -> tuple[int, int]:
        n_hi = round(float(self.high_frac) * n)
        n_mid = round(float(self.middle_frac) * n)
        return n_hi, min(n_mid, n - n_hi)

    def time_grid(self, steps: int, t_eps: float, process: UniformProcess) -> torch.Tensor:
        """``float64 [steps + 1]`` times from 1 to ``t_eps`` following ``time_profile``."""
        grid = time_grid(steps, t_eps)
        c, inv = self._profile()
        if c is None:
            return grid
        if inv:
            c = process.t_for_alpha(c)
        if not (float(t_eps) < c < 1.0):
            raise ValueError(f"Ψ time_profile constant time {c} must lie in (t_eps, 1)")
        n = int(steps) + 1
        n_hi, n_mid = self._split(n)
        return torch.cat([torch.linspace(1.0, c, n_hi, dtype=_F64), torch.full((n_mid,), c, dtype=_F64),
                          torch.linspace(c, float(t_eps), n - n_hi - n_mid, dtype=_F64)])

    def kappas(self, grid: torch.Tensor, alpha: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """κ for every grid point (float64 ``[steps + 1]``); step i uses κ[i] (the last entry is unused)."""
        n = int(grid.numel())
        n_hi, n_mid = self._split(n)
        out = torch.cat([psi_mode_kappas(self.high_mode, grid[:n_hi], alpha),
                         psi_mode_kappas(self.middle_mode, grid[n_hi:n_hi + n_mid], alpha),
                         psi_mode_kappas(self.low_mode, grid[n_hi + n_mid:], alpha)])
        assert out.numel() == n and bool(((out >= 0) & (out <= 1)).all())
        return out

    @classmethod
    def from_config(cls, cfg) -> "PsiSchedule":
        """From a mapping with the keys above (missing keys keep their defaults); unknown keys are an error."""
        cfg = dict(cfg or {})
        fields = ("high_mode", "middle_mode", "low_mode", "high_frac", "middle_frac", "time_profile")
        bad = sorted(set(cfg) - set(fields))
        if bad:
            raise ValueError(f"unknown psi key(s) {bad}; valid keys: {list(fields)}")
        kw = {k: (float(v) if k.endswith("_frac") else str(v)) for k, v in cfg.items() if v is not None}
        return cls(**kw)


class PsiScheduler(AncestralScheduler):
    """The Ψ-sampler: step i draws from κ_i q(z_s | z_t, x_θ) + (1 − κ_i) q_{α_s}(q(x | z_t, x_θ)) on the grid of
    ``psi.time_profile`` (one denoiser call per step, as the ancestral sampler). Every posterior_impl is supported
    (``"mixture"`` without guidance only)."""

    predictor = "psi"

    def __init__(self, process: UniformProcess, psi: Optional[PsiSchedule] = None, **kwargs):
        super().__init__(process, **kwargs)
        self.psi = psi if psi is not None else PsiSchedule()
        self._kappas: Optional[torch.Tensor] = None

    def timesteps(self, steps: int, t_eps: float = 1e-5) -> torch.Tensor:
        grid = self.psi.time_grid(steps, t_eps, self.process)
        check_alpha_grid(self.process, grid, low_open=True, high_open=False)
        self._kappas = self.psi.kappas(grid, self.process.alpha)
        return grid

    def kappa(self, index: int) -> float:
        if self._kappas is None:
            raise RuntimeError("call PsiScheduler.timesteps(steps, t_eps) before step()")
        return float(self._kappas[int(index)])


def make_scheduler(predictor: str, process: UniformProcess, *, psi: Optional[PsiSchedule] = None,
                   **kwargs) -> AncestralScheduler:
    """``predictor`` ∈ {"ancestral", "psi"} → the scheduler (``psi`` only with ``"psi"``)."""
    if predictor == "ancestral":
        if psi is not None:
            raise ValueError("psi= settings need predictor='psi'")
        return AncestralScheduler(process, **kwargs)
    if predictor == "psi":
        if psi is not None and not isinstance(psi, PsiSchedule):
            psi = PsiSchedule.from_config(psi)
        return PsiScheduler(process, psi, **kwargs)
    raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
