"""Fixed-seed sampler cases whose outputs were recorded from the sampler *before* code was moved
(``golden_samples.json``, written by ``python tests/sampling/golden_cases.py --record``): the ancestral family was
recorded before the scheduler split; the Ψ / guidance / block cases, the MDLM (absorbing) sampler cases and the
``duo_generate`` cases (Duo, MDLM and AR model folders) before the sampling loop was unified over processes.
``test_golden.py`` replays them: the same seeds must keep producing the same samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from duo_plugin.sampling.base import Clamp

GOLDEN = Path(__file__).with_name("golden_samples.json")
K, L, B = 11, 6, 5


class GoldenDenoiser:
    """Deterministic x_θ(z, σ): logits[l, k] = Σ_m A[l, m, z_m, k] + c[l, k] σ (float64 tables from a fixed seed)."""

    def __init__(self, k: int = K, length: int = L, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(length, length, k, k, generator=g, dtype=torch.float64) * 1.5
        self.c = torch.randn(length, k, generator=g, dtype=torch.float64)

    def __call__(self, z, sigma):
        out = self.c[None] * sigma.double()[:, None, None]
        for l in range(z.shape[1]):
            for m in range(z.shape[1]):
                out[:, l] = out[:, l] + self.A[l, m][z[:, m]]
        return torch.log_softmax(out, -1).float()


def cases():
    """(name, kwargs for sample(...)) for every option of the ancestral family and each posterior_impl."""
    valid = torch.ones(K, dtype=torch.bool)
    valid[K - 1] = False  # e.g. BOS outside the uniform process
    infill_mask = torch.tensor([False, True, False, True, True, False])
    infill_vals = torch.tensor([0, 3, 0, 10, 7, 0])
    opts = {
        "ancestral": {},
        "greedy": {"noise_removal": "greedy"},
        "none": {"noise_removal": "none"},
        "top_p": {"top_p": 0.8},
        "temperature": {"temperature": 0.7},
        "top_p_temperature_greedy": {"top_p": 0.9, "temperature": 1.3, "noise_removal": "greedy"},
        "prompt": {"prompt": torch.tensor([10, 2])},
        "prompt_rows": {"prompt": torch.tensor([[10, 2], [10, 3], [10, 4], [10, 5], [10, 6]])},
        "infill": {"clamp": Clamp(infill_mask, infill_vals)},
        "valid_vocab_prompt": {"valid_vocab": valid, "prompt": torch.tensor([10]), "top_p": 0.95},
        "chunked_batch": {"chunk_size": 2},
        "generator": {"generator": "shared"},
        "row_generators": {"generator": "rows", "chunk_size": 3},
    }
    for impl in ("dense", "chunked", "mixture", "auto"):
        for name, kw in opts.items():
            kw = dict(kw)
            yield f"{impl}/{name}", dict(kw, posterior_impl=impl)


def run_case(sample_fn, kw):
    kw = dict(kw)
    gen = kw.pop("generator", None)
    if gen == "shared":
        kw["generator"] = torch.Generator().manual_seed(123)
    elif gen == "rows":
        kw["generator"] = [torch.Generator().manual_seed(200 + i) for i in range(B)]
    else:
        kw["seed"] = 7
    res = sample_fn(GoldenDenoiser(), None, batch_size=B, seq_len=L, vocab_size=K, steps=5, progress=False,
                    return_trajectory=True, **kw)
    return {"tokens": res.tokens.tolist(), "trajectory": res.trajectory.tolist(), "nfe": res.nfe}


# ------------------------------------------------------------------------------------ Ψ, guidance, blocks
def uniform_extra_cases():
    """(name, kwargs) for the Ψ-sampler, prompt guidance and block generation (``run_case`` / ``run_blocks``)."""
    prompt = torch.tensor([10, 2])
    lcl = {"high_mode": "pure-pc", "middle_mode": "constant-0.5", "low_mode": "max-capped-0.2", "high_frac": 0.3,
           "middle_frac": 0.3, "time_profile": "linear-constant-linear-0.5"}
    psi_opts = {
        "pure_pc": {"psi": {"high_mode": "pure-pc", "middle_mode": "pure-pc", "low_mode": "pure-pc"}},
        "max_capped": {"psi": {"high_mode": "max-capped-0.3", "middle_mode": "max-rescale-0.5",
                               "low_mode": "constant-remdm-0.05"}, "top_p": 0.9},
        "lcl_prompt_greedy": {"psi": lcl, "prompt": prompt, "noise_removal": "greedy"},
    }
    for impl in ("dense", "chunked", "mixture"):
        for name, kw in psi_opts.items():
            yield f"psi/{impl}/{name}", dict(kw, predictor="psi", posterior_impl=impl)
    for impl in ("dense", "chunked", "auto"):
        yield f"guidance/{impl}/prompt", {"guidance_weight": 2.5, "prompt": prompt, "posterior_impl": impl}
        yield f"guidance/{impl}/psi_infill", {"guidance_weight": 0.5, "predictor": "psi",
                                              "psi": {"high_mode": "pure-pc", "high_frac": 0.5, "middle_frac": 0.2},
                                              "clamp": Clamp(torch.tensor([True, False, True, False, False, False]),
                                                             torch.tensor([10, 0, 4, 0, 0, 0])),
                                              "posterior_impl": impl}
    yield "blocks/ancestral", {"blocks": (2, 3), "prompt": prompt}
    yield "blocks/psi_guided_eos", {"blocks": (3, 2), "prompt": prompt, "predictor": "psi", "guidance_weight": 1.5,
                                    "psi": {"low_mode": "pure-pc"}, "eos_id": 4, "generator": "rows"}
    yield "eos/lengths", {"eos_id": 3, "prompt": prompt}


def run_uniform_extra(sample_fn, sample_blocks_fn, kw):
    """Replay one :func:`uniform_extra_cases` case (the Ψ settings as a mapping, as duo_generate passes them)."""
    kw = dict(kw)
    if "blocks" in kw:
        n_blocks, block_len = kw.pop("blocks")
        gen = kw.pop("generator", None)
        gkw = ({"generator": [torch.Generator().manual_seed(300 + i) for i in range(B)]} if gen == "rows"
               else {"seed": 11})
        res = sample_blocks_fn(GoldenDenoiser(), None, batch_size=B, seq_len=L, vocab_size=K, steps=4,
                               progress=False, n_blocks=n_blocks, block_len=block_len, return_trajectory=True,
                               **gkw, **kw)
        out = {"tokens": res.tokens.tolist(), "trajectory": res.trajectory.tolist(), "nfe": res.nfe}
    else:
        res = run_case(sample_fn, dict(kw, eos_id=kw.get("eos_id")))
        out = res
    return out


# ------------------------------------------------------------------------------------------ MDLM (absorbing)
W_MDLM = K + 1  # data ids 0..K-1 and the appended [MASK] row K


class GoldenMDLMDenoiser(GoldenDenoiser):
    """:class:`GoldenDenoiser` of width K + 1 (the [MASK] row last); ``time_conditioned=False`` ignores σ (the x_θ
    cache then applies)."""

    def __init__(self, time_conditioned: bool = True, seed: int = 1):
        super().__init__(W_MDLM, L, seed)
        if not time_conditioned:
            self.c = torch.zeros_like(self.c)
        self.calls = 0

    def __call__(self, z, sigma):
        self.calls += 1
        return super().__call__(z, sigma)


def mdlm_cases():
    """(name, kwargs for sampling.mdlm.sample_mdlm): noise removal, filters, valid ids, the x_θ cache, clamps."""
    valid = torch.ones(W_MDLM, dtype=torch.bool)
    valid[K] = False
    valid[K - 1] = False  # e.g. BOS: not a data id, but a clamp value
    rows_mask = torch.tensor([[True, False, True, False, False, False]] * 3 + [[False, True, False, True, True, False]]
                             * 2)
    rows_vals = torch.where(rows_mask, torch.tensor([[K - 1, 0, 3, 0, 7, 0]] * B), torch.zeros(B, L, dtype=torch.long))
    opts = {
        "greedy": {},
        "ancestral": {"noise_removal": "ancestral"},
        "none": {"noise_removal": "none"},
        "top_p_temperature": {"top_p": 0.8, "temperature": 0.7, "noise_removal": "ancestral"},
        "valid_vocab": {"valid_vocab": valid, "noise_removal": "ancestral"},
        "cache": {"time_conditioned": False},
        "cache_ancestral_t40": {"time_conditioned": False, "noise_removal": "ancestral", "steps": 40},
        "cache_b1_t30_top_p": {"time_conditioned": False, "steps": 30, "batch_size": 1, "top_p": 0.9},
        "prompt_clamp": {"clamp": Clamp(torch.tensor([True, True, False, False, False, False]),
                                        torch.tensor([K - 1, 2, 0, 0, 0, 0])), "valid_vocab": valid},
        "infill_rows_cache": {"clamp": Clamp(rows_mask, rows_vals), "time_conditioned": False,
                              "noise_removal": "ancestral", "steps": 25},
        "generator": {"generator": "shared"},
        "row_generators": {"generator": "rows", "noise_removal": "ancestral"},
    }
    for name, kw in opts.items():
        yield f"mdlm/{name}", kw


def run_mdlm_case(sample_mdlm_fn, kw):
    kw = dict(kw)
    gen = kw.pop("generator", None)
    if gen == "shared":
        kw["generator"] = torch.Generator().manual_seed(123)
    elif gen == "rows":
        kw["generator"] = [torch.Generator().manual_seed(200 + i) for i in range(B)]
    else:
        kw["seed"] = 7
    den = GoldenMDLMDenoiser(time_conditioned=kw.get("time_conditioned", True))
    kw.setdefault("steps", 5)
    kw.setdefault("batch_size", B)
    from duo_plugin.diffusion.absorbing import AbsorbingProcess

    process = AbsorbingProcess(W_MDLM, K, valid_vocab=kw.pop("valid_vocab", None))
    z, nfe = sample_mdlm_fn(den, process, seq_len=L, return_nfe=True, **kw)
    return {"tokens": z.tolist(), "nfe": int(nfe), "calls": den.calls}


# ----------------------------------------------------------------------------------------- duo_generate
GEN_L = 16


def _fixed_weights(model, seed: int):
    """Overwrite every parameter from one seeded generator (name order), so the folders do not depend on the
    modules' initialisation order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)
    return model


