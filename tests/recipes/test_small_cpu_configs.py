"""duo/{,udlm_,mdlm_,ar_}small_cpu: their tiny_cpu counterparts at d = 128 (docs/small-scale-training.md), nothing else
changed but the output dir and the evaluation interval, so that the study's comparisons stay one-factor."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.recipes import duo_pretrain as dp

CFG = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
PAIRS = [("small_cpu", "tiny_cpu", {}), ("udlm_small_cpu", "udlm_tiny_cpu", {}),
         ("mdlm_small_cpu", "mdlm_tiny_cpu", {}),
         ("ar_small_cpu", "tiny_cpu", {"objective": "ar", "curriculum": {"steps": 0}})]


@pytest.mark.parametrize("small,tiny,ar_changes", PAIRS)
def test_small_config_is_the_tiny_one_at_twice_the_width(small, tiny, ar_changes):
    s = OmegaConf.to_container(dp.validate_config(OmegaConf.load(CFG / f"{small}.yaml")))
    t = OmegaConf.to_container(dp.validate_config(OmegaConf.load(CFG / f"{tiny}.yaml")))
    assert s["model"]["dim"] == 128 and s["model"]["cond_dim"] == 64
    assert s["output_dir"] == f"./outputs/{small}" and s["eval_every"] == 100
    for key, value in ar_changes.items():
        t[key] = value if not isinstance(value, dict) else {**t[key], **value}
    for key in ("output_dir", "eval_every"):
        s.pop(key), t.pop(key)
    s["model"].pop("dim"), s["model"].pop("cond_dim")
    assert s == t


def test_small_backbone_size():
    """~0.6M parameters at K = 256 (the docs' number), i.e. about 3x duo/tiny_cpu's 0.17M."""
    n_small = sum(p.numel() for p in duo_dit_tiny(256, 64, dim=128, cond_dim=64).parameters())
    n_tiny = sum(p.numel() for p in duo_dit_tiny(256, 64).parameters())
    assert 0.45e6 < n_small < 0.65e6 and 2.5 < n_small / n_tiny < 4.0
