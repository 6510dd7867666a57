"""Latency harness for fair A/B comparisons on shared, noisy machines.

Candidates are timed *interleaved*: every round runs each candidate once, and the order rotates from round to round,
so a slow phase of the machine (another job, thermal throttling, a cache flush) hits all candidates alike and none
always runs first. Medians and percentiles, not means, are what to compare.

Spread. Each candidate's stats give p10/p25/median/p75/p90 over its timed calls, and keep the raw samples. Because
the calls of one round run back to back, the ratio of two candidates' times *in the same round* is a paired
measurement that a slow phase of the machine mostly cancels out of: `paired_speedup` gives that ratio's median and
percentiles over the rounds, the honest error bar of a speed-up (`speedup`, the ratio of the medians, is its point
estimate). Quote a speed-up with that spread; two candidates whose p10..p90 ratio range contains 1.0 are not
distinguishably different on this machine.

Like for like. The harness times whatever the callables do; for a fair comparison they must run under the same
conditions: same process (this one), same backend settings (threads, optimisation level, thread spinning; see
`disasm.runtime.onnxrt.OnnxRuntimeRunner.conditions`), same input, and the same warm-up. Warm-up rounds are
interleaved like the timed ones, so both candidates have allocated their buffers and loaded their weights into the
caches alike before the first timed call; each candidate's stats record how many warm-up calls it had and how long
its very first call took (`warmup`, `first_ms`), so a cold start that did not settle shows.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one candidate over `runs` timed calls, in milliseconds. Percentiles use numpy's linear
    interpolation. `samples_ms` holds the timed calls in round order (round r of every candidate ran back to back),
    which `paired_speedup` pairs up; `warmup` is the number of untimed calls before them and `first_ms` the time of
    the very first call (None when there was no warm-up)."""

    name: str
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    p25_ms: float | None = None
    p75_ms: float | None = None
    max_ms: float | None = None
    warmup: int = 0
    first_ms: float | None = None
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @property
    def iqr_ms(self) -> float | None:
        """Interquartile range p75 - p25 (None when the quartiles were not recorded)."""
        return None if self.p25_ms is None or self.p75_ms is None else self.p75_ms - self.p25_ms

    @property
    def spread(self) -> float | None:
        """Relative spread (p90 - p10) / median: 0.05 means the middle 80 % of the calls lie within 5 % of the
        median's size. None for a zero median."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else None


@dataclass(frozen=True)
class SpeedupStats:
    """How many times faster `new` ran than `base`, from the per-round ratios base time / new time (the two calls of
    a round ran back to back): median and percentiles over `rounds` rounds, and the ratio of the medians
    (`of_medians`, what `speedup` returns)."""

    base: str
    new: str
    rounds: int
    median: float
    p10: float
    p25: float
    p75: float
    p90: float
    of_medians: float

    def text(self) -> str:
        """"2.31x (p10-p90 2.20-2.45x over 30 rounds)"."""
        return f"{self.of_medians:.2f}x (p10-p90 {self.p10:.2f}-{self.p90:.2f}x over {self.rounds} rounds)"


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
    first_ns: dict[str, int] = {}
    for round_index in range(warmup):
        for name in _rotated(names, round_index):
            start = time.perf_counter_ns()
            _call(candidates, name, f"warm-up round {round_index + 1} of {warmup}")
            first_ns.setdefault(name, time.perf_counter_ns() - start)
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
    return {name: _stats(name, samples, warmup, first_ns.get(name)) for name, samples in times_ns.items()}


def speedup(base: LatencyStats, new: LatencyStats) -> float:
    """How many times faster `new` is than `base`: base median / new median (2.0 means twice as fast)."""
    if not new.median_ms > 0:
        raise ValueError(
            f"cannot compute a speed-up over {new.name!r}: its median latency is {new.median_ms} ms, "
            "below the timer's resolution; time a larger workload per call"
        )
    return base.median_ms / new.median_ms


def paired_speedup(base: LatencyStats, new: LatencyStats) -> SpeedupStats:
    """The speed-up of `new` over `base` with its spread: percentiles over the rounds of base time / new time, both
    measured in the same round of one `measure_latency` call (see the module docstring)."""
    of_medians = speedup(base, new)
    if not base.samples_ms or len(base.samples_ms) != len(new.samples_ms):
        raise ValueError(
            f"cannot pair {base.name!r} ({len(base.samples_ms)} samples) with {new.name!r} "
            f"({len(new.samples_ms)} samples): both must come from one measure_latency call"
        )
    new_ms = np.asarray(new.samples_ms, dtype=np.float64)
    if not (new_ms > 0).all():
        raise ValueError(f"cannot pair rounds of {new.name!r}: some of its calls took 0 ms, below the timer's resolution")
    ratios = np.asarray(base.samples_ms, dtype=np.float64) / new_ms
    p10, p25, median, p75, p90 = (float(v) for v in np.percentile(ratios, [10, 25, 50, 75, 90]))
    return SpeedupStats(base.name, new.name, len(ratios), median, p10, p25, p75, p90, of_medians)


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


def _stats(name: str, samples_ns: list[int], warmup: int = 0, first_ns: int | None = None) -> LatencyStats:
    samples_ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p10, p25, median, p75, p90 = np.percentile(samples_ms, [10, 25, 50, 75, 90])
    return LatencyStats(
        name=name,
        runs=len(samples_ms),
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        mean_ms=float(samples_ms.mean()),
        min_ms=float(samples_ms.min()),
        p25_ms=float(p25),
        p75_ms=float(p75),
        max_ms=float(samples_ms.max()),
        warmup=warmup,
        first_ms=None if first_ns is None else first_ns / 1e6,
        samples_ms=tuple(float(v) for v in samples_ms),
    )
