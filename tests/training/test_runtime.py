"""duo_plugin.runtime: the CPU thread choice (pure function) and its application."""

from __future__ import annotations

import pytest
import torch

from duo_plugin import runtime as R


def test_auto_uses_one_thread_below_the_size_threshold():
    c = R.choose_cpu_threads("auto", n_params=R.AUTO_MULTI_THREAD_MIN_PARAMS - 1, cpus=16, load=0.0)
    assert c.threads == 1 and "parameters" in c.reason


def test_auto_large_model_uses_free_cpus_per_local_rank():
    big = R.AUTO_MULTI_THREAD_MIN_PARAMS
    assert R.choose_cpu_threads("auto", n_params=big, cpus=8, load=0.0).threads == 8
    assert R.choose_cpu_threads("auto", n_params=big, cpus=8, load=3.2).threads == 5
    assert R.choose_cpu_threads("auto", n_params=big, cpus=8, load=0.0, local_world_size=2).threads == 4
    assert R.choose_cpu_threads("auto", n_params=big, cpus=2, load=9.0).threads == 1


def test_explicit_and_invalid_settings():
    assert R.choose_cpu_threads(3, n_params=10).threads == 3
    assert R.choose_cpu_threads("2", n_params=10).threads == 2
    for bad in (0, -1, "two", 1.5, "auto2"):
        with pytest.raises(ValueError, match="cpu_threads"):
            R.choose_cpu_threads(bad, n_params=10)


def test_log_line_names_threads_and_wait_policy(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    line = R.choose_cpu_threads(2, n_params=10).log_line()
    assert line.startswith("cpu_threads: 2 intra-op") and "OMP_WAIT_POLICY=PASSIVE" in line
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert "set OMP_WAIT_POLICY=PASSIVE" in R.choose_cpu_threads(2, n_params=10).log_line()


def test_configure_cpu_sets_threads_and_flushes_denormals():
    before = torch.get_num_threads()
    try:
        c = R.configure_cpu(1, n_params=10)
        assert torch.get_num_threads() == 1 and c.threads == 1
        tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in fp32
        assert float(tiny * 1.0) == 0.0
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)
