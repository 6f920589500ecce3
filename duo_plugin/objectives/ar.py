"""The autoregressive baseline objective (docs/method.md §7.2): next-token cross-entropy on a causal backbone."""

from __future__ import annotations

import torch

from .base import ObjectiveContext, masked_token_sum

__all__ = ["ARObjective", "ar_token_nll"]


def ar_token_nll(log_probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Next-token NLL ``[B, L-1]``: −log p(x_{l+1} | x_{≤l}) from causal ``log_probs[B, L, K]`` (fp32)."""
    return -log_probs[:, :-1].gather(-1, x0[:, 1:, None]).squeeze(-1).float()


class ARObjective:
    """Next-token NLL of the same backbone built with ``causal: true`` (the recipe sets it when the model config does
    not say). Scored pairs: both tokens real (``mask[:, 1:] & mask[:, :-1]``). σ is fed as zeros."""

    name = "ar"
    causal = True

    def __init__(self):
        self.ctx: ObjectiveContext | None = None

    def setup(self, model: torch.nn.Module, ctx: ObjectiveContext) -> None:
        if not getattr(model, "causal", False):
            raise ValueError("objective: ar needs a causal backbone; set model.causal: true")
        self.ctx = ctx

    def phase(self, step: int) -> str:
        return "ar"

    @staticmethod
    def pair_mask(mask: torch.Tensor) -> torch.Tensor:
        return mask[:, 1:] & mask[:, :-1]

    def count_tokens(self, mask: torch.Tensor) -> int:
        return int(self.pair_mask(mask).sum())

    def __call__(self, model, x0, mask, positions, step):
        b = x0.shape[0]
        kw = {"padding_mask": mask} if not bool(mask.all()) else {}
        with self.ctx.autocast():
            log_p = model(x0, torch.zeros(b, device=self.ctx.device), **kw)
        nll = ar_token_nll(log_p, x0)
        return masked_token_sum(nll, self.pair_mask(mask)), self.count_tokens(mask), {"phase": "ar"}

    def validation_nll(self, model, blocks, mask, *, batch_size: int, special_ids=(), nelbo_perplexity=None) -> dict:
        """``{"nll": mean next-token NLL per content target}``: every real target's NLL summed (float64), divided by
        the number of targets that are not in ``special_ids`` (BOS/EOS/pad; as the diffusion NELBO counts). The NLL
        is exact, so ``nelbo_perplexity`` (the diffusion objectives' evaluation function) is not used."""
        dev = self.ctx.device
        specials = [int(i) for i in special_ids if i is not None]
        tot, n = 0.0, 0
        for lo in range(0, blocks.shape[0], batch_size):
            x0, m = blocks[lo:lo + batch_size].to(dev), mask[lo:lo + batch_size].to(dev)
            kw = {"padding_mask": m} if not bool(m.all()) else {}
            log_p = model(x0, torch.zeros(x0.shape[0], device=dev), **kw)
            tm = self.pair_mask(m)
            tot += float(masked_token_sum(ar_token_nll(log_p, x0).double(), tm))
            content = tm
            for i in specials:
                content = content & (x0[:, 1:] != i)
            n += int(content.sum())
        return {"nll": tot / max(n, 1)}
