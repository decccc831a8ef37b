import time

import pytest

from genbench.timing import time_call


def counter_sleep(seconds):
    calls = []

    def fn():
        calls.append(1)
        if seconds:
            time.sleep(seconds)

    return fn, calls


def test_calls_repeat_until_the_minimum_time():
    fn, calls = counter_sleep(0.002)  # longer than a block: one call per block
    t = time_call(fn, min_calls=5, min_time=0.05, warmup=2, block_s=0.001)
    assert t.per_block == 1 and t.calls == len(calls) - 3  # the warm-up calls and the calibrating one are not timed
    assert 5 < t.calls <= 26  # past the minimum count, stopped once 0.05 s of >= 2 ms calls were made
    assert 0.002 <= t.min <= t.median and t.iqr >= 0


def test_short_calls_are_timed_in_blocks():
    fn, calls = counter_sleep(0)
    t = time_call(fn, min_calls=5, min_time=0.01, warmup=1, block_s=0.001)
    assert t.per_block > 1 and t.calls % t.per_block == 0 and t.calls >= 5 * t.per_block
    assert len(calls) > t.calls  # warm-up and calibrating blocks come on top, untimed
    assert t.median < 0.001 / 2  # a block of per_block calls lasted about block_s or more


def test_a_slow_warm_up_call_does_not_stop_the_blocks():
    """The call after the warm-up calibrates: a slow first call (a CUDA graph's capture) is not it."""
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.01)

    t = time_call(fn, min_calls=5, min_time=0.01, warmup=1, block_s=0.001)
    assert t.per_block > 1


def test_long_calls_stop_at_the_minimum_count():
    fn, calls = counter_sleep(0.02)
    t = time_call(fn, min_calls=3, min_time=0.01, warmup=0)
    assert t.calls == 3 and len(calls) == 4 and t.median >= 0.02  # one calibrating call even without warm-up


def test_the_count_is_capped():
    fn, calls = counter_sleep(0)
    t = time_call(fn, min_calls=2, min_time=10.0, max_calls=7, warmup=0)
    assert t.calls <= 7


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        time_call(lambda: None, min_calls=0)
    with pytest.raises(ValueError):
        time_call(lambda: None, min_calls=5, max_calls=4)
