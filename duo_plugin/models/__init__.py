"""Duo denoisers: the paper's DiT (no torchtune) and torchtune decoders made bidirectional.

Importing this package does not import torchtune; the decoder-family names (``make_denoiser``,
``DecoderDenoiser``, ``duo_llama3_2*``, ``duo_qwen2_5*``, ``duo_lora_*``, HF checkpoint I/O) are
loaded lazily on first access.
"""

from duo_plugin.models.checkpoint import load_pretrained, save_pretrained
from duo_plugin.models.dit import DiT, SoftTopK, duo_dit_medium, duo_dit_small, duo_dit_tiny

_LAZY = {
    "DecoderDenoiser": "duo_plugin.models.adapters",
    "SoftInputEmbedding": "duo_plugin.models.adapters",
    "make_denoiser": "duo_plugin.models.adapters",
    "duo_llama3_2": "duo_plugin.models.builders",
    "duo_llama3_2_1b": "duo_plugin.models.builders",
    "duo_qwen2_5": "duo_plugin.models.builders",
    "duo_qwen2_5_0_5b": "duo_plugin.models.builders",
    "duo_lora_llama3_2": "duo_plugin.models.builders",
    "duo_lora_qwen2_5": "duo_plugin.models.builders",
    "load_hf_checkpoint": "duo_plugin.models.hf_checkpoint",
    "save_hf_checkpoint": "duo_plugin.models.hf_checkpoint",
}

__all__ = ["DiT", "SoftTopK", "duo_dit_tiny", "duo_dit_small", "duo_dit_medium", "save_pretrained",
           "load_pretrained", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'duo_plugin.models' has no attribute {name!r}")
