"""duo_generate on an AR model folder (objective ``ar``): left-to-right KV-cache decoding whose samples equal a plain
no-cache loop (full causal forward on the prefix at every step) with the per-row generators of the seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.data.tokenizers import train_sentencepiece
from duo_plugin.diffusion.uniform import row_generators, sample_categorical
from duo_plugin.models.checkpoint import load_pretrained, save_pretrained
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.sampling.ar_decode import filter_next_token
from duo_plugin.training.recipe_utils import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
L = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar_gen")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"The king of line {i} spoke to the queen {i % 5} times." for i in range(40)))
    tok = train_sentencepiece([corpus], 300, root / "tok", hard_vocab_limit=False)
    torch.manual_seed(0)
    model = duo_dit_tiny(tok.vocab_size, L, causal=True, time_conditioning=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the output layer is zero-initialised (uniform law): random weights give a real law
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    valid = torch.ones(tok.vocab_size, dtype=torch.bool)
    valid[tok.bos_id] = False
    save_pretrained(model, root / "ar", metadata={"seq_len": L, "tokenizer": tok.descriptor(), "valid_vocab": valid,
                                                  "objective": "ar"})
    tok.save(root / "ar" / "tokenizer")
    return root, tok


def _cfg(**over):
    cfg = OmegaConf.load(CONFIGS / "generate.yaml")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def _ids(out):
    return [json.loads(x)["ids"] for x in (out / "samples.jsonl").read_text().splitlines()]


def _reference(root, prompt, n, seed, **law):
    model = load_pretrained(root / "ar", weights="ema")
    gens = row_generators(seed, 0, range(n))
    z = torch.tensor(prompt).expand(n, -1).clone()
    with torch.no_grad():
        while z.shape[1] < L:
            lp = model(z, torch.zeros(n))[:, -1]
            nxt = sample_categorical(filter_next_token(lp, valid_vocab=model.valid_vocab, **law), gens)
            z = torch.cat([z, nxt[:, None]], 1)
    return z.tolist()


def test_unconditional_and_prompted_equal_the_no_cache_loop(ckpt):
    from duo_plugin.recipes.duo_generate import run

    root, tok = ckpt
    out = root / "u"
    m = run(_cfg(checkpoint=str(root / "ar"), output_dir=str(out), steps=3, num_samples=5, batch_size=2,
                 progress_bar=False, seed=4))
    assert _ids(out) == _reference(root, [tok.bos_id], 5, 4)
    assert m["objective"] == "ar" and m["process"] == "causal" and m["nfe"] == L - 1
    out = root / "p"
    prompt = [tok.bos_id] + tok.encode("The king", add_bos=False, add_eos=False)
    m = run(_cfg(checkpoint=str(root / "ar"), output_dir=str(out), steps=3, num_samples=3, progress_bar=False,
                 prompts=["The king"], top_p=0.8, temperature=0.9))
    assert _ids(out) == _reference(root, prompt, 3, 0, top_p=0.8, temperature=0.9)
    assert m["nfe"] == L - len(prompt)


def test_diffusion_only_options_are_errors(ckpt):
    from duo_plugin.recipes.duo_generate import run

    root, _ = ckpt
    with pytest.raises(ValueError, match="objective: ar"):
        run(_cfg(checkpoint=str(root / "ar"), output_dir=str(root / "x"), steps=3, num_samples=1,
                 infill="The [MASK:2] queen", progress_bar=False))
    with pytest.raises(ValueError, match="objective: ar"):
        run(_cfg(checkpoint=str(root / "ar"), output_dir=str(root / "y"), steps=3, num_samples=1,
                 predictor="psi", progress_bar=False))
