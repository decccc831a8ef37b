"""Scoring a cell: the metric set applied to a model's samples against the reference sample, and
each metric's noise floor (the same metric between independent true samples of the same n).

A metric is a named function of (samples, reference, dataset) returning one or more columns. The
runner and ``genbench calibrate`` both score through here, so a table and its resolving power are
computed by the same code. A metric that cannot be computed (non-finite samples, too few points,
a size past its cost limit) leaves its columns empty and its reason in ``errors``; the others
are still computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import metrics as M
from .api import UsageError
from .datasets import Dataset


@dataclass(frozen=True)
class Metric:
    name: str
    columns: tuple[str, ...]
    fn: Callable[..., dict]  # (x, ref, ds, *, seed, device) -> {column: value}
    about: str
    mixtures_only: bool = False
    #: peak memory of one call, in bytes per n^2 (n samples against n reference points): the dense
    #: n x n matrices of GeomLoss' tensorized backend, the k-NN radius counts of PRDC, the energy
    #: distance's blocks of 1024 x n distances (less per n^2 as n grows); measured
    #: (max RSS) at n = 4000 and 8000 and rounded up
    bytes_per_n2: float = 1.0


#: exact W2's network simplex grows roughly as n^3 (benchmarks/score_time.py measures it); past this
#: size the column is left empty with this reason and ``sinkhorn`` stands in
W2_MAX_N = 5000


def _w2(x, ref, ds, *, seed, device):
    x = M.check_points(x)
    M.check_points(ref, what="reference points")
    if max(len(x), len(ref)) > W2_MAX_N:
        raise M.MetricError(f"exact W2 is computed up to n = {W2_MAX_N} (cubic cost); use sinkhorn at this n")
    return {"w2": M.w2(x, ref)}


#: points in the validation sample of a (dataset, seed)
N_VALIDATION = 2000


def validation_sample(ds: Dataset, seed: int, n: int = N_VALIDATION) -> np.ndarray:
    """The validation sample of (dataset, seed): stream 4 of the seed (training 0, reference 1,
    held-out 2, floor draws 3). What selects a model (stopping, the kept checkpoint, matched
    quality, tuning) reads this, never the reference sample the tables are scored against."""
    return ds.sample(n, [seed, 4])


def validation_score(energy: float, off_support: float, floor: dict) -> float:
    """A sample's validation score (lower is better): its energy distance to the validation sample
    and its fraction of points off the support, each as its excess over the data's own value in
    units of that value's spread (``floor``: {"energy": (mean, std), "off_support": (mean, std)},
    as ``runner.monitor.validation_floor`` gives it), summed. The converged budget keeps and stops
    by it during training; ``genbench tune`` selects trials by it from their rows."""
    (e_mean, e_sd), (o_mean, o_sd) = floor["energy"], floor["off_support"]
    return (energy - e_mean) / max(e_sd, 1e-12) + (off_support - o_mean) / o_sd


def _validation(x, ref, ds: Dataset, *, seed, device):
    return {"val_energy": M.energy(M.check_points(x), validation_sample(ds, seed), device=device)}


def _support(x, ref, ds: Dataset, *, seed, device):
    return {"hq_frac": float(ds.on_support(M.check_points(x, minimum=1)).mean())}


def _modes(x, ref, ds: Dataset, *, seed, device):
    s = M.mode_stats(M.check_points(x, minimum=1), ds.means, ds.stds, ds.weights)
    return {k: s[k] for k in ("modes_captured", "modes_total", "mode_tv")}


def _pacgan(x, ref, ds: Dataset, *, seed, device):
    return M.pacgan_stats(M.check_points(x, minimum=1), ds.means, ds.stds, ds.weights)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("w2", ("w2",), _w2, "exact 2-Wasserstein distance between the two samples (POT emd2)"),
    Metric("sinkhorn", ("sinkhorn",), lambda x, ref, ds, *, seed, device: {"sinkhorn": M.sinkhorn(x, ref, device=device)},
           "sqrt(2 x debiased Sinkhorn divergence), blur 0.01 (GeomLoss): W2 with a far smaller bias", bytes_per_n2=26),
    Metric("energy", ("energy",), lambda x, ref, ds, *, seed, device: {"energy": M.energy(x, ref, device=device)},
           "energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic, float64 pairwise distances)", bytes_per_n2=4),
    Metric("prdc", ("precision", "recall", "density", "coverage"), lambda x, ref, ds, *, seed, device: M.prdc(ref, x),
           "precision / recall / density / coverage with 5-NN balls (Naeem et al. 2020)", bytes_per_n2=9),
    Metric("c2st", ("c2st",), lambda x, ref, ds, *, seed, device: {"c2st": M.c2st(x, ref, seed=seed)},
           "held-out accuracy of a k-NN classifier telling samples from data (0.5: indistinguishable)"),
    Metric("validation", ("val_energy",), _validation,
           "energy distance to the validation sample (2,000 true points of their own stream): what selection "
           "reads (matched quality), never the reference", bytes_per_n2=4),
    Metric("support", ("hq_frac",), _support, "fraction of samples on the dataset's noise-free support (its stated tolerance)"),
    Metric("modes", ("modes_captured", "modes_total", "mode_tv"), _modes,
           "mixture modes captured (>= a quarter of the lightest mode's expected count within 3 std); TV of the mode histogram",
           mixtures_only=True),
    Metric("pacgan", ("pacgan_modes", "pacgan_hq", "pacgan_rkl"), _pacgan,
           "PacGAN's Table 1 columns (its code's rule): modes holding any sample within 3 std, the fraction within "
           "3 std of its nearest mode, reverse KL of their mode histogram to the true weights", mixtures_only=True),
]}
DEFAULT_METRICS = ("w2", "energy", "prdc", "c2st", "validation", "support", "modes")
#: columns with no noise floor (constants of the dataset)
NO_FLOOR = {"modes_total"}


def memory_bytes(metrics: list[str], n: int) -> float:
    """Peak memory of scoring one cell of n samples (the metrics run one after another)."""
    return max(METRICS[m].bytes_per_n2 for m in metrics) * float(n) ** 2


def parse_metrics(spec: str | None) -> list[str]:
    """``default``, ``all``, or a comma-separated list of names (``default,sinkhorn`` adds one)."""
    if spec is not None and not spec.strip():
        raise UsageError("--metrics '': empty; give default, all, or comma-separated metric names")
    names: list[str] = []
    items = [i.strip() for i in (spec or "default").split(",")]
    twice = next((i for i in items if items.count(i) > 1), None)
    if twice is not None:
        raise UsageError(f"--metrics {spec!r}: {twice} given twice")
    for item in items:
        if item == "default":
            names += DEFAULT_METRICS
        elif item == "all":
            names += METRICS
        elif item in METRICS:
            names.append(item)
        else:
            raise UsageError(f"--metrics: unknown metric {item!r}; valid: default, all, {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def columns(names, ds: Dataset | None = None) -> list[str]:
    return [c for n in names if ds is None or ds.is_mixture or not METRICS[n].mixtures_only for c in METRICS[n].columns]


def score(x, ref, ds: Dataset, names, *, seed: int = 0, device: str = "cpu") -> tuple[dict, dict]:
    """(values, errors): every column of every applicable metric (None where it failed), and the
    reason per failed metric."""
    values: dict = {}
    errors: dict = {}
    for name in names:
        m = METRICS[name]
        if m.mixtures_only and not ds.is_mixture:
            continue
        try:
            values |= m.fn(x, ref, ds, seed=seed, device=device)
        except M.MetricError as e:
            values |= dict.fromkeys(m.columns)
            errors[name] = str(e)
    return values, errors


def floors(draws, ref, ds: Dataset, names, *, seed: int = 0, device: str = "cpu") -> dict:
    """``{column}_floor`` and ``{column}_floor_std``: the mean and std of each column over
    independent true samples ``draws`` scored against ``ref`` — what a perfect model scores, and
    how much that moves by chance."""
    return floor_summary([score(d, ref, ds, names, seed=floor_seed(seed, i), device=device)[0]
                          for i, d in enumerate(draws)])


def floor_seed(seed: int, draw: int) -> int:
    """The scoring seed of floor draw ``draw`` of (dataset, seed)."""
    return seed + 1000 * (draw + 1)


def floor_summary(draw_values: list[dict]) -> dict:
    """The floors (``floors``) from each draw's ``score`` values."""
    per: dict[str, list] = {}
    for values in draw_values:
        for k, v in values.items():
            per.setdefault(k, []).append(v)
    out = {}
    for k, vals in per.items():
        if k in NO_FLOOR:
            continue
        v = np.asarray([np.nan if a is None else a for a in vals], dtype=np.float64)
        out[f"{k}_floor"] = float(np.nanmean(v)) if np.isfinite(v).any() else None
        out[f"{k}_floor_std"] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else None
    return out
