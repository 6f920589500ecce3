"""The one sampling loop, for every noise process: :func:`sample` (any :class:`~duo_plugin.sampling.base.Scheduler`:
uniform-state ancestral / Greedy-Tail / Ψ, absorbing (MDLM) ancestral / Ψ; nucleus, temperature, prompts,
infilling, prompt guidance), :func:`sample_blocks` (semi-autoregressive stride generation beyond the context) and
:func:`trim_at_eos` (variable-length output). docs/sampling.md describes all of it.

The loop is short: draw z_1 from the prior (clamped positions held), then for each step of the scheduler's grid call
the denoiser once (twice with prompt guidance; not at all while x_θ can be reused) and let the scheduler draw z_s
(``scheduler.step``); after the steps, one optional noise-removal call at t = t_eps (``scheduler.final``):

* ``"ancestral"``: one more posterior step with α_s = 1;
* ``"greedy"`` (Greedy-Tail): z ← argmax_v x_θ(z, σ(t_eps))_v (the denoiser output, not the final posterior);
* ``"none"``: no call.

So NFE = steps + 1 (``steps`` for ``"none"``), doubled with prompt guidance (w ≠ 1).

The update rules live in :mod:`duo_plugin.sampling.schedulers` (uniform state) and :mod:`duo_plugin.sampling.mdlm`
(absorbing); the noise processes in :mod:`duo_plugin.diffusion`. For the uniform process the posterior draw
(``posterior_impl``) has three exact float64 implementations:

* ``"dense"``: the full ``float64 [B, L, K]`` law and a race of exponentials from the torch generators — the
  reference and the original random stream.
* ``"chunked"``: the same law and race, ``workspace // K`` positions at a time, with counter-based exponentials.
* ``"mixture"``: the ancestral / Ψ law as the mixture stay-at-z_t / draw-from-x_θ / draw-uniform (docs/method.md), one
  counter-based coin per position and a float64 inverse-CDF draw over x_θ only on the rows that picked x_θ.
  ``"auto"`` (the default) picks it (``"chunked"`` with prompt guidance, whose law is not such a mixture).

``chunked`` and ``mixture`` key their counter streams by a per-sequence 63-bit seed drawn from that sequence's
generator (after the prior sample), the step index and the position, so they are deterministic and independent of
``chunk_size`` exactly like ``dense``.

Denoiser call convention (docs/architecture.md): ``denoiser(z: LongTensor[B, L], sigma: FloatTensor[B]) ->
log x_θ: FloatTensor[B, L, K]`` with ``sigma = -log α_t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from duo_plugin._progress import progress_bar
from duo_plugin.models.denoiser import DenoiserFn  # noqa: F401  (re-exported: it lives in models/)
from duo_plugin.diffusion.schedules import sigma_from_alpha
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.sampling.schedulers import (
    POSTERIOR_IMPLS,
    AncestralScheduler,
    PsiSchedule,
    StepNoise,
    UniformProcess,
    apply_temperature,
    make_scheduler,
    nucleus_filter,
    time_grid,
)
import dataclasses

from duo_plugin.sampling.base import Clamp, Scheduler
from duo_plugin.sampling.options import NOISE_REMOVAL_MODES, SCHEDULER_FIELDS, SamplerOptions
from duo_plugin.sampling.select import scheduler_for_process

__all__ = [
    "NOISE_REMOVAL_MODES",
    "POSTERIOR_IMPLS",
    "SampleResult",
    "DenoiserFn",
    "sample",
    "sample_blocks",
    "trim_at_eos",
    "nucleus_filter",
    "apply_temperature",
    "time_grid",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """What :func:`sample` returns with ``return_trajectory=True``.

    Attributes:
        tokens: ``LongTensor[B, L]`` final samples.
        nfe: number of denoiser evaluations per sequence (steps + 1 with a noise-removal call; x2 with prompt
            guidance; summed over the windows of :func:`sample_blocks`).
        trajectory: ``LongTensor[S, B, L]``: z after the prior draw (index 0), after every step and after the
            noise-removal call (S = steps + 1 + [noise_removal != "none"]), or None.
        times: ``float64 [S]`` the time of each trajectory entry (1.0, grid..., t_eps, and 0.0 for the final call).
        lengths: ``Long[B]`` (only with ``eos_id``): the number of tokens of each sequence up to, not including,
            its first EOS at or after the prompt (the full length when there is none); see :func:`trim_at_eos`.
    """

    tokens: torch.Tensor
    nfe: int
    trajectory: Optional[torch.Tensor] = None
    times: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None


def _row_stream_seeds(gen, rows: int, device) -> torch.Tensor:
    """``Long[rows]`` counter-stream seeds for the kernels' posterior draws: one 63-bit draw per row from that row's
    generator (a shared generator gives ``rows`` draws in row order), so the stream follows the generator exactly as
    the dense path's draws do."""
    hi = (1 << 63) - 1
    if isinstance(gen, torch.Generator):
        out = torch.randint(0, hi, (rows,), generator=gen, device=gen.device)
    else:
        out = torch.cat([torch.randint(0, hi, (1,), generator=g, device=g.device).cpu() for g in gen])
    return out.to(device=device, dtype=torch.int64)


