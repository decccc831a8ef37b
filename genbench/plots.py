"""PNG figures from a run directory. Reads only saved run data (rows, samples/*.npz, fits/*.json),
never live models, and needs no display (Agg backend)."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .store import RunDir, cell_name  # noqa: E402

#: colours for models that declare none (``Generator.colour``), picked by name so that a model
#: looks the same in every figure
_SPARE = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def colour(df: pd.DataFrame, model: str) -> str:
    """The colour the model's rows carry (its class's ``colour``), else one picked from its name."""
    from matplotlib.colors import is_color_like

    if "colour" in df:
        declared = df.loc[df["model"] == model, "colour"].dropna()
        if len(declared) and is_color_like(declared.iloc[0]):
            return str(declared.iloc[0])
    return _SPARE[sum(map(ord, model)) % len(_SPARE)]


def _grid(n: int, max_cols: int = 4, w: float = 3.2, h: float = 3.0):
    """A figure of ``n`` panels on a grid (at most ``max_cols`` columns: small multiples, never one
    long row or column); the panels past ``n`` are switched off. Returns (figure, flat axes)."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def _finish(fig, title: str | None = None, legend: list | None = None):
    """Title and legend kept inside the canvas: the title wrapped to the figure's width, the
    legend (handles, labels) in rows below the panels, the figure made taller by the legend's
    rows (so that a long legend under one panel does not flatten it); then a tight layout."""
    top, bottom = 1.0, 0.0
    if legend:
        handles, labels = legend
        ncol = max(1, min(len(labels), int(fig.get_figwidth() // 2.2)))
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False, markerscale=1.5)
        below = 0.12 + 0.17 * -(-len(labels) // ncol)  # inches
        fig.set_figheight(fig.get_figheight() + below)
        bottom = below / fig.get_figheight()
    if title:
        lines = textwrap.wrap(title, width=int(fig.get_figwidth() * 11))
        fig.suptitle("\n".join(lines), fontsize=10)
        top = 1 - (0.15 + 0.17 * len(lines)) / fig.get_figheight()
    # twice: the first pass resizes equal-aspect panels, and only the second sees the room their
    # titles then need (with one pass a second row's titles were drawn over the first row's panels)
    for _ in range(2):
        fig.tight_layout(rect=(0, bottom, 1, top))
    return fig


def _label(model: str, steps) -> str:
    return model if pd.isna(steps) else f"{model} ({int(steps)} step{'' if int(steps) == 1 else 's'})"


def _limits(ref: np.ndarray, pad: float = 0.15):
    lo, hi = np.percentile(ref, 0.5, 0), np.percentile(ref, 99.5, 0)
    span = (hi - lo).max() * (1 + 2 * pad)
    centre = (hi + lo) / 2
    return [(c - span / 2, c + span / 2) for c in centre]


def _samples(rd: RunDir, r) -> dict | None:
    """The saved arrays of the cell of row ``r``, or None where the file is missing, torn or does
    not match the sha256 its row recorded (that panel is left empty)."""
    sha = r.get("samples_sha256")
    return rd.load_samples(cell_name(r["model"], r["dataset"], int(r["seed"]), None if pd.isna(r["steps"]) else int(r["steps"])),
                           None if pd.isna(sha) else sha)


def _done(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "done"]


def samples_grid(rd: RunDir, df: pd.DataFrame):
    """Samples over the true data: a row per (model, steps) and a column per dataset, or, for one
    dataset, the (model, steps) panels on a grid."""
    ok = _done(df)
    if ok.empty:
        return "no finished cells"
    seed = ok["seed"].min()
    ok = ok[ok["seed"] == seed]
    dsets = list(dict.fromkeys(ok["dataset"]))
    rows = list(dict.fromkeys(zip(ok["model"], ok["steps"])))
    if len(dsets) == 1:
        fig, flat = _grid(len(rows), max_cols=4, w=2.9, h=3.3)
        places = {(i, 0): ax for i, ax in enumerate(flat)}
    else:
        fig, axes = plt.subplots(len(rows), len(dsets), figsize=(2.8 * len(dsets), 2.7 * len(rows)), squeeze=False)
        places = {(i, j): axes[i, j] for i in range(len(rows)) for j in range(len(dsets))}
    for j, d in enumerate(dsets):
        for i, (m, k) in enumerate(rows):
            ax = places[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            # a single-pass model's steps are missing (NA): match NA with NA (a string comparison of
            # NA differs between pandas releases and left those panels blank under pandas 3)
            same_steps = ok["steps"].isna() if pd.isna(k) else (ok["steps"] == k).fillna(False)
            cell = ok[(ok["dataset"] == d) & (ok["model"] == m) & same_steps]
            arr = _samples(rd, cell.iloc[0]) if len(cell) else None
            if arr is None:
                ax.set_axis_off()
                continue
            ref, x = arr["ref"], arr["x"]
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.75", alpha=0.5, lw=0)
            ax.scatter(x[:, 0], x[:, 1], s=1, c=colour(df, m), alpha=0.6, lw=0)
            (x0, x1), (y0, y1) = _limits(ref)
            ax.set_xlim(x0, x1), ax.set_ylim(y0, y1), ax.set_aspect("equal")
            r = cell.iloc[0]
            modes = "" if pd.isna(r["modes_total"]) else f", {int(r['modes_captured'])}/{int(r['modes_total'])} modes"
            w2 = "" if pd.isna(r["w2"]) else f"W2 {r['w2']:.3f} (floor {r['w2_floor']:.2f})"
            if len(dsets) == 1:
                ax.set_title(f"{_label(m, k)}\n{w2}{modes}", fontsize=7)
            else:
                ax.set_title(f"{d}\n{w2}{modes}" if i == 0 else f"{w2}{modes}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(_label(m, k), fontsize=8)
    where = f" on {dsets[0]}" if len(dsets) == 1 else ""
    return _finish(fig, f"Samples (colour) over true data (grey){where}, seed {seed}")


def _one_per_dataset(rd: RunDir, df: pd.DataFrame, model: str, key: str):
    """For each dataset: (seed, steps, array) of the cell with the most steps that saved ``key``."""
    ok = _done(df)
    ok = ok[ok["model"] == model].sort_values("steps", ascending=False)
    out = {}
    for _, r in ok.iterrows():
        if r["dataset"] in out:
            continue
        arr = _samples(rd, r)
        if arr is not None and key in arr:
            out[r["dataset"]] = (r, arr)
    return out


def _saved(rd: RunDir, df: pd.DataFrame, key: str) -> list[tuple]:
    """(model, dataset, row, arrays) of every model that saved ``key`` (a capability of its class),
    one cell per dataset."""
    return [(m, d, r, arr) for m in dict.fromkeys(_done(df)["model"])
            for d, (r, arr) in _one_per_dataset(rd, df, m, key).items()]


def trajectories(rd: RunDir, df: pd.DataFrame):
    found = _saved(rd, df, "trajectory")
    if not found:
        return "no cells with saved trajectories (a model's trajectory_sample)"
    fig, flat = _grid(len(found), max_cols=3, w=3.6, h=3.6)
    for ax, (m, d, r, arr) in zip(flat, found):
        traj, ref = arr["trajectory"], arr["ref"]
        (x0, x1), (y0, y1) = _limits(ref, pad=0.6)
        inside = (np.abs(traj - [(x0 + x1) / 2, (y0 + y1) / 2]) < (x1 - x0) / 2).all(-1)  # [k+1, n]
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="tab:blue", alpha=0.3, lw=0, label="data")
        for p in range(traj.shape[1]):
            first = int(np.argmax(inside[:, p]))  # x_T lies far outside the view: start where the path enters it
            ax.plot(traj[first:, p, 0], traj[first:, p, 1], c="0.3", lw=0.6, alpha=0.7,
                    label="sampling path" if p == 0 else None)
            ax.scatter(*traj[first, p], c="red", s=8, zorder=3, label="start (x_T, or where the path enters the view)" if p == 0 else None)
            ax.scatter(*traj[-1, p], c="green", s=8, zorder=3, label="end point" if p == 0 else None)
        ax.set_xlim(x0, x1), ax.set_ylim(y0, y1), ax.set_aspect("equal")
        steps = "" if pd.isna(r["steps"]) else f", {int(r['steps'])} steps"
        ax.set_title(f"{m} on {d}\n{r['variant']}{steps}", fontsize=8)
        ax.set_xlabel("x1"), ax.set_ylabel("x2")
    handles, labels = flat[0].get_legend_handles_labels()
    return _finish(fig, "Sampling paths from noise to samples", legend=(handles, labels))


def one_step_maps(rd: RunDir, df: pd.DataFrame):
    panels = [(m, d, arr) for m, d, _, arr in _saved(rd, df, "one_step_map")]
    if not panels:
        return "no cells with saved one-step maps (a model's one_step_map)"
    fig, flat = _grid(len(panels), max_cols=3, w=3.6, h=3.6)
    for ax, (m, d, arr) in zip(flat, panels):
        z, fz, ref = arr["one_step_map"][:, 0], arr["one_step_map"][:, 1], arr["ref"]
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="tab:blue", alpha=0.3, lw=0)
        ax.quiver(z[:, 0], z[:, 1], fz[:, 0] - z[:, 0], fz[:, 1] - z[:, 1], angles="xy", scale_units="xy", scale=1,
                  color=colour(df, m), width=0.004, alpha=0.8)
        ax.scatter(z[:, 0], z[:, 1], c="red", s=6, zorder=3)
        lim = _limits(np.concatenate([ref, z]), pad=0.05)
        ax.set_xlim(*lim[0]), ax.set_ylim(*lim[1]), ax.set_aspect("equal")
        ax.set_title(f"{m} on {d}", fontsize=8)
        ax.set_xlabel("x1"), ax.set_ylabel("x2")
    return _finish(fig, "One-step map: unit noise z (red) to its sample in one network call (arrow); data in blue")


def _minor_labels(ax) -> FuncFormatter:
    """Labels for a log axis' minor ticks that never overlap: every one within a decade, 2 and 5
    over up to two and a half decades, none beyond (the major ticks then suffice)."""
    lo, hi = ax.get_ylim()
    decades = np.log10(hi / lo) if lo > 0 else 10.0
    keep = {2, 3, 4, 5, 6, 7, 8, 9} if decades <= 1 else {2, 5} if decades <= 2.5 else set()

    def fmt(y, _):
        lead = int(round(y / 10 ** np.floor(np.log10(y) + 1e-9))) if y > 0 else 0
        return f"{y:g}" if lead in keep else ""

    return FuncFormatter(fmt)


def _loglog(ax) -> None:
    """Both axes logarithmic, their major ticks labelled as plain numbers (0.05, not 5x10^-2)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def frontier(rd: RunDir, df: pd.DataFrame):
    """W2 against NFE per dataset: a line per model over its step counts (median, min-max over
    seeds); a model sampled at one step count is one point, and its legend entry says so."""
    ok = _done(df)
    if ok.empty:
        return "no finished cells"
    dsets = list(dict.fromkeys(ok["dataset"]))
    fig, flat = _grid(len(dsets), max_cols=3, w=3.8, h=3.4)
    entries: dict[str, object] = {}
    for ax, d in zip(flat, dsets):
        sub = ok[ok["dataset"] == d]
        floor, fstd = sub["w2_floor"].mean(), sub["w2_floor_std"].mean()
        band = ax.axhspan(floor - fstd, floor + fstd, color="0.85")
        entries.setdefault("W2 noise floor (± std)", band)
        ax.axhline(floor, color="0.5", lw=0.8)
        # median and min-max over seeds on a log axis: one seed's far outliers show as a long bar
        # instead of flattening the panel
        for (m, v), g in sub.groupby(["model", "variant"], sort=False):
            s = g.groupby("nfe")["w2"].agg(["median", "min", "max"]).reset_index().sort_values("nfe")
            yerr = np.vstack([s["median"] - s["min"], s["max"] - s["median"]])
            one = len(s) == 1
            line = ax.errorbar(s["nfe"], s["median"], yerr=yerr, marker="o", ms=4 if one else 3, capsize=2,
                               c=colour(df, m), ls="none" if one else "-")
            name = f"{m} ({v})" if v else m
            entries.setdefault(name + (f": one point, NFE {int(s['nfe'].iloc[0])}" if one else ""), line)
        _loglog(ax)
        ax.yaxis.set_minor_formatter(_minor_labels(ax))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_xlabel("NFE per sample batch")
        ax.set_ylabel("W2 (median, min-max over seeds)", fontsize=8)
        ax.set_title(d, fontsize=9)
    return _finish(fig, "Sample quality against network evaluations (both axes log)",
                   legend=(list(entries.values()), list(entries)))


def losses(rd: RunDir, df: pd.DataFrame):
    units = df.drop_duplicates(["model", "dataset"])[["model", "dataset", "seed"]]
    curves = []
    for _, u in units.iterrows():
        seed = df[(df["model"] == u["model"]) & (df["dataset"] == u["dataset"])]["seed"].min()
        rec = rd.load_json("fits", cell_name(u["model"], u["dataset"], int(seed)), unchecked_ok=True)
        y = rec.get("losses") if rec else None
        if isinstance(y, list) and y and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in y):
            curves.append((u["model"], u["dataset"], rec))
    if not curves:
        return "no saved training curves"
    models = list(dict.fromkeys(m for m, _, _ in curves))
    fig, flat = _grid(len(models), max_cols=3, w=3.6, h=3.0)
    styles = ["-", "--", ":", "-."]
    dsets = list(dict.fromkeys(d for _, d, _ in curves))
    for ax, m in zip(flat, models):
        allpos = True
        for _, d, rec in [c for c in curves if c[0] == m]:
            y = np.asarray(rec["losses"], dtype=float)
            allpos &= bool((y > 0).all())
            every = rec.get("log_every")
            x = np.arange(1, len(y) + 1) * (every if type(every) is int and every > 0 else 1)
            ax.plot(x, y, styles[dsets.index(d) % 4], c=colour(df, m), lw=1)
        ax.set_yscale("log" if allpos else "symlog")
        if allpos:  # plain numbers on the log axis ("0.7", not "7x10^-1")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(_minor_labels(ax))
            ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_title(m + ("" if allpos else " (symlog: the loss goes negative)"), fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (window mean)", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls=styles[i % 4], c="0.3") for i in range(len(dsets))]
    return _finish(fig, "Training loss, seed of the first row (line style: dataset)", legend=(handles, dsets))


#: the learning curves' panels: (curve column, how it is shown, the floor fields of the fit record)
CURVE_METRICS = (("energy", "validation energy distance", "eval_floor", "eval_floor_std"),
                 ("off_support", "off-support fraction", "eval_floor_off", "eval_floor_off_std"))


def _curve_points(rec: dict) -> list[dict]:
    """A fit record's evaluations with finite values, the off-support fraction (1 - hq_frac) added."""
    out = []
    for p in rec["eval_curve"]:
        if isinstance(p.get("energy"), (int, float)) and isinstance(p.get("hq_frac"), (int, float)):
            out.append({**p, "off_support": 1.0 - p["hq_frac"]})
    return out


def learning_curves(rd: RunDir, df: pd.DataFrame):
    """Per dataset, the validation metrics of each model's fits (energy distance, off-support
    fraction) against training steps and against training seconds (the converged budget's
    evaluations): the median over seeds, the min-max band, the data's floor band, and the kept
    evaluation of each seed marked."""
    curves = []  # (model, dataset, record)
    for (m, d, seed), _ in df.groupby(["model", "dataset", "seed"], sort=False):
        rec = rd.load_json("fits", cell_name(m, d, int(seed)), unchecked_ok=True)
        points = rec.get("eval_curve") if rec else None
        if isinstance(points, list) and points and all(isinstance(p, dict) and isinstance(p.get("step"), int)
                                                       for p in points):
            curves.append((m, d, rec))
    if not curves:
        return "no evaluation curves (a run at --budget converged records them)"
    dsets = list(dict.fromkeys(d for _, d, _ in curves))
    fig, axes = plt.subplots(len(dsets), 4, figsize=(14.0, 2.8 * len(dsets)), squeeze=False)
    entries: dict[str, object] = {}
    n_val = 2000  # the validation sample's size: an off-support fraction below 1/n shows as 1/n
    for row, d in zip(axes, dsets):
        mine = [(m, rec) for m, dd, rec in curves if dd == d]
        panels = [(metric, label, fields, x_key) for metric, label, *fields in CURVE_METRICS
                  for x_key in ("step", "train_s")]
        for ax, (metric, label, (f_mean, f_std), x_key) in zip(row, panels):
            floor = np.mean([rec.get(f_mean) if isinstance(rec.get(f_mean), (int, float)) else np.nan for _, rec in mine])
            fstd = np.mean([rec.get(f_std) if isinstance(rec.get(f_std), (int, float)) else np.nan for _, rec in mine])
            low = 1.0 / n_val if metric == "off_support" else 1e-12
            if np.isfinite(floor) and np.isfinite(fstd):
                band = ax.axhspan(max(floor - fstd, low), floor + 3 * fstd, color="0.88")
                entries.setdefault("the data's floor band (floor + 3 std)", band)
            for m in dict.fromkeys(m for m, _ in mine):
                table = pd.DataFrame([{**p, "seed": i} for i, (mm, rec) in enumerate(mine) if mm == m
                                      for p in _curve_points(rec)])
                if table.empty:
                    continue
                table[metric] = table[metric].clip(lower=low)
                g = table.groupby("step").agg(x=(x_key, "median"), med=(metric, "median"), lo=(metric, "min"),
                                              hi=(metric, "max")).reset_index()
                line, = ax.plot(g["x"], g["med"], c=colour(df, m), lw=1.2)
                ax.fill_between(g["x"], g["lo"], g["hi"], color=colour(df, m), alpha=0.15, lw=0)
                entries.setdefault(m, line)
                kept = [(p[x_key], max(p[metric], low)) for mm, rec in mine if mm == m for p in _curve_points(rec)
                        if p["step"] == rec.get("kept_step")]
                if kept:
                    mark = ax.scatter(*zip(*kept), marker="*", s=60, c=colour(df, m), edgecolors="k", lw=0.5, zorder=3)
                    entries.setdefault("the evaluation kept (each seed)", mark)
            _loglog(ax)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("training step" if x_key == "step" else "training seconds (evaluation excluded)", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(d, fontsize=9)
    return _finish(fig, "Learning curves on the validation sample: median over seeds, min-max band",
                   legend=(list(entries.values()), list(entries)))


FIGURES: dict[str, tuple[str, Callable]] = {
    "samples.png": ("Samples", samples_grid),
    "trajectories.png": ("Sampling trajectories", trajectories),
    "one_step_map.png": ("One-step map", one_step_maps),
    "frontier.png": ("NFE vs W2 frontier", frontier),
    "losses.png": ("Training loss", losses),
    "learning_curves.png": ("Learning curves", learning_curves),
}


def figures(rd: RunDir, df: pd.DataFrame, notice: Callable[[str], None] = print) -> dict:
    """name -> the matplotlib figure, for every figure the run has data for; a figure without data
    is skipped with a one-line notice. The caller saves and closes them."""
    out = {}
    for name, (title, fn) in FIGURES.items():
        fig = fn(rd, df)
        if isinstance(fig, str):
            notice(f"skipped {name} ({title}): {fig}")
        else:
            out[name] = fig
    return out


def _save(figs: dict, out: Path) -> list[Path]:
    """Writes each figure (name -> figure) into ``out`` as PNG at 110 dpi and closes it; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def plot_run(rd: RunDir, df: pd.DataFrame, out: Path, notice: Callable[[str], None] = print) -> list[Path]:
    """Writes every figure it has data for into ``out``; returns the files written."""
    return _save(figures(rd, df, notice), out)


def text_outside(fig) -> list[str]:
    """What of ``fig`` is drawn beyond its canvas: each panel's tight bounding box (its title, axis
    labels and the tick labels it draws, its legend) and the figure's own title and legends, by
    matplotlib's tight bounding boxes; named by their text."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    bad = []
    for i, artist in enumerate([*fig.axes, *fig.legends, *fig.texts]):
        if not artist.get_visible():
            continue
        box = artist.get_tightbbox(renderer) if hasattr(artist, "get_tightbbox") else artist.get_window_extent(renderer)
        if box is not None and (box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1):
            name = artist.get_title() if hasattr(artist, "get_title") and not hasattr(artist, "get_texts") else ""
            bad.append(name or getattr(artist, "get_text", lambda: f"{type(artist).__name__} {i}")())
    return bad


# -- tuning (genbench tune's tune.json) -----------------------------------------------------------
def _tune_table(tune: dict) -> pd.DataFrame:
    """One row per (trial, dataset): model, study, index, the trial's settings, its validation score."""
    recs = [{"model": t["model"], "study": t["study"], "index": t["index"], "dataset": d, "score": s, **t["params"]}
            for t in tune.get("trials", []) for d, s in t["scores"].items()]
    return pd.DataFrame(recs)


def best_of_k(scores: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best (lowest) score among k trials, k = 1 .. len(scores): the median and 5-95% band over
    ``draws`` bootstrap resamples of k of the trials (a finite score stands for a miss's infinity
    nowhere: misses stay infinite and lose)."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    picks = rng.integers(0, n, size=(draws, n))
    best = np.minimum.accumulate(scores[picks], axis=1)  # [draws, k]
    return tuple(np.percentile(best, q, axis=0) for q in (50, 5, 95))


def tune_figures(tune: dict) -> dict:
    """name -> figure: best-of-k curves (best validation score against the number of trials, with a
    bootstrap band), the distribution of the trials' scores, and the score against the learning rate
    (one panel per dataset, a colour per model; study 0)."""
    from matplotlib.lines import Line2D

    df = _tune_table(tune)
    if df.empty:
        return {}
    df = df[df["study"] == 0]
    dsets = list(dict.fromkeys(df["dataset"]))
    models = list(dict.fromkeys(df["model"]))
    colours = {m: _SPARE[i % len(_SPARE)] for i, m in enumerate(models)}
    out = {}
    kinds = [("best_of_k.png", "Best validation score among k trials (median and 5-95% bootstrap band; lower is better)"),
             ("trial_scores.png", "Validation score of every trial (the defaults circled; lower is better)")]
    if "lr" in df:
        kinds.append(("sensitivity.png", "Validation score against the learning rate (the defaults circled)"))
    for name, title in kinds:
        fig, axes = _grid(len(dsets))
        for ax, d in zip(axes, dsets):
            for i, m in enumerate(models):
                g = df[(df["dataset"] == d) & (df["model"] == m)].sort_values("index")
                scores = g["score"].to_numpy(dtype=float)
                if not len(scores):
                    continue
                finite = np.where(np.isfinite(scores), scores, np.nan)
                if name == "best_of_k.png":
                    med, lo, hi = best_of_k(np.where(np.isfinite(scores), scores, np.inf))
                    k = np.arange(1, len(scores) + 1)
                    ax.plot(k, med, c=colours[m], lw=1.2, label=m)
                    ax.fill_between(k, np.where(np.isfinite(lo), lo, np.nan), np.where(np.isfinite(hi), hi, np.nan),
                                    color=colours[m], alpha=0.15, lw=0)
                    ax.set_xlabel("trials", fontsize=8)
                elif name == "trial_scores.png":
                    x = np.full(len(scores), i) + np.linspace(-0.2, 0.2, len(scores))
                    ax.scatter(x, finite, s=10, c=colours[m], label=m)
                    ax.scatter(x[:1], finite[:1], s=60, facecolors="none", edgecolors="k", lw=0.8)
                    ax.set_xticks(range(len(models)), models, fontsize=7, rotation=30)
                else:
                    lr = pd.to_numeric(g["lr"], errors="coerce").to_numpy()
                    ax.scatter(lr, finite, s=10, c=colours[m], label=m)
                    ax.scatter(lr[:1], finite[:1], s=60, facecolors="none", edgecolors="k", lw=0.8)
                    ax.set_xscale("log")
                    ax.set_xlabel("learning rate", fontsize=8)
            ax.set_ylabel("validation score", fontsize=8)
            ax.set_title(d, fontsize=9)
        handles = [Line2D([], [], c=colours[m], lw=2) for m in models]
        out[name] = _finish(fig, title, legend=(handles, models))
    return out


def plot_tune(tune: dict, out: Path) -> list[Path]:
    """Writes the tuning figures into ``out``; returns the files written."""
    return _save(tune_figures(tune), out)
