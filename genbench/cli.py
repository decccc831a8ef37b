"""The ``genbench`` command. Thin: it parses and validates, then calls the runner, the report or
the registry. It imports nothing of torch itself (the runner does, lazily).

Exit codes: 0 done; 1 the environment failed (a run dir that cannot be written: full disk,
permissions); 2 bad input (nothing was created or trained); 3 the run ended but some cells failed
or diverged (their rows say why); 130 interrupted (Ctrl-C; finished cells are kept)."""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .api import BUDGETS, CONVERGED, RunDirError, UsageError
from .runner.plan import default as _default

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark generative models on 2D data: diffusion, consistency models, VAEs, flows, GANs and plugins.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"genbench {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print genbench's version and exit.")) -> None:
    """Benchmark generative models on 2D data: diffusion, consistency models, VAEs, flows, GANs and plugins."""
EXIT_ENVIRONMENT, EXIT_USAGE, EXIT_CELLS_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130
err = Console(stderr=True)
console = Console()


def fail(msg: str, code: int = EXIT_USAGE) -> "typer.Exit":
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _list(value: str, what: str) -> list[str]:
    """A comma-separated list: no empty item, no item twice."""
    items = [v.strip() for v in value.split(",")]
    if not any(items):
        raise UsageError(f"{what}: empty list; give comma-separated values")
    if not all(items):
        raise UsageError(f"{what} {value!r}: an empty item; give comma-separated values, e.g. a,b")
    twice = next((v for v in items if items.count(v) > 1), None)
    if twice is not None:
        raise UsageError(f"{what} {value!r}: {twice} given twice")
    return items


def _ints(value: str, what: str, minimum: int) -> list[int]:
    """Comma-separated whole numbers written with the digits 0-9 (no '1_0', no full-width digits)."""
    import re

    items = _list(value, what)
    if not all(re.fullmatch(r"-?[0-9]+", v) for v in items):
        raise UsageError(f"{what} {value!r}: expected comma-separated integers (digits 0-9), e.g. 0,1,2")
    vals = [int(v) for v in items]
    if any(v < minimum for v in vals):
        raise UsageError(f"{what} {value!r}: every value must be >= {minimum}")
    return vals


def _steps(value: str | None) -> dict:
    """``1,2,5`` (every multistep model) or ``diffusion=100,cm-cd=1:2`` (per model)."""
    if value is None:
        return {"steps": None}
    if "=" not in value:
        return {"steps": _ints(value, "--steps", 1)}
    per: dict[str, list[int]] = {}
    for item in _list(value, "--steps"):
        model, sep, counts = item.partition("=")
        if not sep or not model:
            raise UsageError(f"--steps {value!r}: mix of forms; use 1,2,5 or MODEL=1:2,MODEL=5")
        if model in per:
            raise UsageError(f"--steps {value!r}: {model} given twice; give its counts once, e.g. {model}=1:2")
        per[model] = _ints(counts.replace(":", ","), f"--steps {model}", 1)
    return {"steps": None, "steps_by_model": per}


