"""Timing on shared, noisy machines: interleaved repeats and medians of paired ratios.

Variants are run in turn (A, B, C, A, B, C, ...) rather than one after the other, so a burst of
load from another process hits every variant about equally; a speedup is the median over
repeats of the ratio *within* a repeat, which cancels slow drifts of the machine's speed.

Process CPU time (all threads) is recorded beside wall time: when other processes compete for
the cores, wall time includes waiting for a core and CPU time does not, so CPU-time ratios are
the steadier of the two on a shared machine (spinning OpenMP threads still inflate both).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``, synchronising CUDA around the call."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, shuffle: int | None = None
                ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """Run every variant ``repeats`` times, interleaved; ``({name: [wall seconds]},
    {name: [process CPU seconds]}, {name: last result})``. ``shuffle`` (a seed): each repeat
    runs the variants in another random order, so that no variant always runs at the same point
    of a round (with many variants a round is long, and where a variant stands in it matters)."""
    if repeats < 1:
        raise ValueError(f"bench.repeats must be >= 1, got {repeats}")
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, Any] = {}
    names = list(variants)
    rng = random.Random(shuffle)
    for _ in range(repeats):
        if shuffle is not None:
            rng.shuffle(names)
        for name in names:
            fn = variants[name]
            c0 = time.process_time()
            results[name], s = timed(fn)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(s)
    return wall, cpu, results


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of ``numerator[i] / denominator[i]`` (paired by repeat)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired timings need the same, non-zero number of repeats")
    return float(statistics.median(a / b for a, b in zip(numerator, denominator)))


def rate(n: int, seconds: Sequence[float]) -> float:
    """Items per second from the median of ``seconds``."""
    return n / float(statistics.median(seconds))
