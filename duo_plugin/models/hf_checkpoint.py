"""HF-format checkpoint I/O for adapted torchtune decoders (:class:`DecoderDenoiser`).

* :func:`load_hf_checkpoint` reads pretrained HF safetensors through torchtune's
  ``FullModelHFCheckpointer`` (key mapping, Llama q/k permutation, Qwen tying), loads them into
  ``model.decoder`` and, if present, the extra adaLN parameters from ``duo_extra.safetensors``.
* :func:`save_hf_checkpoint` writes ``model.safetensors`` (HF key names via torchtune's
  ``tune_to_hf`` / ``qwen2_tune_to_hf``), ``config.json`` and ``duo_extra.safetensors`` (only when the
  model owns extra parameters). The result is readable again by ``FullModelHFCheckpointer`` and
  by :func:`load_hf_checkpoint`. LoRA models are saved with merged weights.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from duo_plugin.models.adapters import DecoderDenoiser

__all__ = ["EXTRA_FILE", "load_hf_checkpoint", "save_hf_checkpoint", "hf_weight_files",
           "merged_decoder_state_dict"]

log = logging.getLogger(__name__)

EXTRA_FILE = "duo_extra.safetensors"
WEIGHTS_FILE = "model.safetensors"


def hf_weight_files(checkpoint_dir: Union[str, Path]) -> List[str]:
    """HF weight files of a directory: the shards named by ``model.safetensors.index.json`` if
    present, else every ``*.safetensors`` except ``duo_extra.safetensors``, else ``*.bin``."""
    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        from duo_plugin.errors import UserError
        from duo_plugin.untrusted import check_folder_json

        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            files = sorted(set(data["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a valid HF index ({type(e).__name__}: {e}); re-copy the "
                            "checkpoint") from None
        check_folder_json(data, str(index))
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
        if bad:  # data of the folder: shard names stay inside it
            raise UserError(f"{index}: weight_map names files outside the checkpoint folder ({bad[:3]}); refusing")
    else:
        files = sorted(p.name for p in d.glob("*.safetensors") if p.name != EXTRA_FILE)
        if not files:
            files = sorted(p.name for p in d.glob("*.bin"))
    missing = [f for f in files if not (d / f).exists()]
    if not files or missing:
        raise FileNotFoundError(
            f"no HF weight files found in {d} (expected model*.safetensors or an index file); missing: {missing}"
        )
    return files


def _dims(model: DecoderDenoiser):
    dec = model.decoder
    attn = dec.layers[0].attn
    return dict(num_heads=int(attn.num_heads), num_kv_heads=int(attn.num_kv_heads),
                dim=int(attn.embed_dim), head_dim=int(attn.head_dim))


def load_hf_checkpoint(model: DecoderDenoiser, checkpoint_dir: Union[str, Path], *,
                       checkpoint_files: Optional[Sequence[str]] = None, model_type: Optional[str] = None,
                       load_extra: bool = True) -> DecoderDenoiser:
    """Load HF-format weights from ``checkpoint_dir`` into ``model`` (in place; returns it).

    ``model_type`` defaults to ``model.hf_model_type`` (set by our builders: ``LLAMA3_2``/``QWEN2``).
    The directory needs ``config.json`` (read by torchtune for head counts / tying). Decoder keys
    must match exactly, except LoRA adapter keys, which a base checkpoint does not have.
    ``duo_extra.safetensors`` (adaLN) is loaded when present; otherwise extras keep their zero init.
    """
    from torchtune.training import FullModelHFCheckpointer

    d = Path(checkpoint_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d / 'config.json'} is missing: FullModelHFCheckpointer needs the HF config")
    from duo_plugin.errors import UserError
    from duo_plugin.untrusted import check_folder_json

    try:
        check_folder_json(json.loads((d / "config.json").read_text(encoding="utf-8")), str(d / "config.json"))
    except (ValueError, UnicodeDecodeError) as e:  # the folder's config is data: no code names, valid JSON
        if isinstance(e, UserError):
            raise
        raise UserError(f"{d / 'config.json'} is not valid JSON ({e}); re-copy the checkpoint") from None
    model_type = model_type or getattr(model, "hf_model_type", None)
    if model_type is None:
        raise ValueError("pass model_type= (e.g. 'LLAMA3_2', 'QWEN2'); the model has no hf_model_type")
    files = list(checkpoint_files) if checkpoint_files else hf_weight_files(d)
    with tempfile.TemporaryDirectory(prefix="duo_hf_out_") as out:
        ckpt = FullModelHFCheckpointer(checkpoint_dir=str(d), checkpoint_files=files, model_type=model_type,
                                       output_dir=out)
        sd = ckpt.load_checkpoint()["model"]
        hf_cfg = dict(ckpt._config)
    own = model.decoder.state_dict()
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"checkpoint {d}: tensor {k} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(own[k].shape)} (vocabulary K={model.vocab_size}); build the model with the "
                f"checkpoint's sizes (config.json vocab_size={hf_cfg.get('vocab_size')})"
            )
    res = model.load_decoder_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if "lora_" not in k and not k.endswith(".magnitude")]
    if missing or res.unexpected_keys:
        raise ValueError(f"checkpoint {d} does not match the model: missing {missing[:5]}, "
                         f"unexpected {list(res.unexpected_keys)[:5]}")
    model.hf_config = hf_cfg
    extra_path = d / EXTRA_FILE
    if load_extra and model.extra_state_dict():
        if extra_path.exists():
            model.load_extra_state_dict(load_file(str(extra_path)))
        else:
            log.info("no %s in %s: adaLN parameters keep their zero initialisation", EXTRA_FILE, d)
    return model


def merged_decoder_state_dict(model: DecoderDenoiser,
                              decoder_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Decoder state dict (torchtune keys) with LoRA merged into base weights when the model is LoRA."""
    sd = dict(decoder_state if decoder_state is not None else model.decoder_state_dict())
    lora = getattr(model, "_duo_lora", None)
    if lora is not None or any("lora_" in k for k in sd):
        if lora is None:
            raise ValueError("state dict has LoRA keys but the model has no _duo_lora (rank, alpha)")
        from torchtune.modules.peft import get_merged_lora_ckpt

        sd = get_merged_lora_ckpt({k: v.clone() for k, v in sd.items()}, rank=lora[0], alpha=lora[1])
    return sd


