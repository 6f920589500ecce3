"""scripts/demo's advice for a run that has not left the unigram plateau (eval.learning.plateau_advice)."""

from __future__ import annotations

from duo_plugin.eval.learning import plateau_advice


def _report(model_ppl: float, unigram_ppl: float = 160.0) -> dict:
    return {"ratio": model_ppl / unigram_ppl, "model_ppl": model_ppl, "unigram_ppl": unigram_ppl}


FLAT = [(0, 352.0), (250, 190.0), (500, 181.0), (750, 180.0), (1000, 179.5), (1250, 179.0), (1500, 179.1)]
FALLING = [(0, 352.0), (250, 200.0), (500, 185.0), (750, 170.0), (1000, 155.0), (1250, 140.0), (1500, 135.0)]


def test_no_advice_once_the_model_is_20_percent_below_the_unigram():
    assert plateau_advice(_report(77.7), steps=1500, max_steps=1500, val_curve=FLAT) == []
    assert plateau_advice(_report(128.0), steps=1500, max_steps=1500, val_curve=FLAT) == []  # exactly 20 % below


def test_flat_curve_points_to_a_larger_batch_not_to_more_steps():
    lines = plateau_advice(_report(179.1), steps=1500, max_steps=1500, val_curve=FLAT)
    text = " ".join(lines)
    assert "above the unigram" in lines[0]
    assert "duo/small_cpu" in text and "global_batch_size=128" in text
    assert "max_steps=" not in text and "max_wall_s" not in text


def test_falling_curve_asks_for_a_longer_budget():
    lines = plateau_advice(_report(135.0), steps=1500, max_steps=1500, val_curve=FALLING)
    text = " ".join(lines)
    assert "only 16% below" in lines[0]  # 135 / 160 = 0.84
    assert "max_steps=3000" in text and "duo/small_cpu" not in text


def test_a_run_stopped_by_the_wall_clock_is_named():
    text = " ".join(plateau_advice(_report(170.0), steps=400, max_steps=1500, val_curve=FLAT[:3]))
    assert "stopped at step 400 of 1500" in text and "max_wall_s=null" in text
