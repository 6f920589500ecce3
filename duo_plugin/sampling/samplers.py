"""Ancestral sampling for uniform-state diffusion LMs (Duo paper §5 / duo-method.md §5 and §1.2).

The sampler starts from the uniform prior z_1 ~ U(valid ids)^L, walks a uniform time grid
``linspace(1, t_eps, steps + 1)`` and at every step draws z_s ~ q(z_s | z_t, x_θ(z_t, σ_t)) from the exact USDM
posterior (paper Eq. 4) in float64 with a race of exponentials. After the steps, one optional *noise-removal* call
at t = t_eps:

* ``"ancestral"``: one more posterior step with α_s = 1;
* ``"greedy"`` (Greedy-Tail): z ← argmax_v x_θ(z, σ(t_eps))_v (the denoiser output, not the final posterior);
* ``"none"``: no call.

So the number of function evaluations is NFE = steps + 1 (``steps`` for ``"none"``).

The posterior draw (``posterior_impl``) has three exact implementations, all float64:

* ``"dense"``: the full ``float64 [B, L, K]`` posterior (:func:`~duo_plugin.diffusion.uniform.posterior`) and a race
  of exponentials from the torch generators (:func:`~duo_plugin.diffusion.uniform.sample_categorical`) — the reference
  and the original random stream.
* ``"chunked"``: the same posterior and race, ``workspace // K`` positions at a time, with counter-based exponentials
  (:func:`duo_plugin.kernels.posterior_sample_step`, ``method="race"``, ``impl="chunked"``).
* ``"mixture"``: the posterior as the mixture stay-at-z_t / draw-from-x_θ / draw-uniform (duo-method.md §1.2), one
  counter-based coin per position and a float64 inverse-CDF draw over x_θ only on the rows that picked x_θ
  (``method="mixture"``). ``"auto"`` (the default) picks it: it supports every option of :func:`sample`.

``chunked`` and ``mixture`` key their counter streams by a per-sequence 63-bit seed drawn from that sequence's
generator (after the prior sample), the step index and the position, so they are deterministic and independent of
``chunk_size`` exactly like ``dense``. With temperature ≠ 1 or top-p < 1 the filtered x_θ is computed row by row in
float64 inside the kernels (``probs_fn``), never for the whole batch at once.

Options: nucleus filtering (top-p on x_θ before the posterior), temperature (on log x_θ), prompt prefixes and
infilling (clamped positions are held at their values in z at every step, including the initial prior sample, and
never resampled), chunked batch sampling with a progress bar, and determinism from an explicit seed or generator.

Denoiser call convention (docs/architecture.md): ``denoiser(z: LongTensor[B, L], sigma: FloatTensor[B]) ->
log x_θ: FloatTensor[B, L, K]`` with ``sigma = -log α_t``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from duo_plugin._progress import progress_bar
from duo_plugin.diffusion.uniform import num_valid, posterior, prior_sample, row_generators, sample_categorical
from duo_plugin.kernels import posterior_sample_step

__all__ = [
    "NOISE_REMOVAL_MODES",
    "POSTERIOR_IMPLS",
    "SampleResult",
    "DenoiserFn",
    "sample",
    "nucleus_filter",
    "apply_temperature",
    "time_grid",
]

NOISE_REMOVAL_MODES = ("ancestral", "greedy", "none")
POSTERIOR_IMPLS = ("auto", "dense", "chunked", "mixture")
_WORKSPACE = 1 << 20  # float64 elements per chunk of rows for the non-dense paths (8 MiB)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    """What :func:`sample` returns with ``return_trajectory=True``.

    Attributes:
        tokens: ``LongTensor[B, L]`` final samples.
        nfe: number of denoiser evaluations per sequence (steps + 1 with a noise-removal call).
        trajectory: ``LongTensor[S, B, L]``: z after the prior draw (index 0), after every step and after the
            noise-removal call (S = steps + 1 + [noise_removal != "none"]), or None.
        times: ``float64 [S]`` the time of each trajectory entry (1.0, grid..., t_eps, and 0.0 for the final call).
    """

    tokens: torch.Tensor
    nfe: int
    trajectory: Optional[torch.Tensor] = None
    times: Optional[torch.Tensor] = None


class DenoiserFn:
    """Wrap a model as a sampler/eval denoiser: eval mode during each call (the model's previous train/eval mode is
    restored afterwards), ``torch.no_grad``, optional bf16 autocast (CUDA only).

    ``DenoiserFn(model)(z, sigma)`` returns fp32 log-probabilities ``[B, L, K]`` (re-normalised with log_softmax, so
    a model returning logits also works). ``nfe`` counts calls (one per batched forward).

    Args:
        model: a module following the denoiser convention ``model(x, sigma) -> log x_θ``.
        dtype: ``None``/``"fp32"`` (no autocast) or ``"bf16"``/``torch.bfloat16`` (autocast, only if the input is on
            CUDA; ignored on CPU so CPU runs stay fp32).
    """

    def __init__(self, model: torch.nn.Module, dtype: Union[str, torch.dtype, None] = None):
        self.model = model
        if isinstance(dtype, str):
            dtype = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(dtype, "?")
            if dtype == "?":
                raise ValueError("DenoiserFn dtype must be one of None, 'fp32', 'bf16'")
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"DenoiserFn supports fp32 or bf16 autocast, got {dtype}")
        self.autocast_dtype = dtype if dtype == torch.bfloat16 else None
        self.nfe = 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        # The forward runs in eval mode (no dropout), then every submodule gets its previous mode back: sampling or
        # evaluating mid-training must not leave the live model in eval mode.
        saved = [(m, m.training) for m in self.model.modules()] if self.model.training else None
        if saved is not None:
            self.model.eval()
        try:
            self.nfe += 1
            ctx = contextlib.nullcontext()
            if self.autocast_dtype is not None and z.device.type == "cuda":
                ctx = torch.autocast("cuda", dtype=self.autocast_dtype)
            with ctx:
                out = self.model(z, sigma, **kwargs)
            return torch.log_softmax(out.float(), dim=-1)
        finally:
            if saved is not None:
                for m, mode in saved:
                    m.training = mode


def time_grid(steps: int, t_eps: float = 1e-5) -> torch.Tensor:
    """``float64 [steps + 1]`` uniform grid ``linspace(1, t_eps, steps + 1)`` (duo-method.md §5)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (0.0 < float(t_eps) < 1.0):
        raise ValueError(f"t_eps must lie in (0, 1), got {t_eps}")
    return torch.linspace(1.0, float(t_eps), int(steps) + 1, dtype=torch.float64)


