"""Rows -> tables: one tidy row per cell (CSV), and per-device Markdown tables aggregated over
seeds (mean +- 95% Student-t half-width, with the number of seeds)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .metrics import mean_ci
from .timing import PROTOCOL

ID = ["model", "variant", "dataset", "steps"]
CELL_COLUMNS = [
    "run_id", "model", "variant", "source", "dataset", "dataset_version", "seed", "steps", "nfe", "n_samples",
    "w2", "w2_floor", "w2_floor_std", "modes_captured", "modes_total", "hq_frac", "mode_tv", "nll", "elbo",
    "train_s", "teacher_train_s", "train_steps", "final_loss", "sample_s", "sample_s_min", "budget",
    "device", "device_name", "threads", "jobs", "torch_version", "cuda_version", "genbench_version", "git_sha",
    "status", "error",
]


def tidy(rows: list[dict]) -> pd.DataFrame:
    """One row per cell with the documented columns first (missing ones empty)."""
    df = pd.DataFrame(rows)
    for c in CELL_COLUMNS:
        if c not in df:
            df[c] = None
    extra = [c for c in df.columns if c not in CELL_COLUMNS]
    df = df[CELL_COLUMNS + extra]
    df["steps"] = df["steps"].astype("Int64")
    return df.sort_values(["device_name", "dataset", "model", "steps", "seed"], na_position="first", kind="stable")


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _pm(values, digits: int = 3) -> str:
    m, h, k = mean_ci(values)
    if k == 0:
        return "–"
    return _fmt(m, digits) if k == 1 or math.isnan(h) else f"{_fmt(m, digits)} ± {_fmt(h, 2)}"


def aggregate(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per device name: one display row per (model, variant, dataset, steps) over seeds."""
    out: dict[str, pd.DataFrame] = {}
    for dev, ddf in df.groupby("device_name", dropna=False, sort=False):
        recs = []
        for key, g in ddf.groupby(ID, dropna=False, sort=False):
            ok = g[g["status"] == "done"]
            rec = dict(zip(ID, key))
            rec["steps"] = "–" if pd.isna(rec["steps"]) else int(rec["steps"])
            rec["seeds"] = len(ok)
            rec["nfe"] = _fmt(ok["nfe"].median(), 4) if len(ok) else "–"
            rec["w2"] = _pm(ok["w2"])
            rec["w2_floor"] = _pm(ok["w2_floor"])
            if ok["modes_total"].notna().any():
                rec["modes"] = f"{_fmt(ok['modes_captured'].mean(), 3)}/{int(ok['modes_total'].max())}"
                rec["hq_frac"] = _pm(ok["hq_frac"])
                rec["mode_tv"] = _pm(ok["mode_tv"], 2)
            else:
                rec["modes"] = rec["hq_frac"] = rec["mode_tv"] = "–"
            for c in ("nll", "elbo"):
                if c in ok and ok[c].notna().any():
                    rec["nll/elbo"] = f"{c} {_pm(ok[c])}"
            rec.setdefault("nll/elbo", "–")
            teacher = ok["teacher_train_s"].dropna()
            rec["train_s"] = _pm(ok["train_s"]) + (f" (+{_fmt(teacher.mean())} teacher)" if len(teacher) else "")
            rec["sample_s"] = _fmt(ok["sample_s"].median(), 3)
            rec["sample_s_min"] = _fmt(ok["sample_s_min"].min(), 3)
            bad = g[g["status"] != "done"]
            rec["status"] = "done" if bad.empty else ", ".join(f"{s}: {e}" for s, e in zip(bad["status"], bad["error"]))[:200]
            recs.append(rec)
        out[str(dev)] = pd.DataFrame(recs)
    return out


def _distinct(values: pd.Series) -> str:
    """The distinct integer values of a column, e.g. ``1,2`` ('?' when none is recorded)."""
    return ",".join(str(int(v)) for v in sorted(values.dropna().unique())) or "?"


def protocol_line(df: pd.DataFrame) -> str:
    return PROTOCOL.format(n=_distinct(df["n_samples"]), repeats=">=5", threads=_distinct(df["threads"]),
                           jobs=_distinct(df["jobs"]))


NOTES = (
    "w2: exact 2-Wasserstein distance from the model's samples to an independent true sample of the "
    "same size; w2_floor: what a perfect model scores (true vs true, mean of 5 draws). "
    "modes: mixture modes with >= 20 samples within 3 std; hq_frac: fraction of samples within 3 std of a mode "
    "(the true data score 0.989); mode_tv: total variation between the captured-mode histogram and the true "
    "weights. Mean ± 95% t-interval over seeds."
)


def markdown(df: pd.DataFrame, title: str = "genbench results") -> str:
    parts = [f"# {title}", ""]
    for dev, table in aggregate(df).items():
        sub = df[df["device_name"].astype(str) == dev]
        torch_v = ",".join(sorted(sub["torch_version"].dropna().astype(str).unique()))
        parts += [f"## {dev} ({', '.join(sorted(sub['device'].dropna().astype(str).unique()))}; torch {torch_v})", ""]
        parts += [table.to_markdown(index=False), "", protocol_line(sub), ""]
    parts += [NOTES, ""]
    return "\n".join(parts)


