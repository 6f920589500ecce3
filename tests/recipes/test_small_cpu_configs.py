"""duo/{,udlm_,mdlm_,ar_}small_cpu: their tiny_cpu counterparts at 4x the batch and 2x the steps (docs/small-scale-training.md: the
unigram plateau is a gradient-noise plateau), nothing else changed but the output dir and the evaluation interval,
so that the study's comparisons stay one-factor."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from duo_plugin.recipes import duo_pretrain as dp

CFG = Path(__file__).resolve().parents[2] / "duo_plugin" / "configs" / "duo"
PAIRS = [("small_cpu", "tiny_cpu", {}), ("udlm_small_cpu", "udlm_tiny_cpu", {}),
         ("mdlm_small_cpu", "mdlm_tiny_cpu", {}),
         ("ar_small_cpu", "tiny_cpu", {"objective": "ar", "curriculum": {"steps": 0}})]


@pytest.mark.parametrize("small,tiny,ar_changes", PAIRS)
def test_small_config_is_the_tiny_one_at_four_times_the_batch_and_twice_the_steps(small, tiny, ar_changes):
    s = OmegaConf.to_container(dp.validate_config(OmegaConf.load(CFG / f"{small}.yaml")))
    t = OmegaConf.to_container(dp.validate_config(OmegaConf.load(CFG / f"{tiny}.yaml")))
    assert s["global_batch_size"] == 4 * t["global_batch_size"] == 128
    assert s["max_steps"] == 2 * t["max_steps"] == 3000  # the bar's "first third" is read against this budget
    assert s["output_dir"] == f"./outputs/{small}" and s["eval_every"] == 100
    for key, value in ar_changes.items():
        t[key] = value if not isinstance(value, dict) else {**t[key], **value}
    for key in ("output_dir", "eval_every", "global_batch_size", "max_steps"):
        s.pop(key), t.pop(key)
    assert s == t
