"""The Duo training objective (docs/method.md §3, §7.1): Gaussian-relaxed curriculum, then the discrete NELBO.

* **Curriculum phase** (§3.1; paper Eq. 21): per sequence a stratified ``t`` over the global batch, ``γ_t = γ_min +
  t (γ_max − γ_min)``, one Gaussian latent ``w = α̃ x + σ̃ ε``; the network sees the soft input ``w/τ``, the loss is
  the discrete NELBO ``f_Duo`` (Eq. 17) at ``z_t = argmax w`` with ``α = T(γ_t)`` and ``α' = dT/dγ · (γ_max −
  γ_min)`` (the duality schedule, §2); ``σ = −log α`` conditions the network.
  The soft input has three interchangeable paths (``curriculum_input``/``kernels_curriculum_input``, §3.3):
  ``dense`` (``losses.curriculum_inputs``: ``[B, L, K]`` logits), ``topk`` (exact ``z_t`` law, sparse soft input,
  for large K) and the fused kernels (``kernels.curriculum_soft_embedding``, counter-based noise).
* **Discrete phase**: the uniform process with the log-linear ``α_t = 1 − (1 − ε) t``, hard ``z_t ~ q(z_t | x0)``.
* The NELBO is either dense (``model(...)`` + ``duo_nelbo``) or fused on the hidden states
  (``kernels.fused_duo_nelbo``), chosen once per run (``kernels.choose_paths``).
* **Attention annealing** (adapted decoders, §7.1): a causal → bidirectional mask over ``attn_anneal_steps``.
  (The AR shift of adapted decoders — logits at ``i`` read from ``h[i−1]`` — is a property of the denoiser,
  ``models.make_denoiser(shift=True)``, so the objective treats shifted and unshifted models alike.)

Noise keys: ``t`` from ``stratified_times(seed, step, position, N)``; torch-generator noise from
``row_generators(seed, step, position)``; the fused input's counter noise from ``kernels.row_seeds(seed, step,
position)``; the random annealing mask from ``(seed, step, streams.ATTN_ANNEAL)``.
"""

from __future__ import annotations

import contextlib

import torch

from duo_plugin.diffusion import streams
from duo_plugin.diffusion.losses import curriculum_inputs
from duo_plugin.diffusion.process import UniformProcess
from duo_plugin.diffusion.schedules import DualitySchedule, gaussian_coefficients
from duo_plugin.diffusion.uniform import row_generators, stable_seed

from .base import ObjectiveContext
from .diffusion import DenseNelbo, DiffusionObjective, NoisyBatch, pad_rule

__all__ = ["DuoObjective", "KERNEL_CHOICES", "CURRICULUM_INPUTS", "FusedNelbo", "DenseSoftInput", "TopKSoftInput",
           "FusedSoftInput"]

KERNEL_CHOICES = ("auto", "dense", "reference", "chunked", "triton")
CURRICULUM_INPUTS = ("dense", "topk")
ANNEAL_MODES = ("window", "random")


# ---------------------------------------------------------------------------------------------- strategies
class FusedNelbo:
    """The fused head: hidden states, then ``kernels.fused_duo_nelbo`` (``reference``/``chunked``/``triton``) without
    dense fp32 logits (docs/performance.md). Same value as :class:`~duo_plugin.objectives.diffusion.DenseNelbo`."""

    def __init__(self, valid_vocab: torch.Tensor, impl: str):
        self.valid_vocab, self.name = valid_vocab, impl

    def __call__(self, model, b: NoisyBatch, autocast) -> torch.Tensor:
        from duo_plugin import kernels

        with b.override, autocast():
            h = model.forward_hidden(b.model_in, b.sigma, **b.model_kwargs)
            w, bias = kernels.projection_params(model)
            return kernels.fused_duo_nelbo(h, w, bias, b.z_t, b.x0, b.alpha, b.alpha_prime, self.valid_vocab,
                                           impl=self.name)


