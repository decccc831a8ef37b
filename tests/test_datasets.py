import numpy as np
import pytest

from genbench import datasets


@pytest.mark.parametrize("name", list(datasets.DATASETS))
def test_seeded_finite_and_independent_of_global_rng(name):
    ds = datasets.get(name)
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    a = ds.sample(500, 3)
    assert a.shape == (500, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, ds.sample(500, 3))
    assert not np.array_equal(a, ds.sample(500, 4))
    assert np.array_equal(state, np.random.get_state()[1])  # global RNG untouched
    assert np.abs(a).max() < 10


def test_ring8_has_eight_distinct_equal_modes():
    ds = datasets.RING8
    assert len(ds.means) == 8
    d = np.linalg.norm(ds.means[:, None] - ds.means[None], axis=-1)
    assert d[~np.eye(8, dtype=bool)].min() > 1.5  # no repeated angle
    np.testing.assert_allclose(np.linalg.norm(ds.means, axis=1), 2.0)
    x = ds.sample(8000, 0)
    nearest = np.linalg.norm(x[:, None] - ds.means[None], axis=-1).argmin(1)
    counts = np.bincount(nearest, minlength=8)
    assert counts.min() > 900 and counts.max() < 1100
    resid = x - ds.means[nearest]
    assert abs(resid.std() - 0.05) < 0.003


def test_grid25_modes():
    ds = datasets.GRID25
    assert len(ds.means) == 25 and len({tuple(m) for m in ds.means}) == 25
    np.testing.assert_allclose(ds.weights.sum(), 1.0)


def test_unknown_dataset_is_usage_error():
    from genbench.api import UsageError

    with pytest.raises(UsageError, match="valid: ring8"):
        datasets.get("ring9")