def _pairs(items: list[str], what: str, example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (sep and key and value):
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE, e.g. {example}")
        out[key] = value
    return out


def _out(value: str | None) -> Path | None:
    """An --out value as a path; an empty one is refused (it would mean the current directory)."""
    if value is None:
        return None
    if not value.strip():
        raise UsageError("--out '': empty path; give a file or directory name")
    return Path(value)


def _params(items: list[str]) -> dict[str, dict[str, str]]:
    params: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, fld = key.partition(".")
        if not (sep and dot and model and fld):
            raise UsageError(f"--param {item!r}: expected MODEL.FIELD=VALUE, e.g. diffusion.sampler=heun")
        params.setdefault(model, {})[fld] = value
    return params


@app.command()
def run(
    models: Optional[str] = typer.Option(None, help="Comma-separated models or aliases (cm = cm-cd,cm-ct). Default: every registered model."),
    datasets: str = typer.Option(",".join(_default("datasets")), help="Comma-separated datasets (see 'genbench list')."),
    seeds: str = typer.Option(",".join(map(str, _default("seeds"))), help="Comma-separated integer seeds; each seeds data, weights and sampling."),
    steps: Optional[str] = typer.Option(None, help="Sampler step counts for multistep models, e.g. 1,2,5,10,100 (train once, one row per count), or per model: diffusion=100,cm-cd=1:2. Default: each model's own."),
    budget: str = typer.Option(_default("budget"), help=f"Training budget preset: {', '.join(BUDGETS)}, or {CONVERGED} (each fit stops on its validation curve, up to a cap, and keeps its best weights), or auto: {CONVERGED} on a GPU, default on the CPU."),
    n_samples: int = typer.Option(_default("n_samples"), help="Samples generated, scored and timed per cell (>= 2)."),
    metrics: str = typer.Option("default", help="Metric set: default (w2, energy, prdc, c2st, support, modes), all, or a comma-separated list (default,sinkhorn adds one)."),
    floor_draws: int = typer.Option(_default("floor_draws"), help="Independent true samples scored for each metric's noise floor (>= 2)."),
    device: str = typer.Option(_default("device"), help="auto, cpu, cuda or mps."),
    threads: int = typer.Option(_default("threads"), help="CPU threads for torch (1 gives stable timings on small shared machines)."),
    jobs: int = typer.Option(_default("jobs"), help="Fit units trained at once, each in its own process; 0 = auto: cores / threads on the CPU, 1 on a GPU."),
    score_jobs: Optional[int] = typer.Option(None, help="CPU processes that score cells while the fits go on (0: each fit process scores its own). Default: on a GPU with one fit process, the cores but two; else 0."),
    side_by_side: Optional[bool] = typer.Option(None, "--side-by-side/--one-by-one", help="Fit the units of a model that can as one stacked network (default: on a GPU), or one at a time."),
    groups_at_once: int = typer.Option(_default("groups_at_once"), help="Side-by-side groups (one per model) trained at once in the fit process, each on its own CUDA stream; a student's group waits for its teacher's; each group's cells are sampled and scored as it ends, and timed after the last group. Rows record it: their train_s then shares the device."),
    max_members: int = typer.Option(_default("max_members"), help="The most fit units in one side-by-side group (a stacked fit); more units of a model make more groups."),
    param: List[str] = typer.Option([], help="Model config override MODEL.FIELD=VALUE, repeatable (e.g. diffusion.sampler=heun)."),
    out: Optional[str] = typer.Option(None, help="Run directory (default results/<budget>-<device>). Re-running into it resumes."),
    executor: str = typer.Option(_default("executor"), help="Where fit units run: local (this machine's processes), ray (Ray tasks; pip install 'genbench\\[ray]') or slurm (SLURM jobs through submitit; pip install 'genbench\\[slurm]'). The run's process alone writes the run dir."),
    address: Optional[str] = typer.Option(None, help="--executor ray: the Ray cluster to join (auto, HOST:PORT or ray://HOST:PORT). Default: start a local Ray instance."),
    retries: int = typer.Option(_default("retries"), help="Times a task whose worker process, node or job died is run again before its cells become error rows (--jobs > 1, ray, slurm)."),
    task_gpus: float = typer.Option(_default("task_gpus"), help="--executor ray on a GPU device: the share of one GPU each task asks for (0 < x <= 1). Below 1, tasks share a GPU and time each other's calls; the default keeps one task per GPU."),
    slurm: List[str] = typer.Option([], help="--executor slurm: a job resource KEY=VALUE, repeatable: partition, account, qos, constraint, time (minutes, default 60), gpus (per job; default 1 on cuda), cpus (default --threads), mem (GB), cluster (slurm, local: jobs as local processes, debug)."),
    tuned: Optional[Path] = typer.Option(None, help="A tuned.json written by 'genbench tune': each model's tuned config per dataset (--param applies on top). The run must be at the tuned budget, on seeds other than the tuning seeds; every row records its config's source."),
):
    """Train each model on each dataset and seed, sample, score and time it; print the table."""
    try:
        out = _out(out)
        from . import registry
        from .runner import Plan, Run
        from .scoring import parse_metrics

        plugins = []
        if models is not None:
            model_names = _list(models, "--models")
        else:  # every registered model; installed plugins join, and the run says so
            found = {n: e for n, e in registry.discover().items() if e.cls is not None}
            model_names = list(found)
            plugins = [f"{n} ({e.dist})" for n, e in found.items() if e.source == "plugin"]
        plan = Plan(models=model_names, datasets=_list(datasets, "--datasets"), seeds=_ints(seeds, "--seeds", 0),
                    **_steps(steps), budget=budget, n_samples=n_samples, metrics=parse_metrics(metrics),
                    floor_draws=floor_draws, device=device, threads=threads, jobs=jobs, score_jobs=score_jobs,
                    side_by_side=side_by_side, groups_at_once=groups_at_once, max_members=max_members,
                    params=_params(param),
                    out=str(out) if out else _default("out"), executor=executor, address=address,
                    retries=retries, task_gpus=task_gpus, slurm=_pairs(slurm, "--slurm", "partition=gpu"))
        if tuned is not None:  # the tuned configs join the plan before its run dir is checked
            from dataclasses import replace

            from .runner.plan import check
            from .tune import tuned_plan_fields

            r = check(plan)  # the models and the budget 'auto' resolves to
            fields = tuned_plan_fields(tuned, [e.name for e in r.entries], list(plan.datasets), list(plan.seeds),
                                       r.plan.budget)
            plan = replace(plan, budget=r.plan.budget, **fields)
        runner = Run(plan)  # validates everything (the run dir's settings too) before anything is trained or written
        if plugins:
            err.print(f"note: no --models given: every registered model runs, plugins included: "
                      f"{', '.join(plugins)}; choose with --models", highlight=False, markup=False, soft_wrap=True)
        rows = _run(runner)
    except UsageError as e:
        raise fail(str(e))
    from . import report

    df = report.tidy(rows)
    _summary(runner, df)
    _finish(runner, df)


def _summary(runner, df) -> None:
    """The end of a run: its heading (where, budget, device), one compact table per dataset, the
    notes once each, and the commands that show the rest."""
    from . import report

    r, out = runner.r, runner.plan.out
    ok = df[df["status"] == "done"]
    device = ", ".join(sorted(df["device_name"].dropna().astype(str).unique())) or r.device
    console.print(f"# genbench run → {out}\n\nbudget {runner.plan.budget}{report.budget_note(df)}; {r.device} "
                  f"({device}); n = {runner.plan.n_samples}; {runner.plan.threads} thread(s) per process, "
                  f"{runner.plan.jobs} fit process(es)\n", highlight=False, soft_wrap=True, markup=False)
    console.print(report.summary(df), highlight=False, soft_wrap=True, markup=False)
    notes = [f"{report.MARK}: the mean over seeds lies outside the data's floor ± {report.MARK_STD:g} std/sqrt(seeds) "
             "(the metric tells the model from the data); sample_ms: median time of one sample call."]
    notes += [line[2:] for line in report.metric_notes(ok if len(ok) else df).splitlines()
              if line.startswith("- empty because")]
    console.print("\n".join(notes), highlight=False, soft_wrap=True, markup=False)
    console.print(f"\nNext: genbench report {out}   (every metric, intervals, the timing protocol)\n"
                  f"      genbench report {out} --format html --out {out}/report.html   (a page to open in a browser)\n"
                  f"      genbench plot {out}   (samples, trajectories, frontier, losses)",
                  highlight=False, soft_wrap=True, markup=False)


@contextlib.contextmanager
def _stop_on_sigterm():
    """A SIGTERM (a command's time limit, a cluster taking the node back) stops the run as Ctrl-C
    does, but a fit in training first saves where it is, at its next logged window (``train.STOP``),
    so that the re-run continues from there."""
    from .models import train

    def stop(signum, frame):
        if not train.request_stop():  # no fit keeping snapshots is training: stop now
            raise KeyboardInterrupt

    train.STOP.clear()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        train.STOP.clear()


def _run(runner) -> list[dict]:
    """Runs with a progress bar; Ctrl-C or SIGTERM exits 130 and a run dir that cannot be written
    exits 1, each with one line (finished cells stay written; on a SIGTERM, each fit in training
    saves a snapshot first)."""
    try:
        runner.store.lock()  # before the progress bar: a refusal is the only line printed
        with _stop_on_sigterm(), _RichProgress() as progress:
            return runner.run(progress)
    except KeyboardInterrupt as e:
        from .models.train import Stopped

        saved = " and the fits in training where they were" if isinstance(e, Stopped) else ""
        raise fail(f"interrupted; finished cells{saved} are kept in {runner.store.path}, re-run the same command "
                   "to resume", EXIT_INTERRUPTED) from None
    except RunDirError as e:
        raise fail(f"{e}; finished cells are kept, re-run to resume", EXIT_ENVIRONMENT) from None


def _notes(notes: list[str]) -> None:
    for note in notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)


