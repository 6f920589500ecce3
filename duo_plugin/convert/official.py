"""Official Duo / MDLM / AR checkpoints <-> duo model folders (docs/published-checkpoints.md).

Two published forms are read:

* a **Lightning ``.ckpt``** written by the official trainers (``s-sahoo/duo``, ``kuleshov-group/mdlm``): ``state_dict``
  (the raw weights, keys ``backbone.*``), ``ema.shadow_params`` (the EMA weights, an unnamed list in
  ``backbone.parameters()`` order) and ``hyper_parameters`` (the run's pickled OmegaConf config and tokenizer). It is
  read by the restricted unpickler of :mod:`duo_plugin.convert.safe_pickle`: no code in the file runs.
* an **HF export** folder: ``config.json`` in the MDLM remote-code layout (``model_type: mdlm``, ``hidden_dim``,
  ``n_blocks``, ``n_heads``, ``cond_dim``, ``model_length``, ``vocab_size``, ``time_conditioning``) and
  ``model.safetensors`` (or ``pytorch_model.bin``, read safely; or a sharded ``*.index.json``) with ``backbone.*``
  keys (the EMA weights).

Mapping onto :class:`duo_plugin.models.dit.DiT` (the same architecture): strip ``backbone.``, rename
``vocab_embed.embedding`` -> ``vocab_embed.weight``, drop the derived buffer ``rotary_emb.inv_freq`` (checked against
base 10,000). Every other key must be one of the DiT's keys with the same shape, and every DiT key must be
supplied, or the conversion stops with one line naming the key. The AR model (causal, no adaLN) maps onto a
``causal=True``, ``time_conditioning=False`` DiT whose adaLN layers are the identity (weights 0, gate biases 1,
other biases 0), which is exact.

Kinds: ``duo`` (uniform state, time conditioning from the config; ``valid_vocab`` = all rows, as the official
process), ``mdlm`` (absorbing, ``metadata.mask_id``; time conditioning as configured, off in the published runs),
``ar`` (causal). ``to_official`` writes the HF-export layout back.
"""

from __future__ import annotations

import json
import logging
import re
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from duo_plugin._io import atomic_dir
from duo_plugin.convert.safe_pickle import LazyTensor, load_checkpoint, placeholder_name, to_plain
from duo_plugin.errors import UserError

__all__ = ["KINDS", "OfficialModel", "read_official", "convert_official", "to_official", "map_official_keys",
           "official_inv_freq", "HF_CONFIG_DEFAULTS", "build_model", "duo_folder_hf_config"]

log = logging.getLogger(__name__)

KINDS = ("duo", "mdlm", "ar")
PREFIX = "backbone."
INV_FREQ = "rotary_emb.inv_freq"
ROPE_BASE = 10_000.0
HF_CONFIG_DEFAULTS = {  # the fields of the official export (fixtures README; the remote code targets 4.38.2)
    "architectures": ["MDLM"],
    "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
    "model_type": "mdlm", "return_dict": False, "torch_dtype": "float32", "transformers_version": "4.38.2",
}
# HF config field -> our size name (with accepted aliases)
_HF_FIELDS = {"hidden_dim": "dim", "hidden_size": "dim", "n_blocks": "n_layers", "n_heads": "n_heads",
              "cond_dim": "cond_dim", "model_length": "max_seq_len", "length": "max_seq_len",
              "vocab_size": "vocab_size", "dropout": "dropout", "time_conditioning": "time_conditioning"}
_HF_IGNORED = {"architectures", "auto_map", "model_type", "return_dict", "torch_dtype", "transformers_version",
               "_name_or_path", "text_config", "tie_word_embeddings", "scale_by_sigma", "vocab_lookup"}


@dataclass
class OfficialModel:
    """What :func:`read_official` found: the DiT state dict (our key names), sizes, kind and provenance."""

    state: Dict[str, torch.Tensor]
    kind: str
    dim: int
    n_layers: int
    n_heads: int
    cond_dim: int
    vocab_size: int
    max_seq_len: int
    time_conditioning: bool
    dropout: float = 0.1
    mask_id: Optional[int] = None
    source: Dict[str, Any] = field(default_factory=dict)
    tokenizer_json: Optional[bytes] = None  # the tokenizer pickled in a .ckpt (tokenizers JSON, data only)
    tokenizer_specials: Dict[str, Optional[str]] = field(default_factory=dict)

    def builder_kwargs(self) -> Dict[str, Any]:
        return dict(vocab_size=self.vocab_size, max_seq_len=self.max_seq_len, dropout=float(self.dropout),
                    dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, cond_dim=self.cond_dim,
                    causal=self.kind == "ar", time_conditioning=bool(self.time_conditioning))


