"""Save / load Duo model directories for both model families (no torchtune import at module load).

A model directory::

    duo_config.json        {"format_version": 1, "family": "dit" | "decoder", "builder": dotpath,
                            "builder_kwargs": {...}, "valid_vocab": null | [[start, stop), ...],
                            "vocab_size": K, "dtype": "float32", "hf_model_type": ... (decoder),
                            "metadata": {...}}
    # family "dit":
    model.safetensors      native DiT state dict
    ema.safetensors        EMA weights (optional)
    # family "decoder" (torchtune decoder made a denoiser):
    model.safetensors, config.json    HF format (readable by torchtune's FullModelHFCheckpointer)
    duo_extra.safetensors             adaLN parameters (only if time-conditioned)
    ema/                              the same three files for the EMA weights (optional)

Writes are atomic: everything is written to a temporary directory in the same parent, which then
replaces ``out_dir`` by ``os.replace`` (an existing model directory is first moved aside and
deleted afterwards).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from duo_plugin._io import atomic_dir
from duo_plugin.models.dit import DiT
from duo_plugin.errors import UserError
from duo_plugin.untrusted import check_folder_json

__all__ = ["CONFIG_NAME", "save_pretrained", "load_pretrained", "read_duo_config", "encode_valid_vocab",
           "decode_valid_vocab", "read_folder_json", "estimate_model_bytes", "available_memory",
           "check_memory", "activation_bytes", "check_training_memory"]

log = logging.getLogger(__name__)

CONFIG_NAME = "duo_config.json"
WEIGHTS_FILE = "model.safetensors"
DIT_EMA_FILE = "ema.safetensors"
EMA_DIR = "ema"
FORMAT_VERSION = 1


# -- helpers ---------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP-style (``.module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _family(model: nn.Module) -> str:
    if isinstance(model, DiT):
        return "dit"
    if type(model).__name__ == "DecoderDenoiser" and hasattr(model, "decoder"):
        return "decoder"
    raise TypeError(f"save_pretrained supports DiT and DecoderDenoiser models, got {type(model).__name__}")


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    from duo_plugin.models.names import canonical_name

    out = {}
    for k, v in sd.items():
        for p in ("_orig_mod.", "module."):
            while k.startswith(p):
                k = k[len(p):]
        out[canonical_name(k)] = v
    return out


def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "items"):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and not isinstance(obj, (bytes, torch.Tensor))):
        return [_jsonable(v) for v in obj]
    raise TypeError(f"value {obj!r} of type {type(obj).__name__} cannot be stored in {CONFIG_NAME}")


def encode_valid_vocab(valid_vocab: Any) -> Optional[List[List[int]]]:
    """``BoolTensor[K]`` / list of ids / list of ``[start, stop)`` / None -> sorted ``[[start, stop), ...]``."""
    if valid_vocab is None:
        return None
    if isinstance(valid_vocab, torch.Tensor) and valid_vocab.dtype == torch.bool:
        ids = torch.nonzero(valid_vocab.flatten().cpu()).flatten().tolist()
    else:
        items = list(valid_vocab.tolist() if isinstance(valid_vocab, torch.Tensor) else valid_vocab)
        if items and isinstance(items[0], (list, tuple)):
            ids = sorted({i for a, b in items for i in range(int(a), int(b))})
        else:
            ids = sorted({int(i) for i in items})
    ranges: List[List[int]] = []
    for i in ids:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def decode_valid_vocab(spec: Any, vocab_size: int) -> Optional[torch.Tensor]:
    """Inverse of :func:`encode_valid_vocab`: ``BoolTensor[K]`` or None. Accepts ranges or a list of ids."""
    if spec is None:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for item in spec:
        if isinstance(item, (list, tuple)):
            a, b = int(item[0]), int(item[1])
        else:
            a, b = int(item), int(item) + 1
        if not (0 <= a < b <= vocab_size):
            raise ValueError(f"valid_vocab entry {item} is outside [0, K={vocab_size})")
        mask[a:b] = True
    if not mask.any():
        raise ValueError("valid_vocab selects no token id")
    return mask


def _full_state(partial: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
    """Complete an (EMA) state dict with ``reference`` for keys it lacks; reject unknown keys/shapes.
    Also accepts ``duo_plugin.training.ema.EMA.state_dict()`` (uses its ``"shadow"``)."""
    if isinstance(partial.get("shadow"), dict):
        partial = partial["shadow"]
    partial = _strip_prefixes(partial)
    reference = _strip_prefixes(reference)
    unexpected = sorted(set(partial) - set(reference))
    if unexpected:
        raise ValueError(f"{what} has keys the model does not have: {unexpected[:5]}")
    for k, v in partial.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, model has {tuple(reference[k].shape)}")
    missing = [k for k in reference if k not in partial]
    if missing:
        log.info("%s lacks %d tensors (e.g. %s); using the model's current values for them",
                 what, len(missing), missing[:3])
    return {k: (partial[k] if k in partial else reference[k]) for k in reference}


def _atomic_dir(out_dir: Path):
    """:func:`duo_plugin._io.atomic_dir`, refusing to replace a non-empty directory that is not a model dir."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).exists():
        raise FileExistsError(f"refusing to replace {out_dir}: non-empty and not a duo model directory "
                              f"(no {CONFIG_NAME}); choose another out_dir")
    return atomic_dir(out_dir)


