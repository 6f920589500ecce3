"""Triton detection and implementation choice, shared by the kernels package and its submodules (no imports from the
package itself, so submodules can use it without an import cycle)."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["IMPLS", "triton_available", "resolve_impl"]

IMPLS = ("auto", "reference", "chunked", "triton")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton path can run on ``device`` (CUDA, or any device under ``TRITON_INTERPRET=1``)."""
    if not _triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    dev = torch.device(device) if device is not None else None
    return dev is not None and dev.type == "cuda" and torch.cuda.is_available()


def resolve_impl(impl: str, device) -> str:
    """Map ``impl`` to a concrete implementation for tensors on ``device`` (``"auto"``: Triton on CUDA only)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    dev = torch.device(device)
    if impl == "auto":
        return "triton" if dev.type == "cuda" and triton_available(dev) else "chunked"
    if impl == "triton" and not triton_available(dev):
        raise RuntimeError(
            "impl='triton' needs triton (pip install 'duo-plugin[triton]') and a CUDA tensor, or TRITON_INTERPRET=1 "
            "for CPU; use impl='chunked' (the CPU default) or 'auto'"
        )
    return impl
