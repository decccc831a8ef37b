"""Rows -> tables: one tidy row per cell (CSV), and per-device Markdown tables aggregated over
seeds (mean +- 95% Student-t half-width, with the number of seeds)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .api import UsageError
from .metrics import mean_ci
from .scoring import METRICS, NO_FLOOR
from .timing import BLOCK_S, LEGACY_MIN_TIME_S, MIN_CALLS, PROTOCOL

ID = ["model", "variant", "dataset", "steps"]
#: every metric column, in the order the tables show them
METRIC_COLUMNS = [c for m in METRICS.values() for c in m.columns]
FLOOR_COLUMNS = [f"{c}_floor{s}" for c in METRIC_COLUMNS if c not in NO_FLOOR for s in ("", "_std")]
CELL_COLUMNS = [
    "run_id", "model", "variant", "source", "dataset", "dataset_version", "seed", "steps", "nfe", "n_samples",
    *METRIC_COLUMNS, *FLOOR_COLUMNS, "metric_errors", "nll", "nll_bound", "elbo", "nll_note",
    "train_s", "teacher_train_s", "train_steps", "final_loss", "sample_s", "sample_s_min", "sample_s_iqr",
    "sample_calls", "sample_calls_per_block", "sample_min_time_s", "budget",
    "device", "device_name", "host", "executor", "threads", "jobs", "groups_at_once", "torch_version", "cuda_version", "genbench_version",
    "git_sha",
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
    if k == 1 or math.isnan(h) or h <= 1e-9 * max(1.0, abs(m)):  # equal values: no interval to show
        return _fmt(m, digits)
    return f"{_fmt(m, digits)} ± {_fmt(h, 2)}"


#: a mean over k seeds is marked when it lies outside floor +- MARK_STD x floor_std / sqrt(k)
MARK_STD = 3.0
MARK = "†"


def _numbers(values) -> np.ndarray:
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
    return v[np.isfinite(v)]


def outside_floor(values, floors, floor_stds) -> bool:
    """Whether the mean of ``values`` (one per seed) lies outside the seeds' mean floor +- 3 std of
    a mean of that many true-sample scores (the floor stds combined in quadrature)."""
    v, f, s = _numbers(values), _numbers(floors), _numbers(floor_stds)
    if not (len(v) and len(f) and len(s)):
        return False
    spread = MARK_STD * math.sqrt(float((s**2).mean()) / len(v))
    return abs(v.mean() - f.mean()) > max(spread, 1e-12)


def _metric_cell(ok: pd.DataFrame, col: str, digits: int = 3) -> str:
    text = _pm(ok[col], digits)
    if text != "–" and f"{col}_floor" in ok and outside_floor(ok[col], ok[f"{col}_floor"], ok[f"{col}_floor_std"]):
        text += MARK
    return text


def _shown_metrics(df: pd.DataFrame) -> list[str]:
    return [c for c in METRIC_COLUMNS if c != "modes_total" and c in df and df[c].notna().any()]


def _floor_row(ddf: pd.DataFrame, dataset: str, shown: list[str]) -> dict:
    """The dataset's 'data' row: what independent true samples score (mean of the seeds' floors,
    and in brackets one draw's std)."""
    g = ddf[ddf["dataset"] == dataset]
    rec = {"model": "data (floor)", "variant": "", "dataset": dataset, "steps": "–", "seeds": "", "nfe": ""}
    for c in shown:
        f, s = _numbers(g.get(f"{c}_floor", [])), _numbers(g.get(f"{c}_floor_std", []))
        key = "modes" if c == "modes_captured" else c
        if not len(f):
            rec[key] = "–"
        elif c == "modes_captured":
            rec[key] = f"{_fmt(f.mean())}/{int(_numbers(g['modes_total']).max())}"
        else:
            rec[key] = f"{_fmt(f.mean())} ({_fmt(float(np.sqrt((s**2).mean())), 2)})" if len(s) else _fmt(f.mean())
    return rec


