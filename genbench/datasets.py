"""The 2D datasets. Each draws from its own seeded numpy Generator (never the global RNG) and
carries a version string that changes whenever its samples would.

Origins: ring8 and grid25 are the mixtures of the mode-collapse literature (VEEGAN, PacGAN);
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
    #: mixtures only: mode means [K, 2], isotropic stds [K], weights [K]
    means: np.ndarray | None = field(default=None, repr=False)
    stds: np.ndarray | None = field(default=None, repr=False)
    weights: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_mixture(self) -> bool:
        return self.means is not None

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

    return Dataset(name, version, description, draw, means, np.full(k, std), weights)


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


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        RING8,
        GRID25,
        Dataset("moons", "1", "two interleaved half circles, noise 0.05, scaled by 1.5", _moons),
        Dataset("circles", "1", "two concentric circles, radii 2 and 1, noise 0.05", _circles),
        Dataset("swissroll", "1", "2D swiss roll (t cos t, t sin t)/5, noise 0.1", _swissroll),
        Dataset("pinwheel", "1", "5-armed pinwheel (FFJORD)", _pinwheel),
        Dataset("spirals", "1", "two interleaved spirals (FFJORD 2spirals)", _spirals),
        Dataset("checkerboard", "1", "4x4 checkerboard on [-4, 4]^2 (FFJORD)", _checkerboard),
    ]
}
DEFAULT_DATASET = "ring8"


def get(name: str) -> Dataset:
    from .api import UsageError

    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}") from None
