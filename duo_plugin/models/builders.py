"""Config-usable builders of Duo denoisers from torchtune decoders (Llama-3.2, Qwen-2.5 shapes).

Every builder returns a :class:`~duo_plugin.models.adapters.DecoderDenoiser` and records
``model._duo_builder = (dotpath, kwargs)`` so :func:`duo_plugin.models.checkpoint.save_pretrained`
can save it without extra arguments. The model also carries ``hf_model_type`` (torchtune
``ModelType`` name for ``FullModelHFCheckpointer``) and ``hf_config`` (a minimal HF ``config.json``).

LoRA builders (``duo_lora_*``) record their non-LoRA twin in ``model._duo_full_builder``; a LoRA
model is saved with merged weights and reloads as the full model.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.models.qwen2 import lora_qwen2, qwen2

from duo_plugin.models.adapters import DecoderDenoiser, make_denoiser
from duo_plugin.models.dit import record_builder

__all__ = [
    "duo_llama3_2",
    "duo_llama3_2_1b",
    "duo_qwen2_5",
    "duo_qwen2_5_0_5b",
    "duo_lora_llama3_2",
    "duo_lora_qwen2_5",
]

_LLAMA3_2_1B = dict(vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
                    max_seq_len=131072, intermediate_dim=8192, attn_dropout=0.0, norm_eps=1e-5,
                    rope_base=500_000, scale_factor=32, tie_word_embeddings=True)
_QWEN2_5_0_5B = dict(vocab_size=151936, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896,
                     intermediate_dim=4864, max_seq_len=32768, attn_dropout=0.0, norm_eps=1e-6,
                     rope_base=1_000_000.0, tie_word_embeddings=True)


def _hf_config_common(model: DecoderDenoiser, *, num_heads: int, num_kv_heads: int, embed_dim: int,
                      max_seq_len: int, norm_eps: float, rope_base: float, tie: bool) -> Dict[str, Any]:
    dec = model.decoder
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": embed_dim,
        "intermediate_size": int(dec.layers[0].mlp.w1.out_features) if hasattr(dec.layers[0].mlp.w1, "out_features")
        else int(dec.layers[0].mlp.w1.weight.shape[0]),
        "num_hidden_layers": len(dec.layers),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": embed_dim // num_heads,
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": norm_eps,
        "rope_theta": float(rope_base),
        "tie_word_embeddings": bool(tie),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def _finish_llama(model: DecoderDenoiser, cfg: Dict[str, Any]) -> DecoderDenoiser:
    hf = _hf_config_common(model, num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"],
                           embed_dim=cfg["embed_dim"], max_seq_len=cfg["max_seq_len"],
                           norm_eps=cfg["norm_eps"], rope_base=cfg["rope_base"],
                           tie=cfg["tie_word_embeddings"])
    hf.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": {"factor": float(cfg["scale_factor"]), "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                         "rope_type": "llama3"},
    })
    model.hf_model_type = "LLAMA3_2"
    model.hf_config = hf
    return model


def _finish_qwen(model: DecoderDenoiser, cfg: Dict[str, Any]) -> DecoderDenoiser:
    hf = _hf_config_common(model, num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"],
                           embed_dim=cfg["embed_dim"], max_seq_len=cfg["max_seq_len"],
                           norm_eps=cfg["norm_eps"], rope_base=cfg["rope_base"],
                           tie=cfg["tie_word_embeddings"])
    hf.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
               "sliding_window": cfg["max_seq_len"]})
    model.hf_model_type = "QWEN2"
    model.hf_config = hf
    return model


@record_builder
def duo_llama3_2(vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                 max_seq_len: int, intermediate_dim: Optional[int] = None, attn_dropout: float = 0.0,
                 rope_base: int = 500_000, norm_eps: float = 1e-5, scale_factor: int = 32,
                 tie_word_embeddings: bool = True, time_conditioning: bool = False, shift: bool = False,
                 cond_dim: int = 128, causal: bool = False) -> DecoderDenoiser:
    """Llama-3.2-family denoiser: ``torchtune.models.llama3_2.llama3_2(...)`` + :func:`make_denoiser`
    (``causal=True``: the AR baseline on the same architecture, saved as a plain Llama HF checkpoint)."""
    cfg = dict(locals())
    dec = llama3_2(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, embed_dim=embed_dim, max_seq_len=max_seq_len,
                   attn_dropout=attn_dropout, rope_base=rope_base, intermediate_dim=intermediate_dim,
                   norm_eps=norm_eps, scale_factor=scale_factor, tie_word_embeddings=tie_word_embeddings)
    model = make_denoiser(dec, time_conditioning=time_conditioning, shift=shift, cond_dim=cond_dim, causal=causal)
    return _finish_llama(model, cfg)


@record_builder
def duo_llama3_2_1b(**opts: Any) -> DecoderDenoiser:
    """Llama-3.2-1B shape (K = 128,256, 16 x 2048, tied); ``opts`` override any :func:`duo_llama3_2` arg
    (e.g. ``max_seq_len=2048, time_conditioning=True``)."""
    return duo_llama3_2(**{**_LLAMA3_2_1B, **opts})


@record_builder
def duo_qwen2_5(vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                max_seq_len: int, intermediate_dim: int, attn_dropout: float = 0.0, norm_eps: float = 1e-6,
                rope_base: float = 1_000_000.0, tie_word_embeddings: bool = True,
                time_conditioning: bool = False, shift: bool = False, cond_dim: int = 128) -> DecoderDenoiser:
    """Qwen-2/2.5-family denoiser: ``torchtune.models.qwen2.qwen2(...)`` + :func:`make_denoiser`."""
    cfg = dict(locals())
    dec = qwen2(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                attn_dropout=attn_dropout, norm_eps=norm_eps, rope_base=rope_base,
                tie_word_embeddings=tie_word_embeddings)
    model = make_denoiser(dec, time_conditioning=time_conditioning, shift=shift, cond_dim=cond_dim)
    return _finish_qwen(model, cfg)


@record_builder
def duo_qwen2_5_0_5b(**opts: Any) -> DecoderDenoiser:
    """Qwen-2.5-0.5B shape (K = 151,936, 24 x 896, tied); ``opts`` override any :func:`duo_qwen2_5` arg."""
    return duo_qwen2_5(**{**_QWEN2_5_0_5B, **opts})


_LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
              "lora_dropout", "use_dora", "quantize_base")
_DENOISER_KEYS = ("time_conditioning", "shift", "cond_dim")
_LORA_POSITIONAL = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output")


def _build_lora(lora_decoder: Callable[..., Any], finish: Callable[[DecoderDenoiser, Dict[str, Any]], Any],
                full_builder: str, cfg: Dict[str, Any]) -> DecoderDenoiser:
    """Body of the ``duo_lora_*`` builders (``cfg``: the builder's arguments): ``lora_decoder(modules, mlp,
    output, **every other decoder argument)`` + :func:`make_denoiser` + ``finish``; records the full twin."""
    if cfg["quantize_base"]:
        raise ValueError("quantize_base=True is not supported by duo_plugin's save/load (NF4 weights)")
    dec_kwargs = {k: v for k, v in cfg.items() if k not in _LORA_POSITIONAL + _DENOISER_KEYS}
    dec = lora_decoder(list(cfg["lora_attn_modules"]), cfg["apply_lora_to_mlp"], cfg["apply_lora_to_output"],
                       **dec_kwargs)
    model = make_denoiser(dec, time_conditioning=cfg["time_conditioning"], shift=cfg["shift"],
                          cond_dim=cfg["cond_dim"])
    finish(model, cfg)
    full_kwargs = {k: v for k, v in cfg.items() if k not in _LORA_KEYS}
    model._duo_full_builder = (full_builder, full_kwargs)
    model._duo_lora = (int(cfg["lora_rank"]), float(cfg["lora_alpha"]))
    return model


@record_builder
def duo_lora_llama3_2(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                      apply_lora_to_output: bool = False, *, vocab_size: int, num_layers: int, num_heads: int,
                      num_kv_heads: int, embed_dim: int, max_seq_len: int,
                      intermediate_dim: Optional[int] = None, attn_dropout: float = 0.0,
                      norm_eps: float = 1e-5, rope_base: int = 500_000, scale_factor: int = 32,
                      lora_rank: int, lora_alpha: float, lora_dropout: float = 0.0, use_dora: bool = False,
                      quantize_base: bool = False, tie_word_embeddings: bool = True,
                      time_conditioning: bool = False, shift: bool = False, cond_dim: int = 128) -> DecoderDenoiser:
    """LoRA Llama-3.2 denoiser (``torchtune.models.llama3_2.lora_llama3_2``). Only LoRA (and adaLN)
    parameters should be trained: use ``torchtune.modules.peft.set_trainable_params`` with
    ``get_adapter_params(model)`` and add ``model.extra_state_dict()`` params if time-conditioned."""
    return _build_lora(lora_llama3_2, _finish_llama, f"{__name__}.duo_llama3_2", dict(locals()))


@record_builder
def duo_lora_qwen2_5(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                     apply_lora_to_output: bool = False, *, vocab_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, embed_dim: int, intermediate_dim: int, max_seq_len: int,
                     attn_dropout: float = 0.0, norm_eps: float = 1e-6, rope_base: float = 1_000_000.0,
                     tie_word_embeddings: bool = True, lora_rank: int, lora_alpha: float,
                     lora_dropout: float = 0.0, use_dora: bool = False, quantize_base: bool = False,
                     time_conditioning: bool = False, shift: bool = False, cond_dim: int = 128) -> DecoderDenoiser:
    """LoRA Qwen-2.5 denoiser (``torchtune.models.qwen2.lora_qwen2``); see :func:`duo_lora_llama3_2`."""
    return _build_lora(lora_qwen2, _finish_qwen, f"{__name__}.duo_qwen2_5", dict(locals()))