def _finish(runner, df) -> None:
    """The run's notes, then its summary; exit 3 when some cells failed or diverged."""
    _notes(runner.notes)
    bad = df[df["status"] != "done"]
    if len(bad):
        counts = ", ".join(f"{n} {s}" for s, n in bad["status"].value_counts().items())
        err.print(f"{len(bad)} of {len(df)} cells did not finish ({counts}); see the status column "
                  f"(exit {EXIT_CELLS_FAILED})", highlight=False)
        raise typer.Exit(EXIT_CELLS_FAILED)


@app.command(name="report")
def report_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories written by 'genbench run' (or folders of them)."),
    format: str = typer.Option("md", "--format", help="md (tables aggregated over seeds, per device), csv (one row per cell) or html (one self-contained page: sortable, filterable tables and every figure)."),
    out: Optional[str] = typer.Option(None, help="Write to this file instead of printing."),
    compare: Optional[Path] = typer.Option(None, help="A baseline run dir (e.g. baselines/cpu): per-cell deltas, regressions beyond the seed-to-seed spread flagged, and (md) each dataset's ranking of the cells in both, its reversals named."),
    rank_by: str = typer.Option("c2st", "--rank-by", help="With --compare: the metric the rankings order cells by (c2st by its distance from 0.5; w2, energy, mode_tv lower first; the others higher first)."),
):
    """Tables from run directories: Markdown aggregated over seeds, or CSV with one row per cell."""
    try:
        out = _out(out)
        if format not in ("md", "csv", "html"):
            raise UsageError(f"--format {format!r}; valid: md, csv, html")
        if format == "html" and compare is not None:
            raise UsageError("--compare writes md or csv; give --format md or csv with it")
        from . import report

        if out is not None:
            _check_out_file(out)
        rows = _read_rows(run_dirs)
        base_rows = _read_rows([compare]) if compare else None
        if base_rows is not None and not any(r.get("status") == "done" for r in base_rows):
            raise UsageError(f"--compare {compare}: no finished cells to compare against (every row failed)")
        if base_rows is not None and not any(r.get("status") == "done" for r in rows):
            raise UsageError(f"{', '.join(map(str, run_dirs))}: no finished cells to compare (every row failed)")
        df = report.tidy(rows)
        base = report.tidy(base_rows) if base_rows is not None else None
        cmp = report.compare(df, base) if base is not None else None
        ranks = None
        if cmp is not None and format == "md":
            columns = sorted(set(report.METRIC_COLUMNS) - report.NO_FLOOR)
            if rank_by not in columns:
                raise UsageError(f"--rank-by {rank_by!r} is not a metric column; valid: {', '.join(columns)}")
            if all(rank_by in d and d[rank_by].notna().any() for d in (df, base)):
                ranks = report.rank_changes(df, base, rank_by)
            else:
                err.print(f"no rankings: the rows of one side hold no {rank_by} (--rank-by another metric)")
    except UsageError as e:
        raise fail(str(e))
    if cmp is not None:
        text = cmp.to_csv(index=False) if format == "csv" else (
            f"# {', '.join(map(str, run_dirs))} against {compare}\n\n" + cmp.to_markdown(index=False, floatfmt=".4g") + "\n")
        bad = int(cmp["flag"].str.startswith("REGRESSION").sum())
        summary = f"{len(cmp)} cells compared, {bad} flagged as regressions"
        if ranks is not None:
            text += report.rankings_markdown(*ranks, rank_by, compare)
            summary += (f"; {len(ranks[1])} pair(s) of cells reordered by {rank_by}, "
                        f"{len(report.beyond_spread(ranks[1]))} beyond the seed spread")
        err.print(summary)
    elif format == "html":
        text = _html_page(run_dirs, df)
    else:
        text = df.to_csv(index=False) if format == "csv" else report.markdown(df)
    if out:
        from .store import atomic_write

        atomic_write(out, text.encode())
        err.print(f"wrote {out}")
    else:
        sys.stdout.write(text)