def official_inv_freq(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The official rotary buffer ``1 / base^(arange(0, hd, 2) / hd)`` in fp32 (as the official DiT computes it)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


# -- state dicts -----------------------------------------------------------------------------------------------
def map_official_keys(sd: Mapping[str, Any], where: str) -> Tuple[Dict[str, Any], Optional[Any]]:
    """Official names -> ours: ``(state, inv_freq)``; keys outside ``backbone.`` are refused (unless none has
    the prefix, as in a bare backbone state dict)."""
    keys = list(sd)
    prefixed = any(k.startswith(PREFIX) for k in keys)
    out: Dict[str, Any] = {}
    inv = None
    for k in keys:
        if prefixed and not k.startswith(PREFIX):
            raise UserError(f"{where}: key {k!r} is outside {PREFIX!r}; cannot map it onto the DiT (only the "
                            "backbone's weights are converted)")
        name = k[len(PREFIX):] if prefixed else k
        if name == INV_FREQ:
            inv = sd[k]
            continue
        if name == "vocab_embed.embedding":
            name = "vocab_embed.weight"
        out[name] = sd[k]
    return out, inv


def _load(t: Any) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) else t


def _shape(t: Any) -> Tuple[int, ...]:
    return tuple(t.shape)


def _sizes_from_tensors(sd: Mapping[str, Any], inv: Any, where: str) -> Dict[str, Any]:
    if "vocab_embed.weight" not in sd:
        raise UserError(f"{where}: no vocab_embed.embedding / vocab_embed.weight tensor; not an official DiT")
    width, dim = _shape(sd["vocab_embed.weight"])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))) or not blocks:
        raise UserError(f"{where}: block indices {sorted(blocks)[:8]} are not 0..N-1")
    sizes: Dict[str, Any] = {"vocab_size": width, "dim": dim, "n_layers": len(blocks)}
    sizes["adaln"] = "sigma_map.mlp.0.weight" in sd
    if sizes["adaln"]:
        sizes["cond_dim"] = _shape(sd["sigma_map.mlp.0.weight"])[0]
    if inv is not None:
        hd = 2 * int(inv.shape[0])
        if hd == 0 or dim % hd:
            raise UserError(f"{where}: rotary_emb.inv_freq has {inv.shape[0]} entries, not a head size of {dim}")
        sizes["n_heads"] = dim // hd
    return sizes


def _official_name(k: str) -> str:
    return PREFIX + ("vocab_embed.embedding" if k == "vocab_embed.weight" else k)


def _check_state(sd: Dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    own = model.state_dict()
    unknown = sorted(set(sd) - set(own))
    if unknown:
        raise UserError(f"{where}: tensor {_official_name(unknown[0])!r} has no place in the DiT "
                        f"({len(unknown)} unknown keys); "
                        "refusing to drop it; is this an official Duo/MDLM/AR DiT checkpoint?")
    missing = sorted(set(own) - set(sd))
    if missing:
        raise UserError(f"{where}: tensor {_official_name(missing[0])!r} is missing ({len(missing)} missing keys); "
                        "the checkpoint is incomplete or of another architecture")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{where}: {_official_name(k)} has shape {tuple(v.shape)}, the DiT built from the config "
                            "expects "
                            f"{tuple(own[k].shape)}; fix the sizes (config / flags) or the file")


