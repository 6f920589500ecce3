"""Shared benchmark method (CPU): time variants *interleaved in one process*, memory in *fresh subprocesses*.

* :func:`interleaved` runs each variant once per round in a rotating order and reports, per variant, the median
  CPU time (``time.process_time``: the whole process, so intra-op threads count, and time another program steals
  from us does not) and the **median of the per-round ratios** against a reference variant.  Ratios of variants
  measured seconds apart on the same machine state are what the targets are stated in; absolute times on a shared
  machine are not comparable across runs.
* :func:`run_isolated` runs ``script --worker JSON`` in a fresh interpreter (clean peak RSS) for memory only.  The
  allocator threshold ``MALLOC_MMAP_THRESHOLD_`` (large buffers via mmap, so that RSS tracks live memory) is set
  only there — in timed runs it turns every large allocation into page faults.
* Long loops show progress with an ETA (:class:`duo_plugin._progress.Eta`: tqdm on a terminal, else a line on
  stderr every 30 s).
* :func:`configure_cpu` flushes denormals (``torch.set_flush_denormal``) and fixes the intra-op thread count.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from duo_plugin._progress import Eta


def configure_cpu(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    torch.set_flush_denormal(True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """Peak RSS (VmHWM; resettable via :func:`reset_peak`), falling back to ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(setup, step) -> dict:
    """``setup()`` → state; one warm-up ``step(state)`` then one measured step.  Returns the peak RSS during the
    measured step minus the RSS before it (``peak_delta_mb``).  Call in a fresh process (:func:`run_isolated`)."""
    state = setup()
    step(state)
    gc.collect()
    reset_peak()
    base = rss_bytes()
    base_peak = peak_bytes()
    step(state)
    peak = peak_bytes()
    return {"peak_delta_mb": round((max(peak, base_peak) - base) / 2**20, 1), "rss_before_mb": round(base / 2**20, 1)}


def measure(setup, step, repeats: int):
    """Memory and (minimum wall) time of ``step`` in one process — kept for scripts that have not moved to
    :func:`measure_memory` + :func:`interleaved`; its time is not paired with any reference."""
    state = setup()
    gc.collect()
    reset_peak()
    base = rss_bytes()
    base_peak = peak_bytes()
    step(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(state)
        times.append(time.perf_counter() - t0)
    peak = peak_bytes()
    return {"peak_delta_mb": round((max(peak, base_peak) - base) / 2**20, 1),
            "rss_after_setup_mb": round(base / 2**20, 1), "time_s": round(min(times), 4)}


def interleaved(variants: dict, reference: str, rounds: int = 5, warmup: int = 1) -> dict:
    """Time ``variants`` (name → zero-argument callable) round-robin in this process.

    Returns ``{name: {"cpu_s": median CPU seconds, "ratio": median over rounds of t_name / t_reference}}``.
    The order rotates every round so that no variant always follows the same one.
    """
    names = list(variants)
    if reference not in variants:
        raise ValueError(f"reference {reference!r} is not one of {names}")
    bar = Eta(True, (warmup + rounds) * len(names), f"interleaved {'/'.join(names)}", unit="run")
    for _ in range(warmup):
        for n in names:
            variants[n]()
            bar.update(1)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            gc.collect()
            t0 = time.process_time()
            variants[n]()
            times[n].append(time.process_time() - t0)
            bar.update(1)
    bar.close()
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[reference]) if b > 0]
        out[n] = {"cpu_s": round(statistics.median(times[n]), 4),
                  "ratio": round(statistics.median(ratios), 3) if ratios else float("nan")}
    return out


def run_isolated(script: str, config: dict) -> dict:
    """Run ``script --worker JSON`` in a fresh interpreter (clean peak RSS) and parse its last stdout line."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(config.get("threads", 1)))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")  # memory runs only: RSS tracks live memory
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(config)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for {config}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")