def _as_batch(t: Optional[torch.Tensor], batch_size: int, name: str, dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(batch_size, -1)
    if t.dim() != 2 or t.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape [L] or [B, L] with B = batch_size = {batch_size}; got {tuple(t.shape)}")
    return t.to(dtype)


def _build_clamp(
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    prompt: Optional[torch.Tensor],
    clamp,
):
    """Merge a prompt prefix and a :class:`Clamp` (mask, values) into one (mask Bool[B, L], values Long[B, L]) or
    None."""
    clamp_mask, clamp_values = (None, None) if clamp is None else clamp
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    values = torch.zeros(batch_size, seq_len, dtype=torch.long)
    used = False
    if (clamp_mask is None) != (clamp_values is None):
        raise ValueError("infilling needs both Clamp.mask (Bool[B, L]) and Clamp.values (Long[B, L])")
    if clamp_mask is not None:
        cm = _as_batch(clamp_mask, batch_size, "clamp_mask", torch.bool).cpu()
        cv = _as_batch(clamp_values, batch_size, "clamp_values", torch.long).cpu()
        if cm.shape[1] != seq_len or cv.shape[1] != seq_len:
            raise ValueError(f"clamp_mask/clamp_values must have length seq_len = {seq_len}; got {cm.shape[1]}, {cv.shape[1]}")
        mask |= cm
        values = torch.where(cm, cv, values)
        used = True
    if prompt is not None:
        pr = _as_batch(prompt, batch_size, "prompt", torch.long).cpu()
        p_len = pr.shape[1]
        if p_len > seq_len:
            raise ValueError(f"prompt has {p_len} tokens but seq_len is {seq_len}; raise seq_len or shorten the prompt")
        if clamp_mask is not None and bool((mask[:, :p_len] & (values[:, :p_len] != pr)).any()):
            raise ValueError("prompt and clamp_values disagree on a position clamped by both")
        mask[:, :p_len] = True
        values[:, :p_len] = pr
        used = used or p_len > 0
    if not used:
        return None, None
    held = values[mask]
    if held.numel() and (int(held.min()) < 0 or int(held.max()) >= vocab_size):
        raise ValueError(f"prompt/clamp ids must lie in [0, {vocab_size}); check the tokenizer matches the model")
    return mask, values

def _denoise(denoiser, scheduler, grid, z, m, v, noise: StepNoise, noise_removal: str, guided: bool,
             traj: Optional[list], bar) -> tuple[torch.Tensor, int]:
    """The loop for one chunk of rows: ``z`` (prior draw, clamped) → (final ids, denoiser calls per row).
    ``m``/``v``: clamp mask / values."""
    proc = scheduler.process
    b, seq_len = z.shape
    k = proc.vocab_size
    reuse = bool(getattr(scheduler, "reuse_x_theta", False)) and not guided
    cache: dict = {}
    calls = 0

    def predict(z, t):  # log x_θ(z_t) and, with guidance, the prediction with the clamped positions as prior noise
        nonlocal calls
        if reuse and cache.get("z") is not None and torch.equal(cache["z"], z):
            return cache["lx"], None
        a = torch.as_tensor(proc.alpha(t), dtype=torch.float64)
        sigma = sigma_from_alpha(a).to(torch.float32).expand(b).to(z.device)
        out = []
        for zz in (z, torch.where(m, proc.prior_sample(z.shape, noise.generator, z.device), z)) if guided else (z,):
            lp = denoiser(zz, sigma)
            calls += 1
            if lp.shape != (b, seq_len, k):
                raise ValueError(f"denoiser returned shape {tuple(lp.shape)}; expected [B, L, K] = {[b, seq_len, k]}")
            out.append(lp)
        if reuse:
            cache.update(z=z, lx=out[0])
        return out[0], (out[1] if guided else None)

    fill_id = scheduler.fill_id

    def clamp(z):
        return z if m is None else torch.where(m, v, z)

    def fill(z):  # clamped positions may hold ids outside the process's law (BOS, prompt): the law is not used there
        return z if m is None or fill_id is None else torch.where(m, torch.full_like(z, fill_id), z)

    steps = grid.numel() - 1
    for i in range(steps):
        lx, lxu = predict(z, grid[i])
        z = clamp(scheduler.step(lx, grid[i], grid[i + 1], fill(z), StepNoise(noise.generator, noise.seeds, i),
                                 log_x_theta_uncond=lxu))
        if traj is not None:
            traj.append(z)
        if bar is not None:
            bar.update(1)
    if noise_removal != "none":
        lx, lxu = predict(z, grid[-1])
        z = clamp(scheduler.final(lx, grid[-1], fill(z), StepNoise(noise.generator, noise.seeds, steps),
                                  noise_removal, log_x_theta_uncond=lxu))
        if traj is not None:
            traj.append(z)
        if bar is not None:
            bar.update(1)
    return z, calls


def _resolve(scheduler, options: Optional[SamplerOptions], kwargs: dict, device):
    """(options, scheduler) for :func:`sample`: ``kwargs`` holds option fields (they override ``options``) and, when
    no :class:`Scheduler` is given, ``vocab_size`` / ``valid_vocab`` of the uniform-state process to build."""
    vocab_size, valid_vocab = kwargs.pop("vocab_size", None), kwargs.pop("valid_vocab", None)
    names = {f.name for f in dataclasses.fields(SamplerOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"sample() got unexpected keyword argument(s) {unknown}; sampler options are "
                        f"{sorted(names)}")
    opts = options if options is not None else SamplerOptions()
    if kwargs:
        opts = opts.replace(**kwargs)
    if isinstance(scheduler, Scheduler):
        built = getattr(scheduler, "options", None)
        if built is not None and built.scheduler_options() != opts.scheduler_options():
            raise ValueError("the scheduler was built with other update-rule options than the ones passed to sample() "
                             f"({', '.join(SCHEDULER_FIELDS)}): build it from the same SamplerOptions")
        if vocab_size is not None and int(vocab_size) != int(scheduler.process.vocab_size):
            raise ValueError(f"vocab_size={vocab_size} but the scheduler's process has width "
                             f"{scheduler.process.vocab_size}")
        if valid_vocab is not None:
            raise ValueError("valid_vocab belongs to the scheduler's process: build the process with it")
        return opts, scheduler
    if vocab_size is None:
        raise TypeError("sample() needs vocab_size= (the denoiser's width) unless a Scheduler is given")
    if scheduler is None:
        from duo_plugin.diffusion.schedules import LogLinearSchedule

        scheduler = LogLinearSchedule()
    process = UniformProcess(int(vocab_size), None if valid_vocab is None else valid_vocab.to(device), scheduler)
    return opts, scheduler_for_process(process, opts)


def _generators(generator, seed, batch_size: int):
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} per-sequence generators for batch_size={batch_size}")
    return generator


def _run_chunks(denoiser, scheduler, opts: SamplerOptions, grid, shape, clamp, gens, device, guided: bool,
                keep_trajectory: bool):
    """Run the loop over chunks of ``opts.chunk_size`` rows: (outputs, trajectories, NFE = the most of any chunk)."""
    (batch_size, seq_len), (cmask, cvals), (generator, seed) = shape, clamp, gens
    chunk = batch_size if opts.chunk_size is None else opts.chunk_size
    n_chunks = (batch_size + chunk - 1) // chunk
    calls = opts.steps + (0 if opts.noise_removal == "none" else 1)
    bar = progress_bar(opts.progress, total=n_chunks * calls, unit="step", leave=False,
                       desc=f"duo sample ({scheduler.predictor}/{opts.noise_removal}, T={opts.steps})")
    outs, trajs, nfe = [], [], 0
    try:
        for c in range(n_chunks):
            lo, hi = c * chunk, min(batch_size, (c + 1) * chunk)
            if generator is None:
                gen = row_generators(int(seed), 0, range(lo, hi), device=device)
            elif isinstance(generator, torch.Generator):
                gen = generator
            else:
                gen = generator[lo:hi]
            m = cmask[lo:hi].to(device) if cmask is not None else None
            v = cvals[lo:hi].to(device) if cvals is not None else None
            z = scheduler.process.prior_sample((hi - lo, seq_len), gen, device)
            z = z if m is None else torch.where(m, v, z)
            seeds = _row_stream_seeds(gen, hi - lo, device) if scheduler.uses_counter_stream else None
            traj = [z] if keep_trajectory else None
            z, n = _denoise(denoiser, scheduler, grid, z, m, v, StepNoise(gen, seeds, 0), opts.noise_removal, guided,
                            traj, bar)
            outs.append(z)
            nfe = max(nfe, n)
            if traj is not None:
                trajs.append(torch.stack(traj, 0))
    finally:
        if bar is not None:
            bar.close()
    return outs, trajs, nfe


def sample(
    denoiser: Denoiser,
    scheduler=None,
    *,
    batch_size: int,
    seq_len: int,
    options: Optional[SamplerOptions] = None,
    prompt: Optional[torch.Tensor] = None,
    clamp: Optional[Clamp] = None,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    return_trajectory: bool = False,
    eos_id: Optional[int] = None,
    **option_kwargs,
) -> Union[torch.Tensor, SampleResult]:
    """Sample from any noise process with its scheduler: one loop for every process (docs/sampling.md).

    Args:
        denoiser: ``denoiser(z Long[B, L], sigma Float[B]) -> log x_θ Float[B, L, W]`` (e.g. :class:`DenoiserFn`),
            called with σ = −log α_t.
        scheduler: a :class:`~duo_plugin.sampling.base.Scheduler` (e.g. from :func:`scheduler_for_model`: uniform
            state, absorbing, Ψ variants), whose process sets the width W. Or, for the uniform-state process, a
            schedule object with ``.alpha(t)`` (or None: log-linear, ε = 1e-3) together with ``vocab_size=`` (K)
            and optionally ``valid_vocab=`` (``Bool[K]``): the scheduler is then built from the options.
        batch_size: number of sequences B (processed ``options.chunk_size`` at a time). seq_len: L.
        options: :class:`SamplerOptions`; ``option_kwargs`` (any of its fields: ``steps``, ``noise_removal``,
            ``top_p``, ``temperature``, ``t_eps``, ``predictor``, ``psi``, ``guidance_weight``, ``posterior_impl``,
            ``chunk_size``, ``progress``) override it. With a Scheduler the update-rule fields are the scheduler's.
        prompt: ``Long[P]`` or ``Long[B, P]`` prefix ids clamped at positions ``0..P-1``.
        clamp: a :class:`~duo_plugin.sampling.base.Clamp` ``(mask Bool[B, L], values Long[B, L])`` (or ``[L]``):
            positions held at the given ids at every step (infilling). Clamped ids need not be ids of the
            process's law (e.g. BOS).
        generator: a ``torch.Generator`` (shared by all rows) or one per sequence; alternatively ``seed``: then row
            b draws from ``row_generators(seed, 0, [b])`` so the result does not depend on the chunk size.
            Exactly one of them is required (sampling is never seeded from global RNG state).
        device: where z and the laws live. return_trajectory: return a :class:`SampleResult` with the trajectory.
        eos_id: when set, the result is a :class:`SampleResult` with ``lengths`` (see :func:`trim_at_eos`).

    Returns:
        ``LongTensor[B, L]``, or a :class:`SampleResult` when ``return_trajectory`` is True or ``eos_id`` is set.
        ``nfe`` counts denoiser calls per sequence (the most of any chunk when x_θ is reused).
    """
    batch_size, seq_len = int(batch_size), int(seq_len)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1; got {batch_size}, {seq_len}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    opts, scheduler = _resolve(scheduler, options, dict(option_kwargs), device)
    generator = _generators(generator, seed, batch_size)
    process = scheduler.process
    cmask, cvals = _build_clamp(batch_size, seq_len, int(process.vocab_size), prompt, clamp)
    if cmask is not None:
        scheduler.check_clamp(cmask, cvals)
    grid = scheduler.timesteps(opts.steps, opts.t_eps)
    guided = scheduler.guidance_weight != 1.0 and cmask is not None

    outs, trajs, nfe = _run_chunks(denoiser, scheduler, opts, grid, (batch_size, seq_len), (cmask, cvals),
                                   (generator, seed), device, guided, return_trajectory)
    tokens = torch.cat(outs, 0)
    if not return_trajectory and eos_id is None:
        return tokens
    res = SampleResult(tokens=tokens, nfe=nfe)
    if return_trajectory:
        res.trajectory = torch.cat(trajs, 1)
        res.times = torch.cat([grid, torch.zeros(1, dtype=torch.float64)]) if opts.noise_removal != "none" else grid
    if eos_id is not None:
        start = 0 if cmask is None else _prompt_end(cmask)
        res.lengths = trim_at_eos(tokens, eos_id, start=start)[1]
    return res


def _prompt_end(cmask: torch.Tensor) -> torch.Tensor:
    """``Long[B]``: length of the clamped prefix of each row (0 when position 0 is free)."""
    free = ~cmask
    first_free = torch.where(free.any(1), free.float().argmax(1), torch.full((cmask.shape[0],), cmask.shape[1]))
    return first_free.long()


def trim_at_eos(tokens: torch.Tensor, eos_id: int, start=0) -> tuple[list[list[int]], torch.Tensor]:
    """Variable-length output: cut each row before its first ``eos_id`` at or after ``start`` (an int or ``Long[B]``,
    e.g. the prompt length, so a prompt's own EOS does not count). Returns ``(rows as lists, lengths Long[B])``;
    a row without EOS keeps its full length."""
    tokens = torch.as_tensor(tokens)
    b, n = tokens.shape
    st = torch.as_tensor(start, dtype=torch.long).expand(b).to(tokens.device)
    pos = torch.arange(n, device=tokens.device)[None, :]
    hit = (tokens == int(eos_id)) & (pos >= st[:, None])
    lengths = torch.where(hit.any(1), hit.float().argmax(1).long(), torch.full((b,), n, device=tokens.device))
    rows = [tokens[i, : int(lengths[i])].tolist() for i in range(b)]
    return rows, lengths.cpu()


def sample_blocks(
    denoiser: Denoiser,
    scheduler=None,
    *,
    batch_size: int,
    seq_len: int,
    n_blocks: Optional[int] = None,
    block_len: Optional[int] = None,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    prompt: Optional[torch.Tensor] = None,
    eos_id: Optional[int] = None,
    return_trajectory: bool = False,
    **kwargs,
) -> SampleResult:
    """Semi-autoregressive (stride) generation beyond the context: ``seq_len + n_blocks × block_len`` tokens, for
    any scheduler (``n_blocks`` / ``block_len`` default to ``options.n_blocks`` / ``options.block_len``).

    Window 0 is :func:`sample` over ``seq_len`` positions (with the prompt). Window j ≥ 1 keeps the last
    ``seq_len − block_len`` tokens generated so far as clamped context (positions ``0..seq_len−block_len−1``, never
    resampled) and denoises the next ``block_len`` positions with any predictor / option of :func:`sample`
    (``kwargs``), then appends them. With ``seed`` window j's row b draws from ``row_generators(seed, j, [b])``
    (window 0 is exactly ``sample(seed=seed)``); with a ``generator`` the windows share it.

    With ``eos_id`` generation stops early once every row has an EOS after its prompt, and ``lengths`` reports each
    row's length up to its first EOS (:func:`trim_at_eos`). ``return_trajectory``: the per-window final tokens
    ``Long[windows, B, seq_len]`` in ``trajectory`` (each window's clamped context equals the previous output).

    Returns a :class:`SampleResult` (``tokens Long[B, seq_len + n·block_len]``, ``nfe`` summed over windows).
    """
    opts = kwargs.get("options")
    n_blocks = (opts.n_blocks if opts is not None else 0) if n_blocks is None else n_blocks
    block_len = (opts.block_len if opts is not None else 0) if block_len is None else block_len
    n_blocks, block_len, seq_len, batch_size = int(n_blocks), int(block_len), int(seq_len), int(batch_size)
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    if n_blocks and not (1 <= block_len < seq_len):
        raise ValueError(f"block_len must lie in [1, seq_len - 1] = [1, {seq_len - 1}] (it keeps seq_len - block_len "
                         f"tokens of context); got {block_len}")
    if kwargs.get("clamp") is not None and n_blocks:
        raise ValueError("sample_blocks takes a prompt, not a clamp (infilling is single-window)")
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
    kwargs = dict(kwargs, return_trajectory=False, eos_id=None)

    def gen_kw(j):
        if seed is None:
            return {"generator": generator}
        return {"seed": int(seed)} if j == 0 else {
            "generator": row_generators(int(seed), j, range(batch_size), device=kwargs.get("device"))}

    res = sample(denoiser, scheduler, batch_size=batch_size, seq_len=seq_len, prompt=prompt, **gen_kw(0),
                 **dict(kwargs, return_trajectory=True))
    out, nfe, windows = res.tokens, res.nfe, [res.tokens]
    p_len = 0 if prompt is None else int(torch.as_tensor(prompt).shape[-1])
    ctx_len = seq_len - block_len
    for j in range(1, n_blocks + 1):
        if eos_id is not None and bool(((out[:, p_len:] == int(eos_id)).any(1)).all()):
            break
        ctx = out[:, -ctx_len:]
        cm = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        cm[:, :ctx_len] = True
        cv = torch.zeros(batch_size, seq_len, dtype=torch.long)
        cv[:, :ctx_len] = ctx.cpu()
        r = sample(denoiser, scheduler, batch_size=batch_size, seq_len=seq_len, clamp=Clamp(cm, cv),
                   **gen_kw(j), **dict(kwargs, return_trajectory=True))
        out = torch.cat([out, r.tokens[:, ctx_len:]], 1)
        nfe += r.nfe
        windows.append(r.tokens)
    result = SampleResult(tokens=out, nfe=nfe)
    if return_trajectory:
        result.trajectory = torch.stack(windows, 0)
    if eos_id is not None:
        result.lengths = trim_at_eos(out, eos_id, start=p_len)[1]
    return result
