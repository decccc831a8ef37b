"""The run: a resolved plan (plan.py) carried out into a run dir. The rooms it ties together:

- ``ledger.py``: the run dir's manifest, settings, done cells and rows, and a task's bundle absorbed;
- ``fits.py``: a fit unit's model reused from its checkpoint or fitted and saved, and fits side by side;
- ``scoring_pool.py``: cells, noise floors and held-out evaluations scored (beside the fits, in
  processes of their own, where the plan has them);
- ``cell.py``: one cell measured (network evaluations counted, sample calls timed);
- ``executors.py``: where tasks run (a task function and tasks in, bundles out).

``Session`` is one process's part of a run (the driver's, or a worker's, or a cluster task's in its
scratch run dir): its fit units fitted, each cell measured, scored and written the moment it ends.
``Run`` is the driver: it checks the run dir, builds the tasks, hands them to the executor and
absorbs what comes back. A failing unit becomes rows with status ``error`` / ``diverged`` and the
rest go on. Re-running the same plan into the same directory skips finished cells, reloads
trained weights from their checkpoints and redoes the failed cells."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..api import Diverged, RunDirError
from ..store import RunDir, atomic_write, cell_name, check_out_dir
from .cell import measure, time_cell
from .executors import Task
from .fits import FitStore
from .ledger import Ledger, safe_variant
from .plan import Cell, Plan, Resolved, Unit, check
from .scoring_pool import Scorer


#: what a row carries of its fit's stopping (the converged budget): why it stopped, the step whose
#: weights were kept, and the steps and seconds to first reach the data's floor band
STOPPING_FIELDS = ("stop_reason", "kept_step", "kept_score", "kept_energy", "kept_hq_frac", "target_step", "target_s",
                   "target_step_energy", "target_s_energy", "target_step_support", "target_s_support", "eval_floor",
                   "eval_floor_off", "eval_s", "anneal_step")


def fit_columns(model, record: dict) -> dict:
    """A cell row's columns from its unit's fit record (the same for each of the unit's cells)."""
    return {"variant": model.variant, "colour": model.colour, "train_s": record["train_s"],
            "teacher_train_s": record.get("teacher_train_s"), "final_loss": record["final_loss"],
            # a stacked member's own stop, where its group trained on for the others
            "train_steps": record.get("stopped_step") or record["steps"], "refit_reason": record.get("refit_reason"),
            "fit_sha256": record.get("fit_sha256"), **{k: record.get(k) for k in STOPPING_FIELDS if k in record}}


class Progress:
    """What the runner reports to; the CLI passes a Rich-backed one."""

    def start(self, total: int) -> None: ...
    def update(self, description: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class Session:
    """One process's part of a run into ``r.plan.out``: fit units in, rows out."""

    def __init__(self, r: Resolved, progress: Progress | None = None):
        self.r = r
        self.store = RunDir(check_out_dir(r.plan.out))
        self.progress = progress or Progress()
        self.ledger = Ledger(self.store, r, self.progress)
        self.notes = self.ledger.notes
        self.fits = FitStore(self.store, r, self.progress, self.notes)
        self.scorer = Scorer(self.store, r, self.ledger.write)

    def run_units(self, units: list[Unit], done: set) -> None:
        """Fits (or reloads) each unit and measures its cells not in ``done``. Fitting side by
        side, each model's groups are fitted right before its cells are sampled (the teachers'
        models first, as the plan orders them), so the scoring processes score one model's cells
        while the next model trains; with ``groups_at_once`` above 1 (or a tune's trials), every
        model's groups are fitted first, that many at a time, each group's cells sampled and sent
        to scoring as soon as it ends (a member it shed, as it is shed: the scoring processes work
        while the other groups train), and every cell timed after the last group, on a quiet
        device; a row is written once it is both scored and timed. A unit fitted side by side is
        sampled and timed on the model its group fitted, not on a copy read back from its
        checkpoint."""
        r = self.r
        todo = {u: [c.steps for c in r.cells([u]) if c not in done] for u in units}
        if self.scorer.pool is not None and r.plan.cells:  # the floor draws go to the scoring processes before the first fit
            for dataset, seed in dict.fromkeys((u.dataset, u.seed) for u in units if todo[u]):
                ds, _, ref, _ = r.data(dataset, seed)
                self.scorer.floors_for(ds, seed, ref)
        # every model's groups first (that many at a time; a tune's trials of one family stacked
        # across its trials), their cells sampled as each ends and timed after them all
        at_once = r.side_by_side and (r.plan.groups_at_once > 1 or bool(r.plan.trials))
        sampled: dict[Unit, tuple] = {}  # unit -> (its model, its cells sampled), to be timed
        fitted: dict[Unit, tuple] = {}  # unit -> (its model, its fit record), fitted side by side

        def sample_ended(ended: list[tuple]) -> None:
            for unit, model, record in ended:
                if todo.get(unit) and unit not in sampled:
                    cells = self.run_unit(unit, model, todo[unit], timed=False, record=record)
                    sampled[unit] = (model if cells else None, cells)  # (a model with nothing to time is let go)

        if at_once:
            self.fits.fit_side_by_side(units, done, on_ended=sample_ended)
        names = dict.fromkeys(u.model for u in units)
        groups = [[u for u in units if u.model == name] for name in names] if r.side_by_side else [units]
        for mine in groups:
            if r.side_by_side and not at_once:
                self.fits.fit_side_by_side(mine, done, on_ended=lambda ended: fitted.update(
                    (unit, (model, record)) for unit, model, record in ended if todo.get(unit)))
            for unit in mine:
                if unit in sampled:
                    model, cells = sampled.pop(unit)
                    self.time_unit(unit, cells, model)
                elif todo[unit]:  # one model at a time (made here, or its group's): a timed model holds its captured graphs
                    model, record = fitted.pop(unit, (None, None))
                    self.run_unit(unit, model or r.model(unit.model, unit.dataset), todo[unit], record=record)
        self.scorer.drain(block=True)

    def run_unit(self, unit: Unit, model, steps: list, timed: bool = True, record: dict | None = None) -> list:
        """One fit unit: its model fitted or reloaded (``record``: the fit record of ``model``,
        fitted side by side here), evaluated, and each of its cells measured, scored and written.
        ``timed=False``: the cells are sampled and sent to scoring but not timed; returns them
        (row, steps, a divergence to record or None) for ``time_unit``, and each row waits for its
        timing before it is written."""
        if not self.r.plan.cells:
            return self.fit_rows(unit, model, steps, record)
        ds, train, ref, test = self.r.data(unit.dataset, unit.seed)
        base = self.ledger.base_row(*unit)
        try:
            if record is None:
                record = self.fits.fit_or_load(unit, model, train)
            self.progress.update(f"{unit.model} on {unit.dataset} seed {unit.seed}: evaluating")
            evaluation = self.scorer.evaluate(unit, model, record, test)
        except RunDirError:
            raise  # the run dir cannot be written: the run stops (nothing to record a row in)
        except Exception as e:  # noqa: BLE001 - a failing unit is recorded, the run goes on
            for k in steps:
                self.ledger.write(base | {"steps": k, "variant": safe_variant(model)}, e)
            return []
        note = {"nll_note": model.no_likelihood} if model.no_likelihood else {}
        self.progress.update(f"{unit.dataset} seed {unit.seed}: noise floors")
        floors = self.scorer.floors_for(ds, unit.seed, ref)
        late = lambda: evaluation() | floors()  # noqa: E731 - what a row gets once it has arrived
        later = not timed and self.r.plan.timed  # timed after the last group (an untimed plan: never)
        untimed = []
        for k in steps:
            self.progress.update(f"{unit.model} on {unit.dataset} seed {unit.seed}: sampling"
                                 + (f" {k} steps" if k else ""))
            row = base | {"steps": k} | fit_columns(model, record) | note
            try:
                x = self.sample_cell(model, ds, unit.seed, k, ref, row, timed=timed)
                self.scorer.submit(row, x, ref, ds, unit.seed, late,
                                   ready=(lambda row=row: "sample_s" in row) if later else None)
                if later:
                    untimed.append((row, k, None))
            except RunDirError:
                raise
            except Exception as e:  # noqa: BLE001 - the row is still written whole, floors included
                with contextlib.suppress(Exception):
                    row |= floors()
                with contextlib.suppress(Exception):
                    row |= evaluation()
                if later and isinstance(e, Diverged):  # timed first, as a cell measured whole is
                    untimed.append((row, k, e))
                else:
                    self.ledger.write(row, e)
        return untimed

    def fit_rows(self, unit: Unit, model, steps: list, record: dict | None = None) -> list:
        """A unit of a plan without cells (``Plan.cells`` False): its fit record (``record``, read
        back, or the unit fitted) written as one row per cell, nothing sampled, scored or evaluated."""
        base = self.ledger.base_row(*unit)
        try:
            record = (record or self.fits.record(unit)
                      or self.fits.fit_or_load(unit, model, self.r.data(unit.dataset, unit.seed)[1]))
        except RunDirError:
            raise
        except Exception as e:  # noqa: BLE001 - a failing unit is recorded, the run goes on
            record, error = None, e
        for k in steps:
            if record is None:
                self.ledger.write(base | {"steps": k, "variant": safe_variant(model)}, error)
            else:
                self.ledger.write(base | {"steps": k} | fit_columns(model, record), None)
        return []

    def time_unit(self, unit: Unit, cells: list, model) -> None:
        """Times the cells ``run_unit(timed=False)`` sampled, on the model that sampled them (kept
        since its group ended: the checkpoint's weights, not read back; nothing captured while it
        sampled); each row is written once its scores have arrived (a diverged cell at once)."""
        if not cells:  # a unit whose fit failed: its rows are written, nothing to time (or to refit)
            return
        p = self.r.plan
        for row, k, error in cells:
            self.progress.update(f"{unit.model} on {unit.dataset} seed {unit.seed}: timing" + (f" {k} steps" if k else ""))
            try:
                time_cell(model, unit.seed, k, row, n=p.n_samples, device=self.r.device, min_calls=p.repeats,
                          min_time=p.min_time_s)
            except Exception as e:  # noqa: BLE001 - an untimed cell is still written, its time empty
                row["sample_s"] = None
                self.notes.append(f"{cell_name(unit.model, unit.dataset, unit.seed, k)}: not timed "
                                  f"({type(e).__name__}: {e})")
            if error is not None:
                self.ledger.write(row, error)
        self.scorer.drain()

    def sample_cell(self, model, ds, seed: int, k, ref, row: dict, timed: bool = True) -> np.ndarray:
        """Measures one cell into ``row`` (cell.measure; ``timed=False``: not its time), saves its
        samples and returns them. An untimed plan (``Plan.timed``) times no cell and saves no
        trajectory."""
        p = self.r.plan
        x, arrays = measure(model, ds, seed, k, ref, row, n=p.n_samples, device=self.r.device,
                            metrics=list(p.metrics), min_calls=p.repeats, min_time=p.min_time_s,
                            timed=timed and p.timed, extras=p.timed)
        if not p.timed:
            row["sample_s"] = None
        row["samples_sha256"] = self.store.save_samples(cell_name(model.name, ds.name, seed, k), **arrays)
        return x


class Run:
    """The driver of a run: ``Run(plan)`` checks everything (UsageError before anything is created
    or trained); ``run()`` carries it out into the run dir and returns the plan's rows."""

    def __init__(self, plan: Plan):
        self.r = check(plan)
        self.plan = self.r.plan
        self.session = Session(self.r)
        self.store, self.ledger, self.notes = self.session.store, self.session.ledger, self.session.notes
        self.todo: int | None = None  # the cells run() found to run (None: not run yet)
        self.ledger.check_settings()

    def run(self, progress: Progress | None = None) -> list[dict]:
        """Takes the run dir's lock for the whole run (a second run into it is refused), repairs a
        torn rows file, re-checks the settings under the lock, then runs what is not done."""
        s = self.session
        if progress is not None:
            s.progress = s.ledger.progress = s.fits.progress = progress
        self.store.lock()
        try:
            self.ledger.open()
            keys = set(self.r.cells(self.r.units()))
            done = self.ledger.done_cells()
            self.ledger.note_done(keys, done)
            self.todo = len(keys - done)
            s.progress.start(self.todo)  # the cells to run now
            self._execute(keys, done)
            self.store.tidy_partial()  # the snapshots' folder, once every fit in it is saved
            return self.ledger.rows(keys)
        finally:
            self.store.unlock()

    def _execute(self, keys: set, done: set) -> None:
        r, s, ex = self.r, self.session, self.r.executor
        absorb = lambda task, bundle: bundle and self.ledger.absorb(bundle, task.units)  # noqa: E731
        fail = lambda task, error: self.ledger.fail_cells(task.units, error)  # noqa: E731
        tick = lambda: None  # noqa: E731
        if ex.in_place and self.plan.jobs == 1:  # this process, with its scoring processes
            def fn(task, scratch):
                with s.scorer.processes(s.progress):
                    s.run_units(task.units, done)

            tasks = [Task(r.units(), "all")]
        elif ex.in_place:  # chains in worker processes that append their own rows
            if r.side_by_side:  # groups fitted side by side here; the workers reuse their checkpoints
                s.fits.fit_side_by_side(r.units(), done)
            chains = r.chains()
            s.progress.update(f"fitting and scoring in {self.plan.jobs} processes")
            fn, tasks, tick = functools.partial(run_chain, self.plan), [Task(c, "") for c in chains], self._row_counter()
        else:  # tasks in scratch run dirs of their own, their bundles absorbed here
            units = r.tasks(done, ex.spread(r.device))
            tasks = [Task(u, task_id(self.plan, u), self.ledger.task_inputs(u),
                          sorted((c for c in done if c[:3] in set(u)), key=str)) for u in units]
            s.progress.update(f"{len(tasks)} task(s) on {self.plan.executor}")
            fn = functools.partial(run_task, self.plan, r.device, ex.task_score_jobs(r.device))
        if tasks:
            ex.run(fn, tasks, device=r.device, run_dir=self.store.path, on_bundle=absorb, on_failure=fail, tick=tick)

    def _row_counter(self):
        """A tick that advances the progress bar by the rows the workers appended since it was made."""
        path = self.store.rows_path
        lines = lambda: path.read_bytes().count(b"\n") if path.exists() else 0  # noqa: E731 - bytes: a line may not be text
        start, seen = lines(), [0]

        def tick():
            now = lines() - start  # every row a worker writes is one of this plan's cells
            self.session.progress.advance(now - seen[0])
            seen[0] = now

        return tick


# -- task functions ---------------------------------------------------------------------------
def run_chain(plan: Plan, task: Task, scratch=None) -> dict:
    """A chain of fit units in a local worker process, written into the run dir itself (rows under
    the rows file's lock); its bundle carries its notes only."""
    s = Session(check(plan))
    s.ledger.setup_process()
    s.run_units(task.units, s.ledger.done_cells())
    return {"notes": s.notes}


def run_task(plan: Plan, device: str, score_jobs: int, task: Task, scratch: str | None) -> dict | None:
    """One task on a cluster node: its fit units fitted, measured and scored into a scratch run dir
    (``scratch``/run, or a temporary one), the same code as a local run, starting from the task's
    inputs (the manifest, and the checkpoints, fit records and floors the driver already has);
    ``score_jobs`` processes score cells beside the fits. Returns the bundle where it made the
    scratch dir itself; else leaves the bundle's marker, ``scratch``/done.json, for the driver."""
    own = scratch is None
    root = Path(tempfile.mkdtemp(prefix="genbench-task-") if own else scratch)
    try:
        run_dir = root / "run"
        for rel, data in task.inputs.items():
            atomic_write(run_dir / rel, data, root=run_dir)
        before = RunDir(run_dir).artefact_shas()
        sub = dataclasses.replace(plan, out=str(run_dir), device=device, jobs=1, score_jobs=score_jobs,
                                  executor="local", address=None, slurm={})
        s = Session(check(sub))
        s.ledger.check_settings()
        s.store.lock()
        try:
            s.ledger.setup_process(executor=plan.executor)
            with s.scorer.processes(s.progress):
                s.run_units(task.units, {Cell(*c) for c in task.done})
        finally:
            s.store.unlock()
        if own:
            return s.store.bundle(before, s.notes)
        atomic_write(root / "done.json", json.dumps({"before": before, "notes": s.notes}).encode())
        return None
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def task_id(plan: Plan, units) -> str:
    """A task's name, the same for the same units and settings on every run."""
    return hashlib.sha256(json.dumps([plan.settings_hash(), units], default=str).encode()).hexdigest()[:16]


def run(plan: Plan, progress: Progress | None = None) -> list[dict]:
    return Run(plan).run(progress)
