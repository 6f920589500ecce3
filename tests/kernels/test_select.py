"""kernels.select: the CPU `auto` choice from the dense path's memory estimate and the measured time crossover."""

from __future__ import annotations

import pytest
import torch

from duo_plugin.kernels import select as S
from duo_plugin.models.dit import duo_dit_tiny


@pytest.fixture(scope="module")
def model():
    return duo_dit_tiny(64, 8)


def _choose(model, **kw):
    why = {}
    out = S.choose_paths("auto", "auto", model=model, device="cpu", explain=why, **kw)
    return out, why


def test_dense_bytes_is_live_tensors_times_rows_l_k():
    assert S.dense_bytes(3, 5, 7, curriculum=False) == S.DENSE_LIVE_TENSORS["nelbo"] * 3 * 5 * 7 * 4
    assert S.dense_bytes(3, 5, 7) == (S.DENSE_LIVE_TENSORS["nelbo"] + S.DENSE_LIVE_TENSORS["curriculum_input"]) * 420


def test_small_shapes_that_fit_stay_dense(model):
    out, why = _choose(model, seq_len=8, vocab_size=64, micro_batch_rows=4, memory_budget_bytes=1 << 30)
    assert out == {"curriculum_input": "dense", "nelbo": "dense"} and why["auto"] == "dense"


def test_memory_budget_switches_to_fused(model):
    need = S.dense_bytes(4, 8, 64)
    out, why = _choose(model, seq_len=8, vocab_size=64, micro_batch_rows=4, memory_budget_bytes=need - 1)
    assert out == {"curriculum_input": "chunked", "nelbo": "chunked"} and "memory budget" in why["reason"]
    out, _ = _choose(model, seq_len=8, vocab_size=64, micro_batch_rows=4, memory_budget_bytes=need)
    assert out["nelbo"] == "dense"
    # the budget scales with the micro-batch: 4x the rows no longer fit the same budget
    out, _ = _choose(model, seq_len=8, vocab_size=64, micro_batch_rows=16, memory_budget_bytes=need)
    assert out["nelbo"] == "chunked"


def test_ram_fraction_budget(model, monkeypatch):
    monkeypatch.setattr(S, "_available_ram", lambda: 1000 * 2**20)
    assert S.memory_budget("cpu", 0.25) == 250 * 2**20
    assert S.memory_budget("cpu", 0.5, memory_budget_bytes=7) == 7
    need = S.dense_bytes(1, 8, 64)
    monkeypatch.setattr(S, "_available_ram", lambda: need * 2)
    assert _choose(model, seq_len=8, vocab_size=64, ram_fraction=0.4)[0]["nelbo"] == "chunked"
    assert _choose(model, seq_len=8, vocab_size=64, ram_fraction=0.6)[0]["nelbo"] == "dense"


def test_time_crossover_selects_fused_at_large_rows(model):
    out, why = _choose(model, seq_len=8, vocab_size=64, auto_min_row_elements=8 * 64, memory_budget_bytes=1 << 40)
    assert out["nelbo"] == "chunked" and "faster" in why["reason"]
    out, _ = _choose(model, seq_len=8, vocab_size=64, auto_min_row_elements=8 * 64 + 1, memory_budget_bytes=1 << 40)
    assert out["nelbo"] == "dense"


def test_auto_never_picks_a_blocked_fused_path(model):
    out = S.choose_paths("auto", "auto", model=model, device="cpu", seq_len=8, vocab_size=64, soft_input="topk",
                         memory_budget_bytes=0)
    assert out == {"curriculum_input": "dense", "nelbo": "chunked"}
    with pytest.raises(ValueError, match="topk"):
        S.choose_paths("chunked", "auto", model=model, device="cpu", seq_len=8, vocab_size=64, soft_input="topk")
    assert torch.is_tensor(S.input_embedding(model).weight)
