"""The pieces of a training step and run that every recipe shares (no torchtune; docs/architecture.md "Recipes").

* :func:`fetch_micro_batches`: the global batch of ``step`` (a pure function of (seed, step)) split into this rank's
  micro-batches with their positions in the global batch (which key every random draw).
* :func:`accumulate_gradients`: Σ micro-batch loss / #tokens of the GLOBAL batch, backward of ``loss × world``
  (FSDP2 averages gradients over ranks; the factor makes it the sum), summed loss all-reduced. Hence 1 process vs
  N processes vs any accumulation split give the same losses (up to float summation order).
* :func:`optimizer_step`: clip, step, zero, EMA update.
* :func:`resolve_resume`, :func:`publish_final`, :func:`model_blocks`, :func:`set_lr`, :func:`autocast_factory`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from duo_plugin.training.recipe_utils import full_tensor, is_dist

__all__ = ["model_blocks", "block_types", "set_lr", "autocast_factory", "fetch_micro_batches",
           "accumulate_gradients", "optimizer_step", "resolve_resume", "publish_final"]


def model_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (DiT ``blocks``, torchtune ``layers``, a denoiser's ``decoder.layers``)."""
    for name in ("blocks", "layers"):
        mods = getattr(model, name, None)
        if isinstance(mods, torch.nn.ModuleList):
            return list(mods)
    inner = getattr(model, "decoder", None)
    return model_blocks(inner) if inner is not None else []


def block_types(model: torch.nn.Module) -> set[type]:
    return {type(b) for b in model_blocks(model)}


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> float:
    for g, base in zip(optimizer.param_groups, base_lrs):
        g["lr"] = base * factor
    return base_lrs[0] * factor


def autocast_factory(enabled: bool) -> Callable[[], Any]:
    """Zero-argument factory of the forward's autocast context (bf16 on CUDA when ``enabled``)."""
    if enabled:
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def fetch_micro_batches(dataset, sampler, step: int, *, rank: int, world_size: int, accum: int, device,
                        count_tokens: Callable[[torch.Tensor], int]) -> tuple[list, int]:
    """``([(x0, mask, positions), ...], local token count)`` of this rank at ``step``."""
    from duo_plugin.data.text import shard

    batch_idx = sampler.indices(step)  # the global batch: N dataset indices, a function of (seed, step)
    micro, local_tokens = [], 0
    for m in range(accum):
        idx, pos = shard(batch_idx, rank, world_size, m, accum)
        b = dataset.batch(idx)
        x0, mask = b["tokens"].to(device), b["attention_mask"].to(device)
        micro.append((x0, mask, pos))
        local_tokens += count_tokens(mask)
    return micro, local_tokens


def accumulate_gradients(model: torch.nn.Module, objective, micro: list, local_tokens: int, step: int, *,
                         world_size: int, distributed: bool, device) -> tuple[float, int]:
    """Run ``objective`` on every micro-batch with backward; returns (global mean loss per token, global tokens)."""
    n_tok = torch.tensor([local_tokens], dtype=torch.float64)
    if is_dist():
        n_tok = n_tok.to(device)
        dist.all_reduce(n_tok)
    n_global = float(n_tok.item())
    if n_global <= 0:
        raise ValueError(f"step {step}: the global batch has no valid tokens; check data.packing / padding")
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x0, mask, pos) in enumerate(micro):
        if distributed and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(micro) - 1)
        s, _, _ = objective(model, x0, mask, pos, step)
        loss = s / n_global
        # FSDP2 averages gradients over ranks; × world size turns that into the sum (= 1-process gradient).
        (loss * world_size).backward()
        loss_sum += loss.detach().double()
    if is_dist():
        dist.all_reduce(loss_sum)
    return float(loss_sum.item()), int(n_global)


def optimizer_step(model: torch.nn.Module, optimizer, *, clip_grad_norm: float | None, ema=None) -> float | None:
    """Clip (if set), step, zero the gradients, update the EMA; returns the pre-clip grad norm or None."""
    grad_norm = None
    if clip_grad_norm is not None:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_grad_norm))
        grad_norm = float(full_tensor(gn))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return grad_norm


def check_finite(loss: float, step: int, last_checkpoint, what: str = "loss") -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite {what} {loss} at step {step}; stopping without saving. Last good checkpoint: "
            f"{last_checkpoint or 'none yet'}. Lower optimizer.lr, raise lr_scheduler.warmup_steps or set "
            "clip_grad_norm, then resume (resume=true)")


def resolve_resume(output_dir: Path, resume) -> Path | None:
    """``resume``: False/None → None; True/"auto" → the latest checkpoint under ``output_dir`` (None if none);
    a path → that checkpoint directory."""
    from duo_plugin.training.checkpointing import latest_checkpoint

    if resume is False or resume is None:
        return None
    if resume in (True, "auto"):
        return latest_checkpoint(output_dir)
    return Path(str(resume))


def publish_final(output_dir: Path, checkpoint: Path) -> Path:
    """Atomically copy ``checkpoint/model`` to ``output_dir/final`` (the run's published model dir).  Files a user
    put into an earlier ``final/`` (not in the run's manifest) are carried over; the published files are recorded in
    the manifest (:mod:`duo_plugin.training.run_dir`)."""
    import shutil

    from duo_plugin._io import atomic_dir
    from duo_plugin.training.run_dir import record_outputs, toolkit_outputs

    src, dst = Path(checkpoint) / "model", Path(output_dir) / "final"
    ours = set(toolkit_outputs(output_dir))
    published = sorted(f"final/{f.relative_to(src).as_posix()}" for f in src.rglob("*") if f.is_file())
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dst.is_dir():
            for f in dst.rglob("*"):
                rel = f.relative_to(dst)
                mine = any(f"final/{Path(*rel.parts[:i]).as_posix()}" in ours for i in range(1, len(rel.parts) + 1))
                if f.is_file() and not mine and not (tmp / rel).exists():
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, tmp / rel)  # the user's file, not the toolkit's: kept
    record_outputs(output_dir, published)
    return dst
