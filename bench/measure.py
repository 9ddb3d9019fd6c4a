"""Measuring primitives: wall time of steps and calls, their statistics, peak memory."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval covers it (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_stats(values: list[float]) -> dict:
    """Median, quartiles (inclusive), IQR, min/max and mean of step seconds; ``all`` keeps the samples."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    median = statistics.median(ordered)
    return dict(median=median, p25=q1, p75=q3, iqr=q3 - q1, min=ordered[0], max=ordered[-1],
                mean=statistics.fmean(ordered), iqr_pct=100.0 * (q3 - q1) / median if median else 0.0,
                all=values)


def sequential_driver(step: Callable[[], None], steps: int) -> list[float]:
    """Run ``step`` ``steps`` times back to back; the seconds of each."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, inner: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples of ``inner`` calls, after one untimed call."""
    fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_memory(device: torch.device, rss_start: int) -> dict:
    """CUDA: peak allocated/reserved bytes since the last reset. CPU: this process's peak RSS, and its
    growth over ``rss_start`` (a forked worker's peak includes what it inherited)."""
    if device.type == "cuda":
        return dict(kind="cuda_max_allocated", bytes=torch.cuda.max_memory_allocated(device),
                    reserved_bytes=torch.cuda.max_memory_reserved(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB
    return dict(kind="rss", bytes=peak, start_bytes=rss_start, growth_bytes=max(0, peak - rss_start))