def generate_folders(root):
    """Duo, MDLM (time-conditioned and not) and AR model folders of a tiny DiT with fixed weights."""
    from duo_plugin.data.tokenizers import train_sentencepiece
    from duo_plugin.models.checkpoint import save_pretrained
    from duo_plugin.models.dit import duo_dit_tiny

    root = Path(root)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"The king of line {i} spoke to the queen {i % 5} times." for i in range(40)))
    tok = train_sentencepiece([corpus], 300, root / "tok", hard_vocab_limit=False)
    k = int(tok.vocab_size)
    specs = {"duo": (k, {}, {}), "mdlm": (k + 1, {"objective": "mdlm"}, {}),
             "mdlm_notime": (k + 1, {"objective": "mdlm"}, {"time_conditioning": False}),
             "ar": (k, {"objective": "ar"}, {"causal": True, "time_conditioning": False})}
    for i, (name, (w, meta, build)) in enumerate(specs.items()):
        model = _fixed_weights(duo_dit_tiny(w, GEN_L, **build), 40 + i)
        valid = torch.ones(w, dtype=torch.bool)
        valid[tok.bos_id] = False
        if w > k:
            valid[k] = False
        save_pretrained(model, root / name, metadata=dict(meta, seq_len=GEN_L, tokenizer=tok.descriptor(),
                                                          valid_vocab=valid))
        tok.save(root / name / "tokenizer")
    return root


