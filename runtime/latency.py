"""Latency harness for fair A/B comparisons on shared, noisy machines.

Candidates are timed *interleaved*: every round runs each candidate once, and the order rotates from round to round,
so a slow phase of the machine (another job, thermal throttling, a cache flush) hits all candidates alike and none
always runs first. Medians and percentiles, not means, are what to compare.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one candidate over `runs` timed calls, in milliseconds."""

    name: str
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float


def measure_latency(
    candidates: dict[str, Callable[[], object]],
    runs: int = 50,
    warmup: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each candidate `runs` times, interleaved in rotating order, after `warmup` untimed calls each.

    Args:
        candidates: Name -> callable taking no arguments. Each call must block until its work is done (a GPU
            candidate synchronizes its stream itself); the return value is ignored.
        runs: Timed rounds; each round calls every candidate once. Defaults to 50.
        warmup: Untimed rounds before the timed ones, also interleaved. Defaults to 5.
        progress: Called as `progress(done, total)` after each timed round (total == runs). Defaults to none.

    Round r calls the candidates starting at position r mod n of `candidates`' order: with candidates a, b, c the
    rounds run abc, bca, cab, abc, ... Python's garbage collector is paused while timing (as `timeit` does), so a
    collection triggered by one candidate is not charged to another.

    Returns:
        Name -> LatencyStats, in the order of `candidates`.

    An exception raised by a candidate propagates unchanged, with a note naming the candidate and the round.
    """
    names = _validated_names(candidates, runs, warmup, progress)
    for round_index in range(warmup):
        for name in _rotated(names, round_index):
            _call(candidates, name, f"warm-up round {round_index + 1} of {warmup}")
    times_ns: dict[str, list[int]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(runs):
            for name in _rotated(names, round_index):
                start = time.perf_counter_ns()
                _call(candidates, name, f"timed round {round_index + 1} of {runs}")
                times_ns[name].append(time.perf_counter_ns() - start)
            if progress is not None:
                progress(round_index + 1, runs)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _stats(name, samples) for name, samples in times_ns.items()}


def speedup(base: LatencyStats, new: LatencyStats) -> float:
    """How many times faster `new` is than `base`: base median / new median (2.0 means twice as fast)."""
    if not new.median_ms > 0:
        raise ValueError(
            f"cannot compute a speed-up over {new.name!r}: its median latency is {new.median_ms} ms, "
            "below the timer's resolution; time a larger workload per call"
        )
    return base.median_ms / new.median_ms


def _validated_names(
    candidates: Mapping[str, Callable[[], object]],
    runs: int,
    warmup: int,
    progress: Callable[[int, int], None] | None,
) -> list[str]:
    if not isinstance(candidates, Mapping):
        raise ValueError(f"candidates must be a dict from name to callable, got {type(candidates).__name__}")
    if not candidates:
        raise ValueError("measure_latency needs at least one candidate; got an empty dict")
    not_callable = [name for name, function in candidates.items() if not callable(function)]
    if not_callable:
        raise ValueError(f"candidates must map names to callables taking no arguments; not callable: {not_callable}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable progress(done, total) or None, got {type(progress).__name__}")
    return list(candidates)


def _rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def _call(candidates: Mapping[str, Callable[[], object]], name: str, where: str) -> None:
    try:
        candidates[name]()
    except Exception as error:
        error.add_note(f"raised by latency candidate {name!r} in {where}")
        raise


def _stats(name: str, samples_ns: list[int]) -> LatencyStats:
    samples_ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p10, median, p90 = np.percentile(samples_ms, [10, 50, 90])
    return LatencyStats(
        name=name,
        runs=len(samples_ms),
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        mean_ms=float(samples_ms.mean()),
        min_ms=float(samples_ms.min()),
    )
