"""The runner: the one place that ties datasets, models, metrics, timing and the store together.

A plan (models x datasets x seeds x sampler steps) becomes fit units (model, dataset, seed), each
trained once, and cells (one per step count), each sampled, timed, scored and written as a row the
moment it ends. A failing unit becomes rows with status ``error`` / ``diverged`` and the rest go on.
Re-running the same plan into the same directory skips finished cells, reloads trained weights
from their checkpoints and redoes the failed cells.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, scoring
from . import datasets as ds_mod
from .api import BUDGETS, Generator, RunDirError, UsageError
from .models.nets import Diverged
from .registry import Entry, resolve
from .store import RunDir, cell_name, check_out_dir, dumps, row_key
from .timing import MIN_CALLS, MIN_TIME_S, time_call

N_TRAIN = 50_000  # training points drawn per (dataset, seed)
N_TEST = 5_000  # held-out points for NLL / ELBO
#: samples per cell, chosen from 'genbench calibrate' (the defects it resolves) and
#: benchmarks/score_time.py (the default metrics must score a cell within 2 s on one CPU thread;
#: exact W2's cubic cost sets the limit); the README's resolving-power section has the figures
N_SAMPLES = 3000
#: seeds feed numpy's and torch's generators (and 10_000 + seed the sampler's): kept in 32 bits
MAX_SEED = 2**32 - 1 - 10_000


@dataclass
class Plan:
    models: list[str]
    datasets: list[str] = field(default_factory=lambda: [ds_mod.DEFAULT_DATASET])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: list[int] | None = None  # None: each model's default
    steps_by_model: dict[str, list[int]] = field(default_factory=dict)  # per-model override of steps
    budget: str = "default"
    n_samples: int = N_SAMPLES
    device: str = "auto"
    threads: int = 1
    jobs: int = 1  # fit units run at once, each in its own process; 0: auto (see Runner.auto_jobs)
    score_jobs: int | None = None  # CPU processes scoring cells beside the fits; None: auto (Runner.auto_score_jobs)
    side_by_side: bool | None = None  # fit units of a model side by side where it can; None: on a GPU
    repeats: int = MIN_CALLS  # timed sample calls per cell: at least this many ...
    min_time_s: float = MIN_TIME_S  # ... and at least this long together
    metrics: list[str] = field(default_factory=lambda: list(scoring.DEFAULT_METRICS))
    floor_draws: int = 10  # independent true samples scored for each metric's noise floor
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> field -> value
    out: str = "results/{budget}-{device}"  # {budget} and {device} are filled in

    def settings(self) -> dict:
        """What must match for a run dir to be resumed or extended."""
        return {"budget": self.budget, "n_samples": self.n_samples, "threads": self.threads,
                "params": self.params, "repeats": self.repeats, "min_time_s": self.min_time_s, "n_train": N_TRAIN,
                "metrics": self.metrics, "floor_draws": self.floor_draws}

    def settings_hash(self) -> str:
        """A short hash of ``settings()``, written into every row: rows of other settings are told
        apart without the manifest."""
        import hashlib

        return hashlib.sha256(dumps(json_norm(self.settings()), sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch here; valid here: auto, cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: torch has no MPS device here; valid here: auto, cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device {device!r}; valid: auto, cpu, cuda, mps")
    return device


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    if device == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """The commit genbench runs from: ``git describe`` of its source checkout (an editable install),
    else the commit pip recorded for a VCS install, else 'unknown (...)' with the reason."""
    def describe(where: Path) -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                                 text=True, cwd=where, timeout=5)
            return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            return None

    here = describe(Path(__file__).parent)
    if here:
        return here
    try:  # PEP 610: pip records where a non-editable install came from
        import json
        from importlib.metadata import distribution

        info = json.loads(distribution("genbench").read_text("direct_url.json") or "{}")
    except Exception:  # noqa: BLE001 - no metadata: installed by other means
        info = {}
    if info.get("vcs_info", {}).get("commit_id"):
        return info["vcs_info"]["commit_id"][:12]
    url = info.get("url", "")
    if url.startswith("file://"):
        src = describe(Path(url[len("file://"):]))
        if src:
            return f"{src} (source dir of the install)"
    return "unknown (installed without a git checkout or VCS URL)"


#: the most fit units trained side by side as one stacked network on a GPU (a group the GPU's memory
#: cannot hold is split in halves until it fits)
MAX_SIDE_BY_SIDE = 32


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_model(entry: Entry, plan: Plan) -> Generator:
    model = entry.cls(budget=plan.budget, params=plan.params.get(entry.name))
    model.name = entry.name  # the registered name is the one rows and files use
    return model


class NFECounter:
    """Counts network evaluations, the forward calls of the declared ``nfe_module``, and checks the
    declaration. The rule: every outermost module call made meanwhile (one not made inside another
    module's forward) is a call of ``nfe_module`` or calls it inside (a wrapper, e.g. a
    preconditioning module around the network). An outermost call that never reaches it is work
    the declaration hides (a second network, say); its class names are collected in
    ``undeclared``. Uses torch's global module hooks, so it sees every module, including ones the
    generator does not hold as attributes."""

    def __init__(self, module):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"nfe_module is {type(module).__name__}, not a torch.nn.Module")
        self.module, self.count, self.undeclared = module, 0, set()
        self._stack: list[tuple[torch.nn.Module, int]] = []  # open module calls with the count at entry
        self.handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]

    def _pre(self, m, *_):
        if m is self.module:
            self.count += 1
        self._stack.append((m, self.count))

    def _post(self, m, *_):
        while self._stack:
            top, start = self._stack.pop()
            if top is m:
                break
        if not self._stack and m is not self.module and self.count == start:
            self.undeclared.add(type(m).__qualname__)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class Progress:
    """What the runner reports to; the CLI passes a Rich-backed one."""

    def start(self, total: int) -> None: ...
    def update(self, description: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class Runner:
    def __init__(self, plan: Plan, progress: Progress | None = None):
        self.plan = plan
        self.progress = progress or Progress()
        # every check of the plan lives here, so that every command that runs one gets it; nothing
        # is created or trained before they all pass
        if plan.budget not in BUDGETS:
            raise UsageError(f"unknown budget {plan.budget!r}; valid: {', '.join(BUDGETS)}")
        if plan.threads < 1:
            raise UsageError(f"--threads {plan.threads}: must be >= 1")
        if plan.threads > cpu_cores():
            raise UsageError(f"--threads {plan.threads}: this process may use {cpu_cores()} CPU core(s); "
                             f"give 1..{cpu_cores()} (more threads than cores only slows each step)")
        if plan.jobs < 0:
            raise UsageError(f"--jobs {plan.jobs}: must be >= 1, or 0 for auto")
        if plan.n_samples < 2:
            raise UsageError(f"--n-samples {plan.n_samples}: need at least 2 samples")
        if plan.floor_draws < 2:
            raise UsageError(f"--floor-draws {plan.floor_draws}: need at least 2 true samples for a floor's spread")
        if plan.repeats < 1:
            raise UsageError(f"repeats {plan.repeats}: must be >= 1")
        bad_seeds = [s for s in plan.seeds if not 0 <= s <= MAX_SEED]
        if bad_seeds:
            raise UsageError(f"--seeds {bad_seeds[0]}: seeds must lie in 0..{MAX_SEED}")
        if not (plan.models and plan.datasets and plan.seeds):
            raise UsageError("empty plan: give at least one model, dataset and seed")
        unknown_metrics = [m for m in plan.metrics if m not in scoring.METRICS]
        if unknown_metrics:
            raise UsageError(f"--metrics: unknown metric(s) {', '.join(unknown_metrics)}; valid: {', '.join(scoring.METRICS)}")
        self.entries = resolve(plan.models)
        self._check_teachers()
        for d in plan.datasets:
            ds_mod.get(d)
        self._check_steps()
        # instantiate once to validate budget and --param values before anything is trained
        self.configs = {}
        for e in self.entries:
            try:
                self.configs[e.name] = dataclasses.asdict(make_model(e, plan).config)
            except UsageError as err:
                raise UsageError(f"model {e.name}: {err}") from None
        unknown = set(plan.params) - {e.name for e in self.entries} - self._teacher_names()
        if unknown:
            raise UsageError(f"--param names model(s) not in this run: {', '.join(sorted(unknown))}")
        self.device = resolve_device(plan.device)
        if plan.score_jobs is not None and plan.score_jobs < 0:
            raise UsageError(f"--score-jobs {plan.score_jobs}: must be >= 0 (0: score in the fit process)")
        plan.jobs = min(plan.jobs or self.auto_jobs(), len(self.chains()))
        if plan.score_jobs is None:
            plan.score_jobs = self.auto_score_jobs()
        self._check_memory()
        plan.out = plan.out.replace("{budget}", plan.budget).replace("{device}", self.device)
        self.store = RunDir(check_out_dir(plan.out))
        self._check_settings()
        self._floors: dict[tuple, object] = {}  # (dataset, seed) -> a function giving its floors
        self.scorer = None  # the scoring processes' pool, while a run has one
        self.pending: list[tuple] = []  # (row, its scores to come, its floors) of cells being scored
        self.notes: list[str] = []  # what the run did besides the plan (repairs, redone cells), for the user

    def _check_teachers(self) -> None:
        """Each student's teacher is installed and has the capabilities the student needs."""
        for e in self.entries:
            if not e.cls.teacher:
                continue
            try:
                t = resolve([e.cls.teacher])[0]
            except UsageError as err:
                raise UsageError(f"model {e.name} needs teacher {e.cls.teacher!r}: {err}") from None
            lacking = [c for c in e.cls.teacher_needs if c not in t.cls.capabilities()]
            if lacking:
                raise UsageError(f"model {e.name}: its teacher {t.name} lacks {', '.join(lacking)} "
                                 f"(it has: {', '.join(t.cls.capabilities()) or 'none'})")

    def _check_steps(self) -> None:
        by_name = {e.name: e for e in self.entries}
        multi = [e.name for e in self.entries if e.cls.multistep]
        for name in self.plan.steps_by_model:
            if name not in by_name:
                raise UsageError(f"--steps {name}=...: {name!r} is not in this run's models ({', '.join(by_name)})")
            if not by_name[name].cls.multistep:
                raise UsageError(f"--steps {name}=...: {name} samples in one pass (not multistep); "
                                 f"multistep models here: {', '.join(multi) or 'none'}")
        if self.plan.steps and not multi:
            raise UsageError(f"--steps: none of this run's models samples in several steps "
                             f"({', '.join(by_name)}); the sweep would be ignored")

    def _check_memory(self) -> None:
        """Refuses an --n-samples whose scoring would not fit in this machine's memory."""
        need = scoring.memory_bytes(self.plan.metrics, self.plan.n_samples)
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return
        procs = (self.plan.jobs or 1) + (self.plan.score_jobs or 0)
        if need * procs > 0.8 * have:
            per = max(scoring.METRICS[m].bytes_per_n2 for m in self.plan.metrics)
            most = int((0.8 * have / procs / per) ** 0.5)
            raise UsageError(f"--n-samples {self.plan.n_samples}: scoring needs about {need / 2**30:.3g} GiB per "
                             f"process, more than this machine's {have / 2**30:.3g} GiB allows; at most {most} here "
                             "(or fewer --jobs, or leave out energy / sinkhorn / prdc with --metrics)")

    def _teacher_names(self) -> set[str]:
        return {e.cls.teacher for e in self.entries if e.cls.teacher}

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
        }

    # -- the plan -------------------------------------------------------------------------------
    def steps_for(self, model: Generator) -> list[int | None]:
        if not model.multistep:
            return [None]
        if model.name in self.plan.steps_by_model:
            return list(self.plan.steps_by_model[model.name])
        return list(self.plan.steps) if self.plan.steps else [model.default_steps()]

    def units(self):
        """(entry, dataset, seed), teachers' models first so that students find their checkpoint."""
        order = sorted(self.entries, key=lambda e: e.cls.teacher is not None)
        for e in order:
            for d in self.plan.datasets:
                for s in self.plan.seeds:
                    yield e, d, s

    def chains(self) -> list[list[tuple]]:
        """Fit units grouped so that a student runs after its teacher in the same process (it then
        loads the teacher's checkpoint instead of training it again); the longest chains first."""
        groups: dict[tuple, list[tuple]] = {}
        for e, d, s in self.units():
            groups.setdefault((e.cls.teacher or e.name, d, s), []).append((e, d, s))
        return sorted(groups.values(), key=len, reverse=True)

    def auto_jobs(self) -> int:
        """One process per ``threads`` CPU cores on the CPU; one on a GPU, where processes sharing
        the device would time each other's kernels."""
        if self.device != "cpu":
            return 1
        return max(1, min(cpu_cores() // self.plan.threads, len(self.chains())))

    def auto_score_jobs(self) -> int:
        """On a GPU with one fit process, the CPU cores but two score cells while the GPU fits and
        samples the next ones; on the CPU the cores are the fits', and each fit process scores its
        own cells."""
        if self.device == "cpu" or self.plan.jobs != 1:
            return 0
        return max(0, cpu_cores() - 2)

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
            if self.plan.jobs == 1:
                with self._scoring_pool():
                    self.run_units(units, done)
            else:  # groups fitted side by side here first; the worker processes then reuse their checkpoints
                self._fit_side_by_side(units, done)
                self._run_parallel(keys, done)
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
        self._fit_side_by_side(units, done)
        for entry, dataset, seed in units:
            model = make_model(entry, self.plan)
            todo = [k for k in self.steps_for(model) if (entry.name, dataset, seed, k) not in done]
            self.progress.advance(len(self.steps_for(model)) - len(todo))
            if todo:
                self._run_unit(entry, model, dataset, seed, todo)
        self._drain(block=True)

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

    def _run_parallel(self, keys: set, done: set) -> None:
        """Chains of fit units in ``jobs`` worker processes; each appends its own rows (whole, under
        the rows file's lock), the progress bar follows the rows file. Any interruption
        (Ctrl-C, an error) terminates the workers at once: finished rows stay, the rest resumes.
        Workers ignore SIGINT, so that Ctrl-C reaches only this process, which terminates them
        (a worker interrupted while importing printed a traceback)."""
        chains = [[(e.name, d, s) for e, d, s in c] for c in self.chains()]
        self.progress.update(f"{len(chains)} fit chains in {self.plan.jobs} processes")
        self.progress.advance(len(done & keys))
        lines = lambda: self.store.rows_path.read_text().count("\n") if self.store.rows_path.exists() else 0  # noqa: E731
        start, seen = lines(), 0
        with worker_pool(self.plan.jobs) as pool:
            results = [pool.apply_async(_run_chain, (self.plan, c)) for c in chains]
            while results:
                time.sleep(0.5)
                for r in [r for r in results if r.ready()]:
                    r.get()  # re-raises what failed in a worker outside a unit's own error handling
                    results.remove(r)
                now = lines() - start  # every row a worker writes is one of this plan's cells
                self.progress.advance(now - seen)
                seen = now

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
        if not (self.device.startswith("cuda") if self.plan.side_by_side is None else self.plan.side_by_side):
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
        base = {"run_id": self.store.read_manifest()["run_id"], "model": entry.name, "source": entry.source,
                "dataset": dataset, "dataset_version": ds.version, "seed": seed, "budget": self.plan.budget,
                "n_samples": self.plan.n_samples, "settings_hash": self.plan.settings_hash(), **self.prov}
        try:
            record = self._fit_or_load(entry.name, model, dataset, seed, train)
            self.progress.update(f"{entry.name} on {dataset} seed {seed}: evaluating")
            extras = model.evaluate(test)
        except RunDirError:
            raise  # the run dir cannot be written: the run stops (nothing to record a row in)
        except Exception as e:  # noqa: BLE001 - a failing unit is recorded, the run goes on
            for k in steps:
                self._write(base | {"steps": k, "variant": _safe_variant(model)}, e)
            return
        if model.no_likelihood:
            extras = {"nll_note": model.no_likelihood, **extras}
        self.progress.update(f"{dataset} seed {seed}: noise floors")
        floors = self._floors_for(ds, seed, ref)
        for k in steps:
            self.progress.update(f"{entry.name} on {dataset} seed {seed}: sampling" + (f" {k} steps" if k else ""))
            row = base | {"steps": k, "variant": model.variant, "colour": model.colour, "train_s": record["train_s"],
                          "teacher_train_s": record.get("teacher_train_s"), "final_loss": record["final_loss"],
                          "train_steps": record["steps"], "refit_reason": record.get("refit_reason"),
                          "fit_sha256": record.get("fit_sha256"), **extras}
            try:
                x = self._sample_cell(model, ds, seed, k, ref, row)
                if self.scorer is not None:  # scored beside the next fits; the row is written then
                    self.pending.append((row, self._score_async(x, ref, ds.name, seed), floors))
                    self._drain()
                    continue
                values, errors = scoring.score(x, ref, ds, self.plan.metrics, seed=seed, device=self.metric_device)
                row |= values | {"metric_errors": errors or None} | floors()
            except RunDirError:
                raise
            except Exception as e:  # noqa: BLE001 - the row is still written whole, floors included
                with contextlib.suppress(Exception):
                    row |= floors()
                self._write(row, e)
            else:
                self._write(row, None)

    def _sample_cell(self, model: Generator, ds, seed: int, k, ref, row: dict) -> np.ndarray:
        """Samples, counts NFE and times one cell into ``row``, saves its samples and returns them
        (to be scored). Non-finite samples end the cell as diverged, its metric columns empty (each
        with its reason)."""
        n, sample_seed = self.plan.n_samples, 10_000 + seed
        with NFECounter(model.nfe_module) as counter:
            x = model.sample(n, steps=k, seed=sample_seed)
        declared = model.nfe(k)
        if counter.undeclared:
            raise RuntimeError(f"NFE declaration is false: {', '.join(sorted(counter.undeclared))} ran during sample "
                               f"outside nfe_module ({type(model.nfe_module).__name__}); nfe_module must be the "
                               "network every evaluation calls (or a module wrapping all of it)")
        if counter.count != declared:
            raise RuntimeError(f"NFE mismatch: declared {declared}, counted {counter.count} forward passes")
        x = x.detach().float().cpu().numpy()
        row["nfe"] = counter.count
        t = time_call(lambda: model.sample(n, steps=k, seed=sample_seed), device=self.device,
                      min_calls=self.plan.repeats, min_time=self.plan.min_time_s)
        row |= {"sample_s": t.median, "sample_s_min": t.min, "sample_s_iqr": t.iqr, "sample_calls": t.calls,
                "sample_calls_per_block": t.per_block}
        if not np.isfinite(x).all():
            values, errors = scoring.score(x, ref, ds, self.plan.metrics, seed=seed, device="cpu")
            row |= values | {"metric_errors": errors or None}
            raise Diverged(f"{int((~np.isfinite(x)).any(1).sum())} of {n} samples are not finite")
        arrays = {"x": x, "ref": ref}
        caps = model.capabilities()
        if "trajectory" in caps:
            arrays["trajectory"] = np.asarray(model.trajectory_sample(64, steps=k, seed=sample_seed))
        if "one-step map" in caps:
            arrays["one_step_map"] = np.asarray(model.one_step_map(64, steps=k, seed=sample_seed))
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


@contextlib.contextmanager
def worker_pool(jobs: int, initializer=None):
    """A pool of ``jobs`` spawned worker processes that ignore SIGINT (Ctrl-C reaches only this
    process) and leave when it is killed; closed when the block ends normally, terminated at once
    on any interruption (Ctrl-C, an error), so finished work stays and nothing runs on.
    ``initializer(parent_pid)`` runs in each (default ``_worker_init``)."""
    import multiprocessing as mp

    pool = _ignoring_sigint(lambda: mp.get_context("spawn").Pool(jobs, initializer=initializer or _worker_init,
                                                                  initargs=(os.getpid(),)))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _worker_init(parent: int) -> None:
    """Worker processes leave when the run that started them is gone (killed, not just ended)."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _score_worker_init(parent: int) -> None:
    """A scoring process: one thread (torch, and the BLAS and OpenMP pools of numpy, scipy and
    scikit-learn), leaving with its parent."""
    from threadpoolctl import threadpool_limits

    _worker_init(parent)
    torch.set_num_threads(1)
    threadpool_limits(1)


def _score_task(x, ref, ds_name: str, metrics: list[str], seed: int):
    return scoring.score(x, ref, ds_mod.get(ds_name), metrics, seed=seed, device="cpu")


def _ignoring_sigint(start):
    """``start()`` with SIGINT ignored, so that the processes it spawns inherit that (Python keeps an
    inherited SIG_IGN); the caller's handler is restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return start()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_chain(plan: Plan, chain: list[tuple[str, str, int]]) -> None:
    runner = Runner(plan)
    runner._setup_process()
    entries = {e.name: e for e in runner.entries}
    runner.run_units([(entries[m], d, s) for m, d, s in chain])


def _safe_variant(model: Generator) -> str:
    try:
        return model.variant
    except Exception:  # noqa: BLE001
        return ""


def json_norm(v):
    import json

    return json.loads(json.dumps(v, sort_keys=True, default=str))


def run(plan: Plan, progress: Progress | None = None) -> list[dict]:
    return Runner(plan, progress).run()
