"""The ``genbench`` command. Thin: it parses and validates, then calls the runner, the report or
the registry. It imports nothing of torch itself (the runner does, lazily)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .api import BUDGETS, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark diffusion, consistency, VAE and flow generators on 2D data.")
err = Console(stderr=True)
console = Console()


def fail(msg: str) -> "typer.Exit":
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"{what}: empty list; give comma-separated values")
    return items


def _ints(value: str, what: str, minimum: int) -> list[int]:
    try:
        vals = [int(v) for v in _list(value, what)]
    except ValueError:
        raise UsageError(f"{what} {value!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if any(v < minimum for v in vals):
        raise UsageError(f"{what} {value!r}: every value must be >= {minimum}")
    return list(dict.fromkeys(vals))


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
    datasets: str = typer.Option("ring8", help="Comma-separated datasets (see 'genbench list')."),
    seeds: str = typer.Option("0", help="Comma-separated integer seeds; each seeds data, weights and sampling."),
    steps: Optional[str] = typer.Option(None, help="Sampler step counts for multistep models, e.g. 1,2,5,10,100 (train once, one row per count). Default: each model's own."),
    budget: str = typer.Option("default", help=f"Training budget preset: {', '.join(BUDGETS)}."),
    n_samples: int = typer.Option(2000, help="Samples generated, scored and timed per cell (>= 2)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 gives stable timings on small shared machines)."),
    param: List[str] = typer.Option([], help="Model config override MODEL.FIELD=VALUE, repeatable (e.g. diffusion.sampler=heun)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default results/<budget>-<device>). Re-running into it resumes."),
):
    """Train each model on each dataset and seed, sample, score and time it; print the table."""
    try:
        if budget not in BUDGETS:
            raise UsageError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
        if threads < 1:
            raise UsageError(f"--threads {threads}: must be >= 1")
        if n_samples < 2:
            raise UsageError(f"--n-samples {n_samples}: need at least 2 samples")
        from . import registry
        from .runner import Plan, Runner

        model_names = _list(models, "--models") if models else [
            n for n, e in registry.discover().items() if e.cls is not None]
        plan = Plan(models=model_names, datasets=_list(datasets, "--datasets"), seeds=_ints(seeds, "--seeds", 0),
                    steps=_ints(steps, "--steps", 1) if steps else None, budget=budget, n_samples=n_samples,
                    device=device, threads=threads, params=_params(param),
                    out=str(out) if out else None)
        runner = Runner(plan)  # validates everything before anything is trained or written
        with _RichProgress() as runner.progress:
            rows = runner.run()
    except UsageError as e:
        raise fail(str(e))
    from . import report

    df = report.tidy(rows)
    console.print(report.markdown(df, title=f"genbench run → {plan.out}"), highlight=False, soft_wrap=True)
    failed = df[df["status"] != "done"]
    if len(failed):
        err.print(f"{len(failed)} of {len(df)} cells did not finish; see the status column")


@app.command(name="report")
def report_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories written by 'genbench run'."),
    format: str = typer.Option("md", "--format", help="md (tables aggregated over seeds, per device) or csv (one row per cell)."),
    out: Optional[Path] = typer.Option(None, help="Write to this file instead of printing."),
):
    """Tables from run directories: Markdown aggregated over seeds, or CSV with one row per cell."""
    try:
        if format not in ("md", "csv"):
            raise UsageError(f"--format {format!r}; valid: md, csv")
        from . import report, store

        rows = [r for d in run_dirs for r in store.open_existing(d).rows()]
        if not rows:
            raise UsageError(f"no rows in {', '.join(map(str, run_dirs))}; run 'genbench run' first")
    except UsageError as e:
        raise fail(str(e))
    df = report.tidy(rows)
    text = df.to_csv(index=False) if format == "csv" else report.markdown(df)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        err.print(f"wrote {out}")
    else:
        sys.stdout.write(text)


@app.command(name="list")
def list_cmd():
    """Registered models (built-in / plugin / broken, with the reason) and datasets."""
    from rich.table import Table

    from . import datasets as ds_mod
    from . import registry

    t = Table(title="models")
    for c in ("name", "source", "target", "note"):
        t.add_column(c)
    for name, e in registry.discover().items():
        t.add_row(name, e.source, e.target, e.error or (e.cls.__doc__ or "").strip().splitlines()[0])
    for alias, names in registry.ALIASES.items():
        t.add_row(alias, "alias", ", ".join(names), "")
    console.print(t)
    d = Table(title="datasets")
    for c in ("name", "version", "kind", "description"):
        d.add_column(c)
    for ds in ds_mod.DATASETS.values():
        d.add_row(ds.name, ds.version, f"mixture of {len(ds.means)}" if ds.is_mixture else "continuous", ds.description)
    console.print(d)


class _RichProgress:
    """Rich progress bar with ETA, one tick per cell."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False)
        self.p.__enter__()
        self.task = self.p.add_task("planning", total=None)
        return self

    def __exit__(self, *exc):
        self.p.__exit__(*exc)

    def start(self, total: int) -> None:
        self.p.update(self.task, total=total, completed=0)

    def update(self, description: str) -> None:
        self.p.update(self.task, description=description)

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
