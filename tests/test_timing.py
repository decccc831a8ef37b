"""The timing protocol's logic on a fake clock: each call of the timed function advances it by a
stated cost, so every assertion is exact and no test depends on the machine's load."""
import pytest

from genbench.timing import time_call


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costing(clock: FakeClock, *costs: float, then: float | None = None):
    """A function whose i-th call costs ``costs[i]`` seconds of fake time (``then`` after those)."""
    calls = []

    def fn():
        i = len(calls)
        calls.append(1)
        clock.now += costs[i] if i < len(costs) else (costs[-1] if then is None else then)

    return fn, calls


def test_calls_repeat_until_the_minimum_time():
    clock = FakeClock()
    fn, calls = costing(clock, 0.002)  # longer than a block: one call per block
    t = time_call(fn, min_calls=5, min_time=0.05, warmup=2, block_s=0.001, clock=clock)
    assert t.per_block == 1 and t.calls == len(calls) - 3  # the warm-up calls and the calibrating one are not timed
    assert t.calls == 25  # past the minimum count, stopped once 0.05 s of 2 ms calls were made
    assert t.min == pytest.approx(0.002) and t.median == pytest.approx(0.002) and t.iqr == pytest.approx(0, abs=1e-12)


def test_short_calls_are_timed_in_blocks():
    clock = FakeClock()
    fn, calls = costing(clock, 0.0001)
    t = time_call(fn, min_calls=5, min_time=0.01, warmup=1, block_s=0.001, clock=clock)
    assert t.per_block == 16  # doubled from 1 until a block lasts block_s: 16 x 0.1 ms
    assert t.calls % t.per_block == 0 and t.calls >= 5 * t.per_block
    assert len(calls) == t.calls + 1 + (1 + 2 + 4 + 8 + 16)  # warm-up and calibrating blocks come on top, untimed
    assert t.median == pytest.approx(0.0001)


def test_a_slow_warm_up_call_does_not_stop_the_blocks():
    """The call after the warm-up calibrates: a slow first call (a CUDA graph's capture) is not it."""
    clock = FakeClock()
    fn, _ = costing(clock, 0.01, then=0.00001)
    t = time_call(fn, min_calls=5, min_time=0.01, warmup=1, block_s=0.001, clock=clock)
    assert t.per_block > 1 and t.median == pytest.approx(0.00001)


def test_long_calls_stop_at_the_minimum_count():
    clock = FakeClock()
    fn, calls = costing(clock, 0.02)
    t = time_call(fn, min_calls=3, min_time=0.01, warmup=0, clock=clock)
    assert t.calls == 3 and len(calls) == 4 and t.median == pytest.approx(0.02)  # one calibrating call without warm-up


def test_the_interquartile_range_of_uneven_blocks():
    clock = FakeClock()
    fn, _ = costing(clock, 0.01, 0.01, 0.01, 0.02, 0.03, 0.04, 0.05)  # warm-up, calibration, then 5 timed
    t = time_call(fn, min_calls=5, min_time=0.0, warmup=1, clock=clock)
    assert t.calls == 5 and t.min == pytest.approx(0.01) and t.median == pytest.approx(0.03)
    assert t.iqr == pytest.approx(0.02)  # quartiles 0.02 and 0.04 (inclusive method)


def test_the_count_is_capped():
    clock = FakeClock()
    fn, _ = costing(clock, 0.0)
    t = time_call(fn, min_calls=2, min_time=10.0, max_calls=7, warmup=0, clock=clock)
    assert t.calls <= 7


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        time_call(lambda: None, min_calls=0)
    with pytest.raises(ValueError):
        time_call(lambda: None, min_calls=5, max_calls=4)