class DenseSoftInput:
    """Curriculum input ``w/τ`` as dense ``[B, L, K]`` logits (``losses.curriculum_inputs``)."""

    name = "dense"

    def __init__(self, ctx: ObjectiveContext):
        self.ctx = ctx

    def __call__(self, model, x0, gamma, tau, step, positions, gens):
        """``(z_t = argmax w, network input, context around the forward)``."""
        z_t, logits = curriculum_inputs(x0, gamma, tau, self.ctx.vocab_size, gens, self.ctx.valid_vocab)
        return z_t, logits, contextlib.nullcontext()


class TopKSoftInput(DenseSoftInput):
    """Sparse top-k curriculum input (exact ``z_t`` law; ``training.adapt.topk_curriculum_inputs``)."""

    name = "topk"

    def __init__(self, ctx: ObjectiveContext, k: int):
        super().__init__(ctx)
        self.k = int(k)

    def __call__(self, model, x0, gamma, tau, step, positions, gens):
        from .adapt import topk_curriculum_inputs

        z_t, soft = topk_curriculum_inputs(x0, gamma, tau, self.k, self.ctx.vocab_size, gens, self.ctx.valid_vocab)
        return z_t, soft, contextlib.nullcontext()


class FusedSoftInput(DenseSoftInput):
    """Fused curriculum embedding (``kernels.curriculum_soft_embedding``, counter noise keyed by
    ``kernels.row_seeds(seed, step, position)``): the network is called with ``z_t`` ids and its input embedding's
    output is replaced by the soft embedding."""

    def __init__(self, ctx: ObjectiveContext, impl: str):
        super().__init__(ctx)
        self.name = impl

    def __call__(self, model, x0, gamma, tau, step, positions, gens):
        from duo_plugin import kernels

        ctx = self.ctx
        at, st = gaussian_coefficients(gamma)
        seeds = kernels.row_seeds(ctx.seed, step, positions, device=ctx.device)
        emb_module = kernels.input_embedding(model)
        emb, z_t = kernels.curriculum_soft_embedding(x0, at.float(), st.float(), tau, seeds, emb_module.weight,
                                                     ctx.valid_vocab, impl=self.name)
        return z_t, z_t, kernels.embedding_override(emb_module, emb)  # ids feed the (discarded) embedding lookup


