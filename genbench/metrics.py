"""Metrics: pure functions of arrays. They know nothing of models.

Each two-sample metric compares a model's samples ``x`` with an independent true sample ``ref``
of the same size; each has a noise floor, the same metric between independent true samples (see
``genbench.scoring``), and a known-answer test. Which quantity each one estimates:

- ``w2``: the exact 2-Wasserstein distance between the two empirical measures (POT ``emd2``).
  In 2D its finite-sample bias shrinks slowly with n (about n^-1/2), so at n = 2000 it is
  dominated by sampling noise; it stays as the verified, familiar column.
- ``sinkhorn``: ``sqrt(2 S_eps)``, S_eps the debiased Sinkhorn divergence of GeomLoss with the
  cost |x - y|^2 / 2 and blur eps^(1/2) (Feydy et al. 2019): an estimate of the population W2
  with a far smaller bias than exact empirical W2 (its floor is smaller), at a higher cost.
- ``energy``: the energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Székely & Rizzo; the MMD of the
  distance kernel), V-statistic, the pairwise distances by ``torch.cdist`` in float64; 0 exactly
  for identical samples, a metric between distributions, no bandwidth to tune.
- ``prdc``: precision, recall, density and coverage of Naeem et al. (2020) with k-NN balls.
- ``c2st``: held-out accuracy of a k-nearest-neighbour classifier telling ``x`` from ``ref``
  (a classifier two-sample test; 0.5 means indistinguishable).
- ``mode_stats``: mode coverage of a Gaussian mixture (VEEGAN / PacGAN protocol).
- ``pacgan_stats``: PacGAN's Table 1 columns exactly as its code computes them (modes, high-quality
  fraction, reverse KL of the mode histogram).
"""
from __future__ import annotations

import math

import numpy as np

#: POT's default ``numItermax`` (100000) stops the network simplex early at n >= 5000 and returns
#: a wrong W2 with only a warning; this bound lets it finish for the sizes genbench uses.
EMD_MAX_ITER = 100_000_000


class MetricError(ValueError):
    """A metric cannot be computed for these arrays (non-finite points, too few points); the
    runner leaves its columns empty and records this reason."""


def check_points(x, *, minimum: int = 2, what: str = "samples") -> np.ndarray:
    """``x`` as a float64 [n, 2] array, or MetricError naming what is wrong."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise MetricError(f"{what} must have shape [n, 2], got {list(x.shape)}")
    bad = int((~np.isfinite(x)).any(1).sum())
    if bad:
        raise MetricError(f"{bad} of {len(x)} {what} are not finite")
    if len(x) < minimum:
        raise MetricError(f"needs at least {minimum} {what}, got {len(x)}")
    return x


def w2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-weight point clouds (POT ``emd2`` on the
    squared Euclidean cost). Non-finite input gives NaN."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    import ot  # here, not at import: POT pulls in scikit-learn and more (seconds), which a GPU run's
    # fitting process, scoring in other processes, never needs

    cost = ot.dist(x, y, metric="sqeuclidean")
    val, log = ot.emd2(a, b, cost, numItermax=EMD_MAX_ITER, log=True)
    if log["warning"] is not None:
        raise RuntimeError(f"exact OT did not converge: {log['warning']}")
    return float(np.sqrt(max(val, 0.0)))


def _tensors(x, y, device: str):
    import torch

    return (torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device),
            torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32), device=device))


def sinkhorn(x: np.ndarray, y: np.ndarray, *, blur: float = 0.01, scaling: float = 0.9, debias: bool = True,
             device: str = "cpu") -> float:
    """``sqrt(2 S)`` with S GeomLoss's Sinkhorn loss for the cost |x - y|^2 / 2 at temperature
    eps = blur^2 (``debias=True``: the Sinkhorn divergence S_eps(a,b) - (S_eps(a,a) + S_eps(b,b))/2;
    ``False``: the entropic OT cost alone, which tends to exact W2^2/2 as blur -> 0). ``scaling``
    is GeomLoss' eps-annealing ratio: one Sinkhorn iteration per level, so a coarser ratio
    converges less (baselines/README.md, "Measurements behind the defaults")."""
    from geomloss import SamplesLoss

    x, y = check_points(x), check_points(y, what="reference points")
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=debias, backend="tensorized")
    return float(math.sqrt(max(2.0 * float(loss(*_tensors(x, y, device))), 0.0)))


def energy(x: np.ndarray, y: np.ndarray, *, device: str = "cpu", block: int = 1024) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` of the two empirical measures
    (V-statistic), in float64: each mean of pairwise distances summed over blocks of ``block``
    rows (``torch.cdist``, each distance computed directly, not through a matrix product), so the
    memory is ``block`` x n, not n x n (GeomLoss' tensorized ``energy`` loss, used before, builds
    n x n float32 matrices and was measured slower: baselines/README.md, "Scoring cost")."""
    return EnergyTo(y, device=device, block=block)(x)


