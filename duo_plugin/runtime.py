"""CPU execution policy for training/evaluation runs: intra-op threads, wait policy, denormals.

PyTorch's default is one intra-op thread per core with OpenMP threads that spin while waiting.  On a machine that is
not idle this collapses: with one other CPU-bound process on 2 cores, 2 spinning threads ran the tiny model's step
~10x slower than 1 thread (docs/performance.md has the measurement and ``benchmarks/bench_threads.py``).  So CPU runs
choose the thread count deliberately (config key ``cpu_threads: auto | N``):

* ``N``: exactly N intra-op threads.
* ``auto``: one thread for models below :data:`AUTO_MULTI_THREAD_MIN_PARAMS` parameters (their matmuls are too small
  to amortise the thread synchronisation, and one thread cannot be starved by a spinning sibling); larger models get
  the CPUs this process may use (``sched_getaffinity``, divided among the local ranks) minus the machine's current
  load (1-minute load average), at least 1.

The OpenMP wait policy (``OMP_WAIT_POLICY``) is read once when the OpenMP runtime starts, i.e. before this code can
run: it is reported, not changed; ``OMP_WAIT_POLICY=PASSIVE`` is the right setting on a shared machine.

:func:`configure_cpu` also flushes denormals (``torch.set_flush_denormal(True)``): at the curriculum temperatures
softmax values become subnormal and x86 arithmetic on them is ~10-20x slower; flushing them to zero changes values
below 1.2e-38 only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["AUTO_MULTI_THREAD_MIN_PARAMS", "ThreadChoice", "available_cpus", "choose_cpu_threads", "configure_cpu",
           "check_device", "drop_cwd_from_sys_path"]

# Measured (benchmarks/bench_threads.py, docs/performance.md) at 0.2M and 8.3M parameters on a shared 2-core machine:
# one thread beats two spinning threads 7-14x and is on par with two passive ones; the 20M threshold above which
# more threads are used is a conservative guess (re-measure on an idle multi-core machine).
AUTO_MULTI_THREAD_MIN_PARAMS = 20_000_000


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str
    wait_policy: str

    def log_line(self) -> str:
        return (f"cpu_threads: {self.threads} intra-op thread(s) ({self.reason}); OMP_WAIT_POLICY={self.wait_policy}"
                + ("" if self.wait_policy.upper() == "PASSIVE" else
                   " (set OMP_WAIT_POLICY=PASSIVE before starting Python on a shared machine)"))


def choose_cpu_threads(setting, *, n_params: int, local_world_size: int = 1, cpus: int | None = None,
                       load: float | None = None) -> ThreadChoice:
    """The intra-op thread count for ``setting`` (``"auto"`` or a positive int) and why.  Pure: sets nothing."""
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    if setting is None or str(setting).lower() == "auto":
        cpus = available_cpus() if cpus is None else int(cpus)
        per_rank = max(1, cpus // max(1, int(local_world_size)))
        if int(n_params) < AUTO_MULTI_THREAD_MIN_PARAMS:
            return ThreadChoice(1, f"auto: model has {n_params / 1e6:.1f}M parameters < "
                                   f"{AUTO_MULTI_THREAD_MIN_PARAMS / 1e6:.0f}M", wait)
        load = _load() if load is None else float(load)
        free = max(1, min(per_rank, int(round(cpus - load)) // max(1, int(local_world_size))))
        return ThreadChoice(free, f"auto: {n_params / 1e6:.1f}M parameters, {cpus} CPU(s) for "
                                  f"{local_world_size} local rank(s), load {load:.1f}", wait)
    try:
        n = int(setting)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(setting).strip() != str(n):
        raise ValueError(f"cpu_threads must be 'auto' or a positive integer, got {setting!r}")
    return ThreadChoice(n, "cpu_threads set in the config", wait)


def configure_cpu(setting, *, n_params: int, local_world_size: int = 1) -> ThreadChoice:
    """Apply :func:`choose_cpu_threads` (``torch.set_num_threads``) and flush denormals; returns the choice."""
    choice = choose_cpu_threads(setting, n_params=n_params, local_world_size=local_world_size)
    torch.set_num_threads(choice.threads)
    torch.set_flush_denormal(True)
    return choice


def check_device(value, key: str = "device") -> torch.device:
    """The ``device`` config value as a :class:`torch.device`, refusing what would silently run elsewhere: an unknown
    name, ``cuda`` without CUDA (torchtune's ``get_device`` would fall back to the CPU without a word), a CUDA index
    beyond the devices present.  :class:`~duo_plugin.errors.UserError` naming ``key`` and the fix."""
    from duo_plugin.errors import UserError

    text = "cpu" if value is None else str(value).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"{key}={value!r} is not a device; set {key}=cpu, {key}=cuda or {key}=cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={text} but CUDA is not available here (torch.cuda.is_available() is False); set "
                            f"{key}=cpu, or run on a machine with an NVIDIA GPU and a CUDA build of PyTorch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{key}={text} but only {torch.cuda.device_count()} CUDA device(s) exist; set "
                            f"{key}=cuda:0..{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu", "meta"):
        raise UserError(f"{key}={text}: unsupported device type {dev.type!r}; set {key}=cpu or {key}=cuda")
    return dev


#: Files that make a directory a model or tokenizer folder (data, never code).
MODEL_FOLDER_MARKERS = ("duo_config.json", "duo_tokenizer.json", "tokenizer/duo_tokenizer.json", "config.json",
                        "model.safetensors", "tokenizer.json", "tokenizer.model")


def drop_cwd_from_sys_path(*, only_if_data: bool = False, data_dirs=()) -> list[str]:
    """Remove the working directory (``''``, ``'.'`` or its absolute path) from ``sys.path``: ``tune run`` and
    ``python -m`` put it there, and a model folder one works from (``checkpoint=.``) is data -- a package shipped in
    it must never shadow a module imported later.  The directory holding duo_plugin itself (a source checkout) is
    kept.  ``only_if_data`` (training recipes, whose ``_component_`` keys may name the user's own code in the working
    directory, as ``tune run`` intends): drop it only when it is a model/tokenizer folder
    (:data:`MODEL_FOLDER_MARKERS`) or lies inside one of ``data_dirs`` (``init_from``, ``tokenizer.path``).
    Entry points call this first; returns the removed entries."""
    import sys
    from pathlib import Path

    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return []
    if only_if_data:
        inside = False
        for d in data_dirs:
            try:
                inside = inside or (bool(d) and cwd.is_relative_to(Path(str(d)).resolve()))
            except (OSError, ValueError):
                continue
        if not inside and not any((cwd / m).exists() for m in MODEL_FOLDER_MARKERS):
            return []
    own = Path(__file__).resolve().parent.parent
    removed = []
    for entry in list(sys.path):
        try:
            here = Path(entry or ".").resolve()
        except OSError:
            continue
        if (entry in ("", ".") or here == cwd) and here != own:
            sys.path.remove(entry)
            removed.append(entry)
    return removed
