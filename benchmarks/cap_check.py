"""The doubled-cap check of the converged budget: two run dirs of the same grid, the second with
every cap doubled; per (model, steps, dataset, metric) cell the difference of the seed means
against 2 standard errors of the difference (each side's standard error over its seeds).

    python benchmarks/cap_check.py BASE_RUN_DIR DOUBLED_RUN_DIR [MORE_DOUBLED ...] [--metrics w2,energy,...]

Several doubled run dirs make one doubled grid: a later dir's models replace an earlier one's (the
grid's doubled run, then a run of the models whose caps changed since, at their doubled caps).

Prints, per model and metric, the cells where the doubled cap is better and worse beyond 2 SE,
the cells both runs have with all seeds, and the fits identical at both caps (stopped by the rule
before the smaller cap: the same path, the same weights kept)."""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from genbench.report import LOWER_BETTER

#: lower is better for these (the report's, and c2st's distance from 0.5); higher for the others
LOWER = {*LOWER_BETTER, "c2st_dev"}
METRICS = ["w2", "energy", "precision", "recall", "density", "coverage", "c2st_dev", "hq_frac", "modes_captured",
           "mode_tv"]


def rows(*runs: Path) -> pd.DataFrame:
    """The finished rows of ``runs``, a later run's models replacing an earlier one's."""
    df = pd.DataFrame()
    for run in runs:
        new = pd.DataFrame([json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines() if line.strip()])
        df = pd.concat([df[~df.model.isin(set(new.model))] if len(df) else df, new], ignore_index=True)
    df = df[df.status == "done"].copy()
    df["c2st_dev"] = (df["c2st"] - 0.5).abs()  # the classifier test: 0.5 is the data's
    df["steps"] = df["steps"].fillna(0).astype(int)  # one-network samplers have no step count (a key)
    return df


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("doubled", type=Path, nargs="+")
    ap.add_argument("--metrics", default=",".join(METRICS))
    args = ap.parse_args()
    metrics = args.metrics.split(",")
    a, b = rows(args.base), rows(*args.doubled)
    key = ["model", "steps", "dataset"]
    seeds = a.groupby(key).seed.nunique().rename("na").to_frame().join(b.groupby(key).seed.nunique().rename("nb"))
    full = seeds[(seeds.na >= 2) & (seeds.na == seeds.nb)].index
    out = []
    for m in metrics:
        ga = a.groupby(key)[m].agg(["mean", "sem"])
        gb = b.groupby(key)[m].agg(["mean", "sem"])
        j = ga.add_suffix("_a").join(gb.add_suffix("_b")).loc[lambda d: d.index.isin(full)]
        diff = j.mean_b - j.mean_a
        se = np.sqrt(j.sem_a.fillna(0) ** 2 + j.sem_b.fillna(0) ** 2)
        sign = -1 if m in LOWER else 1
        better = (sign * diff > 2 * se) & (diff.abs() > 1e-12)
        worse = (-sign * diff > 2 * se) & (diff.abs() > 1e-12)
        for model in j.index.get_level_values("model").unique():
            sel = j.index.get_level_values("model") == model
            out.append({"model": model, "metric": m, "cells": int(sel.sum()), "better": int(better[sel].sum()),
                        "worse": int(worse[sel].sum()), "identical": int((diff[sel].abs() <= 1e-12).sum())})
    t = pd.DataFrame(out)
    per_model = t.groupby("model")[["cells", "better", "worse", "identical"]].sum()
    print(per_model.to_string())
    tot = per_model.sum()
    print(f"all: {tot.cells} cells, doubled cap better beyond 2 SE in {tot.better} ({tot.better / tot.cells:.1%}), "
          f"worse in {tot.worse} ({tot.worse / tot.cells:.1%}), identical in {tot.identical}")
    print(t[t.better > 0].sort_values("better", ascending=False).head(20).to_string(index=False))
    print("worse:")
    print(t[t.worse > 0].sort_values("worse", ascending=False).head(20).to_string(index=False))


if __name__ == "__main__":
    main()
