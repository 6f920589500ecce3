"""Scoring windows of text requests (docs/evaluation.md §2-3): which tokens a forward sees, which it scores.

A *window* is ``Window(ids, n_keep, index, n_tail)``: the model input ``ids`` (``[BOS] + …``), the first ``n_keep``
positions kept clean and not scored (BOS and context), the last ``n_tail`` positions kept clean and not scored (a
window-closing ``[EOS]``), and ``index``, the request's noise key (:func:`request_index`, a hash of its ids, so a
score does not depend on the batch, ``--limit`` or the request order). :class:`WindowSpec` builds them for a
log-likelihood request (context + continuation, left-truncated, rolled when the continuation alone does not fit)
and for a whole document (``loglikelihood_rolling``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, NamedTuple, Sequence, Tuple

__all__ = ["Window", "WindowSpec", "rolling_windows", "truncate_left", "request_index"]


class Window(NamedTuple):
    ids: List[int]
    n_keep: int
    index: int
    n_tail: int

    @property
    def n_scored(self) -> int:
        return len(self.ids) - self.n_keep - self.n_tail


def rolling_windows(
    n_tokens: int, max_len: int, prefix_len: int = 1, context: int = 0, first: int = 0
) -> List[Tuple[int, int, int]]:
    """Windows that score every token of ``seq[first:n_tokens]`` exactly once.

    Each window is ``(ctx_start, pred_start, pred_end)``: the model input is ``prefix (prefix_len tokens, e.g. BOS)
    + seq[ctx_start:pred_start] (kept clean, not scored) + seq[pred_start:pred_end] (scored)``, at most ``max_len``
    tokens. Every window takes up to ``context`` preceding tokens of ``seq`` as clean context (the first window
    has none when ``first == 0``). The ``pred`` ranges partition ``[first, n_tokens)`` in order.
    """
    if max_len - prefix_len < 1:
        raise ValueError(f"max_len={max_len} leaves no room after a prefix of {prefix_len} tokens")
    if not 0 <= first <= n_tokens:
        raise ValueError(f"first={first} must lie in [0, n_tokens={n_tokens}]")
    context = max(0, min(int(context), max_len - prefix_len - 1))
    out, start = [], int(first)
    while start < n_tokens:
        c = min(context, start)
        end = min(n_tokens, start + max_len - prefix_len - c)
        out.append((start - c, start, end))
        start = end
    return out


def truncate_left(ctx: Sequence[int], cont: Sequence[int], max_len: int, prefix_len: int = 1):
    """Fit ``prefix + ctx + cont`` into ``max_len`` by dropping context tokens from the left.

    Returns ``(ctx_kept, n_dropped)``. Raises if the continuation alone does not fit (callers then use
    :func:`rolling_windows` over the continuation instead).
    """
    room = max_len - prefix_len - len(cont)
    if room < 0:
        raise ValueError("continuation longer than the model window")
    drop = max(0, len(ctx) - room)
    return list(ctx[drop:]), drop


def request_index(ids: Sequence[int], extra: str = "") -> int:
    """Stable 40-bit index of a request (sha256 of its token ids), used to seed its noise."""
    h = hashlib.sha256((",".join(map(str, ids)) + "|" + extra).encode()).digest()
    return int.from_bytes(h[:5], "big")


@dataclass(frozen=True)
class WindowSpec:
    """How requests become windows for one model.

    Attributes:
        bos, eos: the tokenizer's ids. max_length: the window (≤ the model's ``max_seq_len``).
        rolling_context: clean preceding tokens of every later rolling window.
        window_eos: rolling windows of a diffusion model end with a clean, unscored ``[EOS]`` (where training put
            it). causal: an AR model (whole window usable, no closing EOS).
    """

    bos: int
    eos: int
    max_length: int
    rolling_context: int
    window_eos: bool = True
    causal: bool = False

    @property
    def room(self) -> int:
        """Tokens a log-likelihood window may hold (BOS included): ``max_length − 1`` for a diffusion model, which
        always saw ``[EOS]`` at the last position in training; ``max_length`` for an AR model."""
        return self.max_length if self.causal else self.max_length - 1

    def for_request(self, ctx: Sequence[int], cont: Sequence[int]) -> List[Window]:
        """Windows scoring every token of ``cont`` once given ``[BOS] + ctx`` (left-truncated when too long)."""
        if len(cont) + 1 <= self.room:
            kept, _ = truncate_left(list(ctx), list(cont), self.room, prefix_len=1)
            ids = [self.bos] + kept + list(cont)
            return [Window(ids, 1 + len(kept), request_index(ids), 0)]
        # the continuation alone exceeds the window: roll over it, each window conditioned on its preceding tokens
        return self.rolling(list(ctx) + list(cont), first=len(ctx), tag="")

    def rolling(self, full: Sequence[int], first: int = 0, tag: str = "rolling") -> List[Window]:
        """Rolling windows over ``full[first:]``: ``[BOS] + clean context + scored tokens (+ clean [EOS])``."""
        eos = [] if (self.causal or not self.window_eos) else [self.eos]
        room = self.max_length - len(eos) if (self.causal or self.window_eos) else self.max_length - 1
        out = []
        for cs, ps, pe in rolling_windows(len(full), room, 1, self.rolling_context, first=first):
            ids = [self.bos] + list(full[cs:pe]) + eos
            out.append(Window(ids, 1 + (ps - cs), request_index(ids, tag), len(eos)))
        return out
