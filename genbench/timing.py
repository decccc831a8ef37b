"""Device-aware wall-clock timing: a warm-up call, device synchronisation around the timed
region, then the median and the minimum of several repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    elif device == "mps":
        import torch

        torch.mps.synchronize()


def time_call(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; returns (median, min) in
    seconds. Each timed call is bracketed by a device synchronize so queued GPU work is counted."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


PROTOCOL = (
    "Timing: {n} samples per call, 1 warm-up call, device synchronize around each timed call, "
    "median (min) of {repeats} repeats; CPU threads = {threads} per process, {jobs} fit process(es) at once."
)
