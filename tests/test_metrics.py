import numpy as np
import pytest

from genbench import datasets, metrics


def test_w2_translation_known_answer_at_5000():
    """W2(X, X + c) = |c| exactly; POT's default iteration cap gets this wrong at n = 5000."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 2))
    y = x[rng.permutation(5000)] + [0.3, 0.4]
    assert metrics.w2(x, y) == pytest.approx(0.5, abs=1e-6)


def test_w2_simple_cases():
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert metrics.w2(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)
    # two points vs two points: optimal matching pairs (0,0)-(0,1) and (1,0)-(1,1): W2 = 1
    assert metrics.w2(x, x + [0.0, 1.0]) == pytest.approx(1.0)
    assert np.isnan(metrics.w2(np.array([[np.nan, 0.0]]), x))


def test_w2_floor_matches_independent_draws_and_shrinks_with_n():
    ds = datasets.RING8
    floors = []
    for n in (200, 1000):
        ref = ds.sample(n, [0, 1])
        c = iter(range(10))
        floors.append(metrics.w2_floor(lambda m: ds.sample(m, [0, 2, next(c)]), ref, n, draws=4))
    assert floors[0][0] > floors[1][0] > 0.1  # a real, shrinking floor
    assert floors[1][1] > 0  # spread across draws reported


def test_mode_stats_true_samples_capture_all():
    ds = datasets.RING8
    s = metrics.mode_stats(ds.sample(4000, 0), ds.means, ds.stds, ds.weights)
    assert s["modes_captured"] == 8 and s["modes_total"] == 8
    assert s["hq_frac"] == pytest.approx(1 - np.exp(-4.5), abs=0.01)  # P(chi2_2 <= 9)
    assert s["mode_tv"] < 0.05


def test_mode_stats_half_the_modes_and_off_mode_points():
    ds = datasets.RING8
    x = ds.sample(4000, 0)
    nearest = np.linalg.norm(x[:, None] - ds.means[None], axis=-1).argmin(1)
    half = x[nearest < 4]
    s = metrics.mode_stats(half, ds.means, ds.stds, ds.weights)
    assert s["modes_captured"] == 4
    assert s["mode_tv"] == pytest.approx(0.5, abs=0.03)
    s = metrics.mode_stats(np.zeros((100, 2)), ds.means, ds.stds, ds.weights)  # the ring's centre
    assert s == {"modes_captured": 0, "modes_total": 8, "hq_frac": 0.0, "mode_tv": 1.0}
    # a mode with fewer than min_count high-quality samples is not captured
    few = np.concatenate([half, np.repeat(ds.means[4:5], 19, 0)])
    assert metrics.mode_stats(few, ds.means, ds.stds, ds.weights)["modes_captured"] == 4


def test_mean_ci():
    m, h, k = metrics.mean_ci([1.0, 2.0, 3.0])
    assert (m, k) == (2.0, 3)
    assert h == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)  # t_{0.975, 2} * s / sqrt(n)
    assert metrics.mean_ci([float("nan"), 5.0])[:1] == (5.0,)
