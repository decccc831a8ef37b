import time

import pytest

from genbench.timing import time_call


def counter_sleep(seconds):
    calls = []

    def fn():
        calls.append(1)
        time.sleep(seconds)

    return fn, calls


def test_short_calls_repeat_until_the_minimum_time():
    fn, calls = counter_sleep(0.001)
    t = time_call(fn, min_calls=5, min_time=0.05, warmup=2)
    assert t.calls == len(calls) - 2  # the warm-up calls are not timed
    assert 5 < t.calls <= 51  # past the minimum count, stopped once 0.05 s of >= 1 ms calls were made
    assert 0.001 <= t.min <= t.median and t.iqr >= 0


def test_long_calls_stop_at_the_minimum_count():
    fn, calls = counter_sleep(0.02)
    t = time_call(fn, min_calls=3, min_time=0.01, warmup=0)
    assert t.calls == 3 == len(calls) and t.median >= 0.02


def test_the_count_is_capped():
    fn, calls = counter_sleep(0)
    t = time_call(fn, min_calls=2, min_time=10.0, max_calls=7, warmup=0)
    assert t.calls == 7 == len(calls)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        time_call(lambda: None, min_calls=0)
    with pytest.raises(ValueError):
        time_call(lambda: None, min_calls=5, max_calls=4)