def generate_cases():
    """(name, duo_generate config overrides; ``checkpoint`` names a folder of :func:`generate_folders`)."""
    psi = {"psi.high_mode": "pure-pc", "psi.middle_mode": "max-capped-0.1", "psi.low_mode": "max-capped-0.1",
           "psi.high_frac": 0.3, "psi.middle_frac": 0.2}
    yield "generate/duo/unconditional", {"checkpoint": "duo", "num_samples": 3, "batch_size": 2}
    yield "generate/duo/prompt_psi_guided", dict(psi, checkpoint="duo", predictor="psi", prompts=["The king", "queen"],
                                                 guidance_weight=2.0, noise_removal="greedy")
    yield "generate/duo/infill_top_p", {"checkpoint": "duo", "infill": "The [MASK:2] king [MASK]", "top_p": 0.9}
    yield "generate/duo/blocks_variable", {"checkpoint": "duo", "prompts": ["The"], "blocks.n_blocks": 2,
                                           "blocks.block_len": 4, "variable_length": True, "temperature": 0.8}
    yield "generate/mdlm/unconditional_greedy", {"checkpoint": "mdlm", "num_samples": 3, "batch_size": 2,
                                                 "noise_removal": "greedy"}
    yield "generate/mdlm/prompt_ancestral", {"checkpoint": "mdlm", "prompts": ["The king"], "seed": 3}
    yield "generate/mdlm/infill_cache", {"checkpoint": "mdlm_notime", "infill": "The [MASK:2] king [MASK]",
                                         "noise_removal": "greedy"}
    yield "generate/mdlm/cache_top_p", {"checkpoint": "mdlm_notime", "top_p": 0.8, "temperature": 1.2, "steps": 30,
                                        "num_samples": 1}
    yield "generate/ar/unconditional", {"checkpoint": "ar", "num_samples": 2}


