"""Progress with an ETA where people wait (duo_plugin._progress): a line on stderr every ``every_s`` seconds when
stderr is not a terminal, with ETA = elapsed / done × remaining; ``eta_lines`` turns the samplers' bars into such
lines (duo_generate, the distillation quality table, the benchmarks)."""

from __future__ import annotations

import re

import pytest
import torch

import duo_plugin._progress as prog


class Clock:
    """A fake ``time.perf_counter`` that advances ``step`` seconds per call."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_eta_lines_report_elapsed_and_closed_form_eta(monkeypatch, capsys):
    clock = Clock(0.0)
    monkeypatch.setattr(prog.time, "perf_counter", clock)
    bar = prog.Eta(True, 10, "work", every_s=30.0, unit="step", initial=2)  # resumed at 2 of 10
    assert bar.bar is None and bar.log  # pytest's stderr is not a terminal
    for t_now in (10.0, 31.0, 40.0, 65.0):
        clock.t = t_now - clock.step
        bar.set_postfix(loss="1.5")
        bar.update(1)
    err = capsys.readouterr().err.strip().splitlines()
    # lines only once >= 30 s passed since the last one: at t = 31 (4 done) and t = 65 (6 done)
    assert err == ["work: 4/10 steps, 31 s elapsed, ETA 93 s, loss=1.5",  # 31 s / 2 steps × 6 left
                   "work: 6/10 steps, 65 s elapsed, ETA 65 s, loss=1.5"]  # 65 s / 4 steps × 4 left
    prog.Eta(False, 10, "quiet").update(5)
    assert capsys.readouterr().err == ""


def test_progress_bar_gives_eta_lines_only_inside_eta_lines():
    assert prog.progress_bar(True, total=3, desc="x") is None  # not a terminal, no opt-in: silent as before
    with prog.eta_lines(every_s=5.0):
        b = prog.progress_bar(True, total=3, desc="x", unit="step")
        assert isinstance(b, prog.Eta) and b.every_s == 5.0 and b.total == 3 and b.unit == "step"
        assert prog.progress_bar(False, total=3) is None
    assert prog.progress_bar(True, total=3, desc="x") is None


def test_sampler_and_quality_table_print_eta_lines(monkeypatch, capsys):
    from duo_plugin.models.dit import duo_dit_tiny
    from duo_plugin.training.distill import QualityTableSpec, sample_quality_table

    monkeypatch.setattr(prog.time, "perf_counter", Clock(31.0))  # every update is 31 s after the previous one
    torch.manual_seed(0)
    model = duo_dit_tiny(17, 8, dim=16, n_layers=1, n_heads=2, cond_dim=8, dropout=0.0).eval()
    rows = sample_quality_table({"m": model}, QualityTableSpec(num_samples=2, seq_len=8, steps=[3, 2],
                                                                samplers=["ancestral"], progress=True))
    assert len(rows) == 2
    err = capsys.readouterr().err
    assert re.search(r"duo sample \(.*T=3\): \d/4 steps, \d+ s elapsed, ETA \d+ s", err)
    assert re.search(r"duo_distill quality table: 1/2 cells, \d+ s elapsed, ETA \d+ s, model=m, sampler=ancestral, T=3",
                     err)
    sample_quality_table({"m": model}, QualityTableSpec(num_samples=2, seq_len=8, steps=[2], samplers=["ancestral"]))
    assert capsys.readouterr().err == ""  # progress off by default


@pytest.mark.parametrize("resume_at", [0, 3])
def test_training_progress_is_an_eta_over_the_remaining_steps(resume_at):
    from types import SimpleNamespace

    from duo_plugin.recipes.common import RecipeBase

    r = RecipeBase.__new__(RecipeBase)
    r.is_rank_zero, r.cfg, r.max_steps, r.step = True, SimpleNamespace(progress_bar=True), 8, resume_at
    bar = r._progress_bar("duo_distill")
    assert isinstance(bar, prog.Eta) and (bar.total, bar.done, bar.unit) == (8, resume_at, "step")
    r.cfg.progress_bar = False
    assert r._progress_bar("duo_distill") is None