class EnergyTo:
    """``energy(x, y)`` of many samples x against one y (a validation sample scored at every
    evaluation): y is put on the device once and its own term E|Y-Y'| computed once; each call
    sums on the device and reads one number back."""

    def __init__(self, y: np.ndarray, *, device: str = "cpu", block: int = 1024):
        import torch

        self.device, self.block = device, block
        y = check_points(y, what="reference points")
        self.y = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float64), device=device)
        self.yy = float(self._mean_distance(self.y, self.y))

    def _mean_distance(self, a, b):
        import torch

        total = sum(torch.cdist(a[i:i + self.block], b, compute_mode="donot_use_mm_for_euclid_dist").sum()
                    for i in range(0, len(a), self.block))
        return total / (len(a) * len(b))

    def __call__(self, x: np.ndarray) -> float:
        import torch

        x = torch.as_tensor(np.ascontiguousarray(check_points(x), dtype=np.float64), device=self.device)
        return float(2.0 * self._mean_distance(x, self.y) - self._mean_distance(x, x)) - self.yy

    #: the most distances a batched call holds at once (``many``): 32M, 256 MB in float64
    MANY_BLOCK = 32 * 2**20

    @staticmethod
    def many(targets: list["EnergyTo"], xs) -> list[float]:
        """``[t(x) for t, x in zip(targets, xs)]`` in a few batched passes on the targets' device
        (the members of a stacked fit scored at one step: one read-back for all): ``xs`` a tensor
        [m, n, 2] (or a list of m tensors of n points) on that device; the targets' samples all of
        one size. A non-finite sample gives NaN."""
        import torch

        ys = torch.stack([t.y for t in targets])
        xs = torch.stack(list(xs)) if isinstance(xs, (list, tuple)) else xs
        xs = xs.to(device=ys.device, dtype=torch.float64)
        m, n, ny = len(xs), xs.shape[1], ys.shape[1]
        if len(targets) != m or ys.shape[1:] != (ny, 2) or xs.shape[2:] != (2,):
            raise ValueError(f"many: {len(targets)} targets of {tuple(ys.shape[1:])} points for samples {tuple(xs.shape)}")
        chunk = max(1, EnergyTo.MANY_BLOCK // (n * max(n, ny)))
        xy, xx = [], []
        for i in range(0, m, chunk):
            a, b = xs[i:i + chunk], ys[i:i + chunk]
            xy.append(torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").sum((1, 2)))
            xx.append(torch.cdist(a, a, compute_mode="donot_use_mm_for_euclid_dist").sum((1, 2)))
        values = (2.0 * torch.cat(xy) / (n * ny) - torch.cat(xx) / (n * n)).tolist()
        return [v - t.yy for v, t in zip(values, targets)]


def _kth_radius(points: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour among the others."""
    from sklearn.neighbors import KDTree

    d, _ = KDTree(points).query(points, k=k + 1)
    return d[:, k]


def _balls_containing(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point, how many balls B(centres_i, radii_i) contain it (KD-tree range query at the
    largest radius, then each candidate checked against its own radius)."""
    from sklearn.neighbors import KDTree

    idx, dist = KDTree(centres).query_radius(points, r=float(radii.max()), return_distance=True)
    counts = np.zeros(len(points), dtype=np.int64)
    for j, (i, d) in enumerate(zip(idx, dist)):
        counts[j] = int((d <= radii[i]).sum())
    return counts


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020), with the k-NN balls of the
    real points (precision, density, coverage) and of the fake points (recall):

    - precision: fraction of fake points inside at least one real ball (fidelity);
    - recall: fraction of real points inside at least one fake ball (diversity);
    - density: mean number of real balls containing a fake point, over k (1 on average for a
      perfect model, above 1 where fakes crowd the densest regions);
    - coverage: fraction of real balls that contain at least one fake point.
    """
    from sklearn.neighbors import KDTree

    real = check_points(real, minimum=k + 1, what="reference points")
    fake = check_points(fake, minimum=k + 1)
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    inside = _balls_containing(fake, real, r_real)
    nearest_fake = KDTree(fake).query(real, k=1)[0][:, 0]
    return {
        "precision": float((inside > 0).mean()),
        "recall": float((_balls_containing(real, fake, r_fake) > 0).mean()),
        "density": float(inside.sum() / (k * len(fake))),
        "coverage": float((nearest_fake <= r_real).mean()),
    }


def c2st(x: np.ndarray, y: np.ndarray, *, seed: int = 0, k: int | None = None) -> float:
    """Classifier two-sample test: the held-out accuracy of a k-nearest-neighbour classifier that
    tells ``x`` (label 1) from ``y`` (label 0), two-fold cross-fitted (each half of the pooled,
    shuffled points is classified by a classifier trained on the other half). 0.5 means the
    classifier cannot tell them apart. ``k`` defaults to the odd number nearest sqrt(points per
    fold), which makes the k-NN rule consistent as n grows. A k-NN classifier is the Bayes-
    consistent choice in 2D at a cost of milliseconds (sbibm's MLP takes seconds per fit)."""
    from sklearn.neighbors import KNeighborsClassifier

    x, y = check_points(x, minimum=4), check_points(y, minimum=4, what="reference points")
    data = np.concatenate([x, y])
    labels = np.concatenate([np.ones(len(x)), np.zeros(len(y))])
    order = np.random.default_rng(seed).permutation(len(data))
    folds = np.array_split(order, 2)
    k = k or max(1, int(round(math.sqrt(len(folds[0])))) // 2 * 2 + 1)
    correct = 0
    for test, train in (folds, folds[::-1]):
        clf = KNeighborsClassifier(n_neighbors=min(k, len(train)), algorithm="kd_tree").fit(data[train], labels[train])
        correct += int((clf.predict(data[test]) == labels[test]).sum())
    return correct / len(data)


def min_mode_count(n: int, weights: np.ndarray, fraction: float = 0.25) -> int:
    """The captured-mode threshold at ``n`` samples: a quarter of the expected count of the
    lightest mode (20 for grid25 at n = 2000, as the threshold was fixed before; 3 at n = 300)."""
    return max(1, math.ceil(fraction * n * float(np.min(weights))))


def mode_stats(
    x: np.ndarray,
    means: np.ndarray,
    stds: np.ndarray,
    weights: np.ndarray,
    k_std: float = 3.0,
    min_count: int | None = None,
) -> dict[str, float]:
    """Mode coverage of a Gaussian mixture (the VEEGAN / PacGAN protocol).

    A sample is high-quality when it lies within ``k_std`` standard deviations (Mahalanobis, modes
    isotropic) of its nearest mode; a mode is captured when at least ``min_count`` high-quality
    samples fall in it (default: ``min_mode_count(len(x), weights)``, which scales with n).
    ``mode_tv`` is the total-variation distance between the histogram of high-quality samples
    over modes and the true mode weights (0 = right proportions, 1 = disjoint).
    """
    x = np.asarray(x, dtype=np.float64)
    if min_count is None:
        min_count = min_mode_count(len(x), weights)
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


def pacgan_stats(x: np.ndarray, means: np.ndarray, stds: np.ndarray, weights: np.ndarray,
                 threshold: float = 3.0) -> dict[str, float]:
    """PacGAN's metrics (Lin et al. 2018, its ``MetricLogger``): each sample goes to the mode nearest
    in Mahalanobis distance (isotropic: Euclidean over the mode's std) and is high quality when
    that distance is below ``threshold``; a mode is captured when it holds any high-quality sample
    (no minimum count, unlike ``mode_stats``); the reverse KL is KL(generated || true) between the
    histogram of the high-quality samples over the modes and the mixture's weights (0 log 0 = 0;
    infinite where no sample is high quality)."""
    x = np.asarray(x, dtype=np.float64)
    d = np.sqrt(((x[:, None, :] - means[None]) ** 2).sum(-1)) / np.asarray(stds)[None]
    nearest, dist = d.argmin(1), d.min(1)
    good = dist < threshold
    counts = np.bincount(nearest[good], minlength=len(means)).astype(np.float64)
    hq = float(good.mean()) if len(x) else 0.0
    if counts.sum() == 0:
        return {"pacgan_modes": 0.0, "pacgan_hq": hq, "pacgan_rkl": math.inf}
    p = counts / counts.sum()
    nz = p > 0
    rkl = float((p[nz] * np.log(p[nz] / np.asarray(weights, dtype=np.float64)[nz])).sum())
    return {"pacgan_modes": float(nz.sum()), "pacgan_hq": hq, "pacgan_rkl": rkl}


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
