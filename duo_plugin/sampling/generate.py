"""Generation from a loaded model, whatever process it was trained with: the library behind ``duo_generate`` and the
lm-eval backend's ``generate_until``.

* diffusion models (uniform state: Duo / UDLM / DCD; absorbing: MDLM): :func:`scheduler_for_model` picks the
  scheduler from the folder's metadata and the one loop (:func:`sample`, or :func:`sample_blocks` with
  ``options.n_blocks``) draws; prompts and infill templates are clamped positions for every process;
* causal models (``objective: ar``): left-to-right decoding with the KV cache
  (:func:`duo_plugin.sampling.ar_decode.sample_ar`); only ``temperature``, ``top_p`` and ``chunk_size`` apply.

Neither caller branches on the process.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from duo_plugin.diffusion.model_process import process_for_metadata

from .base import Clamp
from .options import SamplerOptions
from .samplers import DenoiserFn, SampleResult, sample, sample_blocks, trim_at_eos
from .select import scheduler_for_model

__all__ = ["generate", "generate_continuations", "model_kind"]

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def model_kind(model) -> str:
    """``uniform`` | ``absorbing`` | ``causal``: the process of a loaded model's folder (errors name the key)."""
    vv = getattr(model, "valid_vocab", None)
    return process_for_metadata(getattr(model, "duo_metadata", None), vocab_size=int(model.vocab_size),
                                valid_vocab=vv if isinstance(vv, torch.Tensor) else None,
                                causal=bool(getattr(model, "causal", False)), where=type(model).__name__).kind


def _causal(model, options: SamplerOptions, *, batch_size: int, seq_len: int, prompt, clamp, generator, seed,
            eos_id) -> SampleResult:
    from .ar_decode import sample_ar

    bad = [k for k, on in (("infill (clamp)", clamp is not None), ("blocks.n_blocks", options.n_blocks),
                           ("predictor=psi", options.predictor != "ancestral"),
                           ("guidance_weight", options.guidance_weight != 1.0)) if on]
    if bad:
        raise ValueError(f"this model was trained with objective: ar and is decoded left to right: {', '.join(bad)} "
                         "does not apply (remove it)")
    res = sample_ar(model, batch_size=batch_size, seq_len=seq_len, prompt=prompt, temperature=options.temperature,
                    top_p=options.top_p, valid_vocab=getattr(model, "valid_vocab", None), generator=generator,
                    seed=seed, chunk_size=options.chunk_size, progress=options.progress)
    out = SampleResult(tokens=res.tokens, nfe=res.nfe)
    if eos_id is not None:
        start = 0 if prompt is None else int(torch.as_tensor(prompt).shape[-1])
        out.lengths = trim_at_eos(res.tokens, eos_id, start=start)[1]
    return out


def generate(model, options: SamplerOptions, *, batch_size: int, seq_len: int, prompt: Optional[torch.Tensor] = None,
             clamp: Optional[Clamp] = None, generator: Generators = None, seed: Optional[int] = None,
             eos_id: Optional[int] = None, start_id: Optional[int] = None, denoiser=None, schedule=None) -> SampleResult:
    """Sample ``batch_size`` sequences of ``seq_len`` tokens (plus ``options.n_blocks × block_len`` with blocks)
    from ``model`` (module docstring). Returns a :class:`SampleResult` (``tokens``, ``nfe`` per sequence, and
    ``lengths`` with ``eos_id``).

    ``prompt``: ``Long[P]`` / ``Long[B, P]`` clamped prefix (an AR model needs one, e.g. ``[BOS]``);
    ``clamp``: infilling (diffusion models; :class:`~duo_plugin.sampling.base.Clamp` ``(mask, values)``). Exactly one of ``generator`` / ``seed``.
    ``start_id``: the first token of left-to-right decoding without a prompt (e.g. BOS; diffusion models ignore it).
    ``denoiser``: the callable to use (default ``DenoiserFn(model)``); ``schedule``: α_t (default log-linear).
    Sampling runs on the model's device.
    """
    if model_kind(model) == "causal":
        if prompt is None and clamp is None and start_id is not None:
            prompt = torch.tensor([int(start_id)], dtype=torch.long)
        return _causal(model, options, batch_size=batch_size, seq_len=seq_len, prompt=prompt, clamp=clamp,
                       generator=generator, seed=seed, eos_id=eos_id)
    scheduler = scheduler_for_model(model, options, schedule=schedule)
    den = denoiser if denoiser is not None else DenoiserFn(model)
    device = next(iter(model.parameters())).device
    kw = dict(batch_size=batch_size, seq_len=seq_len, options=options, prompt=prompt, generator=generator, seed=seed,
              device=device, eos_id=eos_id)
    if options.n_blocks:
        if clamp is not None:
            raise ValueError("blocks.n_blocks > 0 generates beyond the context from a prompt; it cannot be combined "
                             "with infill (set blocks.n_blocks=0)")
        return sample_blocks(den, scheduler, **kw)
    return sample(den, scheduler, clamp=clamp, return_trajectory=True, **kw)


def generate_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, options: SamplerOptions, *,
                           generators: Sequence[torch.Generator], eos_id: Optional[int], window: int,
                           denoiser=None, schedule=None, device=None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens, cut before the first ``eos_id``: the
    library of lm-eval's ``generate_until`` for every process.

    Rows with prompts of equal length are sampled together (``options.chunk_size`` rows per call); row i draws
    from ``generators[i]`` only, so its continuation does not depend on the other requests. A diffusion model
    generates ``P + max_new_tokens`` positions with the prompt clamped; beyond ``window`` (the model's context) it
    continues in stride windows of ``options.block_len`` new tokens (:func:`sample_blocks`, stopping once every row
    has an EOS). A causal model decodes left to right (``P + max_new_tokens <= window``). Sampling runs on the
    model's device (``device``, when given, must be it).
    """
    model_device, want = next(iter(model.parameters())).device, None if device is None else torch.device(device)
    if want is not None and (want.type != model_device.type or want.index not in (None, model_device.index)):
        raise ValueError(f"device={device} but the model is on {model_device}: move the model, or pass its device")
    if len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts (one per request)")
    g = int(max_new_tokens)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out: list[Optional[list[int]]] = [None] * len(prompts)
    for p_len, rows in groups.items():
        ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long)
        gens = [generators[i] for i in rows]
        total = p_len + g
        if total <= window:
            opts = options.replace(n_blocks=0)
            seq_len = total
        else:
            if not options.block_len or model_kind(model) == "causal":
                raise ValueError(f"prompt + max_gen_toks = {total} exceeds the model's window {window}: set block_len "
                                 "(stride generation, diffusion models) or lower max_gen_toks")
            opts = options.replace(n_blocks=-(-(total - window) // options.block_len))
            seq_len = window
        res = generate(model, opts, batch_size=len(rows), seq_len=seq_len, prompt=ids, generator=gens,
                       eos_id=eos_id, denoiser=denoiser, schedule=schedule)
        for r, i in enumerate(rows):
            new = res.tokens[r, p_len:total].tolist()
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            out[i] = new
    return out  # type: ignore[return-value]