def numeric_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the numeric figures (used by --compare and tests)."""
    num = ["nfe", "w2", "w2_floor", "modes_captured", "hq_frac", "mode_tv", "train_s", "sample_s"]
    ok = df[df["status"] == "done"].copy()
    ok["steps"] = ok["steps"].fillna(-1)
    g = ok.groupby(["device_name", "model", "dataset", "steps"])[num]
    res = g.mean().join(g.std().add_suffix("_std")).join(g.size().rename("seeds"))
    return res.replace({np.inf: np.nan})


def compare(run: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset, steps): the run's mean figures beside the baseline's, with deltas. A
    cell is flagged when it is worse than the baseline by more than twice the spread: the
    baseline's seed-to-seed std, or the sampling noise (the W2 floor's std, the binomial std of
    hq_frac) where that is larger, so that noise alone rarely flags; or when it loses a mode."""
    key = ["model", "dataset", "steps"]
    r = numeric_summary(run).reset_index().drop(columns="device_name").groupby(key).mean(numeric_only=True)
    b_full = base[base["status"] == "done"].copy()
    b = numeric_summary(base).reset_index().drop(columns="device_name").groupby(key).mean(numeric_only=True)
    by_cell = b_full.assign(steps=b_full["steps"].fillna(-1)).groupby(key)
    floor_std, n = by_cell["w2_floor_std"].mean(), by_cell["n_samples"].mean()
    j = r.join(b.add_suffix("_base"), how="inner")  # r and b have the same columns
    # the spread is never taken below the sampling noise itself (the W2 floor's std, the binomial
    # std of hq_frac): three seeds that happen to agree must not make every wobble a regression
    # (sqrt 2: the spread of a difference of two such estimates)
    w2_spread = np.sqrt(2) * np.fmax(j["w2_std_base"].fillna(0), floor_std.reindex(j.index).fillna(0))
    binomial = np.sqrt(j["hq_frac_base"] * (1 - j["hq_frac_base"]) / n.reindex(j.index))
    hq_spread = np.sqrt(2) * np.fmax(j["hq_frac_std_base"].fillna(0), binomial.fillna(0))
    out = pd.DataFrame({
        "w2": j["w2"], "w2_base": j["w2_base"], "d_w2": j["w2"] - j["w2_base"],
        "modes": j["modes_captured"], "modes_base": j["modes_captured_base"],
        "hq_frac": j["hq_frac"], "hq_frac_base": j["hq_frac_base"],
        "sample_s": j["sample_s"], "sample_s_base": j["sample_s_base"],
        "time_ratio": j["sample_s"] / j["sample_s_base"],
    })
    flags = []
    for idx in out.index:
        f = []
        if out.at[idx, "d_w2"] > 2 * max(w2_spread[idx], 1e-9):
            f.append("w2")
        if pd.notna(out.at[idx, "modes"]) and out.at[idx, "modes"] < out.at[idx, "modes_base"] - 0.5:
            f.append("modes")
        if pd.notna(out.at[idx, "hq_frac"]) and out.at[idx, "hq_frac"] < out.at[idx, "hq_frac_base"] - 2 * (hq_spread[idx] or 0):
            f.append("hq_frac")
        flags.append("REGRESSION: " + ", ".join(f) if f else "ok")
    out["flag"] = flags
    out = out.reset_index()
    out["steps"] = out["steps"].map(lambda s: "–" if s == -1 else int(s))
    return out


#: the source report's own figures (diffusion: Euler 100 steps; consistency: 1 step)
REPORT_FIGURES = {"diffusion": {"nfe": 99, "sample_s": 1.14}, "cm": {"nfe": 1, "sample_s": 0.018}}
REPORT_RATIO = 65.0


def headline(df: pd.DataFrame) -> str:
    """The source report's comparison on this run: NFE, sampling time and its ratio to diffusion
    at 100 steps, W2 beside its floor, modes; with the report's own figures alongside."""
    ok = df[df["status"] == "done"]
    lines = []
    for dev, sub in ok.groupby("device_name", sort=False):
        ref = sub[(sub["model"] == "diffusion") & (sub["steps"] == 100)]
        t_ref = ref["sample_s"].median() if len(ref) else float("nan")
        recs = []
        for (m, k), g in sub.groupby(["model", "steps"], sort=False):
            rep = REPORT_FIGURES.get("diffusion" if m == "diffusion" else "cm") if (m == "diffusion" and k == 100) or (m.startswith("cm") and k == 1) else None
            recs.append({
                "model": m, "steps": int(k), "nfe": int(g["nfe"].median()),
                "sample_s": _fmt(g["sample_s"].median(), 3), "time_ratio": _fmt(t_ref / g["sample_s"].median(), 3),
                "w2": _pm(g["w2"]), "w2_floor": _pm(g["w2_floor"]),
                "modes": f"{_fmt(g['modes_captured'].mean())}/{int(g['modes_total'].max())}", "hq_frac": _pm(g["hq_frac"]),
                "report: nfe": rep["nfe"] if rep else "", "report: sample_s": rep["sample_s"] if rep else "",
            })
        lines += [f"## {dev} ({sub['device'].iloc[0]}, {_distinct(sub['threads'])} thread(s))", "",
                  pd.DataFrame(recs).to_markdown(index=False), "",
                  f"time_ratio = sample_s(diffusion, 100 steps) / sample_s(row). The source report measured "
                  f"~{REPORT_RATIO:.0f}x wall time and ~100x NFE (99 vs 1).", "", protocol_line(sub), ""]
    return "\n".join(lines)
