"""Full-size, end to end on CPU (slow): random-weight checkpoints in the official layouts at the published size
(hidden 768, 12 blocks, 12 heads, cond 128, K = 50,258, L = 1,024) are converted and put through the commands of
docs/published-checkpoints.md (duo_generate with Greedy-Tail and Ψ at 8 steps, duo_eval, lm-eval), which are read
from the document itself and run with small sample counts. The official layouts are written here from the key list
of ../shared/fixtures/official/README.md, not from our DiT.

``DUO_FULLSIZE_REPORT=path.json`` records the measurements (conversion time / peak RSS, generation wall time)."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "published-checkpoints.md"
K, L, D, N_LAYERS, N_HEADS, COND = 50258, 1024, 768, 12, 12, 128
REPORT: dict = {}


def official_keys(adaln: bool):
    """(name, shape) in the official ``state_dict`` order (fixtures README), full size."""
    keys = [("vocab_embed.embedding", (K, D))]
    if adaln:
        keys += [("sigma_map.mlp.0.weight", (COND, 256)), ("sigma_map.mlp.0.bias", (COND,)),
                 ("sigma_map.mlp.2.weight", (COND, COND)), ("sigma_map.mlp.2.bias", (COND,))]
    keys.append(("rotary_emb.inv_freq", (D // N_HEADS // 2,)))
    for i in range(N_LAYERS):
        b = f"blocks.{i}."
        keys += [(b + "norm1.weight", (D,)), (b + "attn_qkv.weight", (3 * D, D)), (b + "attn_out.weight", (D, D)),
                 (b + "norm2.weight", (D,)), (b + "mlp.0.weight", (4 * D, D)), (b + "mlp.0.bias", (4 * D,)),
                 (b + "mlp.2.weight", (D, 4 * D)), (b + "mlp.2.bias", (D,))]
        if adaln:
            keys += [(b + "adaLN_modulation.weight", (6 * D, COND)), (b + "adaLN_modulation.bias", (6 * D,))]
    keys += [("output_layer.norm_final.weight", (D,)), ("output_layer.linear.weight", (K, D)),
             ("output_layer.linear.bias", (K,))]
    if adaln:
        keys += [("output_layer.adaLN_modulation.weight", (2 * D, COND)),
                 ("output_layer.adaLN_modulation.bias", (2 * D,))]
    return keys


def random_state(adaln: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_keys(adaln):
        if name == "rotary_emb.inv_freq":
            hd = D // N_HEADS
            t = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        sd["backbone." + name] = t
    return sd


def write_ckpt(path: Path, cfg: dict, adaln: bool, seed: int):
    from omegaconf import OmegaConf

    sd = random_state(adaln, seed)
    g = torch.Generator().manual_seed(seed + 1)
    shadow = [v + 0.001 * torch.randn(v.shape, generator=g) for k, v in sd.items() if not k.endswith("inv_freq")]
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.2.1", "state_dict": sd,
                "hparams_name": "kwargs", "hyper_parameters": {"config": OmegaConf.create(cfg), "tokenizer": None,
                                                               "vocab_size": None},
                "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": shadow}}, path)


def write_hf(folder: Path, seed: int, time_conditioning: bool):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(random_state(True, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["MDLM"], "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                                                   "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
           "cond_dim": COND, "dropout": 0.1, "hidden_dim": D, "model_length": L, "model_type": "mdlm",
           "n_blocks": N_LAYERS, "n_heads": N_HEADS, "return_dict": False, "time_conditioning": time_conditioning,
           "torch_dtype": "float32", "transformers_version": "4.38.2", "vocab_size": K}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def write_gpt2_tokenizer(folder: Path):
    """GPT-2's file layout and size: 50,257 ids, <|endoftext|> = 50,256 (synthetic pieces beyond the bytes)."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True)
    alphabet = sorted(ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    tokens = alphabet + ["".join(m) for m in merges]
    tokens += [f"Ġw{i}" for i in range(50256 - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|endoftext|>"] = 50256
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def write_scorer(folder: Path, tok_dir: Path):
    """A small random GPT-2 in the gpt2-large folder layout (config.json + weights + tokenizer files)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    transformers.GPT2TokenizerFast.from_pretrained(str(tok_dir)).save_pretrained(str(folder))


TEXT = ("the cat sat on the mat and the dog ran in the park . " * 60).strip()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    dl = tmp_path_factory.mktemp("dl")
    model = {"name": "small", "hidden_size": D, "cond_dim": COND, "n_blocks": N_LAYERS, "n_heads": N_HEADS,
             "length": L, "dropout": 0.1}
    write_hf(dl / "duo", 1, True)
    os.symlink(dl / "duo", dl / "duo-distilled")  # same layout; one random folder serves both blocks
    write_ckpt(dl / "duo.ckpt", {"model": model, "algo": {"name": "duo", "parameterization": "mean",
                                                          "time_conditioning": True, "causal_attention": False}},
               True, 2)
    write_ckpt(dl / "mdlm.ckpt", {"backbone": "dit", "parameterization": "subs", "time_conditioning": False,
                                  "diffusion": "absorbing_state", "model": model}, True, 3)
    write_ckpt(dl / "ar.ckpt", {"backbone": "ar", "parameterization": "ar", "time_conditioning": False,
                                "model": model}, False, 4)
    write_gpt2_tokenizer(dl / "gpt2")
    write_scorer(dl / "gpt2-large", dl / "gpt2")
    (dl / "owt_val.jsonl").write_text("".join(json.dumps({"text": TEXT + f" {i}"}) + "\n" for i in range(2)))
    for name in ("ptb", "wikitext", "lm1b", "lambada", "ag_news", "pubmed", "arxiv"):
        (dl / "zeroshot" / name).mkdir(parents=True)
        (dl / "zeroshot" / name / "text.txt").write_text(TEXT + "\n")
    return dl


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_fullsize_conversion_cost_and_outputs(downloads, tmp_path):
    """Convert the full-size Duo .ckpt in its own process (time, peak RSS), then check the folder."""
    from duo_plugin.models.checkpoint import load_pretrained

    out = tmp_path / "duo"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "duo_plugin.convert", "official", str(downloads / "duo.ckpt"),
                        str(out), "--tokenizer", str(downloads / "gpt2")], env=_env(), capture_output=True,
                       text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    REPORT.update(convert_seconds=round(seconds, 1), convert_peak_rss_mb=round(peak_kb / 1024, 1) if
                  peak_kb > before else None, ckpt_bytes=(downloads / "duo.ckpt").stat().st_size)
    model = load_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    assert model.vocab_size == K and model.max_seq_len == L and len(model.blocks) == N_LAYERS
    assert 169_000_000 < n < 170_500_000  # the paper's 169.6M at K = 50,258
    assert model.time_conditioning and model.duo_metadata["objective"] == "duo"
    # the EMA set was taken: shadow = raw + 0.001 N (write_ckpt, seed 2: noise generator seeded 3), regenerated here
    raw = random_state(True, 2)["backbone.vocab_embed.embedding"]
    shadow_first = raw + 0.001 * torch.randn((K, D), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.vocab_embed.weight, shadow_first)
    tok_meta = model.duo_metadata["tokenizer"]
    assert (tok_meta["bos_id"], tok_meta["eos_id"], tok_meta["pad_id"], tok_meta["vocab_size"]) == (50256, 50256,
                                                                                                     50257, K)


# -- the documented commands ---------------------------------------------------------------------------------------
def doc_blocks():
    """``{section title: [command, ...]}`` from the bash blocks of the model sections (loops kept as one command)."""
    text = DOC.read_text()
    out = {}
    for m in re.finditer(r"^### (.+?)\n(.*?)(?=^### |^## |\Z)", text, flags=re.S | re.M):
        blocks = re.findall(r"```bash\n(.*?)```", m.group(2), flags=re.S)
        if blocks:
            out[m.group(1).split(" (")[0]] = [b for b in blocks if not b.startswith("# setup")]
    return out


SHIM = r'''#!{python}
import os, sys
args = sys.argv[1:]
name = os.path.basename(sys.argv[0])
if name == "python":
    os.execv(sys.executable, [sys.executable, *args])
if name == "duo-convert":
    os.execv(sys.executable, [sys.executable, "-m", "duo_plugin.convert", *args])
if name == "tune":
    recipe = args[1]
    if recipe == "duo_generate":
        args += ["num_samples=1", "batch_size=1", "progress_bar=false"]
    if recipe == "duo_eval":
        args += ["max_blocks=1", "batch_size=1", "progress_bar=false"]
        if "duo/eval_zeroshot" in args:
            args += ["dataset.name=[ptb,wikitext]", "dataset.max_docs=1"]
    tune = os.path.join(os.path.dirname(sys.executable), "tune")
    os.execv(tune, [tune, *args])
if name == "duo-eval":
    i = args.index("--model_args") + 1
    args[i] += ",mc_samples=2"
    args += ["--limit", "1"]
    os.execv(sys.executable, [sys.executable, "-m", "duo_plugin.integrations.lm_eval_cli", *args])
raise SystemExit(f"unknown shim {{name}}")
'''


@pytest.fixture(scope="module")
def shims(tmp_path_factory):
    d = tmp_path_factory.mktemp("bin")
    for name in ("duo-convert", "tune", "duo-eval", "python"):
        p = d / name
        p.write_text(SHIM.format(python=sys.executable))
        p.chmod(0o755)
    return d


@pytest.mark.parametrize("section", ["Duo", "Duo-distilled", "MDLM", "AR"])
def test_documented_commands_run(downloads, shims, tmp_path, section):
    blocks = doc_blocks()
    assert section in blocks, sorted(blocks)
    env = _env(PATH=f"{shims}:{os.environ['PATH']}", DL=downloads, GPT2=downloads / "gpt2",
               GPT2_LARGE=downloads / "gpt2-large", OWT_VAL=downloads / "owt_val.jsonl", ZS=downloads / "zeroshot",
               M=tmp_path / "models", TS="8", NS="1", TASKS="duo_shakespeare_lastword")
    for block in blocks[section]:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=3600)
        assert r.returncode == 0, f"{shlex.quote(block[:200])}\n{r.stderr[-3000:]}"
    runs = tmp_path / "runs"
    for metrics in sorted(runs.glob("*/*/metrics.json")):
        m = json.loads(metrics.read_text())
        if "seconds" in m and "nfe" in m:
            assert m["tokens_per_sample"] == L and m["num_samples"] == 1
            assert "gen_ppl" in m and m["gen_ppl"] > 0
            REPORT[f"{section}/{metrics.parent.name}_seconds"] = round(m["seconds"], 1)
    if section in ("Duo", "MDLM"):
        assert list(runs.glob("*/val/metrics.json")) and list(runs.glob("*/zeroshot/metrics.json"))
    if section == "AR":
        ppl = json.loads((runs / "ar" / "ppl.json").read_text())
        assert set(ppl) == {"owt_val", "ptb", "wikitext", "lm1b", "lambada", "ag_news", "pubmed", "arxiv"}
        assert ppl["owt_val"]["tokens"] > 0 and all(v["ppl"] > 1 for v in ppl.values())
    if any("duo-eval" in blk for blk in blocks[section]):
        res = [json.loads(p.read_text()) for p in runs.glob("*/lm_eval/**/results*.json")]
        assert res and "duo_shakespeare_lastword" in res[0]["results"]
    path = os.environ.get("DUO_FULLSIZE_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2, sort_keys=True))