def _html_page(run_dirs, df) -> str:
    """The results page of ``run_dirs``: their tables, and every figure ``plot`` draws for each."""
    import tempfile

    from . import plots, report, report_html, store

    figures = []
    for d in run_dirs:
        for rd in store.open_many(d):
            with tempfile.TemporaryDirectory(prefix="genbench-page-") as tmp:
                sub = report.tidy(rd.rows())
                for p in plots.plot_run(rd, sub, Path(tmp), notice=lambda m: err.print(m, highlight=False)):
                    figures.append((str(rd.path), plots.FIGURES[p.name][0], p.read_bytes()))
    title = "genbench results: " + ", ".join(str(d) for d in run_dirs)
    return report_html.page(df, figures, title=title)


def _check_out_file(out: Path) -> None:
    """An output file path: refused (exit 2) when it is a directory or lies under a file."""
    from .store import check_out_dir

    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name")
    check_out_dir(out.parent)


def _read_rows(run_dirs) -> list[dict]:
    """Every row of the run dirs (or folders of them); lines that are not rows are counted and
    named on stderr, never fatal."""
    from . import store

    rows = []
    for d in run_dirs:
        for rd in store.open_many(d):
            rows += rd.rows()
            if rd.skipped_lines:
                err.print(f"note: {rd.rows_path}: skipped {rd.skipped_lines} line(s) that are not rows", highlight=False)
    if not rows:
        raise UsageError(f"no rows in {', '.join(map(str, run_dirs))}; run 'genbench run' first")
    return rows


@app.command()
def tune(
    models: str = typer.Option(..., help="Comma-separated models or aliases to tune (each must declare a search space: 'genbench list')."),
    datasets: str = typer.Option(",".join(_default("datasets")), help="Comma-separated datasets; each gets its own tuned config."),
    trials: int = typer.Option(32, help="Trials per model, dataset and study (the same for every model): the defaults, then quasirandom draws of the model's space."),
    studies: int = typer.Option(1, help="Independent studies (each its own Sobol scrambling; the tuned file takes study 0's best)."),
    seeds: str = typer.Option("0", help="Comma-separated tuning seeds (the tables re-run the best on other seeds: run --tuned refuses these)."),
    budget: str = typer.Option("converged", help=f"Training budget of every trial: {CONVERGED} (default: selection at convergence), or {', '.join(BUDGETS)} (quick: smoke tests)."),
    device: str = typer.Option(_default("device"), help="auto, cpu, cuda or mps."),
    threads: int = typer.Option(_default("threads"), help="CPU threads for torch."),
    jobs: int = typer.Option(_default("jobs"), help="Fit units trained at once, each in its own process (as 'run --jobs')."),
    groups_at_once: int = typer.Option(_default("groups_at_once"), help="Side-by-side groups of trials trained at once on a GPU, each on its own CUDA stream (as 'run --groups-at-once')."),
    max_members: int = typer.Option(_default("max_members"), help="The most trials' fit units in one stacked group (as 'run --max-members')."),
    seed: int = typer.Option(0, help="Seed of the quasirandom draws (study s scrambles with seed + s)."),
    halving: int = typer.Option(0, help="Successive halving with this factor eta (0: off, every trial at the budget): per dataset, the best 1/eta of the trials at a fraction of the budget's steps go on at eta times the steps, the last rung at the budget's (32 trials, eta 3: 32, 11, 4, 2 trials at 1/27, 1/9, 1/3, 1 of the steps; where a rung's fits are continued, cut at a logged window's end)."),
    out: Optional[str] = typer.Option(None, help="Tune directory (default results/tune-<budget>): trials/MODEL (a run dir for each model's rungs, its trials its models), tune.json, tuned.json. Re-running resumes."),
):
    """Equal-budget tuning: the same number of quasirandom trials for every model from the search
    space it declares (its defaults always trial 0), each scored on the validation sample (never the
    reference the tables use); the best per model and dataset goes to tuned.json for 'run --tuned'."""
    try:
        out_dir = _out(out) or Path(f"results/tune-{budget}")
        from .tune import run_tune

        bar = _TuneProgress()
        try:
            with _stop_on_sigterm():
                tuned_file, results, best, notes = run_tune(
                    models=_list(models, "--models"), datasets=_list(datasets, "--datasets"),
                    seeds=_ints(seeds, "--seeds", 0), n_trials=trials, studies=studies, budget=budget, out=out_dir,
                    device=device, threads=threads, jobs=jobs, seed=seed, run=bar.run, groups_at_once=groups_at_once,
                    max_members=max_members, halving=halving)
        except KeyboardInterrupt as e:
            from .models.train import Stopped

            bar.close()
            saved = " and the fits in training where they were" if isinstance(e, Stopped) else ""
            raise fail(f"interrupted; finished cells{saved} are kept in {out_dir / 'trials'}, re-run the same "
                       "command to resume", EXIT_INTERRUPTED) from None
        finally:
            bar.close()
        from . import plots

        written = plots.plot_tune({"trials": results}, out_dir / "figures")
    except UsageError as e:
        raise fail(str(e))
    except RunDirError as e:  # names the file it could not write
        raise fail(str(e), EXIT_ENVIRONMENT)
    except OSError as e:
        raise fail(f"cannot write {out_dir}: {e.strerror or e}", EXIT_ENVIRONMENT)
    _notes(notes)
    err.print(f"figures: {', '.join(str(p) for p in written)}", highlight=False, soft_wrap=True, markup=False)
    from rich.table import Table

    t = Table(title=f"tuned configs (study 0's best of {trials} trials, validation score: lower is better) → {tuned_file}")
    for col in ("model", "dataset", "trial", "score", "settings"):
        t.add_column(col)
    for (model, dataset, study), b in sorted(best.items()):
        if study == 0:
            t.add_row(model, dataset, "defaults" if b["trial"] == 0 else str(b["trial"]), f"{b['score']:.3g}",
                      ", ".join(f"{k}={v}" for k, v in b["params"].items()))
    console.print(t)