class DuoObjective(DiffusionObjective):
    """Duo: curriculum for ``curriculum_steps`` steps, then the discrete uniform-state NELBO.

    Args (config keys of ``objective:``; the short form ``objective: duo`` reads the same values from the
    ``schedule:``, ``curriculum:``, ``kernels:`` and ``adapt:`` sections, see :func:`objective_from_config`):
        curriculum_steps: steps ``[0, curriculum_steps)`` use the curriculum (0: none, a Duo-base run).
        tau: curriculum temperature τ (paper 1e-3). With ``tau_end`` set, τ follows the reference code's
            log-linear anneal from ``tau`` to ``tau_end`` (``training.curriculum.CurriculumPhase``) and the phase
            switch is ``curriculum_start``/``curriculum_end`` instead (the fairseq2 trainer's convention, §3.2).
        gamma_min, gamma_max: the Gaussian γ window (both None: ``duality.gamma_window(K_eff)``).
        table: a ``duo-duality build`` file for T; else built (``table_points``), cached on disk if ``table_cache``
            (True: ``$DUO_CACHE_DIR``; a string: that directory). ``table_points=None`` and no ``table``: T is
            integrated exactly at every call (slow for large K; the fairseq2 trainer's default).
        curriculum_input: ``dense`` | ``topk`` (with ``topk`` ids kept).
        kernels_curriculum_input, kernels_nelbo, auto_min_row_elements, ram_fraction, memory_budget_mb: path
            choice (``kernels.choose_paths``: dense while its estimated memory fits the budget — free device
            memory, ``memory_budget_mb``, or ``ram_fraction`` of RAM — and below the measured crossover).
        alpha_eps: ε of the log-linear discrete schedule. t_min: times are stratified in ``[t_min, 1]``.
        attn_anneal_steps, attn_anneal_mode: causal → full attention annealing (decoder denoisers only).
    """

    name = "duo"
    causal = False

    def __init__(self, *, curriculum_steps: int = 0, tau: float = 1e-3, gamma_min: float | None = None,
                 gamma_max: float | None = None, table: str | None = None, table_points: int | None = 1025,
                 table_cache: bool | str = False, curriculum_input: str = "dense", topk: int = 64,
                 kernels_curriculum_input: str = "auto", kernels_nelbo: str = "auto",
                 auto_min_row_elements: int = 1 << 22, ram_fraction: float = 0.25,
                 memory_budget_mb: float | None = None, alpha_eps: float = 1e-3, t_min: float = 1e-3,
                 attn_anneal_steps: int = 0, attn_anneal_mode: str = "window",
                 curriculum_start: int | None = None, curriculum_end: int | None = None,
                 tau_end: float | None = None):
        super().__init__(alpha_eps=alpha_eps, t_min=t_min)
        self.curriculum_steps = int(curriculum_steps)
        self.tau = float(tau)
        if (gamma_min is None) != (gamma_max is None):
            raise ValueError("set both curriculum.gamma_min and curriculum.gamma_max, or neither (default: "
                             "duality.gamma_window(K))")
        self.gamma_min = None if gamma_min is None else float(gamma_min)
        self.gamma_max = None if gamma_max is None else float(gamma_max)
        self.table, self.table_cache = table, table_cache
        self.table_points = None if table_points is None else int(table_points)
        if curriculum_input not in CURRICULUM_INPUTS:
            raise ValueError(f"curriculum.input must be 'dense' or 'topk', got {curriculum_input!r}")
        if curriculum_input == "topk" and int(topk) < 1:
            raise ValueError(f"curriculum.topk must be >= 1, got {topk}")
        self.curriculum_input, self.topk = curriculum_input, int(topk)
        for key, v in (("curriculum_input", kernels_curriculum_input), ("nelbo", kernels_nelbo)):
            if v not in KERNEL_CHOICES:
                raise ValueError(f"kernels.{key} must be one of {KERNEL_CHOICES}, got {v!r}")
        self.kernel_choice = {"curriculum_input": str(kernels_curriculum_input), "nelbo": str(kernels_nelbo)}
        self.auto_min_row_elements = int(auto_min_row_elements)
        if not (0 < float(ram_fraction) <= 1):
            raise ValueError(f"kernels.ram_fraction must be in (0, 1], got {ram_fraction!r}")
        self.ram_fraction = float(ram_fraction)
        self.memory_budget_mb = None if memory_budget_mb is None else float(memory_budget_mb)
        if attn_anneal_mode not in ANNEAL_MODES:
            raise ValueError(f"adapt.attn_anneal_mode must be 'window' or 'random', got {attn_anneal_mode!r}")
        self.anneal_steps, self.anneal_mode = int(attn_anneal_steps or 0), str(attn_anneal_mode)
        self.curriculum_start, self.curriculum_end, self.tau_end = curriculum_start, curriculum_end, tau_end
        if self.has_curriculum and not (self.tau > 0):
            raise ValueError(f"curriculum.tau must be > 0 (paper: 1e-3), got {tau}")
        self.loglinear = self.schedule  # the discrete phase's log-linear schedule
        self.duality: DualitySchedule | None = None
        self.curriculum_process: UniformProcess | None = None  # the uniform process under the duality schedule
        self.soft_input: DenseSoftInput | None = None
        self.kernel_paths: dict[str, str] = {"curriculum_input": "dense", "nelbo": "dense"}

    # ------------------------------------------------------------------------------------------ setup
    @property
    def has_curriculum(self) -> bool:
        if self.curriculum_end is not None:
            return int(self.curriculum_end) >= 0
        return self.curriculum_steps > 0

    def build_process(self, model: torch.nn.Module, ctx: ObjectiveContext) -> UniformProcess:
        if self.anneal_steps > 0 and not hasattr(model, "decoder"):
            raise ValueError("adapt.attn_anneal_steps > 0 needs a torchtune-decoder denoiser (duo_plugin.models."
                             "duo_llama3_2 / duo_qwen2_5 ...); set adapt.attn_anneal_steps: 0 for the DiT")
        return UniformProcess(ctx.vocab_size, ctx.valid_vocab, self.schedule)

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        """The uniform process, the kernel paths (once: the head and the curriculum input are fixed here), the
        duality schedule (T table) for K_eff and the phase switch."""
        super().setup(model, ctx)
        self._choose_kernels(model, ctx)
        self._build_curriculum(ctx)

    def _choose_kernels(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        from duo_plugin.kernels.select import choose_paths

        why: dict = {}
        budget = None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)
        self.kernel_paths = choose_paths(self.kernel_choice["curriculum_input"], self.kernel_choice["nelbo"],
                                         model=model, device=ctx.device, seq_len=ctx.seq_len,
                                         vocab_size=ctx.vocab_size, soft_input=self.curriculum_input,
                                         auto_min_row_elements=self.auto_min_row_elements,
                                         micro_batch_rows=ctx.extra.get("micro_batch_rows"),
                                         ram_fraction=self.ram_fraction, memory_budget_bytes=budget, explain=why)
        if ctx.log:
            ctx.log(f"kernels: curriculum_input={self.kernel_paths['curriculum_input']}, "
                    f"nelbo={self.kernel_paths['nelbo']} (auto would be {why.get('auto')}: {why.get('reason')})")
        nelbo_path, input_path = self.kernel_paths["nelbo"], self.kernel_paths["curriculum_input"]
        self.head = DenseNelbo(self.process) if nelbo_path == "dense" else FusedNelbo(ctx.valid_vocab, nelbo_path)
        if self.curriculum_input == "topk":
            self.soft_input = TopKSoftInput(ctx, self.topk)
        elif input_path != "dense":
            self.soft_input = FusedSoftInput(ctx, input_path)
        else:
            self.soft_input = DenseSoftInput(ctx)

    def _build_curriculum(self, ctx: ObjectiveContext) -> None:
        from .curriculum import CurriculumPhase

        if not self.has_curriculum:
            self.phases = CurriculumPhase(0, -1)
            return
        from duo_plugin.diffusion import duality

        k_eff = ctx.k_eff
        if self.gamma_min is None:
            gmin, gmax = duality.gamma_window(k_eff)
        else:
            gmin, gmax = self.gamma_min, self.gamma_max
        if self.table:
            table = duality.DualityTable.load(str(self.table), vocab_size=k_eff)
        elif self.table_points is None:
            table = None
        elif self.table_cache:
            cache_dir = None if self.table_cache is True else str(self.table_cache)
            table = duality.DualityTable.cached(k_eff, gmin, gmax, num_points=self.table_points, cache_dir=cache_dir)
        else:
            table = duality.DualityTable.build(k_eff, gmin, gmax, num_points=self.table_points)
        self.duality = DualitySchedule(k_eff, gmin, gmax, table=table)
        self.curriculum_process = UniformProcess(ctx.vocab_size, ctx.valid_vocab, self.duality)
        if self.curriculum_end is not None:  # explicit reference-code phase switch (fairseq2 trainer)
            start = int(self.curriculum_start or 0)
            self.phases = CurriculumPhase(start, int(self.curriculum_end), self.tau,
                                          float(self.tau_end if self.tau_end is not None else self.tau), gmin, gmax)
        else:  # steps 0 .. curriculum_steps-1 (CurriculumPhase counts completed steps, inclusive)
            self.phases = CurriculumPhase(0, self.curriculum_steps - 1, self.tau, self.tau, gmin, gmax)
        if ctx.log:
            a = self.duality.alpha(torch.tensor([1.0, 0.0], dtype=torch.float64))
            ctx.log(f"curriculum: {self.describe_curriculum()}, tau={self.tau:g}, gamma in [{gmin:.4f}, {gmax:.4f}] "
                    f"-> alpha in [{float(a[0]):.3f}, {float(a[1]):.3f}]")

    def describe_curriculum(self) -> str:
        if self.curriculum_end is not None:
            return f"steps {int(self.curriculum_start or 0)}..{int(self.curriculum_end)}"
        return f"{self.curriculum_steps} steps"

    # ------------------------------------------------------------------------------------------ per step
    def phase(self, step: int) -> str:
        """``"curriculum"`` or ``"discrete"``."""
        return self.phases.phase(step)

    def tau_at(self, step: int) -> float:
        if self.tau_end is None:
            return self.tau  # constant τ (the recipes; paper scripts)
        return float(self.phases.tau(step))

    def anneal_mask(self, step: int, seq_len: int) -> torch.Tensor | None:
        """Bool ``[L, L]`` attention mask while annealing causal → full, else None (the flash path)."""
        if self.anneal_steps <= 0:
            return None
        from .adapt import anneal_progress, annealed_attention_mask

        prog = anneal_progress(step, self.anneal_steps)
        gen = (torch.Generator().manual_seed(stable_seed(self.ctx.seed, step, streams.ATTN_ANNEAL))
               if self.anneal_mode == "random" else None)
        m = annealed_attention_mask(seq_len, prog, mode=self.anneal_mode, generator=gen)
        return None if m is None else m.to(self.ctx.device)

    def extra_model_kwargs(self, step: int, seq_len: int) -> dict:
        am = self.anneal_mask(step, seq_len)
        return {} if am is None else {"attn_mask": am}

    def corruption(self, step: int):
        """The discrete phase: the base path (:meth:`noisy_batch`: uniform process, log-linear α); the curriculum
        phase: :meth:`curriculum_batch`."""
        return self.curriculum_batch if self.phase(step) == "curriculum" else self.noisy_batch

    def curriculum_batch(self, model, x0: torch.Tensor, mask: torch.Tensor, positions, step: int) -> NoisyBatch:
        """The curriculum phase: ONE Gaussian latent per token under the duality schedule, ``z_t = argmax w`` for
        the loss, the soft input ``w/τ`` (dense, top-k or fused, fixed at setup) for the network, α = T(γ_t),
        α' = dT/dt, σ = −log T(γ_t)."""
        ctx, proc = self.ctx, self.curriculum_process
        dev = ctx.device
        t = self.times(step, positions)
        gens = row_generators(ctx.seed, step, positions, device=dev)
        z_t, model_in, override = self.soft_input(model, x0, self.duality.gamma(t).to(dev), self.tau_at(step), step,
                                                  positions, gens)
        # pads: the soft input cannot be put back to x0 (masked from attention in clean_masked mode, never scored),
        # so the network side of the pad rule is its attention mask only
        pads = pad_rule(z_t, x0, mask, ctx.pad_mode, proc.valid_vocab)
        kw = {**pads.model_kwargs, **self.extra_model_kwargs(step, x0.shape[1])}
        return NoisyBatch(pads.x_loss, pads.z_loss, model_in, proc.alpha(t).to(dev), proc.alpha_prime(t).to(dev),
                          proc.sigma(t).to(dev).float(), kw, override)

    # ------------------------------------------------------------------------------------------ validation
    def validation_process(self):
        return None  # nelbo_perplexity's uniform-state default with the log-linear schedule (docs/method.md §8)
