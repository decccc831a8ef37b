"""Metrics: pure functions of arrays. They know nothing of models."""
from __future__ import annotations

from typing import Callable

import numpy as np
import ot

#: POT's default ``numItermax`` (100000) stops the network simplex early at n >= 5000 and returns
#: a wrong W2 with only a warning; this bound lets it finish for the sizes genbench uses.
EMD_MAX_ITER = 100_000_000


def w2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-weight point clouds (POT ``emd2`` on the
    squared Euclidean cost). Non-finite input gives NaN."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    cost = ot.dist(x, y, metric="sqeuclidean")
    val, log = ot.emd2(a, b, cost, numItermax=EMD_MAX_ITER, log=True)
    if log["warning"] is not None:
        raise RuntimeError(f"exact OT did not converge: {log['warning']}")
    return float(np.sqrt(max(val, 0.0)))


def w2_floor(draw: Callable[[int], np.ndarray], ref: np.ndarray, n: int, draws: int = 5) -> tuple[float, float]:
    """The finite-sample noise floor of ``w2(model, ref)``: W2 from ``ref`` to ``draws``
    independent true samples of size ``n`` — what a perfect model scores. Returns (mean, std)."""
    vals = [w2(draw(n), ref) for _ in range(draws)]
    return float(np.mean(vals)), float(np.std(vals, ddof=1) if draws > 1 else 0.0)


def mode_stats(
    x: np.ndarray,
    means: np.ndarray,
    stds: np.ndarray,
    weights: np.ndarray,
    k_std: float = 3.0,
    min_count: int = 20,
) -> dict[str, float]:
    """Mode coverage of a Gaussian mixture (the VEEGAN / PacGAN protocol).

    A sample is high-quality when it lies within ``k_std`` standard deviations (Mahalanobis, modes
    isotropic) of its nearest mode; a mode is captured when at least ``min_count`` high-quality
    samples fall in it. ``mode_tv`` is the total-variation distance between the histogram of
    high-quality samples over modes and the true mode weights (0 = right proportions, 1 = disjoint).
    """
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x).all(1)
    d = np.sqrt(((x[:, None, :] - means[None]) ** 2).sum(-1)) / stds[None]  # [n, K] in stds
    d[~finite] = np.inf
    nearest = d.argmin(1)
    hq = d[np.arange(len(x)), nearest] <= k_std
    counts = np.bincount(nearest[hq], minlength=len(means))
    hist = counts / max(counts.sum(), 1)
    return {
        "modes_captured": int((counts >= min_count).sum()),
        "modes_total": int(len(means)),
        "hq_frac": float(hq.mean()) if len(x) else float("nan"),
        "mode_tv": float(0.5 * np.abs(hist - weights).sum()) if counts.sum() else 1.0,
    }


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of the Student-t confidence interval, and count of the finite values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    if len(v) == 1:
        return float(v[0]), float("nan"), 1
    half = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half), len(v)