REPRODUCTIONS = ("headline", "pacgan")


@app.command()
def reproduce(
    name: str = typer.Argument("headline", help=f"Which published table: {', '.join(REPRODUCTIONS)}."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
    jobs: int = typer.Option(1, help="Fit units trained at once, each in its own process (1: nothing else runs while the headline is timed; 0 = auto)."),
    budget: str = typer.Option("auto", help=f"headline: training budget preset ({', '.join(BUDGETS)}, {CONVERGED}, or auto: {CONVERGED} on a GPU, default on the CPU)."),
    param: List[str] = typer.Option([], help="Model config override MODEL.FIELD=VALUE, repeatable."),
    packs: str = typer.Option("1,2,3,4", help="pacgan: the packing degrees (1: GAN; m: PacGAN-m)."),
    seeds: int = typer.Option(10, help="pacgan: seeds (trials) per packing degree and dataset (the paper: 10)."),
    epochs: int = typer.Option(400, help="pacgan: training epochs of 100,000 examples (the paper: 400); fewer make a smoke test, and the table says so."),
    out: Optional[str] = typer.Option(None, help="Run directory (default results/reproduce-<budget>-<device>; pacgan: results/reproduce-pacgan-<device>, holding the run dir of the degrees trained at once, e.g. pack1-4)."),
):
    """A published table re-run with genbench's code, the publication's figures beside it.
    headline: the source report's, on ring8 with 2000 samples, diffusion (100 Euler steps) against cm-cd
    and cm-ct (1 and 2 steps): NFE, sampling time and ratio, W2 with its floor, modes, and the
    matched-quality speedup. pacgan: PacGAN's Table 1 (Lin et al. 2018): the GAN and PacGAN2/3/4 on
    its ring and grid at its settings, 10 seeds: modes, high-quality fraction, reverse KL."""
    if name not in REPRODUCTIONS:
        raise fail(f"unknown reproduction {name!r}; valid: {', '.join(REPRODUCTIONS)}")
    if name == "pacgan":
        return _reproduce_pacgan(device, threads, jobs, param, packs, seeds, epochs, out)
    try:
        out = _out(out)
        from .reproduce import HEADLINE
        from .runner import Plan, Run

        plan = Plan(models=list(HEADLINE.steps), datasets=[HEADLINE.dataset], seeds=[0],
                    steps_by_model=HEADLINE.steps, budget=budget,
                    n_samples=HEADLINE.n_samples, device=device, threads=threads, jobs=jobs, params=_params(param),
                    score_jobs=0,  # nothing else runs while the headline is timed
                    out=str(out) if out else "results/reproduce-{budget}-{device}")
        runner = Run(plan)
        rows = _run(runner)
    except UsageError as e:
        raise fail(str(e))
    from . import report

    df = report.tidy(rows)
    console.print(f"# The source report's headline, reproduced → {runner.plan.out}\n\n" + report.headline(df, HEADLINE),
                  highlight=False, soft_wrap=True)
    _finish(runner, df)


def _reproduce_pacgan(device, threads, jobs, param, packs, seeds, epochs, out) -> None:
    """PacGAN's Table 1: the chosen packing degrees trained at once in one run dir (each degree a
    model of the run in its own right, as a tune's trials are: its own config, its group of every
    seed of both datasets fitted side by side, the groups at once on a GPU, each on its own stream);
    the table from its rows and, for the degrees it did not train, from the other run dirs beside
    it (another GPU's invocation with the other degrees)."""
    import hashlib
    import json

    from . import report
    from .reproduce import PACGAN
    from .runner import Plan, Run
    from .runner.plan import MAX_GROUPS_AT_ONCE
    from .store import RunDir
    from .tune import trial_name

    try:
        out = _out(out)
        chosen = sorted(set(_ints(packs, "--packs", 1)))
        if seeds < 1 or epochs < 1:
            raise UsageError(f"--seeds {seeds} --epochs {epochs}: both must be >= 1")
        extra = _params(param)
        if set(extra) - {PACGAN.model}:
            raise UsageError(f"--param: the pacgan reproduction trains {PACGAN.model} only; "
                             f"got {', '.join(sorted(set(extra) - {PACGAN.model}))}")
        from .scoring import DEFAULT_METRICS

        def degree(pack: int) -> tuple[str, dict]:  # a degree's name pins its config, as a trial's does
            p = PACGAN.params | {"pack": str(pack), "train_steps": str(PACGAN.steps(epochs))} | extra.get(PACGAN.model, {})
            return trial_name(PACGAN.model, hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]), p

        degrees = {pack: degree(pack) for pack in {*PACGAN.packs, *chosen}}  # every degree at these settings
        params = dict(degrees[pack] for pack in chosen)
        named = {name: pack for pack, (name, _) in degrees.items()}
        name = "pack" + "-".join(map(str, chosen))
        plan = Plan(models=list(params), trials=dict.fromkeys(params, PACGAN.model), params=params,
                    datasets=list(PACGAN.datasets.values()), seeds=list(range(seeds)), budget="default",
                    n_samples=PACGAN.n_samples, metrics=[*DEFAULT_METRICS, "pacgan"], device=device, threads=threads,
                    jobs=jobs, groups_at_once=min(len(chosen), MAX_GROUPS_AT_ONCE),
                    out=str(out / name) if out else f"results/reproduce-pacgan-{{device}}/{name}")
        runner = Run(plan)  # checked before anything trains
        rows = _run(runner)
    except UsageError as e:
        raise fail(str(e))
    where, mine = Path(runner.plan.out).parent, list(rows)
    found = {named[r["model"]] for r in rows if r.get("status") == "done"}
    others = []
    for other in sorted(p for p in where.iterdir() if p.is_dir() and p != Path(runner.plan.out)):
        try:  # their rows of a degree at this run's settings (other epochs or params are another table)
            theirs = [r for r in RunDir(other).rows() if r.get("model") in named]
        except Exception:  # noqa: BLE001 - not a run dir (or an unreadable one): not part of the table
            continue
        new = {named[r["model"]] for r in theirs if r.get("status") == "done"} - found
        if new:
            rows += [r for r in theirs if named[r["model"]] in new]
            found |= new
            others.append(f"{other.name} ({', '.join(PACGAN.label(k) for k in sorted(new))})")
    df = report.tidy(rows)
    table, compared, marked = report.pacgan_table(df, PACGAN, sorted(found) or chosen)
    text = (f"# PacGAN (Lin et al. 2018) Table 1, reproduced → {where}\n\n{table}\n\n"
            f"{marked} of {compared} cells differ from the paper's beyond 2 combined standard errors."
            + (f" Rows from {Path(runner.plan.out).name} and {', '.join(others)}." if others else ""))
    try:
        (where / "report.md").write_text(text + "\n")
    except OSError as e:
        raise fail(f"cannot write {where / 'report.md'}: {e.strerror or e}", EXIT_ENVIRONMENT)
    console.print(text, highlight=False, soft_wrap=True)
    _finish(runner, report.tidy(mine))  # exit 3 when some of this run's cells did not finish


