"""Greedy checks of diffusion models (``is_greedy``, lambada ``acc``; docs/evaluation.md §2 "Greedy check").

:func:`onepass_greedy`: one forward at t = 1 with the continuation replaced by the process's t = 1 draw (uniform
noise for Duo, every position ``[MASK]`` for MDLM; seeded per request) and the context clean; the network is told
the effective clean fraction α_eff = (n_ctx + α_1 n_cont)/n; the continuation is greedy when it is the argmax of
the process's parameterisation of x_θ at every position -- exact for a one-token continuation, the per-position
mode given the context alone otherwise. The checks of all requests are packed into forwards under a token budget;
each request's noise comes from its own generator, so the result does not depend on the batch.

:func:`official_onepass_greedy`: the official Duo harness' check (target noised except its final EOS, network told
the realised clean fraction).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from duo_plugin.diffusion import streams
from duo_plugin.diffusion.schedules import sigma_from_alpha
from duo_plugin.diffusion.uniform import row_generators
from duo_plugin.eval.likelihood import effective_alpha, pack_rows
from duo_plugin.eval.windows import request_index
from duo_plugin.models.denoiser import log_probs_at

__all__ = ["onepass_greedy", "official_onepass_greedy", "GREEDY_STEP", "OFFICIAL_GREEDY_STEP"]

#: noise stream (step) of the one-pass check's t = 1 draw, keyed by the request's ids (diffusion/streams.py)
GREEDY_STEP = streams.EVAL_GREEDY
OFFICIAL_GREEDY_STEP = streams.EVAL_GREEDY + 1


def _noised_batch(items, process, seed: int, device):
    """``(z, real, cont)`` ``[B, width]``: each item's ids with the continuation replaced by the process's t = 1
    draw from the item's own generator (right-padded)."""
    width = max(ids.numel() for ids, _ in items)
    z = torch.zeros(len(items), width, dtype=torch.long)
    real = torch.zeros(len(items), width, dtype=torch.bool)
    cont = torch.zeros_like(real)
    for j, (ids, nk) in enumerate(items):
        gen = row_generators(seed, GREEDY_STEP, [request_index(ids.tolist())], device=device)
        noise = process.prior_sample((1, ids.numel() - nk), gen, device=device)
        z[j, : ids.numel()] = ids
        z[j, nk : ids.numel()] = noise[0].cpu()
        real[j, : ids.numel()] = True
        cont[j, nk : ids.numel()] = True
    return z, real, cont


@torch.no_grad()
def onepass_greedy(denoiser, process, items: Sequence[tuple], *, seed: int, device, max_rows: Optional[int] = None,
                   max_batch_tokens: Optional[int] = None) -> List[bool]:
    """The one-pass greedy check of each ``(ids Long[n], n_keep)`` (``[BOS] + context + continuation``, the first
    ``n_keep`` positions clean). Returns one bool per item (an empty continuation is greedy)."""
    out = [True] * len(items)
    order = sorted(range(len(items)), key=lambda i: -items[i][0].numel())
    alpha1 = process.alpha(torch.ones(1, dtype=torch.float64)) if hasattr(process, "alpha") else None
    alpha1 = torch.as_tensor(alpha1, dtype=torch.float64)
    for batch in pack_rows([items[i][0].numel() for i in order], max_rows, max_batch_tokens):
        idx = [order[j] for j in batch]
        its = [items[i] for i in idx]
        z, real, cont = _noised_batch(its, process, seed, device)
        n_keep = torch.tensor([nk for _, nk in its])
        n_cont = torch.tensor([ids.numel() - nk for ids, nk in its])
        sigma = sigma_from_alpha(effective_alpha(alpha1, n_keep, n_cont)).to(torch.float32).to(device)
        rr, pp = cont.nonzero(as_tuple=True)
        if rr.numel() == 0:
            continue
        logp = log_probs_at(denoiser, z.to(device), sigma, None if bool(real.all()) else real.to(device),
                            rr.to(device), pp.to(device))
        logp = process.subs(logp[None], z[rr, pp].to(device)[None])[0]
        hit = (logp.argmax(-1).cpu() == torch.cat([ids[nk:] for ids, nk in its])).tolist()
        lo = 0
        for i, (ids, nk) in zip(idx, its):
            out[i] = all(hit[lo : lo + ids.numel() - nk])
            lo += ids.numel() - nk
    return out


@torch.no_grad()
def official_onepass_greedy(denoiser, process, prefix: Sequence[int], target: Sequence[int], *, seed: int,
                            device) -> bool:
    """The official one-pass check: target replaced by uniform noise except its final [EOS], the network
    conditioned on the realised clean fraction, argmax at every target position."""
    ids = torch.tensor(list(prefix) + list(target), dtype=torch.long, device=device)
    gen = row_generators(seed, OFFICIAL_GREEDY_STEP, [request_index(ids.tolist())], device=device)
    z = ids.clone()[None]
    z[0, len(prefix):] = process.prior_sample((1, len(target)), gen, device=device)[0]
    z[0, -1] = ids[-1]
    alpha = (z[0] == ids).to(torch.float64).mean()[None]
    logp = process.subs(denoiser(z, sigma_from_alpha(alpha).to(torch.float32)), z)
    return bool((logp[0, len(prefix):].argmax(-1) == ids[len(prefix):]).all())
