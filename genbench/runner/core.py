"""The run: a checked plan (plan.py) carried out into a run dir. Fit units are fitted (or their
checkpoints reused), each cell measured (cell.py), scored and written as a row the moment it
ends; an executor (executors.py) decides where the fit units run. A failing unit becomes rows with
status ``error`` / ``diverged`` and the rest go on. Re-running the same plan into the same
directory skips finished cells, reloads trained weights from their checkpoints and redoes the
failed cells."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import time
import traceback
import uuid

import numpy as np
import torch

from .. import __version__, scoring
from .. import datasets as ds_mod
from ..api import Diverged, Generator, RunDirError, UsageError
from ..registry import Entry, resolve
from ..store import RunDir, atomic_write, cell_name, check_out_dir, row_key
from .cell import measure
from .executors import _evaluate_task, _score_task, _score_worker_init, task_file, worker_pool
from .plan import MAX_SIDE_BY_SIDE, N_TEST, N_TRAIN, Plan, PlannedRun, device_name, git_sha, json_norm, make_model


class Progress:
    """What the runner reports to; the CLI passes a Rich-backed one."""

    def start(self, total: int) -> None: ...
    def update(self, description: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class Runner(PlannedRun):
    def __init__(self, plan: Plan, progress: Progress | None = None):
        super().__init__(plan)  # every check of the plan: nothing is created or trained before they all pass
        self.progress = progress or Progress()
        self.store = RunDir(check_out_dir(plan.out))
        self._check_settings()
        self._floors: dict[tuple, object] = {}  # (dataset, seed) -> a function giving its floors
        self.scorer = None  # the scoring processes' pool, while a run has one
        self.pending: list[tuple] = []  # (row, its scores to come, its floors) of cells being scored
        self.notes: list[str] = []  # what the run did besides the plan (repairs, redone cells), for the user

    # -- manifest -----------------------------------------------------------------------------
    def _check_settings(self) -> None:
        """A run dir is extended only with its own settings and device: checked against the
        manifest and, independently of it, against the settings hash and device of every row."""
        old = self.store.read_manifest()
        if old is not None:
            saved = old.get("settings") if isinstance(old.get("settings"), dict) else {}
            for k, v in self.plan.settings().items():
                if json_norm(saved.get(k)) != json_norm(v):
                    raise UsageError(f"run dir {self.store.path} was made with {k}={saved.get(k)!r}, not {v!r}; "
                                     "use another --out or the same settings")
            if old.get("device") != self.device:
                raise UsageError(f"run dir {self.store.path} was run on device {old.get('device')!r}, not "
                                 f"{self.device!r}; use another --out")
        mine = self.plan.settings_hash()
        for r in self.store.rows():
            if r.get("settings_hash", mine) != mine or r.get("budget", self.plan.budget) != self.plan.budget \
                    or r.get("n_samples", self.plan.n_samples) != self.plan.n_samples:
                raise UsageError(f"run dir {self.store.path} holds rows made with other settings (budget "
                                 f"{r.get('budget')}, n_samples {r.get('n_samples')}, settings hash "
                                 f"{r.get('settings_hash')}; this run's: {mine}); use another --out or the same settings")
            if r.get("device", self.device) != self.device:
                raise UsageError(f"run dir {self.store.path} holds rows run on device {r.get('device')!r}, not "
                                 f"{self.device!r}; use another --out")

    def _write_manifest(self) -> None:
        old = self.store.read_manifest() or {}
        union = lambda k, new: sorted(set(old.get(k, [])) | set(new), key=str)  # noqa: E731
        rows = self.store.rows()
        self.store.write_manifest({
            # a manifest lost while rows remain is rebuilt with their run id
            "run_id": old.get("run_id") or next((r["run_id"] for r in rows if r.get("run_id")), None) or uuid.uuid4().hex[:12],
            "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": self.plan.settings(),
            "models": union("models", [e.name for e in self.entries]),
            "datasets": union("datasets", self.plan.datasets),
            "seeds": union("seeds", self.plan.seeds),
            "configs": {**old.get("configs", {}), **self.configs},
            "dataset_versions": {**old.get("dataset_versions", {}),
                                 **{d: ds_mod.get(d).version for d in self.plan.datasets}},
            **self.provenance(),
        })

    def provenance(self) -> dict:
        return {
            "device": self.device,
            "device_name": device_name(self.device),
            "threads": torch.get_num_threads(),
            "jobs": self.plan.jobs,
            "score_jobs": self.plan.score_jobs,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda if self.device.startswith("cuda") else None,
            "genbench_version": __version__,
            "git_sha": git_sha(),
            "python": platform.python_version(),
            "host": platform.node(),
            "executor": self.plan.executor,
        }

    def _setup_process(self) -> None:
        """Per process (the run's and each worker's): the thread count, and the provenance that
        every row carries."""
        torch.set_num_threads(self.plan.threads)
        self.prov = self.provenance()

    def run(self) -> list[dict]:
        """Takes the run dir's lock for the whole run (a second run into it is refused), repairs a
        torn rows file, re-checks the settings under the lock, then runs what is not done."""
        self.store.lock()
        try:
            torn = self.store.repair()
            if torn:
                self.notes.append(f"a torn last line of rows.jsonl ({torn} bytes, a run killed mid-write) was "
                                  "moved to rows.torn; its cell is run again")
            self._check_settings()
            self._setup_process()
            self._write_manifest()
            units = list(self.units())
            keys = {(e.name, d, s, k) for e, d, s in units for k in self.steps_for(make_model(e, self.plan))}
            finished = {row_key(r) for r in self.store.rows() if r.get("status") == "done"} & keys
            done = self.done_keys()
            redo = finished - done
            if redo:
                self.notes.append(f"{len(redo)} finished cell(s) run again: their samples file is missing or does "
                                  "not match the sha256 in their row")
            if finished - redo:
                self.notes.append(f"{len(finished - redo)} of {len(keys)} cells were already done and were skipped")
            self.progress.start(len(keys))
            self.executor.run(self, units, keys, done)
            rows = self.store.rows()
            if self.store.skipped_lines:
                self.notes.append(f"{self.store.skipped_lines} line(s) of rows.jsonl are not rows and were skipped")
            return [r for r in rows if row_key(r) in keys]
        finally:
            self.store.unlock()

    def done_keys(self) -> set[tuple]:
        """Cells finished with their samples file intact (its sha256 as the row recorded it); a
        cell whose samples are missing or torn is run again."""
        done = set()
        for r in self.store.rows():
            if r.get("status") != "done":
                continue
            sha = r.get("samples_sha256")
            if sha is not None and self.store.sha("samples", cell_name(r["model"], r["dataset"], r["seed"], r["steps"]),
                                                  ".npz") != sha:
                continue
            done.add(row_key(r))
        return done

    def run_units(self, units, done: set | None = None) -> None:
        done = self.done_keys() if done is None else done
        steps = {(e.name, d, s): self.steps_for(make_model(e, self.plan)) for e, d, s in units}
        todo = {unit: [k for k in ks if (*unit, k) not in done] for unit, ks in steps.items()}
        if self.scorer is not None:  # the floor draws go to the scoring processes before the first fit
            for dataset, seed in dict.fromkeys((d, s) for (_, d, s), ks in todo.items() if ks):
                ds, _, ref, _ = self._data(dataset, seed)
                self._floors_for(ds, seed, ref)
        # fitting side by side, each model's groups are fitted right before its cells are sampled (the
        # teachers' models first, as units() orders them), so the scoring processes score one
        # model's cells while the next model trains
        names = dict.fromkeys(e.name for e, _, _ in units)
        groups = [[u for u in units if u[0].name == name] for name in names] if self.side_by_side_on else [units]
        for mine in groups:
            self._fit_side_by_side(mine, done)
            for entry, dataset, seed in mine:
                unit = (entry.name, dataset, seed)
                self.progress.advance(len(steps[unit]) - len(todo[unit]))
                if todo[unit]:  # its model made here, one at a time: a fitted model holds its captured graphs
                    self._run_unit(entry, make_model(entry, self.plan), dataset, seed, todo[unit])
        self._drain(block=True)

    # -- what a cluster executor asks of the run ------------------------------------------------
    def cell_keys(self, units) -> list[tuple]:
        """The cells of fit units [(model, dataset, seed)]."""
        entries = {e.name: e for e in self.entries}
        return [(m, d, s, k) for m, d, s in units for k in self.steps_for(make_model(entries[m], self.plan))]

    def tasks(self, done: set, spread: int = 1) -> list[list[tuple]]:
        """The chains with cells left to do, as a cluster's tasks [(model, dataset, seed)], the
        largest first: a chain each, or, where units are fitted side by side, the chains of the
        same models split into ``spread`` tasks (those that can run at once) of at most
        MAX_SIDE_BY_SIDE chains, their teachers' units first in each."""
        chains = [[(e.name, d, s) for e, d, s in c] for c in self.chains()]
        todo = [c for c in chains if set(self.cell_keys(c)) - done]
        if not self.side_by_side_on:
            tasks = todo
        else:
            groups: dict[tuple, list] = {}
            for c in todo:
                groups.setdefault(tuple(m for m, _, _ in c), []).append(c)
            tasks = []
            for same in groups.values():
                size = min(MAX_SIDE_BY_SIDE, -(-len(same) // max(1, spread)))
                for at in range(0, len(same), size):
                    part = same[at:at + size]
                    tasks.append([c[i] for i in range(len(part[0])) for c in part])
        return sorted(tasks, key=lambda t: len(set(self.cell_keys(t)) - done), reverse=True)

    def task_inputs(self, units) -> dict[str, bytes]:
        """What a task starts from (relative path -> bytes): the manifest, and the fit records,
        checkpoints (its units' and their teachers') and noise floors this run dir has."""
        entries = {e.name: e for e in self.entries}
        names = set()
        for m, d, s in units:
            names.add(cell_name(m, d, s))
            if entries[m].cls.teacher:
                names.add(cell_name(resolve([entries[m].cls.teacher])[0].name, d, s))
        wanted = [("fits", n, ".json") for n in names] + [("checkpoints", n, ".pt") for n in names]
        wanted += [("floors", f"{d}__s{s}", ".json") for d, s in {(d, s) for _, d, s in units}]
        files = {"manifest.json": self.store.manifest_path.read_bytes()}
        for kind, name, suffix in wanted:
            data = self.store._read_artefact(kind, name, suffix, None)
            if data is not None:
                files[f"{kind}/{name}{suffix}"] = data
        return files

    def absorb(self, bundle: dict, units) -> None:
        """A task's bundle written into the run dir by this process alone: its files first (each
        name checked, written atomically), then its rows (only the cells of ``units``)."""
        mine = set(self.cell_keys(units))
        try:
            files = [(task_file(self.store.path, rel), bytes(data)) for rel, data in bundle.get("files", {}).items()]
        except (ValueError, TypeError) as e:  # a name outside the run dir's artefacts: nothing of it is written
            self.fail_cells(units, e)
            return
        for path, data in files:
            atomic_write(path, data)
        for row in bundle.get("rows", []):
            if isinstance(row, dict) and row_key(row) in mine:
                self.store.append_row(row)
                self.progress.advance()
        self.notes.extend(n for n in bundle.get("notes", []) if n not in self.notes)

    def fail_cells(self, units, error: BaseException) -> None:
        """Error rows for the cells of ``units`` that a failed task left undone."""
        entries = {e.name: e for e in self.entries}
        done = {row_key(r) for r in self.store.rows() if r.get("status") == "done"}  # as this run wrote them
        for m, d, s, k in self.cell_keys(units):
            if (m, d, s, k) not in done:
                row = self._base_row(entries[m], d, s) | {"steps": k,
                                                           "variant": _safe_variant(make_model(entries[m], self.plan))}
                self._write(row, error)

    @property
    def side_by_side_on(self) -> bool:
        return self.device.startswith("cuda") if self.plan.side_by_side is None else self.plan.side_by_side

    @contextlib.contextmanager
    def _scoring_pool(self):
        """``score_jobs`` CPU worker processes that score cells and floor draws while this process
        goes on fitting and sampling; rows are written as their scores arrive. Closed (or, on an
        interruption, terminated: cells not yet written are run again on resume) when the block ends."""
        if not self.plan.score_jobs:
            yield
            return
        self.progress.update(f"starting {self.plan.score_jobs} scoring processes")
        with worker_pool(self.plan.score_jobs, initializer=_score_worker_init) as pool:
            self.scorer = pool
            try:
                yield
            finally:
                self.scorer = None

    def _score_async(self, x, ref, ds_name: str, seed: int):
        return self.scorer.apply_async(_score_task, (x, ref, ds_name, self.plan.metrics, seed))

    def _drain(self, block: bool = False) -> None:
        """Writes the rows whose scores have arrived (all of them with ``block``)."""
        waiting = []
        for row, result, floors in self.pending:
            if not (block or result.ready()):
                waiting.append((row, result, floors))
                continue
            try:
                values, errors = result.get()
                row |= values | {"metric_errors": errors or None} | floors()
            except RunDirError:
                raise
            except Exception as e:  # noqa: BLE001 - a scoring failure is the cell's error
                self._write(row, e)
            else:
                self._write(row, None)
        self.pending = waiting

    # -- one fit unit ---------------------------------------------------------------------------
    def _data(self, dataset: str, seed: int):
        ds = ds_mod.get(dataset)
        return ds, ds.sample(N_TRAIN, [seed, 0]), ds.sample(self.plan.n_samples, [seed, 1]), ds.sample(N_TEST, [seed, 2])

    def _reuse(self, entry_name: str, model: Generator, dataset: str, seed: int) -> tuple[dict | None, str | None]:
        """(the unit's fit record, its checkpoint loaded into ``model``), or (None, why the unit must
        be fitted: None where it never was)."""
        unit = cell_name(entry_name, dataset, seed)
        record = self.store.load_json("fits", unit)
        if isinstance(record, dict) and record.get("checkpoint_sha256"):
            try:  # tensors and plain containers only: a checkpoint is data, never code
                state = self.store.load_checkpoint(unit, record["checkpoint_sha256"], self.device)
                model.load_state_dict(state, device=self.device)
                # reused: the refit reason of the fit that made it is not this run's
                return {**record, "refit_reason": None, "fit_sha256": self.store.sha("fits", unit, ".json")}, None
            except Exception as e:  # noqa: BLE001 - an unreadable, torn or unsafe checkpoint is retrained
                refit = f"checkpoint not reused ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
                self.progress.update(f"{unit}: {refit}; training again")
                return None, refit
        if isinstance(record, dict) and "checkpoint_sha256" in record:
            return None, "the model saves no checkpoint"
        if (self.store.path / "fits" / f"{unit}.json").exists():
            return None, "fit record unreadable (torn or foreign)"
        return None, None

    def _save_fit(self, unit: str, model: Generator, info, extras: dict, refit: str | None) -> dict:
        """The fit record (and the checkpoint, where the model saves one) of a fitted unit."""
        record = {**dataclasses.asdict(info), **extras, "refit_reason": refit}
        record.update(record.pop("extras", {}))
        try:
            state = model.state_dict()
        except NotImplementedError:
            state = None  # a plugin without checkpoints is simply retrained on resume
        record["checkpoint_sha256"] = None if state is None else self.store.save_checkpoint(unit, state)
        record["fit_sha256"] = self.store.save_json("fits", unit, record)
        return record

    def _fit_side_by_side(self, units, done: set) -> None:
        """On a GPU (or as ``side_by_side`` says), the units of each model that fits side by side and
        must be fitted are fitted in groups, as one stacked network each (a student's group after
        its teachers', each member given its own teacher); their checkpoints and fit records
        are then what the unit-by-unit pass reuses. A member that diverged, or a group that failed,
        is left to that pass (fitted alone, its failure recorded as a solo fit's)."""
        if not self.side_by_side_on:
            return
        todo: dict[str, list] = {}
        for entry, dataset, seed in units:  # teachers' units come first: their groups are fitted first
            if "side by side" not in entry.cls.capabilities():
                continue
            model = make_model(entry, self.plan)
            if all((entry.name, dataset, seed, k) in done for k in self.steps_for(model)):
                continue
            record, refit = self._reuse(entry.name, model, dataset, seed)
            if record is None:
                todo.setdefault(entry.name, []).append((entry, dataset, seed, refit))
        for group in todo.values():
            for at in range(0, len(group), MAX_SIDE_BY_SIDE):
                self._fit_group(group[at:at + MAX_SIDE_BY_SIDE])

    def _fit_group(self, chunk: list) -> None:
        """One group fitted side by side; a group the GPU's memory cannot hold is split in halves."""
        if len(chunk) < 2:
            return
        entry = chunk[0][0]
        self.progress.update(f"{entry.name}: {len(chunk)} fits side by side")
        models = [make_model(e, self.plan) for e, _, _, _ in chunk]
        datas = [self._data(d, s)[1] for _, d, s, _ in chunk]
        kw, extras = {}, [{} for _ in chunk]
        infos = None
        try:
            if entry.cls.teacher:  # each member's teacher, fitted or loaded (its group came first)
                teacher_entry = resolve([entry.cls.teacher])[0]
                kw["teachers"] = []
                for (_, d, s, _), data, ex in zip(chunk, datas, extras):
                    teacher = make_model(teacher_entry, self.plan)
                    ex["teacher_train_s"] = self._fit_or_load(teacher_entry.name, teacher, d, s, data)["train_s"]
                    kw["teachers"].append(teacher)
            infos = entry.cls.fit_side_by_side(models, datas, device=self.device, seeds=[s for _, _, s, _ in chunk],
                                               **kw)
        except torch.cuda.OutOfMemoryError:
            pass  # split below, once the exception (and the memory its frames hold) is gone
        except RunDirError:
            raise
        except Exception as e:  # noqa: BLE001 - the units are fitted one by one instead
            self.notes.append(f"{entry.name}: fitting {len(chunk)} units side by side failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                              "they were fitted one by one")
            return
        if infos is None:
            models = datas = None
            torch.cuda.empty_cache()
            self._fit_group(chunk[:len(chunk) // 2])
            self._fit_group(chunk[len(chunk) // 2:])
            return
        for (e, d, s, refit), model, info, ex in zip(chunk, models, infos, extras):
            if not isinstance(info, BaseException):
                self._save_fit(cell_name(e.name, d, s), model, info, ex, refit)

    def _fit_or_load(self, entry_name: str, model: Generator, dataset: str, seed: int, train) -> dict:
        """Fits the model, or loads it from this run dir's checkpoint; returns its fit record."""
        unit = cell_name(entry_name, dataset, seed)
        record, refit = self._reuse(entry_name, model, dataset, seed)
        if record is not None:
            return record
        teacher = None
        extras: dict[str, float] = {}
        if model.teacher:
            teacher_entry = resolve([model.teacher])[0]
            teacher = make_model(teacher_entry, self.plan)
            self.progress.update(f"{model.teacher} (teacher of {entry_name}) on {dataset} seed {seed}: training")
            trec = self._fit_or_load(teacher_entry.name, teacher, dataset, seed, train)
            extras["teacher_train_s"] = trec["train_s"]
        self.progress.update(f"{entry_name} on {dataset} seed {seed}: training")
        info = model.fit(train, device=self.device, seed=seed, **({"teacher": teacher} if teacher else {}))
        return self._save_fit(unit, model, info, extras, refit)

    def _run_unit(self, entry: Entry, model: Generator, dataset: str, seed: int, steps: list) -> None:
        ds, train, ref, test = self._data(dataset, seed)
        base = self._base_row(entry, dataset, seed)
        try:
            record = self._fit_or_load(entry.name, model, dataset, seed, train)
            self.progress.update(f"{entry.name} on {dataset} seed {seed}: evaluating")
            evaluation = self._evaluate(entry, model, dataset, seed, record, test)
        except RunDirError:
            raise  # the run dir cannot be written: the run stops (nothing to record a row in)
        except Exception as e:  # noqa: BLE001 - a failing unit is recorded, the run goes on
            for k in steps:
                self._write(base | {"steps": k, "variant": _safe_variant(model)}, e)
            return
        note = {"nll_note": model.no_likelihood} if model.no_likelihood else {}
        self.progress.update(f"{dataset} seed {seed}: noise floors")
        floors = self._floors_for(ds, seed, ref)
        late = lambda: evaluation() | floors()  # noqa: E731 - what a row gets once it has arrived
        for k in steps:
            self.progress.update(f"{entry.name} on {dataset} seed {seed}: sampling" + (f" {k} steps" if k else ""))
            row = base | {"steps": k, "variant": model.variant, "colour": model.colour, "train_s": record["train_s"],
                          "teacher_train_s": record.get("teacher_train_s"), "final_loss": record["final_loss"],
                          "train_steps": record["steps"], "refit_reason": record.get("refit_reason"),
                          "fit_sha256": record.get("fit_sha256"), **note}
            try:
                x = self._sample_cell(model, ds, seed, k, ref, row)
                if self.scorer is not None:  # scored beside the next fits; the row is written then
                    self.pending.append((row, self._score_async(x, ref, ds.name, seed), late))
                    self._drain()
                    continue
                values, errors = scoring.score(x, ref, ds, self.plan.metrics, seed=seed, device=self.metric_device)
                row |= values | {"metric_errors": errors or None} | late()
            except RunDirError:
                raise
            except Exception as e:  # noqa: BLE001 - the row is still written whole, floors included
                with contextlib.suppress(Exception):
                    row |= floors()
                with contextlib.suppress(Exception):
                    row |= evaluation()
                self._write(row, e)
            else:
                self._write(row, None)

    def _evaluate(self, entry: Entry, model: Generator, dataset: str, seed: int, record: dict, test):
        """``model.evaluate(test)`` (held-out likelihood and the like), as a function that gives its
        result. With scoring processes and a checkpoint, it runs in one of them, on the CPU, on the
        model loaded from the checkpoint, while this process samples and fits on (a diffusion
        model's PF-ODE likelihood is an adaptive ODE solve, launch-bound on a GPU); else here."""
        sha = record.get("checkpoint_sha256")
        if self.scorer is None or not sha or type(model).evaluate is Generator.evaluate:
            here = model.evaluate(test)
            return lambda: here
        state = self.store.checkpoint_bytes(cell_name(entry.name, dataset, seed), sha)  # the bytes saved
        return functools.cache(self.scorer.apply_async(_evaluate_task, (entry, self.plan, state, test)).get)

    def _base_row(self, entry: Entry, dataset: str, seed: int) -> dict:
        """A row's identity and provenance."""
        return {"run_id": self.store.read_manifest()["run_id"], "model": entry.name, "source": entry.source,
                "dataset": dataset, "dataset_version": ds_mod.get(dataset).version, "seed": seed,
                "budget": self.plan.budget, "n_samples": self.plan.n_samples,
                "settings_hash": self.plan.settings_hash(), **self.prov}

    def _sample_cell(self, model: Generator, ds, seed: int, k, ref, row: dict) -> np.ndarray:
        """Measures one cell into ``row`` (cell.measure), saves its samples and returns them."""
        x, arrays = measure(model, ds, seed, k, ref, row, n=self.plan.n_samples, device=self.device,
                            metrics=self.plan.metrics, min_calls=self.plan.repeats, min_time=self.plan.min_time_s)
        row["samples_sha256"] = self.store.save_samples(cell_name(model.name, ds.name, seed, k), **arrays)
        return x

    @property
    def metric_device(self) -> str:
        """Where the GPU-capable metrics run: the run's CUDA device, unless scoring processes
        score on the CPU beside the fits; else the CPU."""
        return self.device if self.device.startswith("cuda") and not self.plan.score_jobs else "cpu"

    def _floors_for(self, ds, seed: int, ref):
        """Every metric's noise floor for (dataset, seed): ``floor_draws`` independent true samples
        of n points scored against the reference sample. Computed once per run dir (saved under
        floors/, shared by the worker processes under a lock) and reused by every model; with
        scoring processes, the draws are scored there while the fits go on. Returns a function
        that gives the floors (waiting for them, the first time, if they are being scored)."""
        key = (ds.name, seed)
        if key in self._floors:
            return self._floors[key]
        name = f"{ds.name}__s{seed}"
        ident = {"dataset": ds.name, "dataset_version": ds.version, "seed": seed, "n": len(ref),
                 "metrics": self.plan.metrics, "draws": self.plan.floor_draws, "device": self.device,
                 "metric_device": self.metric_device}
        draws = lambda: [ds.sample(len(ref), [seed, 3, i]) for i in range(self.plan.floor_draws)]  # noqa: E731
        if self.scorer is None:  # computed here (or by another worker process, under the file's lock)
            value = self.store.cached_json("floors", name, ident, lambda: scoring.floors(
                draws(), ref, ds, self.plan.metrics, seed=seed, device=self.metric_device))
        else:  # the run's one process: saved by an earlier run, or scored by the scoring processes
            value = self.store.saved_value("floors", name, ident)
        if value is not None:
            self._floors[key] = lambda: value
            return self._floors[key]
        results = [self._score_async(d, ref, ds.name, scoring.floor_seed(seed, i)) for i, d in enumerate(draws())]
        memo: dict = {}

        def floors() -> dict:
            if "value" not in memo:
                value = scoring.floor_summary([r.get()[0] for r in results])
                memo["value"] = self.store.cached_json("floors", name, ident, lambda: value)
            return memo["value"]

        self._floors[key] = floors
        return floors

    def _write(self, row: dict, error: BaseException | None) -> None:
        if error is None:
            row |= {"status": "done", "error": None}
        else:
            status = "diverged" if isinstance(error, Diverged) else "error"
            msg = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            row |= {"status": status, "error": msg}
            if os.environ.get("GENBENCH_DEBUG"):
                traceback.print_exception(error)
        self.store.append_row(row)
        self.progress.advance()


def _safe_variant(model: Generator) -> str:
    try:
        return model.variant
    except Exception:  # noqa: BLE001
        return ""



def run(plan: Plan, progress: Progress | None = None) -> list[dict]:
    return Runner(plan, progress).run()