"""duo_generate on an MDLM model folder (objective ``mdlm`` in its metadata): the recipe samples the absorbing
process, and its samples equal direct ``sampling.mdlm.sample_mdlm`` calls with the same seed (unconditional, in
chunks, and with a prompt clamped as unmasked tokens), and Ψ / guidance / blocks equal the library's absorbing
schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.data.tokenizers import train_sentencepiece
from duo_plugin.models.checkpoint import load_pretrained, save_pretrained
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.sampling import Clamp

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
L = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdlm_gen")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"The king of line {i} spoke to the queen {i % 5} times." for i in range(40)))
    tok = train_sentencepiece([corpus], 300, root / "tok", hard_vocab_limit=False)
    torch.manual_seed(0)
    W = tok.vocab_size + 1  # the [MASK] row is the last one
    model = duo_dit_tiny(W, L)
    valid = torch.ones(W, dtype=torch.bool)
    valid[tok.bos_id] = False
    valid[W - 1] = False
    save_pretrained(model, root / "mdlm", metadata={"seq_len": L, "tokenizer": tok.descriptor(), "valid_vocab": valid,
                                                    "objective": "mdlm"})
    tok.save(root / "mdlm" / "tokenizer")
    return root, tok


def _cfg(**over):
    cfg = OmegaConf.load(CONFIGS / "generate.yaml")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def _ids(out):
    return [json.loads(x)["ids"] for x in (out / "samples.jsonl").read_text().splitlines()]


def _library(root, **kw):
    from duo_plugin.diffusion.absorbing import AbsorbingProcess
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.sampling import DenoiserFn
    from duo_plugin.sampling.mdlm import sample_mdlm

    model = load_pretrained(root / "mdlm", weights="ema")
    W = int(model.vocab_size)
    process = AbsorbingProcess(W, W - 1, valid_vocab=model.valid_vocab, schedule=LogLinearSchedule(1e-3))
    return sample_mdlm(DenoiserFn(model), process, seq_len=L, **kw), W


@pytest.mark.parametrize("mode", ["greedy", "ancestral"])
def test_unconditional_matches_library_in_chunks(ckpt, mode):
    from duo_plugin.recipes.duo_generate import run

    root, tok = ckpt
    out = root / f"u_{mode}"
    m = run(_cfg(checkpoint=str(root / "mdlm"), output_dir=str(out), steps=6, num_samples=5, batch_size=2,
                 noise_removal=mode, progress_bar=False))
    ref, W = _library(root, batch_size=5, steps=6, noise_removal=mode, seed=0)  # one batch of 5 vs chunks of 2
    assert _ids(out) == ref.tolist()
    assert m["process"] == "absorbing" and m["objective"] == "mdlm" and m["nfe"] <= 6 + 1
    assert all(0 <= t < W - 1 and t != tok.bos_id for row in _ids(out) for t in row)  # no [MASK], no invalid id


def test_prompt_is_clamped_and_matches_library(ckpt):
    from duo_plugin.recipes.duo_generate import run

    root, tok = ckpt
    out = root / "p"
    run(_cfg(checkpoint=str(root / "mdlm"), output_dir=str(out), steps=4, num_samples=3, prompts=["The king"],
             seed=5, progress_bar=False))
    pids = [tok.bos_id] + tok.encode("The king", add_bos=False, add_eos=False)
    cm = torch.zeros(L, dtype=torch.bool)
    cm[: len(pids)] = True
    cv = torch.zeros(L, dtype=torch.long)
    cv[: len(pids)] = torch.tensor(pids)
    ref, _ = _library(root, batch_size=3, steps=4, noise_removal="ancestral", seed=5, clamp=Clamp(cm, cv))
    rows = _ids(out)
    assert rows == ref.tolist()
    assert all(r[: len(pids)] == pids for r in rows)


def test_psi_guidance_and_blocks_for_mdlm_match_the_library(ckpt):
    """One loop for every process: Ψ (ReMDM-style remasking), prompt guidance and block generation run on an MDLM
    folder and equal the library's absorbing schedulers driven by hand with the same seed."""
    from duo_plugin.diffusion.absorbing import AbsorbingProcess
    from duo_plugin.diffusion.schedules import LogLinearSchedule
    from duo_plugin.recipes.duo_generate import run
    from duo_plugin.sampling import AbsorbingPsiScheduler, DenoiserFn, PsiSchedule, SamplerOptions, sample_blocks

    root, tok = ckpt
    out = root / "psi"
    m = run(_cfg(checkpoint=str(root / "mdlm"), output_dir=str(out), steps=4, num_samples=3, prompts=["The king"],
                 predictor="psi", guidance_weight=1.5, progress_bar=False, **{"blocks.n_blocks": 1,
                 "blocks.block_len": 4, "psi.high_mode": "max-capped-0.2", "psi.middle_mode": "constant-remdm-0.05",
                 "psi.low_mode": "pure-pc", "psi.high_frac": 0.4, "psi.middle_frac": 0.2}))
    model = load_pretrained(root / "mdlm", weights="ema")
    W = int(model.vocab_size)
    psi = PsiSchedule("max-capped-0.2", "constant-remdm-0.05", "pure-pc", 0.4, 0.2)
    sched = AbsorbingPsiScheduler(AbsorbingProcess(W, W - 1, model.valid_vocab, LogLinearSchedule(1e-3)), psi,
                                  guidance_weight=1.5)
    pids = torch.tensor([tok.bos_id] + tok.encode("The king", add_bos=False, add_eos=False))
    ref = sample_blocks(DenoiserFn(model), sched, batch_size=3, seq_len=L, n_blocks=1, block_len=4, prompt=pids,
                        seed=0, options=SamplerOptions(steps=4, progress=False))
    assert _ids(out) == ref.tokens.tolist()
    assert m["process"] == "absorbing" and m["predictor"] == "psi" and m["nfe"] == 2 * 2 * (4 + 1)
    assert all(0 <= t < W - 1 for row in _ids(out) for t in row)  # no [MASK] left


def test_uniform_draw_paths_are_refused_for_mdlm(ckpt, tmp_path):
    from duo_plugin.recipes.duo_generate import run

    root, _ = ckpt
    base = dict(checkpoint=str(root / "mdlm"), output_dir=str(tmp_path), steps=2, num_samples=1, progress_bar=False)
    with pytest.raises(ValueError, match="posterior_impl=auto"):
        run(_cfg(posterior_impl="chunked", **base))
