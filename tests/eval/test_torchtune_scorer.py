"""Gen PPL scorer from a torchtune builder + HF-format checkpoint (written here from a random tiny Llama-3.2)."""

from __future__ import annotations

import json
import math

import torch

KW = dict(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=64)


def test_torchtune_scorer_roundtrip_and_gen_ppl(tmp_path):
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.models.llama3_2 import llama3_2

    from duo_plugin.eval.genppl import causal_nll
    from duo_plugin.integrations.torchtune_scorer import load_torchtune_scorer

    torch.manual_seed(0)
    ref = llama3_2(**KW).eval()
    hf = tune_to_hf(ref.state_dict(), num_heads=2, num_kv_heads=1, dim=32)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 32, "tie_word_embeddings": True}))
    scorer = load_torchtune_scorer("torchtune.models.llama3_2.llama3_2", tmp_path, model_type="LLAMA3_2",
                                   builder_kwargs=KW)
    toks = torch.randint(0, 63, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(toks)
    got = scorer(toks)
    assert got.shape == (2, 9, 64) and torch.allclose(got, expected, atol=1e-5)
    # causal NLL of one sequence equals the hand sum of -log softmax at the next tokens
    seq = toks[0].tolist()
    total, n = causal_nll(scorer, [seq], eos_id=63, batch_size=1)
    lp = torch.log_softmax(expected[0].double(), -1)
    hand = -sum(float(lp[i, seq[i + 1]]) for i in range(8))
    assert n == 8 and math.isclose(total, hand, rel_tol=1e-5)