def _identity_adaln(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """adaLN tensors making every modulation the identity (shift 0, scale 0, gate 1) and sigma_map zero."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("sigma_map."):
            out[k] = torch.zeros_like(v)
        elif k.endswith("adaLN_modulation.weight"):
            out[k] = torch.zeros_like(v)
        elif k.endswith("adaLN_modulation.bias"):
            b = torch.zeros_like(v)
            if k.startswith("blocks."):  # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
                d = v.shape[0] // 6
                b[2 * d:3 * d] = 1.0
                b[5 * d:6 * d] = 1.0
            out[k] = b
    return out


# -- configs ---------------------------------------------------------------------------------------------------
def _section(cfg: Mapping, name: str) -> Mapping:
    v = cfg.get(name) if isinstance(cfg, Mapping) else None
    return v if isinstance(v, Mapping) else {}


def _kind_from_ckpt_config(cfg: Mapping) -> Optional[str]:
    algo = _section(cfg, "algo")
    name = str(algo.get("name") or "").lower()
    param = str(algo.get("parameterization") or cfg.get("parameterization") or "").lower()
    backbone = str(algo.get("backbone") or cfg.get("backbone") or "").lower()
    diffusion = str(algo.get("diffusion") or cfg.get("diffusion") or "").lower()
    if name == "ar" or param == "ar" or backbone == "ar" or algo.get("causal_attention") is True:
        return "ar"
    if name == "mdlm" or param == "subs" or diffusion.startswith("absorbing"):
        return "mdlm"
    if name.startswith(("duo", "udlm", "distill", "dcd")) or diffusion == "uniform":
        return "duo"
    return None


def _ckpt_config_sizes(cfg: Mapping) -> Dict[str, Any]:
    model = _section(cfg, "model")
    algo = _section(cfg, "algo")
    out: Dict[str, Any] = {}
    for src, dst in (("hidden_size", "dim"), ("n_blocks", "n_layers"), ("n_heads", "n_heads"),
                     ("cond_dim", "cond_dim"), ("length", "max_seq_len"), ("dropout", "dropout")):
        v = model.get(src)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[dst] = v
    tc = algo.get("time_conditioning", cfg.get("time_conditioning"))
    if isinstance(tc, bool):
        out["time_conditioning"] = tc
    return out


def _embedded_tokenizer(hp: Mapping) -> Tuple[Optional[bytes], Dict[str, Optional[str]]]:
    """The tokenizers-JSON bytes of a pickled ``*TokenizerFast`` (inert placeholder state) and its special tokens."""
    tok = hp.get("tokenizer") if isinstance(hp, Mapping) else None
    state = getattr(tok, "state", None) if placeholder_name(tok) else None
    if not isinstance(state, dict):
        return None, {}
    inner = state.get("_tokenizer")
    raw = getattr(inner, "state", None) if placeholder_name(inner) else None
    specials: Dict[str, Optional[str]] = {}
    for key in ("bos", "eos", "pad", "mask", "unk"):
        v = state.get(f"_{key}_token")
        if placeholder_name(v) and isinstance(v.state, dict):
            v = v.state.get("content")
        specials[key] = v if isinstance(v, str) else None
    return (raw if isinstance(raw, bytes) else None), specials


def _token_id(tokenizer_json: Optional[bytes], token: Optional[str]) -> Optional[int]:
    if not tokenizer_json or not token:
        return None
    data = json.loads(tokenizer_json.decode("utf-8"))
    for t in data.get("added_tokens", []):
        if t.get("content") == token:
            return int(t["id"])
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def _read_ckpt(path: Path, weights: str) -> Tuple[Dict[str, Any], Any, Dict[str, Any], Dict[str, Any]]:
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise UserError(f"{path}: no 'state_dict' in the checkpoint; not a Lightning checkpoint")
    sd_raw = ck["state_dict"]
    hp = ck.get("hyper_parameters") if isinstance(ck.get("hyper_parameters"), dict) else {}
    cfg = to_plain(hp.get("config")) if hp.get("config") is not None else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    if weights == "raw":
        sd = dict(sd_raw)
    else:
        ema = ck.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
        if not isinstance(shadow, list):
            raise UserError(f"{path}: no ema.shadow_params in the checkpoint; convert the raw weights with "
                            "--weights raw")
        names = [k for k in sd_raw if not k.endswith(INV_FREQ)]
        if len(names) != len(shadow):
            raise UserError(f"{path}: ema.shadow_params has {len(shadow)} tensors but state_dict has {len(names)} "
                            "parameters; cannot pair them (use --weights raw)")
        sd = {}
        for k, t in zip(names, shadow):
            if _shape(t) != _shape(sd_raw[k]):
                raise UserError(f"{path}: ema.shadow_params entry for {k} has shape {_shape(t)}, the parameter has "
                                f"{_shape(sd_raw[k])}; the EMA list is not in backbone.parameters() order")
            sd[k] = t
        sd.update({k: v for k, v in sd_raw.items() if k.endswith(INV_FREQ)})
    return sd, hp, cfg, {"format": "lightning", "file": path.name, "path": str(path), "weights": weights,
                         "global_step": ck.get("global_step") if isinstance(ck.get("global_step"), int) else None}


def _read_hf_weights(folder: Path) -> Dict[str, Any]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: Dict[str, Any] = {}
        for f in files:
            if Path(f).name != f:
                raise UserError(f"{index}: shard name {f!r} must be a file next to it")
            sd.update(load_file(str(folder / f)))
        return sd
    if (folder / "pytorch_model.bin").is_file():
        sd = load_checkpoint(folder / "pytorch_model.bin")
        if not isinstance(sd, dict):
            raise UserError(f"{folder / 'pytorch_model.bin'} does not hold a state dict")
        return sd
    raise UserError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_hf(folder: Path) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder}: no config.json; an official HF export holds config.json + model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or (cfg.get("model_type") not in ("mdlm", "duo")
                                     and "MDLM" not in (cfg.get("architectures") or [])):
        raise UserError(f"{cfg_path}: model_type={cfg.get('model_type')!r} is not the MDLM remote-code layout "
                        "(model_type 'mdlm'); not an official Duo/MDLM export")
    sizes: Dict[str, Any] = {}
    for k, v in cfg.items():
        if k in _HF_FIELDS:
            sizes[_HF_FIELDS[k]] = v
        elif k not in _HF_IGNORED:
            log.info("%s: ignoring config field %s=%r", cfg_path, k, v)
    return _read_hf_weights(folder), cfg, sizes


def _resolve_kind(kind: Optional[str], cfg_kind: Optional[str], adaln: bool, where: str, hint: str) -> str:
    k = kind or cfg_kind
    if k is None:
        raise UserError(f"{where}: cannot tell the model kind from {hint}; pass --kind duo|mdlm|ar")
    if k not in KINDS:
        raise UserError(f"--kind {k!r}: expected one of {', '.join(KINDS)}")
    if (k == "ar") == adaln:
        raise UserError(f"{where}: kind {k!r} but the weights {'have' if adaln else 'lack'} the adaLN / sigma_map "
                        f"tensors ({'a diffusion' if adaln else 'an AR'} model); fix --kind")
    return k


def read_official(src, *, weights: str = "ema", kind: Optional[str] = None,
                  overrides: Optional[Mapping[str, Any]] = None) -> OfficialModel:
    """Read an official checkpoint (``.ckpt`` file or HF-export folder) into an :class:`OfficialModel`.

    Sizes come from the tensors, cross-checked against the checkpoint's own config; ``kind`` and ``overrides``
    (``max_seq_len``, ``n_heads``, ``time_conditioning``, ``mask_id``, ``dropout``) replace what the config says.
    """
    src = Path(src)
    if weights not in ("ema", "raw"):
        raise UserError(f"--weights {weights!r}: expected ema or raw")
    overrides = dict(overrides or {})
    tok_json, specials = None, {}
    if src.is_dir():
        if weights == "raw":
            raise UserError(f"{src}: an HF export holds only the EMA weights; --weights raw needs the .ckpt")
        sd_off, cfg, cfg_sizes = _read_hf(src)
        cfg_kind = None if "time_conditioning" not in cfg else ("duo" if cfg["time_conditioning"] else "mdlm")
        source = {"format": "hf", "weights": "ema", "config": cfg, "path": str(src)}
        hint = "config.json (time_conditioning true = duo, false = mdlm)"
    elif src.is_file():
        sd_off, hp, cfg, source = _read_ckpt(src, weights)
        cfg_sizes, cfg_kind = _ckpt_config_sizes(cfg), _kind_from_ckpt_config(cfg)
        tok_json, specials = _embedded_tokenizer(hp)
        hint = "the checkpoint's hyper-parameters (algo.name / parameterization)"
        if isinstance(hp.get("vocab_size"), int):
            cfg_sizes["vocab_size"] = hp["vocab_size"]
    else:
        raise FileNotFoundError(f"official checkpoint not found: {src}")
    where = str(src)
    sd, inv = map_official_keys(sd_off, where)
    sizes = _sizes_from_tensors(sd, inv, where)
    k = _resolve_kind(kind, cfg_kind, sizes["adaln"], where, hint)
    for name in ("dim", "n_layers", "cond_dim", "n_heads", "vocab_size"):
        if name in sizes and name in cfg_sizes and int(cfg_sizes[name]) != int(sizes[name]):
            raise UserError(f"{where}: the config says {name}={cfg_sizes[name]} but the weights have {sizes[name]}")
    merged = {**cfg_sizes, **{n: v for n, v in sizes.items() if n != "adaln"}, **overrides}
    for name in ("n_heads", "max_seq_len"):
        if merged.get(name) is None:
            raise UserError(f"{where}: {name} is neither in the config nor derivable from the tensors; pass "
                            f"--{name.replace('_', '-')}")
    if k == "ar":
        merged["time_conditioning"] = False
        merged.setdefault("cond_dim", 128)
    else:
        merged.setdefault("time_conditioning", k == "duo")
    mask_id = overrides.get("mask_id")
    if mask_id is None and k in ("mdlm", "ar"):
        mask_id = _token_id(tok_json, specials.get("mask")) if tok_json else None
        mask_id = int(merged["vocab_size"]) - 1 if mask_id is None else mask_id
    if inv is not None:
        inv_t = _load(inv).float()
        ref = official_inv_freq(int(merged["dim"]) // int(merged["n_heads"]))
        if inv_t.shape != ref.shape or not torch.allclose(inv_t, ref, rtol=1e-6, atol=0):
            raise UserError(f"{where}: rotary_emb.inv_freq is not base-10000 rotary for head size "
                            f"{int(merged['dim']) // int(merged['n_heads'])}; unsupported rotary variant")
    return OfficialModel(
        state={n: _load(v) for n, v in sd.items()}, kind=k, dim=int(merged["dim"]), n_layers=int(merged["n_layers"]),
        n_heads=int(merged["n_heads"]), cond_dim=int(merged["cond_dim"]), vocab_size=int(merged["vocab_size"]),
        max_seq_len=int(merged["max_seq_len"]), time_conditioning=bool(merged["time_conditioning"]),
        dropout=float(merged.get("dropout", 0.1)), mask_id=None if mask_id is None else int(mask_id),
        source=source, tokenizer_json=tok_json, tokenizer_specials=specials)


def build_model(om: OfficialModel) -> torch.nn.Module:
    """The DiT of ``om`` with its weights loaded (AR: adaLN as the identity); eval mode."""
    from duo_plugin.models.dit import duo_dit_small

    model = duo_dit_small(**om.builder_kwargs())
    sd = dict(om.state)
    if om.kind == "ar":
        sd.update(_identity_adaln(model))
    _check_state(sd, model, om.source.get("path") or "the checkpoint")
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()},
                          strict=True)
    return model.eval()


def _valid_vocab(om: OfficialModel) -> Optional[torch.Tensor]:
    if om.kind == "duo":
        return None  # the official uniform process covers every embedding row
    vv = torch.ones(om.vocab_size, dtype=torch.bool)
    vv[int(om.mask_id)] = False
    return vv


def duo_folder_hf_config(om: OfficialModel) -> Dict[str, Any]:
    """The ``config.json`` written beside ``duo_config.json``: lets ``transformers.AutoModelForMaskedLM`` find our
    registered ``duo_dit`` model type (duo_plugin.integrations.transformers). The duo loaders ignore it."""
    return {"model_type": "duo_dit", "architectures": ["DuoDiTForMaskedLM"], "vocab_size": om.vocab_size,
            "model_length": om.max_seq_len, "hidden_dim": om.dim, "cond_dim": om.cond_dim, "n_blocks": om.n_layers,
            "n_heads": om.n_heads, "dropout": om.dropout, "time_conditioning": bool(om.time_conditioning),
            "duo_objective": om.kind}


def convert_official(src, out, *, weights: str = "ema", tokenizer=None, kind: Optional[str] = None,
                     overrides: Optional[Mapping[str, Any]] = None, embedded_tokenizer: bool = True) -> Path:
    """Convert an official checkpoint into a duo model folder ``out`` (``load_pretrained`` / ``duo_generate`` /
    ``duo_eval`` / ``duo_distill init_from`` / lm-eval read it). ``tokenizer``: a local GPT-2 / BERT tokenizer
    (:mod:`duo_plugin.convert.tokenizer`); without it the tokenizer pickled in a ``.ckpt`` is used (as data) when
    ``embedded_tokenizer``. Returns ``out``."""
    from duo_plugin.models.checkpoint import save_pretrained

    om = read_official(src, weights=weights, kind=kind, overrides=overrides)
    model = build_model(om)
    meta: Dict[str, Any] = {"objective": om.kind, "valid_vocab": _valid_vocab(om),
                            "converted_from": {**{k: v for k, v in om.source.items() if k not in ("config", "path")},
                                               "kind": om.kind}}
    if om.kind == "mdlm":
        meta["mask_id"] = int(om.mask_id)
    if om.source.get("format") == "hf":
        # the record of the export's config, minus ``auto_map`` (it names remote code, which a model folder may not
        # carry; ``to_official`` writes the official layout's standard one back)
        meta["official_config"] = {k: v for k, v in om.source["config"].items() if k != "auto_map"}
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "duo_config.json").exists():
        raise UserError(f"refusing to replace {out}: non-empty and not a duo model folder; choose another OUT")
    with atomic_dir(out) as tmp:
        tok = None
        if tokenizer is not None or (embedded_tokenizer and om.tokenizer_json is not None):
            from duo_plugin.convert.tokenizer import save_official_tokenizer

            tok = save_official_tokenizer(tokenizer, tmp / "tokenizer", kind=om.kind, width=om.vocab_size,
                                          embedded_json=None if tokenizer is not None else om.tokenizer_json)
            meta["tokenizer"] = tok.descriptor()
            mask = _tokenizer_mask_id(tmp / "tokenizer" / "tokenizer.json")
            if om.kind in ("mdlm", "ar") and mask is not None and "mask_id" not in (overrides or {}):
                om.mask_id = mask  # the official rule: the tokenizer's [MASK] when it has one, else the last row
                meta["valid_vocab"] = _valid_vocab(om)
                if om.kind == "mdlm":
                    meta["mask_id"] = int(mask)
        save_pretrained(model, tmp / "model", metadata=meta)
        for f in (tmp / "model").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "model").rmdir()
        (tmp / "config.json").write_text(json.dumps(duo_folder_hf_config(om), indent=2, sort_keys=True) + "\n")
    return out


def _tokenizer_mask_id(path: Path) -> Optional[int]:
    from tokenizers import Tokenizer

    i = Tokenizer.from_file(str(path)).token_to_id("[MASK]")
    return None if i is None else int(i)


def _official_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        name = "vocab_embed.embedding" if k == "vocab_embed.weight" else k
        sd[PREFIX + name] = v.detach().cpu().contiguous()
        if k == "sigma_map.mlp.2.bias":  # the official order: rotary buffer right after sigma_map
            sd[PREFIX + INV_FREQ] = official_inv_freq(model.dim // model.n_heads, model.rope_base)
    if PREFIX + INV_FREQ not in sd:
        sd[PREFIX + INV_FREQ] = official_inv_freq(model.dim // model.n_heads, model.rope_base)
    return sd


def to_official(src, out, *, weights: str = "ema") -> Path:
    """A duo DiT model folder -> the official HF-export layout (``config.json`` in the MDLM remote-code style +
    ``model.safetensors`` with ``backbone.*`` keys), which the official ``algo.backbone=hf_dit`` path loads.
    Uniform-state (duo) and MDLM models only; a folder converted from an HF export gets its ``config.json`` back
    (sizes refreshed from the model)."""
    from safetensors.torch import save_file

    from duo_plugin.models.checkpoint import load_pretrained
    from duo_plugin.models.dit import DiT

    model = load_pretrained(src, weights="ema" if weights == "ema" else "model")
    if not isinstance(model, DiT):
        raise UserError(f"{src}: to-official converts DiT model folders only (this one is "
                        f"{model.duo_config.get('family')})")
    meta = dict(getattr(model, "duo_metadata", {}) or {})
    objective = str(meta.get("objective") or "duo")
    if model.causal or objective == "ar":
        raise UserError(f"{src}: the official AR model has no HF export layout; keep the duo folder")
    if objective == "mdlm" and meta.get("mask_id") is not None and int(meta["mask_id"]) != model.vocab_size - 1:
        log.warning("%s: [MASK] id %s is not the last row; the official code derives it from its tokenizer",
                    src, meta["mask_id"])
    base = meta.get("official_config") if isinstance(meta.get("official_config"), dict) else HF_CONFIG_DEFAULTS
    cfg = {**HF_CONFIG_DEFAULTS, **base}
    cfg.update({"cond_dim": int(model.output_layer.adaLN_modulation.in_features), "hidden_dim": int(model.dim),
                "model_length": int(model.max_seq_len), "n_blocks": len(model.blocks), "n_heads": int(model.n_heads),
                "time_conditioning": bool(model.time_conditioning), "vocab_size": int(model.vocab_size)})
    cfg.setdefault("dropout", float(model.blocks[0].dropout))
    cfg = {k: cfg[k] for k in sorted(cfg)}
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"refusing to replace {out}: non-empty and not an HF export; choose another OUT")
    with atomic_dir(out) as tmp:
        save_file(_official_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