def save_hf_checkpoint(model: DecoderDenoiser, out_dir: Union[str, Path], *,
                       decoder_state: Optional[Dict[str, torch.Tensor]] = None,
                       extra_state: Optional[Dict[str, torch.Tensor]] = None,
                       config: Optional[dict] = None) -> List[str]:
    """Write ``model.safetensors`` (HF keys), ``config.json`` and (if any) ``duo_extra.safetensors``.

    ``decoder_state`` / ``extra_state`` default to the model's own (pass EMA weights here);
    ``config`` defaults to the HF config the model was loaded from or built with. ``out_dir`` is
    created if needed. Returns the written file names.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_type = getattr(model, "hf_model_type", None)
    cfg = copy.deepcopy(config if config is not None else getattr(model, "hf_config", None))
    if model_type is None or cfg is None:
        raise ValueError("model has no hf_model_type/hf_config; build it with duo_plugin.models builders")
    sd = merged_decoder_state_dict(model, decoder_state)
    dims = _dims(model)
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(sd, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **dims)
    else:
        from torchtune.models.convert_weights import tune_to_hf

        hf = tune_to_hf(sd, **dims)
    hf = {k: v.detach().to("cpu").contiguous() for k, v in hf.items()}
    dtype = next(iter(hf.values())).dtype
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    save_file(hf, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    written = [WEIGHTS_FILE, "config.json"]
    extra = extra_state if extra_state is not None else model.extra_state_dict()
    if extra:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.items()}, str(out / EXTRA_FILE),
                  metadata={"format": "pt"})
        written.append(EXTRA_FILE)
    return written