def run_generate_case(run_fn, root, over):
    """Run duo_generate's ``run`` with ``over`` on a folder of ``root``; the samples' ids (and lengths) and NFE."""
    from omegaconf import OmegaConf

    root = Path(root)
    name = over["checkpoint"]
    out = root / "out" / "_".join(f"{k}-{v}" for k, v in sorted(over.items()))[:150].replace("/", "_")
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo" / "generate.yaml")
    base = {"steps": 5, "num_samples": 2, "progress_bar": False, "output_dir": str(out)}
    for k, v in dict(base, **dict(over, checkpoint=str(root / name))).items():
        OmegaConf.update(cfg, k, v, force_add=True)
    metrics = run_fn(cfg)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return {"ids": [r["ids"] for r in rows], "lengths": [r.get("length") for r in rows], "nfe": metrics["nfe"]}


def record_all(names=None):
    """Every case's current output (``names``: only those)."""
    import tempfile

    from duo_plugin.recipes.duo_generate import run
    from duo_plugin.sampling import sample, sample_blocks
    from duo_plugin.sampling.mdlm import sample_mdlm

    out = {}
    for name, kw in cases():
        out[name] = run_case(sample, kw)
    for name, kw in uniform_extra_cases():
        out[name] = run_uniform_extra(sample, sample_blocks, kw)
    for name, kw in mdlm_cases():
        out[name] = run_mdlm_case(sample_mdlm, kw)
    with tempfile.TemporaryDirectory() as tmp:
        generate_folders(tmp)
        for name, over in generate_cases():
            out[name] = run_generate_case(run, tmp, over)
    return out if names is None else {n: out[n] for n in names}


if __name__ == "__main__" and "--record" in sys.argv:
    # Adds the cases not yet recorded; recorded ones are kept (they are the reference), unless --force.
    old = {} if "--force" in sys.argv or not GOLDEN.exists() else json.loads(GOLDEN.read_text())
    new = record_all()
    merged = dict(new, **old)
    GOLDEN.write_text(json.dumps(merged))
    print(f"wrote {GOLDEN}: {len(merged)} cases ({len(set(new) - set(old))} new)")