@app.command()
def calibrate(
    datasets: str = typer.Option("all", help="Comma-separated datasets, or all."),
    n_samples: int = typer.Option(_default("n_samples"), help="Points per sample (as 'run --n-samples')."),
    reps: int = typer.Option(6, help="Replicates (seeds) per dataset used to estimate each shift and spread (>= 3)."),
    defects: str = typer.Option("all", help="all, or NAME[=SIZE],... of: outliers, blur, shift, dilate, missing, reweight."),
    metrics: str = typer.Option("default", help="Metric set: default, all, or a comma-separated list (default,sinkhorn adds one)."),
    max_seeds: int = typer.Option(5, help="Seeds beyond which a defect counts as unresolved."),
    jobs: int = typer.Option(0, help="Datasets calibrated at once, one process and thread each; 0 = the cores."),
    device: str = typer.Option("cpu", help="Where the GPU-capable metrics (energy, sinkhorn) run: cpu or cuda."),
    out: Optional[str] = typer.Option(None, help="Also write the table here (.md, or .csv with every shift and spread)."),
):
    """The benchmark's resolving power: plant defects of stated sizes in true samples and print,
    per dataset and defect, how many seeds each metric needs to mark them at this n."""
    try:
        out = _out(out)
        from . import calibrate as cal
        from . import datasets as ds_mod
        from .scoring import parse_metrics

        names = list(ds_mod.DATASETS) if datasets.strip() == "all" else _list(datasets, "--datasets")
        for d in names:
            ds_mod.get(d)
        chosen = cal.parse_defects(defects)
        metric_names = parse_metrics(metrics)
        if n_samples < 10 or reps < 3 or max_seeds < 1 or jobs < 0:
            raise UsageError("need --n-samples >= 10, --reps >= 3, --max-seeds >= 1, --jobs >= 0")
        if device not in ("cpu", "cuda"):
            raise UsageError(f"--device {device!r}; valid: cpu, cuda")
        if device == "cuda":
            from .runner import resolve_device

            resolve_device("cuda")
        if out is not None and out.suffix not in (".md", ".csv"):
            raise UsageError(f"--out {out}: give a .md or .csv file")
        from .runner.plan import check_memory, cpu_cores

        jobs = min(jobs or cpu_cores(), len(names))
        check_memory(metric_names, n_samples, jobs)
    except UsageError as e:
        raise fail(str(e))
    import time

    t0 = time.perf_counter()
    rows = cal.calibrate(names, n_samples, reps, chosen, metric_names, jobs=jobs, device=device,
                         progress=lambda d: err.print(f"calibrated {d}", highlight=False))
    wall = time.perf_counter() - t0
    tab = cal.table(rows, max_seeds)
    head = (f"# Resolving power at n = {n_samples} ({reps} replicates per dataset, {wall:.0f} s)\n\n"
            f"Seeds each metric needs to mark the defect (the report's 3-std rule, >= 97.7% of the time); "
            f"'–': more than {max_seeds}.\n\n"
            + "\n".join(f"- {d.name} (size {s:g}): {cal.describe(d, s)}" for d, s in chosen) + "\n\n")
    text = (head + "Per dataset and defect, the fewest seeds and the metrics that need only that many:\n\n"
            + cal.summary(rows, max_seeds).to_markdown(index=False) + "\n\nEvery metric column:\n\n"
            + tab.to_markdown(index=False) + "\n")
    console.print(text, highlight=False, soft_wrap=True)
    if out is not None:
        import pandas as pd

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(pd.DataFrame(rows).to_csv(index=False) if out.suffix == ".csv" else text)
        err.print(f"wrote {out}")


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A run directory written by 'genbench run'."),
    out: Optional[str] = typer.Option(None, help="Folder for the PNGs and report.md (default RUN_DIR/report)."),
):
    """PNG figures (samples, PF-ODE paths, one-step maps, NFE-W2 frontier, losses) and a Markdown
    report embedding them. Reads only saved run data; a figure without data is skipped with a notice."""
    try:
        out = _out(out)
        from . import store
        from .store import check_out_dir

        rd = store.open_existing(run_dir)
        rows = _read_rows([run_dir])
        folder = out or rd.path / "report"
        check_out_dir(folder)
    except UsageError as e:
        raise fail(str(e))
    from . import plots, report

    from .store import atomic_write

    df = report.tidy(rows)
    written = plots.plot_run(rd, df, folder, notice=lambda m: err.print(m, highlight=False))
    md = report.markdown(df, title=f"genbench report: {rd.path.name}")
    md += "\n" + "\n".join(f"## {plots.FIGURES[p.name][0]}\n\n![{p.stem}]({p.name})\n" for p in written)
    atomic_write(folder / "report.md", md.encode())
    err.print(f"wrote {len(written)} figure(s) and {folder / 'report.md'}")