def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature on log x_θ: ``log_softmax(log x_θ / T)`` (float64 ``[..., K]``). T = 1 is the identity."""
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lp = log_probs.to(torch.float64)
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
    probs = probs.to(torch.float64)
    if p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < p * sorted_p.sum(-1, keepdim=True)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    out = torch.where(keep, probs, torch.zeros((), dtype=torch.float64, device=probs.device))
    return out / out.sum(-1, keepdim=True)


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
    clamp_mask: Optional[torch.Tensor],
    clamp_values: Optional[torch.Tensor],
):
    """Merge a prompt prefix and (clamp_mask, clamp_values) into one (mask Bool[B, L], values Long[B, L]) or None."""
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    values = torch.zeros(batch_size, seq_len, dtype=torch.long)
    used = False
    if (clamp_mask is None) != (clamp_values is None):
        raise ValueError("infilling needs both clamp_mask (Bool[B, L]) and clamp_values (Long[B, L]), or neither")
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


def sample(
    denoiser: Denoiser,
    schedule=None,
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    steps: int,
    noise_removal: str = "ancestral",
    top_p: float = 1.0,
    temperature: float = 1.0,
    prompt: Optional[torch.Tensor] = None,
    clamp_mask: Optional[torch.Tensor] = None,
    clamp_values: Optional[torch.Tensor] = None,
    valid_vocab: Optional[torch.Tensor] = None,
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seed: Optional[int] = None,
    t_eps: float = 1e-5,
    device: Union[str, torch.device, None] = None,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    return_trajectory: bool = False,
    posterior_impl: str = "auto",
) -> Union[torch.Tensor, SampleResult]:
    """Ancestral sampling with the exact float64 USDM posterior (paper Eq. 4, Alg. "ancestral"; duo-method.md §5).

    Args:
        denoiser: ``denoiser(z Long[B, L], sigma Float[B]) -> log x_θ Float[B, L, K]`` (e.g. :class:`DenoiserFn`).
        schedule: object with ``.alpha(t)`` (float64 tensors in, α_t out); default ``LogLinearSchedule()``
            (α_t = 1 − (1 − 1e-3) t).
        batch_size: number of sequences B to generate (processed ``chunk_size`` at a time).
        seq_len: L. vocab_size: K (the denoiser's output width).
        steps: number of posterior steps T on the grid ``linspace(1, t_eps, T + 1)``.
        noise_removal: ``"ancestral"`` | ``"greedy"`` | ``"none"`` (the call at t_eps after the steps).
        top_p: nucleus mass on x_θ before the posterior (1.0 = off). temperature: divides log x_θ (1.0 = off).
        prompt: ``Long[P]`` or ``Long[B, P]`` prefix ids clamped at positions ``0..P-1``.
        clamp_mask, clamp_values: ``Bool[B, L]`` / ``Long[B, L]`` (or ``[L]``): positions held at the given ids
            at every step (infilling). Clamped ids need not be in ``valid_vocab`` (e.g. BOS).
        valid_vocab: ``Bool[K]`` ids the uniform process covers; x_θ mass on other ids is dropped.
        generator: a ``torch.Generator`` (shared by all rows) or one per sequence; alternatively ``seed``: then row
            b draws from ``row_generators(seed, 0, [b])`` so the result does not depend on ``chunk_size``.
            Exactly one of them is required (sampling is never seeded from global RNG state).
        t_eps: final time of the grid (1e-5 in the paper). device: where z and the posterior live.
        chunk_size: max sequences per denoiser call (default: all). progress: tqdm bar (only on a TTY).
        return_trajectory: return a :class:`SampleResult` with the trajectory and the NFE count.
        posterior_impl: ``"auto"`` (= ``"mixture"``, the fastest; every option is supported) | ``"dense"`` (full
            float64 posterior + torch-generator race: the reference and the pre-kernel random stream) |
            ``"chunked"`` (kernels' chunked float64 posterior + counter race) | ``"mixture"`` (kernels' exact
            mixture draw). All are exactly posterior-distributed; the random streams differ between them.

    Returns:
        ``LongTensor[B, L]``, or a :class:`SampleResult` when ``return_trajectory`` is True.
    """
    if noise_removal not in NOISE_REMOVAL_MODES:
        raise ValueError(f"noise_removal must be one of {NOISE_REMOVAL_MODES}, got {noise_removal!r}")
    if posterior_impl not in POSTERIOR_IMPLS:
        raise ValueError(f"posterior_impl must be one of {POSTERIOR_IMPLS}, got {posterior_impl!r}")
    impl = "mixture" if posterior_impl == "auto" else posterior_impl
    batch_size, seq_len, vocab_size, steps = int(batch_size), int(seq_len), int(vocab_size), int(steps)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1; got {batch_size}, {seq_len}")
    grid = time_grid(steps, t_eps)
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_valid(vocab_size, valid_vocab)  # validates valid_vocab against K
    if schedule is None:
        from duo_plugin.diffusion.schedules import LogLinearSchedule

        schedule = LogLinearSchedule()
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= (torch.Generator or one per sequence) or seed= (int)")
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} per-sequence generators for batch_size={batch_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    chunk = batch_size if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    cmask, cvals = _build_clamp(batch_size, seq_len, vocab_size, prompt, clamp_mask, clamp_values)
    if valid_vocab is not None:
        valid_vocab = valid_vocab.to(device)
        fill_id = int(torch.nonzero(valid_vocab)[0])
    else:
        fill_id = 0

    # alpha on the grid (float64) and sigma = -log alpha for the denoiser.
    alphas = torch.as_tensor(schedule.alpha(grid), dtype=torch.float64).reshape(-1)
    if alphas.numel() != grid.numel():
        raise ValueError("schedule.alpha(t) must return one value per time")
    if bool(((alphas <= 0) | (alphas > 1)).any()):
        raise ValueError("schedule.alpha(t) must lie in (0, 1] on the sampling grid")

    n_chunks = (batch_size + chunk - 1) // chunk
    nfe = steps + (0 if noise_removal == "none" else 1)
    bar = progress_bar(
        progress, total=n_chunks * nfe, desc=f"duo sample ({noise_removal}, T={steps})", unit="nfe", leave=False
    )

    outs, trajs = [], []
    try:
        for c in range(n_chunks):
            lo, hi = c * chunk, min(batch_size, (c + 1) * chunk)
            b = hi - lo
            if generator is None:
                gen = row_generators(int(seed), 0, range(lo, hi), device=device)
            elif isinstance(generator, torch.Generator):
                gen = generator
            else:
                gen = generator[lo:hi]
            m = cmask[lo:hi].to(device) if cmask is not None else None
            v = cvals[lo:hi].to(device) if cvals is not None else None

            def clamp(z):
                return z if m is None else torch.where(m, v, z)

            def filt(lp):  # log x_θ rows [..., K] -> float64 filtered probabilities (temperature, valid, top-p)
                probs = apply_temperature(lp, temperature).exp()
                if valid_vocab is not None:
                    probs = torch.where(valid_vocab, probs, torch.zeros((), dtype=torch.float64, device=probs.device))
                    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
                return nucleus_filter(probs, top_p)

            def log_x_theta(z, alpha):
                sigma = (-torch.log(alpha)).to(torch.float32).expand(b).to(device)
                logp = denoiser(z, sigma)
                if logp.shape != (b, seq_len, vocab_size):
                    raise ValueError(
                        f"denoiser returned shape {tuple(logp.shape)}; expected [B, L, K] = {[b, seq_len, vocab_size]}"
                    )
                return logp

            def x_theta(z, alpha):
                return filt(log_x_theta(z, alpha))

            def greedy(z, alpha):
                if impl == "dense":
                    return x_theta(z, alpha).argmax(-1)
                lx = log_x_theta(z, alpha).reshape(b * seq_len, vocab_size)
                rows = max(1, _WORKSPACE // vocab_size)
                top = [filt(lx[i:i + rows]).argmax(-1) for i in range(0, b * seq_len, rows)]
                return torch.cat(top).view(b, seq_len)

            plain = float(temperature) == 1.0 and float(top_p) >= 1.0
            probs_fn = None if plain else filt

            def post_step(z, alpha_t, alpha_s, step_idx):
                # Clamped positions may hold ids outside valid_vocab (BOS, prompt); the posterior is not used there.
                z_in = z if m is None else torch.where(m, torch.full_like(z, fill_id), z)
                if impl == "dense":
                    probs = posterior(z_in, x_theta(z, alpha_t), alpha_t, alpha_s, valid_vocab=valid_vocab)
                    return clamp(sample_categorical(probs, gen))
                lx = log_x_theta(z, alpha_t)
                out = posterior_sample_step(
                    lx, z_in, alpha_t.item(), alpha_s.item(), seeds, step_idx, valid_vocab,
                    impl="chunked", method="race" if impl == "chunked" else "mixture", probs_fn=probs_fn,
                )
                return clamp(out)

            z = clamp(prior_sample((b, seq_len), vocab_size, gen, valid_vocab=valid_vocab, device=device))
            seeds = None if impl == "dense" else _row_stream_seeds(gen, b, device)
            traj = [z] if return_trajectory else None
            for i in range(steps):
                z = post_step(z, alphas[i], alphas[i + 1], i)
                if traj is not None:
                    traj.append(z)
                if bar is not None:
                    bar.update(1)
            a_final = alphas[-1]
            if noise_removal == "ancestral":
                z = post_step(z, a_final, torch.ones((), dtype=torch.float64), steps)
            elif noise_removal == "greedy":
                z = clamp(greedy(z, a_final))
            if noise_removal != "none":
                if traj is not None:
                    traj.append(z)
                if bar is not None:
                    bar.update(1)
            outs.append(z)
            if traj is not None:
                trajs.append(torch.stack(traj, 0))
    finally:
        if bar is not None:
            bar.close()
    tokens = torch.cat(outs, 0)
    if not return_trajectory:
        return tokens
    times = torch.cat([grid, torch.zeros(1, dtype=torch.float64)]) if noise_removal != "none" else grid
    return SampleResult(tokens=tokens, nfe=nfe, trajectory=torch.cat(trajs, 1), times=times)
