import json

import pytest
import torch

LLAMA = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
             intermediate_dim=48)
QWEN = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=32,
            intermediate_dim=48, tie_word_embeddings=True)


def randomize_(module, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def plain_decoder(family):
    """A stock torchtune decoder (causal, untouched) of the tiny test shape."""
    if family == "llama":
        from torchtune.models.llama3_2 import llama3_2

        return llama3_2(**LLAMA)
    from torchtune.models.qwen2 import qwen2

    return qwen2(**QWEN)


def write_hf_checkpoint(decoder, family, out_dir):
    """Write a tiny HF-format checkpoint (torchtune's FullModelHFCheckpointer format): HF keys + safetensors + minimal config.json."""
    from safetensors.torch import save_file

    cfg = LLAMA if family == "llama" else QWEN
    sd = {k: v.clone() for k, v in decoder.state_dict().items()}
    dims = dict(num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"], dim=cfg["embed_dim"])
    if family == "llama":
        from torchtune.models.convert_weights import tune_to_hf

        hf = tune_to_hf(sd, **dims)
    else:
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(sd, tie_word_embeddings=True, **dims)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({
        "num_attention_heads": cfg["num_heads"], "num_key_value_heads": cfg["num_kv_heads"],
        "hidden_size": cfg["embed_dim"], "tie_word_embeddings": True, "vocab_size": cfg["vocab_size"]}))
    return out_dir


def duo_builder(family, **kw):
    from duo_plugin.models import duo_llama3_2, duo_qwen2_5

    return (duo_llama3_2 if family == "llama" else duo_qwen2_5)(**(LLAMA if family == "llama" else QWEN), **kw)


@pytest.fixture
def helpers():
    class H:
        pass

    h = H()
    h.randomize_ = randomize_
    h.plain_decoder = plain_decoder
    h.write_hf_checkpoint = write_hf_checkpoint
    h.duo_builder = duo_builder
    h.LLAMA, h.QWEN = LLAMA, QWEN
    return h