@app.command(name="list")
def list_cmd():
    """Registered models (built-in / plugin / broken, with the reason) and datasets."""
    from rich.markup import escape
    from rich.table import Table

    from . import datasets as ds_mod
    from . import registry

    t = Table(title="models")
    for c in ("name", "source", "target", "capabilities", "note"):
        t.add_column(c, overflow="fold")  # folded, never cut: an entry point is read to be found
    found = registry.discover()
    for name, e in found.items():
        doc = (e.cls.__doc__ or "").strip().splitlines() if e.cls else []
        note = e.error or (doc[0] if doc else "(no docstring)")
        if e.ignored:
            note += f" (ignored: {', '.join(e.ignored)} also claims this name)"
        caps = ", ".join(e.cls.capabilities()) if e.cls else ""
        t.add_row(*(escape(v) for v in (name, e.source, e.target, caps, note)))  # plugin text is not markup
    for alias, names in registry.ALIASES.items():
        t.add_row(alias, "alias", ", ".join(names), "", "")
    console.print(t)
    b = Table(title="budgets: the config fields the presets set")
    for c in ("model", *BUDGETS, f"{CONVERGED} (cap)"):
        b.add_column(c, overflow="fold")
    for name, e in found.items():
        if e.cls is not None:
            fields = list(dict.fromkeys(k for x in (*BUDGETS, CONVERGED) for k in e.cls.budgets.get(x, {})))
            configs = [e.cls(budget=x).config for x in (*BUDGETS, CONVERGED)]
            b.add_row(escape(name), *(escape(", ".join(f"{k}={getattr(c, k)}" for k in fields) or "–") for c in configs))
    console.print(b)
    from .tune import space_table

    sp = Table(title="search spaces ('genbench tune' draws its trials from these; the defaults are always a trial)")
    for col in ("model", "field", "range", "default"):
        sp.add_column(col)
    for row in space_table([e for e in found.values() if e.cls is not None]):
        sp.add_row(*(escape(v) for v in row))
    console.print(sp)
    d = Table(title="datasets")
    for c in ("name", "version", "kind", "description", "on the support (hq_frac)"):
        d.add_column(c)
    for ds in ds_mod.DATASETS.values():
        d.add_row(ds.name, ds.version, f"mixture of {len(ds.means)}" if ds.is_mixture else "continuous", ds.description,
                  ds.support_note)
    console.print(d)