def aggregate(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per device name: per dataset a 'data (floor)' row, then one display row per (model,
    variant, dataset, steps) over seeds; a metric outside its floor's band is marked."""
    out: dict[str, pd.DataFrame] = {}
    for dev, ddf in df.groupby("device_name", dropna=False, sort=False):
        recs = []
        shown = _shown_metrics(ddf[ddf["status"] == "done"])
        floor_done: set = set()
        for key, g in ddf.groupby(ID, dropna=False, sort=False):
            ok = g[g["status"] == "done"]
            rec = dict(zip(ID, key))
            if rec["dataset"] not in floor_done:
                floor_done.add(rec["dataset"])
                recs.append(_floor_row(ddf, rec["dataset"], shown))
            rec["steps"] = "–" if pd.isna(rec["steps"]) else int(rec["steps"])
            rec["seeds"] = len(ok)
            rec["nfe"] = _fmt(ok["nfe"].median(), 4) if len(ok) else "–"
            for c in shown:
                if c == "modes_captured":
                    v = _numbers(ok["modes_captured"])
                    mark = MARK if outside_floor(ok[c], ok["modes_captured_floor"], ok["modes_captured_floor_std"]) else ""
                    rec["modes"] = f"{_fmt(v.mean())}/{int(_numbers(ok['modes_total']).max())}{mark}" if len(v) else "–"
                else:
                    rec[c] = _metric_cell(ok, c)
            nll = _pm(ok["nll"]) if ok["nll"].notna().any() else None
            bound = _pm(ok["nll_bound"]) if ok["nll_bound"].notna().any() else None
            rec["nll"] = nll or (f"≤ {bound}" if bound else "–")
            teacher = ok["teacher_train_s"].dropna()
            rec["train_s"] = _pm(ok["train_s"]) + (f" (+{_fmt(teacher.mean())} teacher)" if len(teacher) else "")
            rec["sample_s"] = _fmt(ok["sample_s"].median(), 3)
            bad = g[g["status"] != "done"]
            rec["status"] = "done" if bad.empty else ", ".join(f"{s}: {e}" for s, e in zip(bad["status"], bad["error"]))[:200]
            recs.append(rec)
        out[str(dev)] = pd.DataFrame(recs).fillna("")
    return out


def _distinct(values: pd.Series) -> str:
    """The distinct integer values of a column, e.g. ``1,2`` ('?' when none is recorded)."""
    return ",".join(str(int(v)) for v in sorted(values.dropna().unique())) or "?"


def _span(df: pd.DataFrame, column: str, missing: str) -> str:
    """The range of an integer column's values ('5' or '5–4000'); ``missing`` where none is recorded."""
    v = df[column].dropna() if column in df else pd.Series(dtype=float)
    if not len(v):
        return missing
    return f"{int(v.min())}" if v.min() == v.max() else f"{int(v.min())}–{int(v.max())}"


def _windows(df: pd.DataFrame) -> str:
    """The minimum timed seconds per cell that the rows record ('0.05', or '0.05, 0.25' for a mix;
    rows from before the field was recorded used LEGACY_MIN_TIME_S)."""
    v = df["sample_min_time_s"] if "sample_min_time_s" in df else pd.Series(float("nan"), index=df.index)
    return ", ".join(f"{x:g}" for x in sorted(v.fillna(LEGACY_MIN_TIME_S).unique()))


def protocol_line(df: pd.DataFrame) -> str:
    return PROTOCOL.format(n=_distinct(df["n_samples"]), calls=_span(df, "sample_calls", "5 (not recorded)"),
                           block=_span(df, "sample_calls_per_block", "1"), block_ms=BLOCK_S * 1e3,
                           min_calls=MIN_CALLS, min_time=_windows(df), threads=_distinct(df["threads"]),
                           concurrency=_concurrency(df))


def _concurrency(df: pd.DataFrame) -> str:
    """How many fits ran at once: local processes, or cluster tasks (as many as its resources allow)."""
    executors = sorted(df["executor"].dropna().astype(str).unique()) if "executor" in df else []
    remote = [e for e in executors if e != "local"]
    if not remote:
        return f"{_distinct(df['jobs'])} fit process(es) at once"
    hosts = df["host"].dropna().nunique() if "host" in df else 0
    return (f"fit units run as {' and '.join(remote)} tasks on {hosts or 'unknown'} host(s), as many at once as the "
            "cluster's resources allowed (tasks sharing a device time each other's calls)")


NOTES = (
    "Each metric compares a cell's samples with an independent true sample of the same size. "
    "'data (floor)' rows: what independent true samples score (mean over the seeds' floors, one draw's std in "
    f"brackets). {MARK}: the mean over seeds lies outside floor ± {MARK_STD:g} std/sqrt(seeds), i.e. the metric "
    "tells the model from the data; a model matches the data only where nothing is marked. "
    "Others: mean ± 95% t-interval over seeds."
)


def metric_notes(df: pd.DataFrame) -> str:
    """What each shown metric column is, and why a likelihood column is empty where it is."""
    shown = _shown_metrics(df[df["status"] == "done"])
    lines = [f"- {', '.join('modes' if c == 'modes_captured' else c for c in m.columns if c in shown)}: {m.about}"
             for m in METRICS.values() if any(c in shown for c in m.columns)]
    lines.append("- nll: test negative log-likelihood in nats per point (data units); '≤ x': an upper bound "
                 "(importance-weighted, the VAE); elbo is in the CSV")
    if "nll_note" in df:
        notes = df.dropna(subset=["nll_note"]).groupby("model", sort=False)["nll_note"].first()
        for note, models in notes.groupby(notes, sort=False).groups.items():  # each note once, its models together
            lines.append(f"- nll of {', '.join(models)} is empty: {note}")
    errors = df["metric_errors"].dropna() if "metric_errors" in df else []
    reasons = sorted({f"{k}: {v}" for e in errors if isinstance(e, dict) for k, v in e.items()})
    lines += [f"- empty because {r}" for r in reasons[:10]]
    return "\n".join(lines)


def settings_label(df: pd.DataFrame) -> pd.Series:
    """Per row, the settings that must match for rows to be pooled over seeds: the budget and n,
    and the settings hash where rows of one budget and n still differ (params, metrics, ...)."""
    label = "budget " + df["budget"].astype(str) + ", n = " + df["n_samples"].astype(str)
    if "settings_hash" in df and (df.groupby(label)["settings_hash"].nunique(dropna=True) > 1).any():
        label = label + ", settings " + df["settings_hash"].fillna("?").astype(str)
    return label


def _device_sections(df: pd.DataFrame, level: str) -> list[str]:
    parts = []
    for dev, table in aggregate(df).items():
        sub = df[df["device_name"].astype(str) == dev]
        torch_v = ",".join(sorted(sub["torch_version"].dropna().astype(str).unique()))
        parts += [f"{level} {dev} ({', '.join(sorted(sub['device'].dropna().astype(str).unique()))}; torch {torch_v})", ""]
        parts += [table.to_markdown(index=False), "", protocol_line(sub), ""]
    return parts


def markdown(df: pd.DataFrame, title: str = "genbench results") -> str:
    """Per device, the aggregated table; rows made with different settings (budget, n, params) are
    never pooled: each setting gets its own labelled section."""
    parts = [f"# {title}", ""]
    labels = settings_label(df)
    if labels.nunique() == 1:
        parts += [f"Settings: {labels.iloc[0]}{budget_note(df)}", ""]
    if labels.nunique() > 1:
        parts += [f"These rows were made with {labels.nunique()} different settings; each is tabulated on its own.", ""]
        for lab, sub in df.groupby(labels, sort=False):
            parts += [f"## Settings: {lab}", ""] + _device_sections(sub, "###")
    else:
        parts += _device_sections(df, "##")
    parts += [NOTES, "", metric_notes(df), ""]
    stopping = convergence_table(df)
    if stopping is not None:
        parts += ["## Training to convergence", "",
                  "Each fit evaluated its samples on a validation sample at log-spaced steps (energy distance and "
                  "the fraction of samples off the support, each in units of the data's own spread), stopped when "
                  "their score had not improved by more than its noise for a patience window, and kept the best "
                  "weights. 'reached the data': seeds whose validation metrics entered the data's floor band "
                  "(floor + 3 std), both at once and each on its own, and the median training steps and seconds "
                  "to first do so (both at once).",
                  "", stopping.to_markdown(index=False), ""]
        if stopping["seconds to reach"].str.endswith(IMPOSSIBLE_MARK).any():
            parts += [IMPOSSIBLE_NOTE, ""]
    matched = matched_quality(df)
    if matched is not None:
        ladder = next(c for c in matched.columns if c.endswith(" steps to match")).removesuffix(" steps to match")
        parts += ["## Matched-quality speedup", "", MATCHED_NOTE.format(ladder=ladder), "",
                  matched.to_markdown(index=False), ""]
    return "\n".join(parts)


IMPOSSIBLE_MARK = " ‡"
IMPOSSIBLE_NOTE = ("‡: some seeds' recorded seconds to reach the data exceed their fit's training time (side-by-side "
                   "fits of genbench before these were stamped with the group's clock counted the other members' "
                   "evaluations as training); those are left out, and the steps to reach are theirs.")


def convergence_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per model and dataset: how its fits stopped, the step kept, and whether and how fast they
    reached the data's floor band on the validation metric (None where no row records a stop)."""
    if "stop_reason" not in df or df["stop_reason"].isna().all():
        return None
    recs = []
    for (model, dataset), g in df.drop_duplicates(["model", "dataset", "seed"]).groupby(["model", "dataset"],
                                                                                        sort=False):
        reasons = g["stop_reason"].dropna().astype(str).str.replace(r" at step \d+", "", regex=True)
        reached = g["target_step"].dropna() if "target_step" in g else pd.Series(dtype=float)

        def share(col: str) -> str:
            return f"{len(_numbers(g[col])) if col in g else 0}/{len(g)}"

        # a time to target above the fit's own training time cannot be (the side-by-side evaluation
        # clock of older runs counted the other members' evaluations): such seconds are not shown
        secs = pd.DataFrame({c: pd.to_numeric(g[k], errors="coerce") if k in g else np.nan
                             for c, k in (("t", "target_s"), ("train", "train_s"))}).dropna(subset=["t"])
        shown = secs["t"][secs["t"] <= secs["train"] * (1 + 1e-9)]
        seconds = _fmt(np.median(shown)) if len(shown) else "–"
        if len(shown) < len(secs):
            seconds += IMPOSSIBLE_MARK
        recs.append({"model": model, "dataset": dataset,
                     "stopped": ", ".join(f"{n} {r}" for r, n in reasons.value_counts().items()),
                     "steps trained": _fmt(_numbers(g["train_steps"]).mean() if len(_numbers(g["train_steps"])) else None),
                     "step kept": _fmt(_numbers(g.get("kept_step", [])).mean() if len(_numbers(g.get("kept_step", []))) else None),
                     "reached the data": share("target_step"),
                     "energy in band": share("target_step_energy"), "support in band": share("target_step_support"),
                     "steps to reach": _fmt(reached.median()) if len(reached) else "never",
                     "seconds to reach": seconds if len(reached) else "–"})
    return pd.DataFrame(recs)


def matched_quality(df: pd.DataFrame, ladder: str | None = None) -> pd.DataFrame | None:
    """Matched-quality speedup on the validation metrics: for each cell of every other model, the
    fewest steps of the ``ladder`` model (default: the model with the most step counts; each of its
    variants, e.g. solvers, in the rows tried, the best taken) whose quality is at least as good on
    both validation metrics (energy distance to the validation sample: not higher; on-support
    fraction: not lower; each the mean over the seeds both have), and the ratio of their sampling
    times (medians over seeds). Per device and dataset. None where the rows hold no ladder."""
    need = {"val_energy", "hq_frac", "sample_s", "steps"}
    ok = df[df["status"] == "done"] if "status" in df else df
    if not need <= set(ok) or ok.empty:
        return None
    ok = ok.dropna(subset=["val_energy", "hq_frac"])
    counts = ok.dropna(subset=["steps"]).groupby("model")["steps"].nunique()
    if ladder is None:
        if counts.empty or counts.max() < 3 or (counts == counts.max()).sum() > 1:
            return None
        ladder = counts.idxmax()
    recs = []
    for (dev, dataset), sub in ok.groupby(["device_name", "dataset"], sort=False):
        lad = sub[sub["model"] == ladder]
        if lad.empty:
            continue
        rungs = lad.groupby(["variant", "steps"]).agg(val_energy=("val_energy", "mean"), hq_frac=("hq_frac", "mean"),
                                                      sample_s=("sample_s", "median"), nfe=("nfe", "median"))
        rungs = rungs.reset_index().sort_values(["steps", "sample_s"])
        for (model, steps), g in sub[sub["model"] != ladder].groupby(["model", "steps"], sort=False, dropna=False):
            e, q, t = g["val_energy"].mean(), g["hq_frac"].mean(), g["sample_s"].median()
            match = rungs[(rungs["val_energy"] <= e) & (rungs["hq_frac"] >= q)]
            rec = {"device": dev, "dataset": dataset, "model": model,
                   "steps": "" if pd.isna(steps) else int(steps), "val_energy": _fmt(e, 4), "hq_frac": _fmt(q, 3)}
            if match.empty:
                rec |= {f"{ladder} steps to match": f"none of {int(rungs['steps'].max())} or fewer",
                        "its val_energy, hq_frac": "", "time ratio": "–"}
            else:
                best = match.iloc[0]
                rec |= {f"{ladder} steps to match": f"{int(best['steps'])} ({best['variant']})",
                        "its val_energy, hq_frac": f"{_fmt(best['val_energy'], 4)}, {_fmt(best['hq_frac'], 3)}",
                        "time ratio": _fmt(best["sample_s"] / t, 3)}
            recs.append(rec)
    return pd.DataFrame(recs) if recs else None


MATCHED_NOTE = ("Matched quality: for each model's cell, the fewest steps of {ladder} (of the step counts and "
                "variants in these rows) whose samples are at least as good on both validation metrics (energy "
                "distance to the validation sample not higher, on-support fraction not lower; means over seeds), "
                "and time ratio = its sampling time / the cell's (medians over seeds). Selection reads the "
                "validation sample, never the reference the tables are scored against.")


def budget_note(df: pd.DataFrame) -> str:
    """What a table made at a fixed named budget is (a plugin's own budget names pass unexplained)."""
    budgets = set(df["budget"].dropna().astype(str))
    return (" (a fixed, hand-picked training budget, not converged: README, 'Budgets')"
            if budgets and budgets <= {"quick", "default", "full"} else "")


#: the summary's quality columns, each shown against the data's floor
SUMMARY_METRICS = ("w2", "hq_frac", "modes_captured", "c2st")


def summary(df: pd.DataFrame) -> str:
    """The end of a run: per dataset one compact table (model, steps, NFE, the main quality
    columns against the data's floor, train and sample time) that fits a 100-column terminal;
    the full table is ``report``'s."""
    ok = df[df["status"] == "done"]
    shown = [c for c in SUMMARY_METRICS if c in ok and ok[c].notna().any()]
    parts = []
    for dataset, g in df.groupby("dataset", sort=False):
        floor = _floor_row(g, dataset, shown)
        recs = [{"model": "data (floor)", "steps": "", "nfe": "",
                 **{_name(c): str(floor.get(_name(c), "–")).split(" (")[0] for c in shown}, "train_s": "",
                 "sample_ms": ""}]
        for (model, steps), h in g.groupby(["model", "steps"], sort=False, dropna=False):
            done = h[h["status"] == "done"]
            failed = sorted(set(h["status"]) - {"done"})
            rec = {"model": model + (f" [{len(h) - len(done)} {'/'.join(failed)}]" if failed else ""),
                   "steps": "–" if pd.isna(steps) else int(steps),
                   "nfe": _fmt(done["nfe"].median(), 4) if len(done) else "–"}
            for c in shown:
                v = _numbers(done[c])
                mark = MARK if len(v) and outside_floor(done[c], done[f"{c}_floor"], done[f"{c}_floor_std"]) else ""
                if c == "modes_captured":
                    rec["modes"] = f"{_fmt(v.mean())}/{int(_numbers(done['modes_total']).max())}{mark}" if len(v) else "–"
                else:
                    rec[c] = f"{_fmt(v.mean())}{mark}" if len(v) else "–"
            rec["train_s"] = _fmt(_numbers(done["train_s"]).mean()) if len(done) else "–"
            rec["sample_ms"] = _fmt(done["sample_s"].median() * 1e3) if len(done) else "–"
            recs.append(rec)
        table = pd.DataFrame(recs)
        empty = [c for c in table.columns[3:] if (table[c].iloc[1:] == "–").all()]  # e.g. modes off a mixture
        parts += [f"{dataset} (mean over {g['seed'].nunique()} seed(s)):",
                  table.drop(columns=empty).to_markdown(index=False), ""]
    return "\n".join(parts)


def _name(c: str) -> str:
    return "modes" if c == "modes_captured" else c


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
    for side, d in (("the run", run), ("the baseline", base)):
        labels = settings_label(d[d["status"] == "done"]).unique()
        if len(labels) > 1:
            raise UsageError(f"{side} holds rows of {len(labels)} settings ({'; '.join(labels)}); compare one at a time")
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


#: metrics for which lower is better (the rest: higher; c2st ranks by its distance from 0.5)
LOWER_BETTER = ("w2", "sinkhorn", "energy", "mode_tv", "val_energy", "c2st", "pacgan_rkl")


def rank_changes(run: pd.DataFrame, base: pd.DataFrame, metric: str = "c2st") -> tuple[pd.DataFrame, list[str]]:
    """Per dataset, the cells (model and step count) both run sets hold, ranked by ``metric``'s
    seed mean (best first; c2st by its distance from 0.5) in the baseline and in the run. Returns
    the table (dataset, cell, rank and value in each) and one line per pair of cells whose order
    the run reverses, marked "beyond the seed spread" where both orders are (each difference over
    twice the standard error of the difference of the seed means) and "within the seed spread"
    otherwise: a reversal of two cells that neither run separates is noise, not a new ranking."""
    def summary(d: pd.DataFrame) -> pd.DataFrame:
        ok = d[(d["status"] == "done") & d[metric].notna()].copy() if metric in d else d.iloc[0:0]
        if not len(ok):
            raise UsageError(f"no finished cell has {metric!r} to rank by")
        value = (ok[metric].astype(float) - 0.5).abs() if metric == "c2st" else ok[metric].astype(float)
        ok = ok.assign(value=value if metric in LOWER_BETTER else -value,
                       cell=ok["model"] + ok["steps"].map(lambda k: "" if pd.isna(k) else f" ({int(k)} step{'' if k == 1 else 's'})"))
        g = ok.groupby(["dataset", "cell"])["value"]
        return pd.DataFrame({"mean": g.mean(), "se": g.std().fillna(0) / np.sqrt(g.size())})

    a, b = summary(base), summary(run)
    both = a.add_suffix("_base").join(b.add_suffix("_run"), how="inner")
    shown = (lambda v: v + 0.5) if metric == "c2st" else (lambda v: v if metric in LOWER_BETTER else -v)
    table, lines = [], []
    for dataset, g in both.groupby(level="dataset", sort=True):
        g = g.droplevel("dataset")
        rank_base, rank_run = g["mean_base"].rank(method="min"), g["mean_run"].rank(method="min")
        for cell in g.index:
            table.append({"dataset": dataset, "cell": cell, "rank_base": int(rank_base[cell]),
                          f"{metric}_base": shown(g.at[cell, "mean_base"]), "rank_run": int(rank_run[cell]),
                          f"{metric}_run": shown(g.at[cell, "mean_run"])})
        cells = list(g.sort_values("mean_run").index)
        for i, ahead in enumerate(cells):
            for behind in cells[i + 1:]:
                if not g.at[ahead, "mean_base"] > g.at[behind, "mean_base"]:
                    continue
                sep = [abs(g.at[ahead, f"mean_{s}"] - g.at[behind, f"mean_{s}"])
                       > 2 * np.hypot(g.at[ahead, f"se_{s}"], g.at[behind, f"se_{s}"]) for s in ("base", "run")]
                lines.append(f"{dataset}: {ahead} now ahead of {behind} ({metric} "
                             f"{shown(g.at[ahead, 'mean_run']):.4g} against {shown(g.at[behind, 'mean_run']):.4g}; "
                             f"in the baseline {shown(g.at[ahead, 'mean_base']):.4g} against "
                             f"{shown(g.at[behind, 'mean_base']):.4g}): "
                             + ("beyond the seed spread" if all(sep) else "within the seed spread"))
    return pd.DataFrame(table), lines


def beyond_spread(lines: list[str]) -> list[str]:
    """The reversals of ``rank_changes`` that both runs separate beyond the seed spread."""
    return [line for line in lines if line.endswith("beyond the seed spread")]


def rankings_markdown(table: pd.DataFrame, lines: list[str], metric: str, base_name) -> str:
    """``rank_changes``' result as Markdown: each dataset's order in the baseline and in the run,
    then the reversals."""
    orders = [{"dataset": d, f"baseline ({base_name})": ", ".join(g.sort_values(["rank_base", "cell"])["cell"]),
               "this run": ", ".join(g.sort_values(["rank_run", "cell"])["cell"])}
              for d, g in table.groupby("dataset", sort=True)]
    beyond = beyond_spread(lines)
    out = [f"\n## Rankings by {metric}, best first\n", pd.DataFrame(orders).to_markdown(index=False), "",
           f"{len(lines)} pair(s) of cells reordered; {len(beyond)} beyond the seed spread (both runs separate the "
           "two cells by more than twice the standard error of their difference)" + (":" if beyond else ".")
           if lines else "No pair of cells is reordered."]
    return "\n".join(out + [f"- {line.rsplit(': ', 1)[0]}" for line in beyond]) + "\n"


def marked_columns(g: pd.DataFrame) -> list[str]:
    """The metric columns whose mean over ``g``'s seeds lies outside the floor band."""
    return [c for c in _shown_metrics(g) if f"{c}_floor" in g
            and outside_floor(g[c], g[f"{c}_floor"], g[f"{c}_floor_std"])]


def headline(df: pd.DataFrame, spec) -> str:
    """A published comparison (``spec``, a ``reproduce.Headline``) on this run: NFE, sampling time
    and its ratio to the reference cell, the quality metrics with their floor marks and which
    metrics tell each model from the data; with the publication's own figures alongside."""
    ok = df[df["status"] == "done"]
    ref_model, ref_steps = spec.reference
    lines = []
    for dev, sub in ok.groupby("device_name", sort=False):
        ref = sub[(sub["model"] == ref_model) & (sub["steps"] == ref_steps)]
        t_ref = ref["sample_s"].median() if len(ref) else float("nan")
        recs = []
        for (m, k), g in sub.groupby(["model", "steps"], sort=False):
            rep = spec.published.get((m, int(k)))
            recs.append({
                "model": m, "steps": int(k), "nfe": int(g["nfe"].median()),
                "sample_s": _fmt(g["sample_s"].median(), 3), "time_ratio": _fmt(t_ref / g["sample_s"].median(), 3),
                "w2": _metric_cell(g, "w2"), "w2_floor": _pm(g["w2_floor"]),
                "modes": f"{_fmt(g['modes_captured'].mean())}/{int(g['modes_total'].max())}",
                **{c: _metric_cell(g, c) for c in ("precision", "recall", "c2st", "hq_frac") if c in g},
                "told from the data by": ", ".join(marked_columns(g)) or "nothing",
                "report: nfe": rep["nfe"] if rep else "", "report: sample_s": rep["sample_s"] if rep else "",
            })
        lines += [f"## {dev} ({sub['device'].iloc[0]}, {_distinct(sub['threads'])} thread(s))", "",
                  pd.DataFrame(recs).to_markdown(index=False), "",
                  f"time_ratio = sample_s({ref_model}, {ref_steps} steps) / sample_s(row). The source report measured "
                  f"{spec.source}. {MARK}: outside the data's noise floor "
                  f"± {MARK_STD:g} std; 'told from the data by' lists every metric so marked.", "", protocol_line(sub), ""]
    matched = matched_quality(ok, ladder=ref_model)
    if matched is not None:
        lines += ["## Matched quality", "", MATCHED_NOTE.format(ladder=ref_model), "",
                  matched.drop(columns=["device"]).to_markdown(index=False), ""]
    return "\n".join(lines)


#: PacGAN's Table 1 columns -> the row columns of the "pacgan" metric
PACGAN_COLUMNS = {"modes": "pacgan_modes", "hq": "pacgan_hq", "rkl": "pacgan_rkl"}


def _mean_se(values) -> tuple[float, float, int]:
    v = _numbers(values)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"), len(v)


def pacgan_table(df: pd.DataFrame, spec, packs=None) -> tuple[str, int, int]:
    """PacGAN's Table 1 beside this run's (``spec``: a ``reproduce.PacGANTable``): per packing degree
    and dataset, the modes captured, the high-quality fraction (%) and the reverse KL, mean ±
    standard error over the seeds, the paper's alongside; a cell whose means differ by more than
    twice their combined standard error is marked. Returns (Markdown, cells compared, cells marked)."""
    # the model's rows, or its degrees' as ``reproduce pacgan`` names them (trials of the model: MODEL~KEY)
    ok = df[(df["status"] == "done") & ((df["model"] == spec.model) | df["model"].str.startswith(f"{spec.model}~"))]
    recs, compared, marked = [], 0, 0
    for pack in packs or spec.packs:
        rec = {"model": spec.label(pack)}
        sub = ok[ok["variant"] == f"pack{pack}"]
        for group, dataset in spec.datasets.items():
            g = sub[sub["dataset"] == dataset]
            paper = spec.published.get((pack, group), {})
            for col, column in PACGAN_COLUMNS.items():
                mean, se, n = _mean_se(g[column]) if column in g else (float("nan"), float("nan"), 0)
                scale = 100.0 if col == "hq" else 1.0
                p_mean, p_se = paper.get(col, (float("nan"), float("nan")))
                mark = ""
                if n and np.isfinite(p_mean):
                    compared += 1
                    if abs(mean - p_mean) > 2 * np.sqrt((se if np.isfinite(se) else 0.0) ** 2 + p_se ** 2):
                        mark, marked = f" {MARK}", marked + 1
                ours = f"{_fmt(mean * scale)} ± {_fmt(se * scale, 2)}{mark}" if n else "–"
                rec[f"{group} {col}"] = ours
                rec[f"{group} {col} (paper)"] = f"{_fmt(p_mean * scale)} ± {_fmt(p_se * scale, 2)}" if np.isfinite(p_mean) else ""
            rec[f"{group} seeds"] = int(g["seed"].nunique()) if len(g) else 0
        recs.append(rec)
    steps = sorted({int(s) for s in _numbers(ok["train_steps"])}) if "train_steps" in ok else []
    text = [pd.DataFrame(recs).to_markdown(index=False), "",
            f"Ours: mean ± standard error over the seeds; the paper: {spec.source}, mean ± standard error over 10 "
            f"trials. {MARK}: the two means differ by more than 2 combined standard errors. hq: high-quality samples "
            "(within 3 std of their nearest mode), %; modes: modes holding any of them; rkl: reverse KL of their mode "
            f"histogram to the true weights. Training steps here: {', '.join(map(str, steps)) or '–'} (the paper: "
            f"{spec.steps()})."]
    if steps and steps != [spec.steps()]:
        text += ["", f"**Not the paper's budget**: {', '.join(map(str, steps))} training steps against its {spec.steps()} "
                 f"({spec.epochs} epochs of {spec.examples_per_epoch:,} examples); the comparison is not a reproduction."]
    return "\n".join(text), compared, marked
