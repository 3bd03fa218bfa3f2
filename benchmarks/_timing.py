"""Timing and memory helpers: warm-up, then medians of repeats, ratios in one run."""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2,
                device: torch.device | str | None = None, max_seconds: float = 20.0) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls.

    Stops early (with at least 3 repeats) once ``max_seconds`` are spent.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def interleaved_medians(cases: dict[str, Callable[[], Any]], *, repeats: int = 20,
                        warmup: int = 2, device: torch.device | str | None = None
                        ) -> dict[str, float | str]:
    """Median wall time (seconds) of every case, timed round-robin: each round calls
    every case once, so a slow drift of the machine (frequency, a neighbour) moves all
    cases alike and their ratios stay put. A case that raises ``RuntimeError`` gets the
    message instead of a time."""
    results: dict[str, float | str] = {}
    live = {}
    for name, fn in cases.items():
        try:
            for _ in range(warmup):
                fn()
        except RuntimeError as exc:  # e.g. the ZeroTensor trap in plain torch.func
            results[name] = f"fails: {str(exc)[:40]}"
            continue
        live[name] = fn
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    results.update({name: statistics.median(t) for name, t in times.items()})
    return {name: results[name] for name in cases}


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated during ``fn()``: tracemalloc on CPU, CUDA allocator on GPU.

    NOTE: on CPU, torch's allocations go through malloc, which tracemalloc sees only
    for Python-level objects; we therefore use torch's CPU profiler-free estimate via
    tracemalloc *and* report it as indicative. On CUDA the figure is exact.
    """
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak
