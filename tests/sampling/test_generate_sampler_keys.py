"""duo_generate's sampler keys (predictor / psi / guidance_weight / blocks / variable_length) end to end on a tiny
random DiT checkpoint written here; the recipe's samples equal direct library calls with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.data.tokenizers import train_sentencepiece
from duo_plugin.models.checkpoint import load_pretrained, save_pretrained
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.training.recipe_utils import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
L = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("duo_gen_keys")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"The king of line {i} spoke to the queen {i % 5} times." for i in range(40)))
    tok = train_sentencepiece([corpus], 300, root / "tok", hard_vocab_limit=False)
    torch.manual_seed(0)
    model = duo_dit_tiny(tok.vocab_size, L)
    valid = torch.ones(tok.vocab_size, dtype=torch.bool)
    valid[tok.bos_id] = False
    save_pretrained(model, root / "duo", metadata={"seq_len": L, "tokenizer": tok.descriptor(), "valid_vocab": valid})
    tok.save(root / "duo" / "tokenizer")
    return root, tok


def _cfg(**over):
    cfg = OmegaConf.load(CONFIGS / "generate.yaml")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def _rows(out):
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def test_psi_guidance_blocks_and_variable_length(ckpt):
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.recipes.duo_generate import run
    from duo_plugin.sampling import DenoiserFn, PsiSchedule, sample_blocks, trim_at_eos

    root, tok = ckpt
    out = root / "g1"
    m = run(_cfg(checkpoint=str(root / "duo"), output_dir=str(out), steps=4, num_samples=3, progress_bar=False,
                 predictor="psi", prompts=["The king"], guidance_weight=2.0, **{"blocks.n_blocks": 2,
                 "blocks.block_len": 4, "psi.high_mode": "pure-pc", "psi.high_frac": 0.4}, variable_length=True))
    rows = _rows(out)
    assert m["nfe"] == 3 * (4 + 1) * 2 and m["tokens_per_sample"] <= L + 2 * 4 and m["predictor"] == "psi"
    model = load_pretrained(root / "duo", weights="ema")
    pids = torch.tensor([tok.bos_id] + tok.encode("The king", add_bos=False, add_eos=False))
    ref = sample_blocks(DenoiserFn(model), LogLinearSchedule(1e-3), batch_size=3, seq_len=L,
                        vocab_size=model.vocab_size, steps=4, prompt=pids, valid_vocab=model.valid_vocab, seed=0,
                        predictor="psi", psi=PsiSchedule("pure-pc", "max-capped-0.01", "max-capped-0.01", 0.4, 0.0),
                        guidance_weight=2.0, n_blocks=2, block_len=4, eos_id=tok.eos_id, progress=False)
    trimmed, lengths = trim_at_eos(ref.tokens, tok.eos_id, start=len(pids))
    assert [r["ids"] for r in rows] == trimmed and [r["length"] for r in rows] == lengths.tolist()
    assert all(r["ids"][: len(pids)] == pids.tolist() for r in rows)


def test_bad_sampler_keys_fail_with_the_key_name(ckpt, tmp_path):
    from duo_plugin.recipes.duo_generate import run

    root, _ = ckpt
    base = dict(checkpoint=str(root / "duo"), output_dir=str(tmp_path), steps=2, num_samples=1, progress_bar=False)
    with pytest.raises(ConfigError, match="psi: unknown Ψ mode"):
        run(_cfg(predictor="psi", **{"psi.low_mode": "max-capped"}, **base))
    with pytest.raises(ConfigError, match="predictor"):
        run(_cfg(predictor="remdm", **base))
    with pytest.raises(ConfigError, match="block_len"):
        run(_cfg(**{"blocks.n_blocks": 2}, **base))
    with pytest.raises(ConfigError, match="did you mean|high_mode"):
        run(_cfg(**{"psi.hi_mode": "pure-pc"}, **base))
