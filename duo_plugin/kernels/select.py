"""Choosing the training-loss paths (recipes' ``kernels:`` config section) and finding a model's parameters.

``kernels.curriculum_input``: ``dense`` (``losses.curriculum_inputs``: torch.Generator noise, dense ``[B, L, K]``
soft logits into the model), ``reference`` / ``chunked`` / ``triton`` (:func:`curriculum_soft_embedding` with the
counter-based noise stream and :func:`embedding_override`) or ``auto``.
``kernels.nelbo``: ``dense`` (``model(...)`` + ``duo_nelbo``), ``reference`` / ``chunked`` / ``triton``
(:func:`fused_duo_nelbo` on ``model.forward_hidden``) or ``auto``.

``auto`` (decided once per run from quantities that do not depend on world size or accumulation, so the noise
stream of a run is the same on every topology):

* CUDA with Triton importable → ``triton`` for both;
* otherwise (CPU, or CUDA without Triton) from what each path costs:

  - **memory**: when the dense path's estimated peak (:func:`dense_bytes`: ``DENSE_LIVE_TENSORS`` fp32 tensors of
    ``rows·L·K`` for the micro-batch) does not fit the memory budget → ``chunked``.  The budget is
    ``memory_budget_bytes`` when given, else free device memory on CUDA, else ``ram_fraction`` of the available RAM
    (:func:`memory_budget`);
  - **time**: when one row's ``L·K`` reaches ``auto_min_row_elements`` the fused paths are as fast as dense or
    faster (measured: docs/performance.md, benchmarks/bench_nelbo.py and bench_curriculum.py) → ``chunked``;
    below it the dense paths win on per-call overhead → ``dense``.

  The time rule depends only on ``L`` and ``K``; the memory rule also on the micro-batch and the machine (pin the
  paths explicitly when a resumed run must draw the same curriculum noise on another machine);
* never a fused path when it cannot apply: FSDP (DTensor parameters), ``curriculum.input: topk``, or an output
  projection that is not a plain linear layer (e.g. LoRA) — then ``dense``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["KERNEL_CHOICES", "AUTO_MIN_ROW_ELEMENTS", "DEFAULT_RAM_FRACTION", "DENSE_LIVE_TENSORS", "choose_paths",
           "dense_bytes", "memory_budget", "input_embedding", "projection_params"]

KERNEL_CHOICES = ("auto", "dense", "reference", "chunked", "triton")
# L·K from which `auto` uses the chunked paths for speed (e.g. K = 50k at L >= 84, K = 151,936 at L >= 28).
AUTO_MIN_ROW_ELEMENTS = 1 << 22
# fraction of the available RAM the dense [B, L, K] tensors may take on CPU (kernels.ram_fraction)
DEFAULT_RAM_FRACTION = 0.25
# fp32 [rows, L, K] tensors alive at the dense path's peak (measured: 4.7 for the NELBO alone, ~3 more for the
# dense curriculum input's noise, soft logits and softmax)
DENSE_LIVE_TENSORS = {"nelbo": 5, "curriculum_input": 3}


def dense_bytes(rows: int, seq_len: int, vocab_size: int, curriculum: bool = True) -> int:
    """Estimated peak bytes of the dense paths for a micro-batch of ``rows`` sequences."""
    n = DENSE_LIVE_TENSORS["nelbo"] + (DENSE_LIVE_TENSORS["curriculum_input"] if curriculum else 0)
    return int(n) * int(rows) * int(seq_len) * int(vocab_size) * 4


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device, ram_fraction: float = DEFAULT_RAM_FRACTION, memory_budget_bytes: int | None = None):
    """Bytes the dense paths may use: ``memory_budget_bytes`` if given; on CUDA the free device memory; else
    ``ram_fraction`` × available RAM (``None`` when unknown: no memory constraint)."""
    if memory_budget_bytes is not None:
        return int(memory_budget_bytes)
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    ram = _available_ram()
    return None if ram is None else int(float(ram_fraction) * ram)


def input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose ``.weight [K, d]`` embeds input ids (DiT ``vocab_embed``, torchtune ``tok_embeddings``)."""
    for path in ("vocab_embed", "decoder.tok_embeddings"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
            return m
    return None


def projection_params(model: torch.nn.Module):
    """``(weight [K, d], bias | None)`` of ``model.output_projection`` if it is a plain ``nn.Linear`` or a
    torchtune ``TiedLinear`` (weight of the tied embedding), else ``None`` (e.g. LoRA: the fused loss would drop
    the adapter)."""
    proj = getattr(model, "output_projection", None)
    if proj is None:
        return None
    if type(proj) is torch.nn.Linear:
        return proj.weight, proj.bias
    if type(proj).__name__ == "TiedLinear" and hasattr(proj, "tied_module"):
        return proj.tied_module.weight, None
    return None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def choose_paths(curriculum_input: str, nelbo: str, *, model: torch.nn.Module, device, seq_len: int,
                 vocab_size: int, soft_input: str = "dense",
                 auto_min_row_elements: int = AUTO_MIN_ROW_ELEMENTS, micro_batch_rows: int | None = None,
                 ram_fraction: float = DEFAULT_RAM_FRACTION, memory_budget_bytes: int | None = None,
                 explain: dict | None = None) -> dict[str, str]:
    """Concrete ``{"curriculum_input": ..., "nelbo": ...}`` (each ``dense|reference|chunked|triton``).

    Explicit fused choices that cannot apply raise ``ValueError`` naming the reason; ``auto`` falls back to
    ``dense`` instead.  ``micro_batch_rows`` (sequences per forward; default 1) sizes the dense estimate;
    ``explain`` (a dict) receives ``{"auto": ..., "reason": ...}`` for the run's log line.
    """
    from ._env import triton_available

    for name, v in (("curriculum_input", curriculum_input), ("nelbo", nelbo)):
        if v not in KERNEL_CHOICES:
            raise ValueError(f"kernels.{name} must be one of {KERNEL_CHOICES}, got {v!r}")
    dev = torch.device(device)
    emb = input_embedding(model)
    proj = projection_params(model)
    blockers = {
        "curriculum_input": ("curriculum.input is 'topk' (sparse soft input)" if soft_input != "dense" else
                             "the model has no input embedding with a .weight" if emb is None else
                             "parameters are sharded (FSDP DTensor)" if _is_dtensor(emb.weight) else None),
        "nelbo": ("model.output_projection is not a plain linear layer (e.g. LoRA)" if proj is None else
                  "parameters are sharded (FSDP DTensor)" if _is_dtensor(proj[0]) else None),
    }
    rows = max(1, int(micro_batch_rows or 1))
    if dev.type == "cuda" and triton_available(dev):
        auto, reason = "triton", "CUDA with Triton"
    else:
        need = dense_bytes(rows, seq_len, vocab_size, curriculum=soft_input == "dense")
        budget = memory_budget(dev, ram_fraction, memory_budget_bytes)
        row = int(seq_len) * int(vocab_size)
        if budget is not None and need > budget:
            auto, reason = "chunked", (f"dense estimate {need / 2**20:.0f} MiB > memory budget "
                                       f"{budget / 2**20:.0f} MiB")
        elif row >= int(auto_min_row_elements):
            auto, reason = "chunked", f"L*K = {row} >= {int(auto_min_row_elements)} (fused is faster there)"
        else:
            auto, reason = "dense", (f"L*K = {row} < {int(auto_min_row_elements)} and dense estimate "
                                     f"{need / 2**20:.0f} MiB fits the budget "
                                     + ("(unknown)" if budget is None else f"{budget / 2**20:.0f} MiB"))
    if explain is not None:
        explain.update(auto=auto, reason=reason)
    out = {}
    for name, v in (("curriculum_input", curriculum_input), ("nelbo", nelbo)):
        if v == "auto":
            v = "dense" if blockers[name] else auto
        elif v != "dense" and blockers[name]:
            raise ValueError(f"kernels.{name}={v!r} cannot be used: {blockers[name]}; use 'dense' or 'auto'")
        if v == "triton" and not triton_available(dev):
            raise ValueError("kernels: 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                             "use 'chunked' or 'auto'")
        out[name] = v
    return out