def _save_safetensors(sd: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _dtype_name(model: nn.Module) -> str:
    p = next(iter(model.parameters()), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"


# -- public API ------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, out_dir: Union[str, Path], *,
                    ema_state_dict: Optional[Dict[str, torch.Tensor]] = None,
                    metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save ``model`` (built by a duo_plugin builder) as a model directory; returns its path.

    ``ema_state_dict``: EMA weights with the model's state-dict keys, e.g. ``EMA.shadow`` or
    ``EMA.state_dict()`` (tensors it lacks, e.g. frozen base weights, are taken from the model). ``metadata``: JSON-able dict stored in
    ``duo_config.json``; a ``"valid_vocab"`` entry (BoolTensor[K], ids or ranges) is stored at the top
    level, otherwise ``model.valid_vocab`` is used when set. Full (unsharded) models only.
    """
    model = _unwrap(model)
    family = _family(model)
    builder = getattr(model, "_duo_full_builder", None) or getattr(model, "_duo_builder", None)
    if builder is None:
        raise ValueError("model has no _duo_builder record: build it with a duo_plugin.models builder "
                         "(duo_dit_*, duo_llama3_2*, duo_qwen2_5*) or set model._duo_builder = (dotpath, kwargs)")
    metadata = dict(metadata or {})
    valid = metadata.pop("valid_vocab", getattr(model, "valid_vocab", None))
    cfg: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "builder": builder[0],
        "builder_kwargs": _jsonable(builder[1]),
        "vocab_size": int(model.vocab_size),
        "dtype": _dtype_name(model),
        "valid_vocab": encode_valid_vocab(valid),
        "metadata": _jsonable(metadata),
    }
    if family == "decoder":
        cfg["hf_model_type"] = model.hf_model_type
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        if family == "dit":
            own = model.state_dict()
            _save_safetensors(own, tmp / WEIGHTS_FILE)
            if ema_state_dict is not None:
                _save_safetensors(_full_state(ema_state_dict, own, "ema_state_dict"), tmp / DIT_EMA_FILE)
        else:
            from duo_plugin.models.hf_checkpoint import save_hf_checkpoint

            save_hf_checkpoint(model, tmp)
            if ema_state_dict is not None:
                full = _full_state(ema_state_dict, model.state_dict(), "ema_state_dict")
                dec = {k[len("decoder."):]: v for k, v in full.items() if k.startswith("decoder.")}
                extra = {k: v for k, v in full.items() if not k.startswith("decoder.")}
                save_hf_checkpoint(model, tmp / EMA_DIR, decoder_state=dec, extra_state=extra)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return out_dir


# -- a model folder is data (duo_plugin.untrusted) ---------------------------------------------------
def read_folder_json(f: Union[str, Path], what: str = "the model directory") -> Any:
    """Parse a JSON file of a model folder and :func:`check_folder_json` it; one-line errors naming the file."""
    f = Path(f)
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({str(e).splitlines()[0]}): {what} is truncated or corrupt") from None
    check_folder_json(data, str(f))
    return data


# -- memory estimate before building ----------------------------------------------------------------
def available_memory(device: Union[str, torch.device] = "cpu") -> Optional[int]:
    """Bytes free for a new model on ``device``: CUDA free memory, else ``MemAvailable`` (Linux) capped by a cgroup
    memory limit; None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            lim = Path(f).read_text().strip()
            used_f = Path(f).with_name("memory.current" if f.endswith(".max") else "memory.usage_in_bytes")
            if lim.isdigit() and int(lim) < (1 << 60):
                room = int(lim) - int(used_f.read_text().strip())
                avail = room if avail is None else min(avail, room)
        except (OSError, ValueError):
            continue
    return avail


def estimate_model_bytes(build, *, dtype_bytes: int = 4) -> tuple[int, nn.Module]:
    """``(parameter + buffer bytes, meta model)`` of ``build()`` run on the meta device: exact sizes from the
    config, nothing allocated (a folder declaring a 10^9 vocabulary costs nothing to inspect)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the global RNG is left as it was
        model = build()
    n = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    return int(n) * int(dtype_bytes), model


def activation_bytes(model: nn.Module, rows: int, seq_len: int) -> int:
    """Rough fp32 activation memory of one training forward/backward of ``rows`` sequences of ``seq_len`` tokens:
    ~24 floats per hidden unit per token per block (attention and MLP inputs/outputs, norms, residuals) plus ~4
    per vocabulary entry per token (logits, softmax/log-softmax and their gradient).  An estimate for the
    before-build check, not a measurement."""
    hidden = max((m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)), default=0)
    layers = max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList)), default=0)
    vocab = int(getattr(model, "vocab_size", 0) or 0)
    return int(rows) * int(seq_len) * (24 * hidden * layers + 4 * vocab) * 4


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_memory(need: int, device: Union[str, torch.device], what: str, detail: str = "") -> None:
    """:class:`UserError` (one line naming the sizes) when ``need`` bytes exceed the free memory of ``device``.
    ``DUO_SKIP_MEMORY_CHECK=1`` skips the check (e.g. when swap or unified memory make it too strict)."""
    if os.environ.get("DUO_SKIP_MEMORY_CHECK", "").strip() not in ("", "0"):
        return
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise UserError(f"{what} needs about {_gb(need)}{detail} but {torch.device(device).type} has "
                        f"{_gb(avail)} available; use a smaller model or batch (or a machine with more memory; "
                        "DUO_SKIP_MEMORY_CHECK=1 skips this check)")


def check_training_memory(build, *, rows: int, seq_len: int, device: Any, what: str, ema: bool = True) -> None:
    """Before building a model to train: parameters, gradients, two AdamW moments (and an EMA copy) plus
    :func:`activation_bytes` of one micro-batch, against the free memory of ``device`` (:func:`check_memory`)."""
    n_bytes, meta = estimate_model_bytes(build)
    trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad) * 4
    states = n_bytes + 3 * trainable + (n_bytes if ema else 0)
    act = activation_bytes(meta, rows, seq_len)
    check_memory(states + act, device, what, f" ({_gb(n_bytes)} of parameters, {_gb(states - n_bytes)} of "
                 f"gradients/optimizer/EMA state, ~{_gb(act)} of activations for {rows} x {seq_len} tokens)")


def read_duo_config(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and validate ``duo_config.json`` of a model directory."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {p} does not exist")
    f = p / CONFIG_NAME
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: {p} is not a duo_plugin model directory (save it with "
                                f"duo_plugin.models.save_pretrained)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({str(e).splitlines()[0]}): the model directory is truncated or "
                        "corrupt") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} must hold a JSON object")
    check_folder_json(cfg, str(f), skip=("builder", "metadata"))
    meta = cfg.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise UserError(f"{f}: metadata must be a JSON object")
    # metadata.tokenizer is a tokenizer descriptor: typed and allow-listed by check_descriptor whenever it is loaded
    check_folder_json({k: v for k, v in (meta or {}).items() if k != "tokenizer"}, f"{f} (metadata)")
    for key in ("family", "builder", "builder_kwargs"):
        if key not in cfg:
            raise UserError(f"{f} lacks the required key {key!r}: not a duo model directory written by "
                            "save_pretrained; re-save it")
    if cfg["family"] not in ("dit", "decoder"):
        raise UserError(f"{f}: unknown family {cfg['family']!r} (expected 'dit' or 'decoder')")
    return cfg


#: Modules whose ``@record_builder`` functions a model directory may name (a model folder is data: any other callable,
#: even inside duo_plugin, e.g. a recipe's ``run`` or a loader taking a builder dotpath, could run arbitrary code).
BUILDER_MODULES = ("duo_plugin.models.dit", "duo_plugin.models.builders", "duo_plugin.models")


def _build(cfg: Dict[str, Any], where: Union[str, Path] = CONFIG_NAME, device: Any = "cpu") -> nn.Module:
    """Call the (allow-listed) builder of ``cfg`` -- first on the meta device, so that a model too large for
    ``device`` stops with one line naming the sizes instead of allocating (the weights are read once more)."""
    dotpath = cfg["builder"]
    module, _, name = str(dotpath).rpartition(".")
    if module not in BUILDER_MODULES or not name.isidentifier() or name.startswith("_"):
        raise UserError(f"refusing to call builder {dotpath!r} named in {CONFIG_NAME}: only the model builders of "
                        f"{', '.join(BUILDER_MODULES)} are loaded (a model folder is data)")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        raise UserError(f"builder {dotpath!r} named in {CONFIG_NAME} not found")
    if not getattr(fn, "_duo_record_builder", False):
        raise UserError(f"refusing to call {dotpath!r} named in {CONFIG_NAME}: not a duo model builder")
    kwargs = cfg["builder_kwargs"]
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}: builder_kwargs must be a JSON object")
    try:
        n_bytes, _ = estimate_model_bytes(lambda: fn(**kwargs))
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: builder_kwargs do not fit {dotpath} ({type(e).__name__}: {e}); the model "
                        "directory is corrupt or from another version: re-save it") from None
    check_memory(2 * n_bytes, device, f"loading {Path(str(where)).parent}",
                 f" ({_gb(n_bytes)} of parameters, x2 while the weights are read)")
    return fn(**kwargs)


def _read_weights(where: Path, read):
    """``read()``, turning a truncated / corrupt weights file (safetensors' error names no file) into a
    :class:`UserError` naming ``where``."""
    try:
        return read()
    except Exception as e:
        if type(e).__name__ != "SafetensorError" and not isinstance(e, (EOFError, UnicodeDecodeError)):
            raise
        raise UserError(f"{where}: cannot read the weights ({type(e).__name__}: {e}): the file is truncated or "
                        "corrupt; re-copy the model directory or use an earlier checkpoint") from e


def load_pretrained(path: Union[str, Path], *, weights: str = "ema", device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild and load a model directory written by :func:`save_pretrained`.

    ``weights="ema"`` loads the EMA weights when the directory has them (else the raw weights, with
    a log line); ``weights="model"`` loads the raw weights. Returns the model on ``device`` in eval
    mode, in the saved dtype, with ``model.valid_vocab`` (``BoolTensor[K]`` or None),
    ``model.duo_metadata`` and ``model.duo_config`` set.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    p = Path(path)
    cfg = read_duo_config(p)
    model = _build(cfg, p / CONFIG_NAME, device)
    if cfg.get("vocab_size") is not None and int(cfg["vocab_size"]) != model.vocab_size:
        raise ValueError(f"{p}: duo_config vocab_size={cfg['vocab_size']} but the builder made K={model.vocab_size}")
    if cfg["family"] == "dit":
        from safetensors.torch import load_file

        f = p / WEIGHTS_FILE
        if weights == "ema":
            if (p / DIT_EMA_FILE).exists():
                f = p / DIT_EMA_FILE
            else:
                log.info("%s has no %s; loading the raw model weights", p, DIT_EMA_FILE)
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing")
        sd = _read_weights(f, lambda: load_file(str(f)))
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"{f} does not match the model built by {cfg['builder']}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{f}: {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)} "
                                 f"(vocabulary K={model.vocab_size}); vocab/shape mismatch with duo_config.json")
        model.load_state_dict(sd, strict=True)
    else:
        from duo_plugin.models.hf_checkpoint import load_hf_checkpoint

        d = p
        if weights == "ema":
            if (p / EMA_DIR).is_dir():
                d = p / EMA_DIR
            else:
                log.info("%s has no %s/ folder; loading the raw model weights", p, EMA_DIR)
        _read_weights(d, lambda: load_hf_checkpoint(model, d))
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    model = model.to(device=device, dtype=dtype).eval()
    model.valid_vocab = decode_valid_vocab(cfg.get("valid_vocab"), model.vocab_size)
    model.duo_metadata = cfg.get("metadata", {})
    model.duo_config = cfg
    return model
