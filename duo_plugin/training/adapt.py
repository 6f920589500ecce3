"""Moved to :mod:`duo_plugin.objectives.adapt` (top-k curriculum input, attention annealing); re-exported here.

Defined here: :func:`architecture_from_hf_config` — the decoder's shape read from an HF checkpoint's ``config.json``
(so the adapt configs need no ``model.*`` size overrides for another checkpoint of the family).
"""

from __future__ import annotations

from duo_plugin.objectives.adapt import (  # noqa: F401
    anneal_progress,
    annealed_attention_mask,
    describe_valid_vocab,
    top_order_statistics,
    topk_curriculum_inputs,
)

__all__ = ["topk_curriculum_inputs", "top_order_statistics", "anneal_progress", "annealed_attention_mask",
           "describe_valid_vocab", "architecture_from_hf_config"]


# ----------------------------------------------------------------------------------------------------------------
# Architecture from an HF checkpoint's config.json
# ----------------------------------------------------------------------------------------------------------------
#: HF ``config.json`` key -> duo builder argument (``duo_plugin.models.duo_llama3_2`` / ``duo_qwen2_5`` and LoRA twins)
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "hidden_size": "embed_dim",
    "intermediate_size": "intermediate_dim",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_base",
    "tie_word_embeddings": "tie_word_embeddings",
}
_FAMILIES = {"llama": "llama", "qwen2": "qwen"}


def architecture_from_hf_config(config: dict, *, component: str | None = None,
                                where: str = "config.json") -> dict:
    """Builder kwargs for the decoder described by an HF ``config.json`` (``model_type`` llama or qwen2).

    Keys the file lacks are left to the builder's defaults.  ``component`` (the config's ``model._component_``) is
    checked against the family: a Qwen checkpoint with a Llama builder (or vice versa) is a
    :class:`~duo_plugin.errors.UserError` naming the builder to use.
    """
    from duo_plugin.errors import UserError

    mt = str(config.get("model_type") or "")
    fam = _FAMILIES.get(mt)
    if component is not None and fam is not None:
        comp = str(component).rsplit(".", 1)[-1]
        want = "llama3_2" if fam == "llama" else "qwen2_5"
        if ("llama" in comp or "qwen" in comp) and want not in comp:
            lora = "lora_" if "lora" in comp else ""
            raise UserError(f"{where} has model_type={mt!r} but model._component_={component}; set "
                            f"model._component_=duo_plugin.models.duo_{lora}{want}")
    arch = {dst: config[src] for src, dst in _HF_KEYS.items() if config.get(src) is not None}
    if fam == "llama":
        rs = config.get("rope_scaling") or {}
        if isinstance(rs, dict) and rs.get("factor") is not None:
            arch["scale_factor"] = int(rs["factor"]) if float(rs["factor"]).is_integer() else rs["factor"]
    for k in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim"):
        if k in arch:
            arch[k] = int(arch[k])
    for k in ("norm_eps", "rope_base"):
        if k in arch:
            arch[k] = float(arch[k])
    if "tie_word_embeddings" in arch:
        arch["tie_word_embeddings"] = bool(arch["tie_word_embeddings"])
    return arch
