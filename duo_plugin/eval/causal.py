"""Exact scores of causal (AR-objective) models: next-token log-likelihood of scoring windows and the argmax check,
packed under a token budget (docs/evaluation.md §2 "AR checkpoints").

A causal model ``model(x, 0)[i]`` gives ``log p(x_{i+1} | x_{≤i})``; its output at position p depends only on
``x[: p + 1]``, so a window whose input ``ids[:-1]`` is a prefix of another window's ids is read off that window's
forward (every single-token continuation of one context shares the context's pass: the clean context is encoded
once).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from duo_plugin.eval.likelihood import pack_rows
from duo_plugin.eval.windows import Window

__all__ = ["ar_log_probs", "ar_windows_nll", "ar_argmax_windows"]


@torch.no_grad()
def ar_log_probs(model, x: torch.Tensor, valid_vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log p(x_{i+1} | x_{≤i})`` at position i, float64 ``[B, L, K]`` (ids outside ``valid_vocab`` at −inf)."""
    dev = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else x.device
    out = model(x.to(dev), torch.zeros(x.shape[0], device=dev)).to(torch.float64)
    if valid_vocab is not None:
        out = out.masked_fill(~valid_vocab.to(dev), float("-inf"))
    return torch.log_softmax(out, -1)


def _hosts(windows: Sequence[Window]):
    """``(hosts, served)``: the windows whose forward is run (longest first) and, per host, the windows it serves
    (those whose input ``ids[:-1]`` is a prefix of the host's ids)."""
    n = len(windows)
    order = sorted(range(n), key=lambda i: (windows[i].ids, -len(windows[i].ids)), reverse=True)
    hosts: List[int] = []
    host_of = [0] * n
    for i in order:  # a prefix sorts right after every sequence it is a prefix of
        need = windows[i].ids[:-1]
        if hosts and windows[hosts[-1]].ids[: len(need)] == need and len(windows[hosts[-1]].ids) >= len(need):
            host_of[i] = hosts[-1]
        else:
            hosts.append(i)
            host_of[i] = i
    served: Dict[int, List[int]] = defaultdict(list)
    for i in range(n):
        served[host_of[i]].append(i)
    hosts.sort(key=lambda i: -len(windows[i].ids))
    return hosts, served


def _padded(windows, idx, pad: int) -> torch.Tensor:
    width = max(len(windows[i].ids) for i in idx)
    x = torch.full((len(idx), width), int(pad), dtype=torch.long)
    for r, i in enumerate(idx):
        x[r, : len(windows[i].ids)] = torch.tensor(windows[i].ids, dtype=torch.long)
    return x


@torch.no_grad()
def ar_windows_nll(model, windows: Sequence[Window], *, vocab_size: int, pad_id: int,
                   valid_vocab: Optional[torch.Tensor] = None, max_rows: Optional[int] = None,
                   max_batch_tokens: Optional[int] = None) -> torch.Tensor:
    """Exact causal NLL of the scored tokens of each window (float64 ``[N]``; +inf for an id ≥ K), with shared
    prefixes read off one forward and windows of different lengths right-padded (``pad_id``) together."""
    n = len(windows)
    out = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return out
    k = int(vocab_size)
    hosts, served = _hosts(windows)
    for batch in pack_rows([len(windows[h].ids) for h in hosts], max_rows, max_batch_tokens):
        hs = [hosts[j] for j in batch]
        logp = ar_log_probs(model, _padded(windows, hs, pad_id).clamp(0, k - 1), valid_vocab).cpu()
        for r, h in enumerate(hs):
            for i in served[h]:
                ids, n_keep, _, n_tail = windows[i]
                end = len(ids) - n_tail
                tgt = torch.tensor(ids[n_keep:end], dtype=torch.long)
                if tgt.numel() == 0:
                    continue
                bad = (tgt < 0) | (tgt >= k)
                tok = logp[r, n_keep - 1 : end - 1].gather(-1, tgt.clamp(0, k - 1)[:, None]).squeeze(-1)
                out[i] = -torch.where(bad, torch.full_like(tok, float("-inf")), tok).sum()
    return out


@torch.no_grad()
def ar_argmax_windows(model, windows: Sequence[Window], *, vocab_size: int,
                      valid_vocab: Optional[torch.Tensor] = None, max_rows: Optional[int] = None,
                      max_batch_tokens: Optional[int] = None) -> List[bool]:
    """Is every scored token of each window the argmax of the causal next-token distribution? (exact)"""
    k = int(vocab_size)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    res = [False] * len(windows)
    for batch in pack_rows([len(windows[i].ids) for i in order], max_rows, max_batch_tokens):
        idx = [order[j] for j in batch]
        pred = ar_log_probs(model, _padded(windows, idx, 0).clamp(0, k - 1), valid_vocab).argmax(-1).cpu()
        for r, i in enumerate(idx):
            ids, n_keep = windows[i].ids, windows[i].n_keep
            res[i] = bool((pred[r, n_keep - 1 : len(ids) - 1] == torch.tensor(ids[n_keep:])).all())
    return res
