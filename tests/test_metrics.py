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
    from genbench import scoring

    ds = datasets.RING8
    floors = []
    for n in (200, 1000):
        ref = ds.sample(n, [0, 1])
        f = scoring.floors([ds.sample(n, [0, 2, i]) for i in range(4)], ref, ds, ["w2"])
        floors.append((f["w2_floor"], f["w2_floor_std"]))
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


def _brute_energy(x, y):
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1).mean()  # noqa: E731
    return 2 * d(x, y) - d(x, x) - d(y, y)


def test_energy_known_answers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    assert metrics.energy(x, x) == pytest.approx(0.0, abs=1e-5)
    # two point masses at distance 5: 2 E|X-Y| - 0 - 0 = 10
    assert metrics.energy(np.zeros((50, 2)), np.tile([3.0, 4.0], (40, 1))) == pytest.approx(10.0, rel=1e-12)
    y = rng.normal(size=(2500, 2)) + [0.5, 0.0]  # more rows than a block: the blocks' sums add up
    assert metrics.energy(x, y) == pytest.approx(_brute_energy(x, y), rel=1e-9)
    assert metrics.energy(x, y, block=7) == pytest.approx(_brute_energy(x, y), rel=1e-9)


def test_energy_to_one_sample_scores_many_against_it():
    """``EnergyTo(y)`` keeps y's own term from its first computation: every later x (of other
    sizes, and y itself) gets the brute-force energy distance."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=(1500, 2))
    to_y = metrics.EnergyTo(y, block=256)
    assert to_y.yy == pytest.approx(np.linalg.norm(y[:, None] - y[None], axis=-1).mean(), rel=1e-12)
    for x in (rng.normal(size=(400, 2)) + [1.0, 0.0], rng.normal(size=(1500, 2)) * 2.0, y):
        assert to_y(x) == pytest.approx(_brute_energy(x, y), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        to_y(np.full((10, 2), np.nan))  # checked as energy's points are


def test_sinkhorn_debiased_translation_and_entropic_cost_tends_to_exact_w2():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    # S_eps(a, a + c) = |c|^2 / 2 exactly for the quadratic cost (the coupling's linear term cancels)
    assert metrics.sinkhorn(x, x + [0.3, 0.4]) == pytest.approx(0.5, abs=2e-3)
    assert metrics.sinkhorn(x, x) == pytest.approx(0.0, abs=2e-3)
    y = rng.normal(size=(300, 2)) * [1.0, 0.5] + [1.0, 0.0]
    exact = metrics.w2(x, y)
    gaps = [abs(metrics.sinkhorn(x, y, blur=b, debias=False) - exact) for b in (0.5, 0.1, 0.02)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01 * exact


def _brute_prdc(real, fake, k):
    dist = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
    rr, ff, rf = dist(real, real), dist(fake, fake), dist(real, fake)
    r_real, r_fake = np.sort(rr, 1)[:, k], np.sort(ff, 1)[:, k]
    inside = rf <= r_real[:, None]  # [real, fake]
    return {"precision": inside.any(0).mean(), "recall": (rf <= r_fake[None]).any(1).mean(),
            "density": inside.sum() / (k * len(fake)), "coverage": (rf.min(1) <= r_real).mean()}


def test_prdc_known_answers():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 2))
    fake = rng.normal(size=(300, 2)) * 1.3 + [0.4, 0.0]
    got = metrics.prdc(real, fake, k=5)
    assert got == pytest.approx(_brute_prdc(real, fake, 5), abs=1e-12)
    # identical sets: every point is in its own ball, each ball holds itself and its k neighbours
    same = metrics.prdc(real, real, k=5)
    assert same == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 6 / 5, "coverage": 1.0})
    # disjoint sets far apart: nothing of either is inside the other's balls
    assert metrics.prdc(real, fake + 100.0) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_c2st_known_answers():
    """N(0, I) against N((2, 0), I): the Bayes classifier's accuracy is Phi(1) = 0.8413."""
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4000, 2)), rng.normal(size=(4000, 2))
    assert metrics.c2st(x, y) == pytest.approx(0.5, abs=0.025)
    assert metrics.c2st(x + [2.0, 0.0], y) == pytest.approx(norm.cdf(1.0), abs=0.02)
    assert metrics.c2st(x + 50.0, y) == 1.0


def test_metrics_refuse_bad_points_with_a_reason():
    good = np.random.default_rng(0).normal(size=(50, 2))
    bad = good.copy()
    bad[3, 1] = np.nan
    for fn in (metrics.energy, metrics.sinkhorn, metrics.prdc, metrics.c2st):
        with pytest.raises(metrics.MetricError, match="1 of 50 samples are not finite"):
            fn(bad, good) if fn is not metrics.prdc else fn(good, bad)
    with pytest.raises(metrics.MetricError, match="at least 6"):
        metrics.prdc(good, good[:3])


def test_min_mode_count_scales_with_n():
    """True grid25 samples capture every mode at n = 300 too (a fixed threshold of 20 gave 0/25)."""
    ds = datasets.GRID25
    assert metrics.min_mode_count(2000, ds.weights) == 20 and metrics.min_mode_count(300, ds.weights) == 3
    for n in (300, 2000):
        assert metrics.mode_stats(ds.sample(n, 5), ds.means, ds.stds, ds.weights)["modes_captured"] == 25
