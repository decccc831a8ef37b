"""The 2D datasets. Each draws from its own seeded numpy Generator (never the global RNG) and
carries a version string that changes whenever its samples would.

Origins: pacgan-ring and pacgan-grid are PacGAN's (Lin et al. 2018) exactly, for its reproduction;
ring8 and grid25 are the mixtures of the mode-collapse literature (VEEGAN, PacGAN);
moons and circles follow scikit-learn's ``make_moons`` / ``make_circles`` geometry; swissroll,
pinwheel, spirals (``2spirals``) and checkerboard follow the toy densities of FFJORD
(Grathwohl et al. 2019), re-written here on a seeded Generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    version: str
    description: str
    draw: Callable[[int, np.random.Generator], np.ndarray] = field(repr=False)
    #: distance of each point to the noise-free support (the mixture means in mode stds, the
    #: moons' arcs, the checkerboard's squares ...), and the tolerance within which a point counts
    #: as on the support (``hq_frac``); ``support_note`` says what both are, in the data's units
    support_distance: Callable[[np.ndarray], np.ndarray] = field(default=None, repr=False)
    support_tol: float = 0.0
    support_note: str = ""
    #: mixtures only: mode means [K, 2], isotropic stds [K], weights [K]
    means: np.ndarray | None = field(default=None, repr=False)
    stds: np.ndarray | None = field(default=None, repr=False)
    weights: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_mixture(self) -> bool:
        return self.means is not None

    def on_support(self, x: np.ndarray) -> np.ndarray:
        """Boolean per point: within ``support_tol`` of the noise-free support."""
        return self.support_distance(np.asarray(x, dtype=np.float64)) <= self.support_tol

    def sample(self, n: int, seed: int | np.random.Generator | list[int]) -> np.ndarray:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return np.asarray(self.draw(int(n), rng), dtype=np.float32)


def _mixture(name: str, means: np.ndarray, std: float, description: str, version: str = "1") -> Dataset:
    means = np.asarray(means, dtype=np.float64)
    k = len(means)
    weights = np.full(k, 1.0 / k)

    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        idx = rng.choice(k, size=n, p=weights)
        return means[idx] + std * rng.standard_normal((n, 2))

    def distance(x: np.ndarray) -> np.ndarray:  # to the nearest mean, in mode stds
        return np.sqrt(((x[:, None, :] - means[None]) ** 2).sum(-1)).min(1) / std

    return Dataset(name, version, description, draw, distance, 3.0,
                   "within 3 mode stds of the nearest mean (the VEEGAN / PacGAN rule)", means, np.full(k, std), weights)


def _arc_distance(x: np.ndarray, centre, radius: float, start: float, stop: float) -> np.ndarray:
    """Distance from points to the circular arc of angles [start, stop] (radians, start < stop)."""
    d = x - np.asarray(centre, dtype=np.float64)
    ang = np.arctan2(d[:, 1], d[:, 0])
    mid = (start + stop) / 2
    rel = (ang - mid + np.pi) % (2 * np.pi) - np.pi  # angle relative to the arc's middle
    on_arc = np.abs(rel) <= (stop - start) / 2
    radial = np.abs(np.hypot(d[:, 0], d[:, 1]) - radius)
    ends = [radius * np.array([np.cos(a), np.sin(a)]) for a in (start, stop)]
    to_ends = np.min([np.hypot(*(d - e).T) for e in ends], 0)
    return np.where(on_arc, radial, to_ends)


def _polyline_distance(curve: np.ndarray):
    """Distance to a densely sampled curve (a KD-tree over its points, built at the first call and
    kept: the evaluations during training ask at every evaluation of every fit)."""
    tree = []

    def distance(x: np.ndarray) -> np.ndarray:
        if not tree:
            from sklearn.neighbors import KDTree

            tree.append(KDTree(curve))
        return tree[0].query(x, k=1)[0][:, 0]

    return distance


_angles = 2 * np.pi * np.arange(8) / 8  # 8 distinct angles (linspace(0, 2pi, 8) would repeat 0)
RING8 = _mixture(
    "ring8",
    2.0 * np.stack([np.cos(_angles), np.sin(_angles)], 1),
    0.05,
    "8 equal Gaussians on a circle of radius 2, std 0.05",
)
_g = np.arange(-2.0, 3.0)
GRID25 = _mixture(
    "grid25",
    np.stack(np.meshgrid(_g, _g, indexing="ij"), -1).reshape(-1, 2),
    0.05,
    "5x5 equal Gaussians on the integer grid [-2, 2]^2, std 0.05",
)


def _moons_distance(x: np.ndarray) -> np.ndarray:
    p = x / 1.5 + [0.5, 0.25]  # undo the scaling: arcs of radius 1 around (0, 0) and (1, 0.5)
    return 1.5 * np.minimum(_arc_distance(p, (0, 0), 1.0, 0.0, np.pi), _arc_distance(p, (1, 0.5), 1.0, np.pi, 2 * np.pi))


def _circles_distance(x: np.ndarray) -> np.ndarray:
    r = np.hypot(x[:, 0], x[:, 1])
    return np.minimum(np.abs(r - 1.0), np.abs(r - 2.0))


_t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 20_000)
_SWISSROLL_CURVE = np.stack([_t * np.cos(_t), _t * np.sin(_t)], 1) / 5.0
_r = np.linspace(0, 3 * np.pi, 20_000)
_arm = np.stack([-np.cos(_r) * _r, np.sin(_r) * _r], 1) / 3 + 0.25 / 3  # + the mean of the uniform offset
_SPIRALS_CURVE = np.concatenate([_arm, -_arm])
_f = np.linspace(0.1, 1.9, 4_000)  # radial feature within 3 std of its mean (1 +- 3 x 0.3)
_PINWHEEL_CURVE = np.concatenate([
    2 * _f[:, None] * np.stack([np.cos(a + 0.25 * np.exp(_f)), -np.sin(a + 0.25 * np.exp(_f))], 1)
    for a in np.linspace(0, 2 * np.pi, 5, endpoint=False)])


def _checkerboard_distance(x: np.ndarray) -> np.ndarray:
    """Distance to the union of the 8 squares (0 inside)."""
    d = np.full(len(x), np.inf)
    for k in range(-2, 2):  # column [k, k + 1) (before the x2 scaling), rows by parity of k
        for lo in ((0.0, -2.0) if k % 2 == 0 else (1.0, -1.0)):
            dx = np.maximum(np.maximum(2 * k - x[:, 0], x[:, 0] - 2 * (k + 1)), 0)
            dy = np.maximum(np.maximum(2 * lo - x[:, 1], x[:, 1] - 2 * (lo + 1)), 0)
            d = np.minimum(d, np.hypot(dx, dy))
    return d


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    n_out = n // 2
    t = rng.uniform(0, np.pi, n)
    outer = np.stack([np.cos(t), np.sin(t)], 1)
    inner = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    x = np.where((np.arange(n) < n_out)[:, None], outer, inner)
    x = x + 0.05 * rng.standard_normal((n, 2))
    return (x - [0.5, 0.25]) * 1.5


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0, 2 * np.pi, n)
    r = np.where(rng.random(n) < 0.5, 2.0, 1.0)
    return r[:, None] * np.stack([np.cos(t), np.sin(t)], 1) + 0.05 * rng.standard_normal((n, 2))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + 0.5 * rng.standard_normal((n, 2))
    return x / 5.0


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    radial_std, tangential_std, classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, classes, endpoint=False)
    feats = rng.standard_normal((n, 2)) * [radial_std, tangential_std]
    feats[:, 0] += 1.0
    labels = rng.integers(0, classes, n)
    ang = rads[labels] + rate * np.exp(feats[:, 0])
    rot = np.stack([np.cos(ang), -np.sin(ang), np.sin(ang), np.cos(ang)], 1).reshape(-1, 2, 2)
    return 2 * np.einsum("ti,tij->tj", feats, rot)


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    m = rng.random(n) < 0.5
    r = np.sqrt(rng.random(n)) * 540 * (2 * np.pi) / 360
    x = np.stack([-np.cos(r) * r + rng.random(n) * 0.5, np.sin(r) * r + rng.random(n) * 0.5], 1)
    x = np.where(m[:, None], x, -x) / 3
    return x + 0.1 * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


# named presets of published papers, beside genbench's own (their metrics: scoring's "pacgan")
_pacgan_angles = 2 * np.pi * np.arange(8) / 8
PACGAN_RING = _mixture(
    "pacgan-ring",
    np.stack([np.cos(_pacgan_angles), np.sin(_pacgan_angles)], 1),
    0.01,
    "PacGAN (Lin et al. 2018) 2D-ring: 8 equal Gaussians on the unit circle, std 0.01",
)
_pg = np.arange(-4.0, 5.0, 2.0)
PACGAN_GRID = _mixture(
    "pacgan-grid",
    np.stack(np.meshgrid(_pg, _pg, indexing="ij"), -1).reshape(-1, 2),
    0.05,
    "PacGAN (Lin et al. 2018) 2D-grid: 5x5 equal Gaussians at {-4, -2, 0, 2, 4}^2, std 0.05",
)

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        RING8,
        GRID25,
        Dataset("moons", "1", "two interleaved half circles, noise 0.05, scaled by 1.5", _moons,
                _moons_distance, 0.225, "within 0.225 (3 noise stds) of the two arcs"),
        Dataset("circles", "1", "two concentric circles, radii 2 and 1, noise 0.05", _circles,
                _circles_distance, 0.15, "within 0.15 (3 noise stds) of either circle"),
        Dataset("swissroll", "1", "2D swiss roll (t cos t, t sin t)/5, noise 0.1", _swissroll,
                _polyline_distance(_SWISSROLL_CURVE), 0.3, "within 0.3 (3 noise stds) of the roll's curve"),
        Dataset("pinwheel", "1", "5-armed pinwheel (FFJORD)", _pinwheel, _polyline_distance(_PINWHEEL_CURVE), 0.6,
                "within 0.6 (3 tangential stds) of an arm's centre line, radial feature within 3 stds"),
        Dataset("spirals", "1", "two interleaved spirals (FFJORD 2spirals)", _spirals,
                _polyline_distance(_SPIRALS_CURVE), 0.33,
                "within 0.33 (3 stds of the noise and the uniform offset) of either arm's centre line"),
        Dataset("checkerboard", "1", "4x4 checkerboard on [-4, 4]^2 (FFJORD)", _checkerboard,
                _checkerboard_distance, 1e-5, "inside one of the 8 squares (1e-5 for float32 rounding)"),
        PACGAN_RING,
        PACGAN_GRID,
    ]
}
DEFAULT_DATASET = "ring8"


def get(name: str) -> Dataset:
    from .api import UsageError

    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}") from None