@app.command(name="bench-sampler")
def bench_sampler(
    steps: int = typer.Option(100, help="Sampler steps."),
    n: int = typer.Option(2000, help="Batch size (samples per call)."),
    sampler: str = typer.Option("euler", help="A diffusion sampler (euler, heun, lms, dpmpp_2m)."),
    device: str = typer.Option("cpu", help="auto, cpu, cuda or mps."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
    repeats: int = typer.Option(9, help="Alternating timed rounds of the loop and of NFE forward passes (>= 5)."),
):
    """Benchmark: the diffusion sampling loop's wall time against NFE x one network forward pass."""
    try:
        if steps < 1 or n < 2 or repeats < 5 or threads < 1:
            raise UsageError("need --steps >= 1, --n >= 2, --repeats >= 5, --threads >= 1")
        from .models.bench import sampler_overhead

        r = sampler_overhead(steps=steps, n=n, device=device, threads=threads, repeats=repeats, sampler=sampler)
    except UsageError as e:
        raise fail(str(e))
    console.print(
        f"{r['device_name']} ({r['device']}, {r['threads']} thread(s)), {r['sampler']} {r['steps']} steps "
        f"= {r['nfe']} NFE, n = {r['n']}\n"
        f"  one forward pass: median {r['forward_s'] * 1e3:.3f} ms (min {r['forward_s_min'] * 1e3:.3f}), "
        f"from {r['nfe']} back-to-back passes\n"
        f"  sampling loop:    median {r['loop_s'] * 1e3:.2f} ms (min {r['loop_s_min'] * 1e3:.2f})\n"
        f"  loop / (NFE x forward) = {r['ratio']:.3f} (median of {repeats} alternating rounds)", highlight=False)


@app.command(name="bench-graph")
def bench_graph(
    n: int = typer.Option(2000, help="Batch size (samples per call)."),
    device: str = typer.Option("cuda", help="A CUDA device (graphs are CUDA-only)."),
    repeats: int = typer.Option(20, help="Timed repeats (>= 5)."),
):
    """Benchmark: sampling time eager vs replayed from a CUDA graph, and per NFE."""
    try:
        if repeats < 5 or n < 2:
            raise UsageError("need --repeats >= 5 and --n >= 2")
        from .models.bench import graph_vs_eager
        from .runner import device_name, resolve_device

        if not resolve_device(device).startswith("cuda"):
            raise UsageError(f"--device {device}: CUDA graphs need a CUDA device")
        rows = graph_vs_eager(n=n, device=device, repeats=repeats)
    except UsageError as e:
        raise fail(str(e))
    import pandas as pd

    console.print(f"{device_name(device)}, n = {n}, median of {repeats} (min in the CSV)\n"
                  + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"), highlight=False)


class _RichProgress:
    """Rich progress bar with ETA, one tick per cell to run (cells already done are not counted).
    Where stderr is not a terminal (a log file, a batch job), where the bar draws nothing until the
    end, a plain status line every ``PLAIN_EVERY_S`` seconds instead: the cells done, the elapsed
    time and what the run is doing."""

    PLAIN_EVERY_S = 60.0

    def __enter__(self):
        import threading

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # the ETA from the mean speed over the run so far (fits and cells alternate: a short window jumps)
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False,
                          speed_estimate_period=3600)
        self.p.__enter__()
        self.task = self.p.add_task("planning", total=None)
        self._stop = threading.Event()
        self._plain = None
        if not err.is_terminal:
            self._plain = threading.Thread(target=self._status_lines, daemon=True, name="genbench-status")
            self._plain.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._plain is not None:
            self._plain.join()
        self.p.__exit__(*exc)

    def _status_lines(self) -> None:
        import time

        start = time.monotonic()
        while not self._stop.wait(self.PLAIN_EVERY_S):
            task = self.p.tasks[0]
            done = f"{int(task.completed)}/{int(task.total)} cells" if task.total is not None else "planning"
            err.print(f"[{time.monotonic() - start:7.0f} s] {done}: {task.description}", highlight=False,
                      markup=False, soft_wrap=True)

    def start(self, total: int) -> None:
        self.p.update(self.task, total=total, completed=0)

    def update(self, description: str) -> None:
        self.p.update(self.task, description=description)

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)


class _TuneProgress:
    """One progress bar for a tune's runs (each model's rungs; on a GPU several at once), opened at
    the first run (a tune refused before it prints its one line alone): each run adds its cells to
    the bar's total. ``run`` is the tune's way to run one ``runner.Run``."""

    def __init__(self):
        import threading

        self.bar, self.total, self.lock = None, 0, threading.Lock()

    def run(self, runner) -> list[dict]:
        with self.lock:
            if self.bar is None:
                self.bar = _RichProgress().__enter__()
        return runner.run(self)

    def start(self, total: int) -> None:
        with self.lock:
            self.total += total
            self.bar.p.update(self.bar.task, total=self.total)

    def update(self, description: str) -> None:
        self.bar.update(description)

    def advance(self, n: int = 1) -> None:
        self.bar.advance(n)

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None


def _click_classes(name: str) -> tuple:
    """The command-line parser's exception class ``name``: click's, and, where Typer carries its own
    copy of click (Typer 0.2x), that one's too."""
    import importlib

    out = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def main() -> None:
    """The entry point: no traceback reaches the user. A command-line mistake (an unknown option, a
    value of the wrong type, a missing argument) is one line and exit 2; file-system failures exit
    1 with the path and the cause; anything unexpected exits 1 with one line (GENBENCH_DEBUG=1
    shows the traceback)."""
    from .api import debug_enabled

    usage, no_args, abort = (_click_classes(n) for n in ("UsageError", "NoArgsIsHelpError", "Abort"))
    try:
        code = app(standalone_mode=False)
    except no_args as e:  # 'genbench' alone: the help, as --help gives it
        print(e.ctx.get_help() if getattr(e, "ctx", None) else str(e))
        sys.exit(0)
    except usage as e:
        msg = e.format_message()
        if "unexpected extra argument" in msg:
            msg += " (lists are comma-separated, e.g. --datasets ring8,moons)"
        command = e.ctx.command_path if getattr(e, "ctx", None) else "genbench"
        fail(f"{msg.rstrip('.')}; see '{command} --help'")
        sys.exit(EXIT_USAGE)
    except abort:
        fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
    except RunDirError as e:
        fail(str(e), EXIT_ENVIRONMENT)
        sys.exit(EXIT_ENVIRONMENT)
    except OSError as e:
        if debug_enabled():
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        fail(f"cannot access{where}: {e.strerror or e}", EXIT_ENVIRONMENT)
        sys.exit(EXIT_ENVIRONMENT)
    except Exception as e:  # noqa: BLE001
        if debug_enabled():
            raise
        from rich.markup import escape

        err.print(f"[bold red]internal error:[/] {escape(type(e).__name__)}: "
                  f"{escape(str(e).splitlines()[0]) if str(e) else ''} (set GENBENCH_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(EXIT_ENVIRONMENT)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
