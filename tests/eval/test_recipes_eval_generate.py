"""duo_generate / duo_eval run end to end on a tiny random DiT checkpoint written in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.data.tokenizers import train_sentencepiece
from duo_plugin.models.checkpoint import save_pretrained
from duo_plugin.models.dit import duo_dit_tiny

CONFIGS = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
TEXT = "\n\n".join(
    f"The king of paragraph {i} spoke to the queen, and the queen answered him with {i % 7} words." for i in range(60)
)
L = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("duo_recipes")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    tok = train_sentencepiece([corpus], 300, root / "tok", hard_vocab_limit=False)
    torch.manual_seed(0)
    model = duo_dit_tiny(tok.vocab_size, L)
    valid = torch.ones(tok.vocab_size, dtype=torch.bool)
    valid[tok.bos_id] = False  # BOS never produced by noise (exercises clamped ids outside valid_vocab)
    save_pretrained(model, root / "duo", metadata={"seq_len": L, "tokenizer": tok.descriptor(), "valid_vocab": valid})
    tok.save(root / "duo" / "tokenizer")
    ar = duo_dit_tiny(tok.vocab_size, 64, causal=True)
    save_pretrained(ar, root / "ar", metadata={"seq_len": 64, "objective": "ar"})
    tok.save(root / "ar" / "tokenizer")
    return {"root": root, "tok": tok, "corpus": corpus}


def _cfg(name, **over):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def test_generate_unconditional_prompt_infill_and_genppl(assets):
    from duo_plugin.recipes.duo_generate import run

    root, tok = assets["root"], assets["tok"]
    out = root / "gen"
    m = run(_cfg("generate", checkpoint=str(root / "duo"), output_dir=str(out), steps=4, num_samples=3, batch_size=2,
                 progress_bar=False, **{"genppl.path": str(root / "ar")}))
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["ids"]) == L and r["steps"] == 4 and r["mode"] == "ancestral" for r in rows)
    assert m["nfe"] == 5 and 0 <= m["entropy"] <= torch.log(torch.tensor(float(L))).item() + 1e-9
    assert m["gen_ppl"] > 1 and m["gen_ppl_tokens"] > 0
    assert not any(tok.bos_id in r["ids"] for r in rows)  # outside valid_vocab, never sampled

    prompt = "The king"
    m = run(_cfg("generate", checkpoint=str(root / "duo"), output_dir=str(out / "p"), steps=3, num_samples=2,
                 noise_removal="greedy", prompts=[prompt, "the queen"], progress_bar=False))
    rows = [json.loads(x) for x in (out / "p" / "samples.jsonl").read_text().splitlines()]
    ids = [tok.bos_id] + tok.encode(prompt)
    assert len(rows) == 4 and all(r["ids"][: len(ids)] == ids for r in rows[:2]) and rows[2]["prompt"] == "the queen"
    assert m["nfe"] == 4

    run(_cfg("generate", checkpoint=str(root / "duo"), output_dir=str(out / "i"), steps=3, num_samples=2,
             infill="The king [MASK:3] the queen", progress_bar=False))
    rows = [json.loads(x) for x in (out / "i" / "samples.jsonl").read_text().splitlines()]
    a, b = [tok.bos_id] + tok.encode("The king "), tok.encode(" the queen")
    for r in rows:
        assert r["ids"][: len(a)] == a and r["ids"][len(a) + 3 : len(a) + 3 + len(b)] == b


def test_eval_files_and_zeroshot(assets):
    from duo_plugin.recipes.duo_eval import run

    root = assets["root"]
    m = run(_cfg("eval_ppl", checkpoint=str(root / "duo"), output_dir=str(root / "ev"), progress_bar=False,
                 mc_passes=2, batch_size=8, **{"dataset.source": "files", "dataset.files": [str(assets["corpus"])],
                                               "dataset.val_fraction": 0.25, "dataset.cache_dir": str(root / "c")}))
    r = m["sets"]["files"]
    assert r["passes"] == 2 and r["tokens"] > 0 and r["stderr"] > 0 and r["ppl"] > 1
    assert json.loads((root / "ev" / "metrics.json").read_text())["sets"]["files"]["ppl"] == r["ppl"]
    # content-token headline with the all-token figure, estimator and pass count beside it
    assert r["tokens"] < r["tokens_all"] and r["ppl_all_tokens"] < r["ppl"] and "pass" in r["estimator"]
    # an untrained model is near the uniform prior: its NELBO per token is about log K (well within 2x)
    k = assets["tok"].vocab_size - 1
    assert 0.5 * torch.log(torch.tensor(float(k))) < r["nll_per_token"] < 2 * torch.log(torch.tensor(float(k)))

    ptb = root / "ptb.jsonl"
    ptb.write_text("\n".join(json.dumps({"sentence": f"the king 's N words , {i}"}) for i in range(5)))
    m = run(_cfg("eval_ppl", checkpoint=str(root / "duo"), output_dir=str(root / "zs"), progress_bar=False,
                 **{"dataset.source": "zeroshot", "dataset.name": "ptb", "dataset.data_files": [str(ptb)]}))
    assert m["sets"]["ptb"]["tokens"] > 0


def test_generate_and_eval_reject_misspelled_keys(tmp_path):
    """A typo (``step=8``) is an error naming the closest valid key, before any checkpoint is loaded."""
    from duo_plugin.recipes import duo_eval, duo_generate
    from duo_plugin.training.recipe_utils import ConfigError

    with pytest.raises(ConfigError, match=r"unknown config key 'step': did you mean 'steps'\?"):
        duo_generate.run(_cfg("generate", output_dir=str(tmp_path / "g"), step=8))
    with pytest.raises(ConfigError, match=r"'genppl.max_length'.*did you mean 'genppl.max_len'"):
        duo_generate.run(_cfg("generate", output_dir=str(tmp_path / "g"), **{"genppl.max_length": 8}))
    with pytest.raises(ConfigError, match=r"unknown config key 'mc_pass': did you mean 'mc_passes'"):
        duo_eval.run(_cfg("eval_ppl", output_dir=str(tmp_path / "e"), mc_pass=4))
    with pytest.raises(ConfigError, match=r"'dataset.names'.*did you mean 'dataset.name'"):
        duo_eval.run(_cfg("eval_zeroshot", output_dir=str(tmp_path / "e"), **{"dataset.names": "ptb"}))
    assert not (tmp_path / "g").exists() and not (tmp_path / "e").exists()


def test_shipped_generate_and_eval_configs_validate():
    """The shipped configs, with the overrides README.md "Sample and measure" shows, pass the key check."""
    from duo_plugin.recipes import duo_eval, duo_generate

    duo_generate.validate_config(_cfg("generate"))
    duo_generate.validate_config(_cfg("generate", steps=64, noise_removal="greedy", prompts=["To be"]))
    duo_generate.validate_config(_cfg("generate", infill="The king [MASK:6] the queen"))
    duo_eval.validate_config(_cfg("eval_ppl", mc_passes=4))
    duo_eval.validate_config(_cfg("eval_zeroshot", **{"dataset.name": "ptb", "dataset.data_files": ["ptb.jsonl"]}))


@pytest.mark.slow
def test_cli_entry_points(assets):
    root = assets["root"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "duo_plugin.recipes.duo_generate", "--config", str(CONFIGS / "generate.yaml"),
           f"checkpoint={root / 'duo'}", f"output_dir={root / 'cli'}", "steps=2", "num_samples=2", "progress_bar=False"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len((root / "cli" / "samples.jsonl").read_text().splitlines()) == 2
    assert json.loads((root / "cli" / "metrics.json").read_text())["nfe"] == 3
