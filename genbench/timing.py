"""Device-aware wall-clock timing: warm-up calls, device synchronisation around each timed call,
and as many timed calls as a stable median needs (like ``timeit``'s autorange)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

#: timed calls are repeated until there are at least MIN_CALLS of them and they took MIN_TIME_S
#: together (at most MAX_CALLS): a 0.05 ms call is timed thousands of times, a 1 s call five times
MIN_CALLS = 5
MIN_TIME_S = 0.25
MAX_CALLS = 10_000


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    elif device == "mps":
        import torch

        torch.mps.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``calls`` timed calls: median, minimum and interquartile range."""

    median: float
    min: float
    iqr: float
    calls: int


def time_call(fn: Callable[[], object], *, device: str = "cpu", min_calls: int = MIN_CALLS,
              min_time: float = MIN_TIME_S, max_calls: int = MAX_CALLS, warmup: int = 1) -> Timing:
    """Runs ``fn`` ``warmup`` times untimed, then timed until at least ``min_calls`` calls that took
    ``min_time`` seconds together were made (or ``max_calls``). Each timed call is bracketed by a
    device synchronize, so queued GPU work is counted in the call that queued it."""
    if min_calls < 1 or max_calls < min_calls or min_time < 0:
        raise ValueError("need 1 <= min_calls <= max_calls and min_time >= 0")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while len(times) < max_calls and (len(times) < min_calls or total < min_time):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        total += times[-1]
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return Timing(statistics.median(times), min(times), q3 - q1, len(times))


PROTOCOL = (
    "Timing: {n} samples per call, 1 warm-up call, device synchronize around each timed call, "
    "median of {calls} timed calls per cell (at least {min_calls} and {min_time} s of calls; each row's "
    "sample_calls, with the interquartile range in sample_s_iqr); CPU threads = {threads} per process, "
    "{jobs} fit process(es) at once."
)
