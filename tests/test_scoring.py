"""The dataset supports, the scorer's per-metric errors and floors, and the calibration's defects."""
import math

import numpy as np
import pytest

from genbench import calibrate, datasets, scoring


def test_support_distances_known_answers():
    d = datasets.DATASETS
    assert d["circles"].support_distance(np.array([[1.5, 0.0], [0.0, 2.0], [0.0, 0.0]])).tolist() == \
        pytest.approx([0.5, 0.0, 1.0])
    # moons: the outer arc's top (0, 1) -> (-0.75, 1.125) after the shift and the 1.5 scale; 0.3 above it
    assert d["moons"].support_distance(np.array([[-0.75, 1.125], [-0.75, 1.425]])).tolist() == pytest.approx([0, 0.3])
    # checkerboard: inside a square, and the centre of an empty square (one unit from two squares)
    assert d["checkerboard"].support_distance(np.array([[-3.0, 1.0], [-3.0, 3.0]])).tolist() == pytest.approx([0, 1])
    assert d["ring8"].support_distance(np.array([[2.0, 0.1]])).tolist() == pytest.approx([2.0])  # in mode stds


@pytest.mark.parametrize("name", list(datasets.DATASETS))
def test_true_samples_lie_on_their_support_and_a_shift_leaves_it(name):
    ds = datasets.DATASETS[name]
    x = ds.sample(4000, 7)
    assert ds.on_support(x).mean() >= 0.985
    scale = np.sqrt(x.var(0).mean())
    assert ds.on_support(x + 0.5 * scale).mean() < 0.9


def test_score_leaves_failed_metrics_empty_with_their_reason():
    ds = datasets.RING8
    ref = ds.sample(200, 1)
    x = ds.sample(200, 2)
    x[:5] = np.nan
    values, errors = scoring.score(x, ref, ds, scoring.DEFAULT_METRICS)
    assert set(errors) == set(scoring.DEFAULT_METRICS)
    assert all(v is None for k, v in values.items()) and "5 of 200 samples are not finite" in errors["w2"]
    # too few points for the k-NN metrics: those are empty, the others computed
    values, errors = scoring.score(ds.sample(3, 2), ref, ds, scoring.DEFAULT_METRICS)
    assert set(errors) == {"prdc", "c2st"} and values["precision"] is None and values["w2"] > 0
    # moons has no modes: the mixture metric is skipped, not an error
    values, errors = scoring.score(datasets.get("moons").sample(200, 2), datasets.get("moons").sample(200, 1),
                                   datasets.get("moons"), scoring.DEFAULT_METRICS)
    assert not errors and "modes_captured" not in values and 0.9 < values["hq_frac"] <= 1


def test_floors_are_true_sample_scores():
    ds = datasets.get("moons")
    ref = ds.sample(500, 1)
    draws = [ds.sample(500, [9, i]) for i in range(4)]
    f = scoring.floors(draws, ref, ds, ["w2", "c2st", "support"])
    w2s = [scoring.score(d, ref, ds, ["w2"])[0]["w2"] for d in draws]
    assert f["w2_floor"] == pytest.approx(np.mean(w2s)) and f["w2_floor_std"] == pytest.approx(np.std(w2s, ddof=1))
    assert abs(f["c2st_floor"] - 0.5) < 0.05 and f["hq_frac_floor"] > 0.98


def test_parse_metrics():
    assert scoring.parse_metrics("default,sinkhorn") == [*scoring.DEFAULT_METRICS, "sinkhorn"]
    assert scoring.parse_metrics("all") == list(scoring.METRICS)
    with pytest.raises(ValueError, match="unknown metric 'mmd'"):
        scoring.parse_metrics("w2,mmd")


def test_defects_do_what_they_say():
    ds = datasets.get("moons")
    ref = ds.sample(4000, 1)
    scale = np.sqrt(ref.var(0).mean())
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    D = calibrate.DEFECTS
    shifted = D["shift"].fn(ds, 4000, 0.05, rng(), ref)
    assert np.linalg.norm(shifted.mean(0) - ds.sample(4000, rng()).mean(0)) == pytest.approx(0.05 * scale, rel=1e-4)
    out = D["outliers"].fn(ds, 4000, 0.02, rng(), ref)
    assert (~ds.on_support(out)).mean() == pytest.approx(0.02, abs=0.006)
    right = (D["reweight"].fn(ds, 20000, 0.05, rng(), ref)[:, 0] > np.median(ref[:, 0])).mean()
    assert right == pytest.approx(0.55, abs=0.012)
    c = ref.mean(0)
    miss = D["missing"].fn(ds, 4000, 0.05, rng(), ref)
    ang = np.abs(np.arctan2(*(ref - c)[:, ::-1].T))
    width = np.quantile(ang, 0.05)
    assert (np.abs(np.arctan2(*(miss - c)[:, ::-1].T)) <= width * 0.9).sum() == 0


def test_seeds_needed_and_calibration_tells_large_from_none():
    assert calibrate.seeds_needed(1.0, 0.1, 0.1) == 1
    assert calibrate.seeds_needed(0.1, 0.1, 0.0) == 9 and math.isinf(calibrate.seeds_needed(0.0, 0.1, 0.1))
    ds = datasets.get("moons")
    rows = calibrate.calibrate_dataset(ds, 300, 3, [(calibrate.DEFECTS["shift"], 0.5), (calibrate.DEFECTS["blur"], 1e-6)],
                                       ["w2", "c2st", "support"])
    seeds = {(r["defect"], r["column"]): r["seeds"] for r in rows}
    assert all(seeds[("shift", c)] == 1 for c in ("w2", "c2st", "hq_frac"))
    assert all(seeds[("blur", c)] > 5 for c in ("w2", "c2st", "hq_frac"))
    tab = calibrate.table(rows, max_seeds=5)
    assert tab.set_index("defect").loc["blur", "resolved by"] == "nothing"
