"""SamplerOptions (one dataclass: checks, config mapping), scheduler_for_model (the scheduler from a model folder's
metadata), the one loop's guards, and generate / generate_continuations for Duo, MDLM and AR models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.diffusion.schedules import LogLinearSchedule
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.sampling import (
    AbsorbingPsiScheduler,
    AbsorbingScheduler,
    AncestralScheduler,
    DenoiserFn,
    PsiSchedule,
    PsiScheduler,
    SamplerOptions,
    Scheduler,
    generate,
    generate_continuations,
    sample,
    scheduler_for_model,
    scheduler_for_process,
)
from duo_plugin.sampling.ar_decode import sample_ar


@pytest.mark.parametrize("key,value,fix", [
    ("guidance_weight", math.nan, "finite"), ("guidance_weight", math.inf, "finite"), ("steps", 0, ">= 1"),
    ("steps", -3, ">= 1"), ("steps", 2.5, "integer"), ("steps", True, "integer"), ("top_p", 0, "noise_removal=greedy"),
    ("top_p", 1.5, "(0, 1]"), ("temperature", 0.0, "noise_removal=greedy"), ("temperature", "hot", "number"),
    ("t_eps", 1.0, "(0, 1)"), ("noise_removal", "argmax", "greedy"), ("predictor", "remdm", "psi"),
    ("posterior_impl", "fast", "auto"), ("chunk_size", 0, ">= 1"), ("n_blocks", -1, ">= 0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(key, value, fix):
    with pytest.raises(ValueError) as e:
        SamplerOptions(**{key: value})
    msg = str(e.value)
    assert "\n" not in msg and f"sampler option {key}" in msg and fix in msg


def test_cross_field_checks():
    with pytest.raises(ValueError, match="block_len must be >= 1 when n_blocks > 0"):
        SamplerOptions(n_blocks=2)
    with pytest.raises(ValueError, match="psi needs predictor=psi"):
        SamplerOptions(psi=PsiSchedule())
    with pytest.raises(ValueError, match="sampler option psi: unknown Ψ mode"):
        SamplerOptions(predictor="psi", psi={"low_mode": "max-capped"})
    with pytest.raises(ValueError, match="posterior_impl"):
        SamplerOptions(guidance_weight=2.0, posterior_impl="mixture")
    assert SamplerOptions(predictor="psi").psi == PsiSchedule()
    assert SamplerOptions(guidance_weight=0).guidance_weight == 0.0  # a set value is never replaced


def test_from_config_reads_every_field_in_both_spellings():
    cfg = OmegaConf.create({"steps": "12", "noise_removal": "greedy", "top_p": 0.9, "temperature": "0.8",
                            "t_eps": 1e-4, "predictor": "psi", "guidance_weight": 0, "posterior_impl": "dense",
                            "batch_size": 3, "progress_bar": False, "blocks": {"n_blocks": 2, "block_len": 4},
                            "psi": {"high_mode": "pure-pc", "middle_mode": None, "high_frac": 0.3},
                            "checkpoint": "ignored", "seed": 5})
    o = SamplerOptions.from_config(cfg)
    assert (o.steps, o.noise_removal, o.top_p, o.temperature, o.t_eps, o.chunk_size, o.progress) == (
        12, "greedy", 0.9, 0.8, 1e-4, 3, False)
    assert (o.n_blocks, o.block_len, o.guidance_weight, o.posterior_impl) == (2, 4, 0.0, "dense")
    assert o.psi == PsiSchedule(high_mode="pure-pc", high_frac=0.3)
    flat = SamplerOptions.from_config({"predictor": "psi", "psi_low_mode": "max-capped-0.1", "block_len": 8})
    assert flat.psi == PsiSchedule(low_mode="max-capped-0.1") and flat.block_len == 8
    assert SamplerOptions.from_config({"psi": {"high_mode": "pure-pc"}}).psi is None  # only with predictor=psi
    # every field is reachable from a config under its own name (adding an option is one place)
    defaults = SamplerOptions()
    for f in dataclasses.fields(SamplerOptions):
        if f.name != "psi":
            assert hasattr(SamplerOptions.from_config({f.name: getattr(defaults, f.name)}), f.name)


W_DATA = 20


def _model(objective: str, **build):
    torch.manual_seed(0)
    width = W_DATA + (objective == "mdlm")
    model = duo_dit_tiny(width, 12, **build)
    valid = torch.ones(width, dtype=torch.bool)
    valid[1] = False  # BOS
    if objective == "mdlm":
        valid[-1] = False
    model.register_buffer("valid_vocab", valid, persistent=False)
    model.duo_metadata = {"objective": objective} if objective else {}
    return model


def test_scheduler_for_model_reads_the_metadata():
    assert isinstance(scheduler_for_model(_model("")), AncestralScheduler)
    assert isinstance(scheduler_for_model(_model("udlm"), SamplerOptions(predictor="psi")), PsiScheduler)
    mdlm = scheduler_for_model(_model("mdlm"), predictor="psi")
    assert isinstance(mdlm, AbsorbingPsiScheduler) and mdlm.process.mask_id == W_DATA and not mdlm.reuse_x_theta
    assert scheduler_for_model(_model("mdlm", time_conditioning=False)).reuse_x_theta
    by_meta = scheduler_for_model({"objective": "mdlm", "mask_id": 3}, vocab_size=10, time_conditioned=False)
    assert isinstance(by_meta, AbsorbingScheduler) and by_meta.process.mask_id == 3 and by_meta.reuse_x_theta
    assert isinstance(by_meta, Scheduler)
    with pytest.raises(ValueError, match="metadata.objective"):
        scheduler_for_model({"objective": "sedd_typo"}, vocab_size=10)
    with pytest.raises(ValueError, match="left to right"):
        scheduler_for_model(_model("ar", causal=True, time_conditioning=False))
    with pytest.raises(ValueError, match="mask_id"):
        scheduler_for_model({"objective": "mdlm", "mask_id": 10}, vocab_size=10)


def test_the_loop_refuses_inconsistent_arguments():
    model = _model("duo")
    sch = scheduler_for_model(model, SamplerOptions(top_p=0.9))
    den = DenoiserFn(model)
    with pytest.raises(ValueError, match="other update-rule options"):
        sample(den, sch, batch_size=1, seq_len=4, seed=0, options=SamplerOptions(steps=2))
    with pytest.raises(TypeError, match="steps_count"):
        sample(den, sch, batch_size=1, seq_len=4, seed=0, steps_count=2)
    with pytest.raises(ValueError, match="vocab_size=7"):
        sample(den, sch, batch_size=1, seq_len=4, seed=0, vocab_size=7, top_p=0.9)
    with pytest.raises(ValueError, match="exactly one of generator"):
        sample(den, sch, batch_size=1, seq_len=4, top_p=0.9)
    # the scheduler-built path and the flat-keyword path are the same sampler
    a = sample(den, sch, batch_size=2, seq_len=6, seed=3, options=SamplerOptions(steps=3, top_p=0.9, progress=False))
    b = sample(den, LogLinearSchedule(), batch_size=2, seq_len=6, seed=3, steps=3, top_p=0.9, progress=False,
               vocab_size=W_DATA, valid_vocab=model.valid_vocab)
    assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["duo", "mdlm", "ar"])
def test_generate_continuations_is_per_request_and_matches_the_samplers(objective):
    """Row i uses generators[i] only: the continuations equal one-request calls of generate(), which equals the
    process's own sampler (the loop with the model's scheduler, or KV-cache AR decoding); cut before EOS."""
    model = _model(objective, **({"causal": True, "time_conditioning": False} if objective == "ar" else {}))
    opts = SamplerOptions(steps=3, progress=False)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9]]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    got = generate_continuations(model, prompts, 5, opts, generators=gens(), eos_id=2, window=12)
    for i, p in enumerate(prompts):
        g = gens()[i]
        if objective == "ar":
            ref = sample_ar(model, batch_size=1, seq_len=len(p) + 5, prompt=torch.tensor(p), generator=[g],
                            valid_vocab=model.valid_vocab).tokens[0, len(p):].tolist()
        else:
            ref = sample(DenoiserFn(model), scheduler_for_model(model, opts), batch_size=1, seq_len=len(p) + 5,
                         options=opts, prompt=torch.tensor(p), generator=[g])[0, len(p):].tolist()
        ref = ref[: ref.index(2)] if 2 in ref else ref
        assert got[i] == ref
    res = generate(model, opts, batch_size=2, seq_len=8, prompt=torch.tensor([1, 5]), seed=0, eos_id=2)
    assert res.tokens.shape == (2, 8) and res.lengths is not None and (res.tokens[:, :2] == torch.tensor([1, 5])).all()


def test_generate_continuations_strides_beyond_the_window():
    model = _model("mdlm")
    opts = SamplerOptions(steps=2, block_len=4, progress=False)
    out = generate_continuations(model, [[1, 5]], 16, opts, generators=[torch.Generator().manual_seed(0)],
                                 eos_id=None, window=12)
    assert len(out[0]) == 16 and all(0 <= t < W_DATA for t in out[0])
    with pytest.raises(ValueError, match="block_len"):
        generate_continuations(model, [[1, 5]], 16, SamplerOptions(steps=2), generators=[torch.Generator()],
                               eos_id=None, window=12)
    with pytest.raises(ValueError, match="objective: ar"):
        generate(_model("ar", causal=True, time_conditioning=False), SamplerOptions(predictor="psi"), batch_size=1,
                 seq_len=4, prompt=torch.tensor([1]), seed=0)
    assert scheduler_for_process(scheduler_for_model(model).process).options == SamplerOptions()
