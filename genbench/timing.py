"""Device-aware wall-clock timing: warm-up calls, device synchronisation around each timed block of
calls, and as many calls as a stable median needs (like ``timeit``'s autorange)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

#: timed calls are repeated until there are at least MIN_CALLS of them and they took MIN_TIME_S
#: together (at most MAX_CALLS): a 0.05 ms call is timed a thousand times, a 1 s call five times.
#: Longer windows were measured no steadier on the H100 (baselines/README.md, "Timing windows"),
#: and in a grid of 360 cells every 0.1 s of window is 36 s of wall time.
MIN_CALLS = 5
MIN_TIME_S = 0.05
#: the window of rows written before they recorded theirs (``sample_min_time_s``)
LEGACY_MIN_TIME_S = 0.25
MAX_CALLS = 10_000
#: calls shorter than this are timed in blocks of back-to-back calls that last at least this long
BLOCK_S = 0.001


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    elif device == "mps":
        import torch

        torch.mps.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, minimum and interquartile range over the timed blocks (each block's
    time divided by its calls); ``calls`` timed in all, ``per_block`` between two synchronizes."""

    median: float
    min: float
    iqr: float
    calls: int
    per_block: int = 1


def block_time(fn: Callable[[], object], number: int, device: str,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for ``number`` back-to-back calls of ``fn``, with a device synchronize before and after."""
    synchronize(device)
    t0 = clock()
    for _ in range(number):
        fn()
    synchronize(device)
    return clock() - t0


def time_call(fn: Callable[[], object], *, device: str = "cpu", min_calls: int = MIN_CALLS,
              min_time: float = MIN_TIME_S, max_calls: int = MAX_CALLS, warmup: int = 1,
              block_s: float = BLOCK_S, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Runs ``fn`` ``warmup`` times untimed and once more to calibrate, then times it in blocks of
    back-to-back calls with a device synchronize around each block: the calls per block double
    until a block takes ``block_s`` (``timeit``'s autorange: a synchronize per 0.05 ms call would
    time the synchronize), then blocks are timed until there are at least ``min_calls`` of them and
    they took ``min_time`` together (at most ``max_calls`` calls). Calls of ``block_s`` or more are
    timed one per block. ``clock`` reads the time (the tests give a fake one)."""
    if min_calls < 1 or max_calls < min_calls or min_time < 0:
        raise ValueError("need 1 <= min_calls <= max_calls and min_time >= 0")
    for _ in range(warmup):
        fn()
    last = block_time(fn, 1, device, clock)  # untimed: calibrates (a warm-up call may be slow: a CUDA graph's capture)
    number = 1
    while last < block_s and number * 2 * min_calls <= max_calls:
        number *= 2  # the calibrating blocks are untimed warm-up too
        last = block_time(fn, number, device, clock)
    times: list[float] = []
    total = 0.0
    while (len(times) + 1) * number <= max_calls and (len(times) < min_calls or total < min_time):
        t = block_time(fn, number, device, clock)
        times.append(t / number)
        total += t
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return Timing(statistics.median(times), min(times), q3 - q1, len(times) * number, number)


PROTOCOL = (
    "Timing: {n} samples per call, 1 warm-up and 1 calibrating call, then {calls} timed calls per cell, "
    "{block} per block, back to back, with a device synchronize around each block (a call shorter than "
    "{block_ms} ms is repeated in its block until the block lasts that long; at least {min_calls} blocks and "
    "{min_time} s); sample_s is the median over the blocks of the time per call "
    "(each row's sample_calls, sample_calls_per_block, and the interquartile range in sample_s_iqr); "
    "CPU threads = {threads} per process, {concurrency}."
)
