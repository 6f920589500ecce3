"""Shared helpers: run each configuration in a fresh subprocess and report peak-RSS delta and time (CPU)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


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


def measure(setup, step, repeats: int):
    """``setup()`` → state; runs ``step(state)`` once (warm-up, counted in the peak) then ``repeats`` timed times.
    Returns dict(peak_delta_mb, time_s) with peak_delta = max RSS during the steps − RSS after setup."""
    state = setup()
    import gc

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


def run_isolated(script: str, config: dict) -> dict:
    """Run ``script --worker JSON`` in a fresh interpreter (clean peak RSS) and parse its last stdout line."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")  # large buffers via mmap: RSS tracks live memory
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(config)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for {config}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")
