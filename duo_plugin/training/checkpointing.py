"""Atomic step checkpoints, training state and RNG capture for exact resume.

Layout::

    out_dir/checkpoints/step_00000500/   (whatever the writer put there)
    out_dir/checkpoints/latest           (text file: "step_00000500")
    out_dir/checkpoints/.tmp-step_...    (only while writing or pruning, or after a crash; ignored, and removed by
                                          clean_tmp, which the run calls holding the output_dir lock)

A step directory appears only after the writer returned and its files were fsynced (rename is atomic on POSIX),
and ``latest`` is replaced atomically afterwards, so a crash at any point leaves the previous checkpoint intact.
Pruning renames a step directory to a ``.tmp-`` name before deleting it, so a crash mid-delete never leaves a
half-deleted directory under a valid ``step_*`` name.  A ``latest`` pointer holding anything but the name of an
existing step directory (binary garbage included) is ignored with a WARNING: the highest step directory is used.
In multi-process training, call these from rank 0 only (after a barrier if other ranks write shards into
``tmp_path`` from the writer).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from duo_plugin._io import atomic_dir, atomic_open, atomic_write_text
from duo_plugin.models.names import (WRAPPER_PREFIXES, canonical_name, canonical_named_parameters,  # noqa: F401
                                     canonical_state_dict)  # (re-exported: the naming lives in models/)

__all__ = [
    "step_dir_name",
    "checkpoint_step",
    "save_step_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "clean_tmp",
    "is_checkpoint_entry",
    "save_training_state",
    "load_training_state",
    "capture_rng_state",
    "restore_rng_state",
    "check_resume_compatible",
    "WRAPPER_PREFIXES",
    "canonical_name",
    "canonical_state_dict",
    "canonical_named_parameters",
    "check_finite",
    "load_first_good",
]

def check_finite(state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Raise :class:`~duo_plugin.errors.UserError` naming ``source`` and the first tensor holding NaN/Inf (weights
    loaded from a corrupt file are not a learning-rate problem)."""
    from duo_plugin.errors import UserError

    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{source}: weight {k!r} holds NaN/Inf values: the checkpoint is corrupt; resume from an "
                            "earlier checkpoint (resume=<output_dir>/checkpoints/step_XXXXXXXX) or re-create it")


_STEP_RE = re.compile(r"^step_(\d{8,})$")
_WARNED_LATEST: set = set()
_TMP_PREFIX = ".tmp-"
_LATEST = "latest"


def step_dir_name(step: int) -> str:
    """``step_XXXXXXXX`` (zero-padded to 8 digits)."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{int(step):08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step number of a ``step_XXXXXXXX`` directory."""
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a step_XXXXXXXX checkpoint directory")
    return int(m.group(1))


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Completed step directories under ``out_dir/checkpoints``, sorted by step."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(dirs, key=checkpoint_step)


def is_checkpoint_entry(name: str) -> bool:
    """A name the checkpoint writer creates under ``checkpoints/`` (``step_*``, ``latest``, ``.tmp-*``)."""
    return bool(_STEP_RE.match(name)) or name == _LATEST or name.startswith(_TMP_PREFIX)


