"""The benchmark's resolving power: defects of stated sizes planted in true samples, scored by
every metric against the reference sample exactly as a model's samples are, and the number of
seeds each metric needs to tell the defective samples from the data.

A cell is marked in the report when its mean over s seeds lies outside floor +- 3 floor_std /
sqrt(s) (``report.outside_floor``). For a defect that moves a metric by delta on average, with
floor std sd_t (true samples against one reference) and a seed-to-seed spread sd_d of the
defective samples' distance from the floor, the mark appears with probability >= 97.7% once
``sqrt(s) >= (3 sd_t + 2 sd_d) / |delta|``; that smallest s is what the table reports.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import scoring
from .api import UsageError
from .datasets import Dataset


@dataclass(frozen=True)
class Defect:
    name: str
    size: float
    about: str  # with {pct} filled in (the size in percent)
    fn: Callable  # (ds, n, size, rng, ref) -> [n, 2]


def describe(defect: Defect, size: float) -> str:
    return defect.about.format(pct=f"{size * 100:g}%")


def _scale(ref: np.ndarray) -> float:
    """The data's scale: the root mean per-axis variance."""
    return float(np.sqrt(ref.var(0).mean()))


def _thinned(ds: Dataset, n: int, rng, accept: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """n true points drawn with acceptance probability accept(x) in [0, 1] (exact reweighting)."""
    out, have = [], 0
    while have < n:
        pool = ds.sample(4 * n, rng)
        keep = pool[rng.random(len(pool)) < accept(pool)]
        out.append(keep[rng.permutation(len(keep))])  # some datasets draw their parts in order
        have += len(keep)
    return np.concatenate(out)[:n]


def _outliers(ds, n, size, rng, ref):
    x = ds.sample(n, rng)
    k = int(round(size * n))
    lo, hi = ref.min(0), ref.max(0)
    x[rng.choice(n, k, replace=False)] = rng.uniform(lo, hi, (k, 2))
    return x


def _blur(ds, n, size, rng, ref):
    return ds.sample(n, rng) + size * _scale(ref) * rng.standard_normal((n, 2))


def _shift(ds, n, size, rng, ref):
    return ds.sample(n, rng) + size * _scale(ref) * np.array([1.0, 1.0]) / np.sqrt(2)


def _dilate(ds, n, size, rng, ref):
    x = ds.sample(n, rng)
    c = ref.mean(0)
    return c + (1 + size) * (x - c)


def _missing(ds, n, size, rng, ref):
    """A wedge around the data's mean, pointing along +x, holding ``size`` of the mass, emptied."""
    c = ref.mean(0)
    ang = lambda x: np.abs(np.arctan2(x[:, 1] - c[1], x[:, 0] - c[0]))  # noqa: E731
    width = np.quantile(ang(ds.sample(20 * n, rng)), size)
    return _thinned(ds, n, rng, lambda x: (ang(x) > width).astype(float))


def _reweight(ds, n, size, rng, ref):
    """``size`` of the mass moved from the left half (x below the median) to the right half."""
    med = float(np.median(ref[:, 0]))
    a = 2 * size  # densities (1 - a) and (1 + a) on the halves: each half's mass moves by a / 2
    return _thinned(ds, n, rng, lambda x: np.where(x[:, 0] > med, 1.0, (1 - a) / (1 + a)))


DEFECTS: dict[str, Defect] = {d.name: d for d in [
    Defect("outliers", 0.02, "{pct} of points replaced by uniform points over the data's bounding box", _outliers),
    Defect("blur", 0.02, "every point jittered by N(0, ({pct} of the data's std)^2)", _blur),
    Defect("shift", 0.05, "all points shifted by {pct} of the data's std (diagonally)", _shift),
    Defect("dilate", 0.05, "the sample scaled by 1 + {pct} about the data's mean", _dilate),
    Defect("missing", 0.05, "a wedge holding {pct} of the mass emptied (resampled from the rest)", _missing),
    Defect("reweight", 0.05, "{pct} of the mass moved from the left half to the right half", _reweight),
]}


def parse_defects(spec: str | None) -> list[tuple[Defect, float]]:
    """``all`` (the default sizes) or ``NAME[=SIZE],...``."""
    if spec is not None and not spec.strip():
        raise UsageError("--defects '': empty; give all, or NAME[=SIZE],...")
    out = []
    for item in (spec or "all").split(","):
        name, _, size = item.strip().partition("=")
        if name == "all" and not size:
            out += [(d, d.size) for d in DEFECTS.values()]
            continue
        if name not in DEFECTS:
            raise UsageError(f"--defects: unknown defect {name!r}; valid: all, {', '.join(DEFECTS)}")
        try:
            value = float(size) if size else DEFECTS[name].size
        except ValueError:
            raise UsageError(f"--defects: size {size!r} of {name} is not a number") from None
        if not (0 < value < 1):
            raise UsageError(f"--defects: size {value} of {name} must lie in (0, 1)")
        out.append((DEFECTS[name], value))
    return out


def seeds_needed(delta: float, sd_t: float, sd_d: float) -> float:
    """Smallest seed count at which the report's 3-std mark appears with >= 97.7% probability
    (inf where the defect does not move the metric)."""
    if not np.isfinite(delta) or delta == 0:
        return math.inf
    return float(max(1, math.ceil(((3 * sd_t + 2 * sd_d) / abs(delta)) ** 2 - 1e-9)))


def calibrate_dataset(ds: Dataset, n: int, reps: int, defects, names, true_draws: int = 4,
                      device: str = "cpu") -> list[dict]:
    """One row per (defect, metric column): the mean shift from the floor, the spreads and the
    seeds needed. Each replicate r uses the runner's reference sample of seed r."""
    cols = [c for c in scoring.columns(names, ds) if c not in scoring.NO_FLOOR]
    t_within: dict[str, list] = {c: [] for c in cols}  # per replicate: the true draws' values
    d_vals: dict[tuple, list] = {}
    for r in range(reps):
        ref = ds.sample(n, [r, 1])
        trues = [scoring.score(ds.sample(n, [r, 5, i]), ref, ds, names, seed=r, device=device)[0]
                 for i in range(true_draws)]
        for c in cols:
            t_within[c].append([np.nan if t[c] is None else t[c] for t in trues])
        for j, (defect, size) in enumerate(defects):
            rng = np.random.default_rng([r, 6, j])
            vals, _ = scoring.score(defect.fn(ds, n, size, rng, ref).astype(np.float32), ref, ds, names, seed=r,
                                    device=device)
            for c in cols:
                d_vals.setdefault((defect.name, size, c), []).append(np.nan if vals[c] is None else vals[c])
    rows = []
    for (name, size, c), dv in d_vals.items():
        t = np.asarray(t_within[c], dtype=np.float64)  # [reps, true_draws]
        diff = np.asarray(dv) - np.nanmean(t, 1)  # the defect's distance from each replicate's floor
        sd_t = float(np.sqrt(np.nanmean(np.nanvar(t, 1, ddof=1))))
        sd_d = float(np.nanstd(diff, ddof=1))
        delta = float(np.nanmean(diff))
        rows.append({"dataset": ds.name, "defect": name, "size": size, "column": c, "floor": float(np.nanmean(t)),
                     "floor_std": sd_t, "delta": delta, "defect_std": sd_d, "seeds": seeds_needed(delta, sd_t, sd_d)})
    return rows


def _one(args):
    import torch

    torch.set_num_threads(1)
    from . import datasets

    name, n, reps, defects, names, device = args
    return calibrate_dataset(datasets.get(name), n, reps, [(DEFECTS[d], s) for d, s in defects], names, device=device)


def calibrate(datasets: list[str], n: int, reps: int, defects, names, jobs: int = 1, device: str = "cpu",
              progress=None) -> list[dict]:
    """Every dataset, in ``jobs`` processes (one thread each)."""
    from .runner import worker_pool

    tasks = [(d, n, reps, [(df.name, s) for df, s in defects], names, device) for d in datasets]
    rows: list[dict] = []
    with worker_pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for t, res in zip(tasks, (pool.imap if pool else map)(_one, tasks)):
            rows += res
            if progress:
                progress(t[0])
    return rows


def table(rows: list[dict], max_seeds: int = 5) -> "pd.DataFrame":  # noqa: F821
    """Per (dataset, defect): the seeds each metric column needs ('–' beyond ``max_seeds``) and
    the cheapest column."""
    import pandas as pd

    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=["dataset", "defect", "size"], columns="column", values="seeds", sort=False)
    cols = [c for c in df["column"].unique()]
    wide = wide[cols]
    best = wide.min(axis=1)
    out = wide.map(lambda v: "–" if not np.isfinite(v) or v > max_seeds else str(int(v)))
    out["resolved by"] = [", ".join(c for c in cols if wide.loc[i, c] == b) if np.isfinite(b) and b <= max_seeds else "nothing"
                          for i, b in best.items()]
    out["seeds"] = ["–" if not np.isfinite(b) or b > max_seeds else str(int(b)) for b in best]
    return out.reset_index()


def summary(rows: list[dict], max_seeds: int = 5) -> "pd.DataFrame":  # noqa: F821
    """One row per dataset, one column per defect: the fewest seeds any metric needs, with the
    metrics that need that few ('–': none within ``max_seeds``)."""
    import pandas as pd

    full = table(rows, max_seeds)
    full["cell"] = [f"{s} ({r})" if s != "–" else "–" for s, r in zip(full["seeds"], full["resolved by"])]
    full["defect"] = [f"{d} {z:g}" for d, z in zip(full["defect"], full["size"])]
    out = full.pivot(index="dataset", columns="defect", values="cell")
    out = out.loc[list(dict.fromkeys(full["dataset"])), list(dict.fromkeys(full["defect"]))]
    return out.reset_index().rename_axis(columns=None)