def clean_tmp(out_dir: str | os.PathLike) -> None:
    """Remove ``checkpoints/.tmp-*`` leftovers of a crashed save or prune.  Only while holding the run lock of
    ``out_dir`` (:mod:`duo_plugin.training.run_dir`): in a live run they are its checkpoint being written."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _prune(path: Path) -> None:
    """Delete a step directory crash-safely: rename it to a ``.tmp-`` name (atomic), then delete that."""
    doomed = path.with_name(f"{_TMP_PREFIX}pruned-{path.name}")
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def save_step_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    writer: Callable[[Path], None],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and return its final directory.

    Steps: create ``checkpoints/.tmp-step_XXXXXXXX/`` → ``writer(tmp_path)`` → fsync files and directory →
    rename to ``step_XXXXXXXX`` (replacing an older directory of the same step) → atomically update ``latest``
    → prune to the last ``keep_last`` completed steps (None or 0 = keep all). If the writer raises, the temp
    directory is removed, nothing else changes and the exception propagates.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    with atomic_dir(final, prefix=f"{_TMP_PREFIX}{name}.", fsync=True) as tmp:
        writer(tmp)
    atomic_write_text(root / _LATEST, name + "\n", prefix=f"{_TMP_PREFIX}{_LATEST}.", fsync_dir=True)
    from duo_plugin.training.run_dir import record_outputs

    record_outputs(out_dir, [f"checkpoints/{name}", f"checkpoints/{_LATEST}"])  # what overwrite=true may remove
    if keep_last is not None and int(keep_last) > 0:
        done = list_checkpoints(out_dir)
        for p in done[: max(0, len(done) - int(keep_last))]:
            if p != final:
                _prune(p)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest completed checkpoint directory, or None.  Read-only (``.tmp-*`` leftovers are ignored; see
    :func:`clean_tmp`).

    Uses the ``latest`` pointer when it names an existing directory, else the highest ``step_*`` directory; a
    pointer with other content (truncated, binary garbage, a name that does not exist) is reported with a WARNING.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    ptr = root / _LATEST
    done = list_checkpoints(out_dir)
    if ptr.is_file() or ptr.is_symlink():
        try:
            raw = ptr.read_bytes()[:256]
        except OSError:
            raw = b""
        name = raw.decode("utf-8", errors="replace").strip()
        cand = root / name
        if _STEP_RE.match(name) and cand.is_dir() and not cand.is_symlink():
            return cand
        key = (str(ptr), raw)
        if key not in _WARNED_LATEST:  # once per pointer content (run_dir checks the directory more than once)
            _WARNED_LATEST.add(key)
            logging.getLogger(__name__).warning(
                "%s does not name a checkpoint (%r); using the highest step directory instead: %s", ptr, raw[:40],
                done[-1].name if done else "none")
    return done[-1] if done else None


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` atomically (temp file in the same directory + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb", prefix=f"{_TMP_PREFIX}{path.name}.") as f:
        torch.save(dict(state), f)


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        weights_only: bool = True) -> dict:
    """Load a state saved by :func:`save_training_state` (``weights_only=True`` works for states made of
    tensors, python scalars/containers and :func:`capture_rng_state` output)."""
    from duo_plugin.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # truncated / corrupt file: torch/pickle raise many types
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                        "the file is truncated or corrupt; resume from an earlier checkpoint "
                        "(resume=<output_dir>/checkpoints/step_XXXXXXXX)") from e
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not a duo training state (no 'step'); resume from a checkpoint directory "
                        "written by duo_pretrain / duo_distill")
    return state


def load_first_good(candidates: Sequence[Path], loader: Callable[[Path], Any], *, log: Any = None):
    """``(path, loader(path))`` for the first candidate (newest first) that loads; a candidate that fails with a
    user error (truncated / corrupt / NaN) is skipped with a warning naming it and the fallback.  When every
    candidate fails, the first candidate's error is raised."""
    from duo_plugin.errors import USER_ERROR_TYPES

    first_err = None
    for i, path in enumerate(candidates):
        try:
            return path, loader(Path(path))
        except USER_ERROR_TYPES as e:
            first_err = first_err or e
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            msg = (f"checkpoint {path} is unusable ({str(e).splitlines()[0]}); "
                   + (f"falling back to the previous checkpoint {nxt}" if nxt else "no earlier checkpoint left"))
            if log is not None:
                log.warning(msg)
            else:
                import warnings

                warnings.warn(msg, stacklevel=2)
    if first_err is None:
        raise ValueError("load_first_good: no candidate checkpoint")
    raise first_err


def capture_rng_state() -> dict:
    """Global RNG states of python ``random``, numpy, torch CPU and (if initialised) every CUDA device.

    Only tensors and python primitives (loadable with ``torch.load(weights_only=True)``).
    """
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"].numpy(), dtype=np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"saved CUDA RNG states for {len(cuda)} devices, found {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda)


_MISSING = object()


def _get(cfg: Any, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        if isinstance(cur, Mapping):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif hasattr(cur, part):
            cur = getattr(cur, part)
        else:
            try:
                cur = cur[part]
            except Exception:
                return _MISSING
    return cur


def _plain(v: Any) -> Any:
    try:  # OmegaConf containers compare as plain containers
        from omegaconf import OmegaConf

        if OmegaConf.is_config(v):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return v


def check_resume_compatible(saved_cfg: Any, cfg: Any, keys: Sequence[str]) -> None:
    """Raise ``ValueError`` listing every dotted key (e.g. ``"model.vocab_size"``, ``"global_batch_size"``,
    ``"seed"``) whose value differs between the checkpoint's config and the current one (a key missing on one
    side counts as a difference). Works with dicts, OmegaConf configs and attribute objects."""
    bad = []
    for k in keys:
        a, b = _plain(_get(saved_cfg, k)), _plain(_get(cfg, k))
        if a is _MISSING and b is _MISSING:
            continue
        if a is _MISSING or b is _MISSING or a != b:
            fa = "<missing>" if a is _MISSING else repr(a)
            fb = "<missing>" if b is _MISSING else repr(b)
            bad.append(f"  {k}: checkpoint={fa}, config={fb}")
    if bad:
        raise ValueError(
            "cannot resume: the config differs from the checkpoint's in keys that must match:\n" + "\n".join(bad)
            + "\nset them back to the checkpoint's values, or start a fresh run (new output_dir) instead of resuming"
        )
