"""The plan: what to run, with what resources, where (``Plan``, frozen, with the CLI's defaults),
and ``check(plan)``: every check made of it before anything is created or trained, returning a
``Resolved`` plan (auto values filled in, the models' entries, configs and step lists, the fit
units and chains, the executor). Nothing here touches a run dir; torch is imported only where a
device is resolved."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .. import datasets as ds_mod
from .. import scoring
from ..api import BUDGETS, CONVERGED, Generator, UsageError
from ..registry import Entry, resolve
from ..store import dumps
from ..timing import MIN_CALLS, MIN_TIME_S

N_TRAIN = 50_000  # training points drawn per (dataset, seed)
N_TEST = 5_000  # held-out points for NLL / ELBO
#: samples per cell, chosen from 'genbench calibrate' (the defects it resolves) and the cost of
#: scoring a cell (exact W2 grows ~n^3): baselines/README.md, "Resolving power", has the figures
N_SAMPLES = 3000
#: seeds feed numpy's and torch's generators (and 10_000 + seed the sampler's): kept in 32 bits
MAX_SEED = 2**32 - 1 - 10_000
#: the most fit units trained side by side as one stacked network on a GPU (a group the GPU's memory
#: cannot hold is split in halves until it fits)
MAX_SIDE_BY_SIDE = 32
#: the most side-by-side groups trained at once: each thread holds up to three CUDA streams of
#: the 64 torch pools (graphs.own_stream), the run's own thread two more
MAX_GROUPS_AT_ONCE = 16
#: the budget that means: converged on a GPU (the grid is cheap there), default on the CPU
AUTO = "auto"


class Unit(NamedTuple):
    """A fit unit: one model trained on one dataset and seed."""

    model: str
    dataset: str
    seed: int


class Cell(NamedTuple):
    """A cell, one row of the results: a fit unit sampled with a step count (None: one pass)."""

    model: str
    dataset: str
    seed: int
    steps: int | None


@dataclass(frozen=True)
class Plan:
    """What to run (models .. min_time_s), with what resources (device .. side_by_side) and where
    (out .. slurm). Sequences are kept as tuples. ``check`` resolves it; it is never changed."""

    models: tuple[str, ...]
    datasets: tuple[str, ...] = (ds_mod.DEFAULT_DATASET,)
    seeds: tuple[int, ...] = (0,)
    steps: tuple[int, ...] | None = None  # None: each model's default
    steps_by_model: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-model override of steps
    budget: str = "auto"  # AUTO: converged on a GPU, default on the CPU
    n_samples: int = N_SAMPLES
    metrics: tuple[str, ...] = tuple(scoring.DEFAULT_METRICS)
    floor_draws: int = 10  # independent true samples scored for each metric's noise floor
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> field -> value
    #: tuned configs (``run --tuned``): model -> dataset -> field -> value, under ``params``
    tuned: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    tuned_source: str | None = None  # the tuned file and its checksum, as rows record it
    #: trials (``genbench tune``): a trial's name -> its model; each trial is a model of the run in
    #: its own right (its rows, its files), its config that model's under ``params[trial]``, and
    #: trials of one model that differ only in the model's ``member_fields`` fit side by side
    trials: dict[str, str] = field(default_factory=dict)
    #: a trial's datasets where it is not trained on every dataset of the plan (successive halving
    #: promotes a trial per dataset)
    trial_datasets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    repeats: int = MIN_CALLS  # timed sample calls per cell: at least this many ...
    min_time_s: float = MIN_TIME_S  # ... and at least this long together
    #: False: no cell's sample call is timed and no trajectory is saved (a tune's trials: selection
    #: reads their validation columns alone); their rows' sample_s is empty
    timed: bool = True
    #: False: no cell is sampled, scored or evaluated; each fit unit writes one row per cell from its
    #: fit record (training seconds, stop, the kept evaluation's validation score): a tune's rungs
    #: before the last, promoted by that score. Not a setting: such rows are told by their empty
    #: metrics (a tune's run dir holds both kinds, each trial's rung its own name)
    cells: bool = True
    #: a trial's evaluations during training begin at this fraction of its steps (the earlier steps
    #: of the evaluation schedule passed over): with ``cells`` False, a tune's rungs before the last,
    #: whose rows carry the best evaluation's score alone, and the early evaluations are seldom the
    #: best (benchmarks/evaluate_from.py). Teachers evaluate from the start. Not a setting, as ``cells``
    evaluate_from: float = 0.0
    #: True: each side-by-side fit's state at its cap is kept (ends/) for a longer fit to continue
    #: from (a tune's rungs before the last); ``continues``: a trial's name -> the trial (at the
    #: previous rung) whose kept states its fits continue from, where its model's path does not
    #: depend on the cap (``Generator.continues_to_longer_caps``). Not settings, as ``cells``
    keep_ends: bool = False
    continues: dict[str, str] = field(default_factory=dict)
    #: a group of fits side by side sheds the fits that stopped and goes on with the others
    #: (``fits.SHED_SHARE``); False: the group trains every member to its last one's stop
    shed: bool = True
    # resources
    device: str = "auto"
    threads: int = 1
    jobs: int = 0  # fit units run at once, each in its own process; 0: auto (Resolved.auto_jobs)
    score_jobs: int | None = None  # CPU processes scoring cells beside the fits; None: auto
    side_by_side: bool | None = None  # fit units of a model side by side where it can; None: on a GPU
    #: side-by-side groups trained at once, each on a CUDA stream of its own (threads of the fit
    #: process: tiny networks leave the GPU idle between kernels; a student's group waits for its
    #: teacher's); 1: one after another. Their ``train_s`` then shares the GPU (rows record it).
    groups_at_once: int = 1
    #: the most fit units in one side-by-side group (a stacked fit); more make fewer groups, each a
    #: larger stacked network (a captured step costs about its kernel count until the GPU is busy)
    max_members: int = MAX_SIDE_BY_SIDE
    # where
    out: str = "results/{budget}-{device}"  # {budget} and {device} are filled in
    executor: str = "local"  # where fit units run: local (this machine's processes), ray or slurm
    address: str | None = None  # ray: the cluster to join (auto, HOST:PORT, ray://...); None: a local instance
    retries: int = 2  # ray, slurm: times a task whose worker or job died is run again before its cells fail
    task_gpus: float = 1.0  # ray on a GPU device: the share of one GPU each task asks for (below 1: tasks share)
    slurm: dict[str, str] = field(default_factory=dict)  # slurm: the job's resources (executors.SLURM_KEYS)

    def __post_init__(self):
        for name in ("models", "datasets", "seeds", "metrics"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "steps_by_model", {k: tuple(v) for k, v in self.steps_by_model.items()})

    def settings(self) -> dict:
        """What must match for a run dir to be resumed or extended."""
        return {"budget": self.budget, "n_samples": self.n_samples, "threads": self.threads,
                # a trial's name pins its config (its key is the hash of its params): a tune extended
                # with more trials extends its run dir, as a run extended with more models does
                "params": {k: v for k, v in self.params.items() if k not in self.trials},
                **({"tuned": self.tuned, "tuned_source": self.tuned_source} if self.tuned else {}),
                "repeats": self.repeats, "min_time_s": self.min_time_s,
                **({} if self.timed else {"timed": False}),  # absent when timed: older run dirs' settings unchanged
                "n_train": N_TRAIN, "metrics": list(self.metrics), "floor_draws": self.floor_draws}

    def settings_hash(self) -> str:
        """A short hash of ``settings()``, written into every row: rows of other settings are told
        apart without the manifest."""
        return hashlib.sha256(dumps(json_norm(self.settings()), sort_keys=True).encode()).hexdigest()[:16]


def default(name: str) -> Any:
    """The default of a ``Plan`` field (the CLI's defaults are these)."""
    f = next(f for f in dataclasses.fields(Plan) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(frozen=True)
class Resolved:
    """A checked plan: ``plan`` with its auto values filled in (jobs, score_jobs, out), the device,
    the models' registry entries and configs, each model's step counts, and the executor."""

    plan: Plan
    device: str
    entries: tuple[Entry, ...]
    configs: dict[str, dict]
    steps: dict[str, tuple]  # model -> its step counts (None alone for a single-pass model)
    executor: Any

    # -- the plan's parts -------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        """A model's registry entry (a teacher that is not itself in the run included)."""
        return next((e for e in self.entries if e.name == name), None) or resolve([name])[0]

    def model(self, name: str, dataset: str | None = None) -> Generator:
        """Model ``name`` with its config (on ``dataset``: its tuned config there, where the run has one)."""
        return make_model(self.entry(name), self.plan, dataset)

    def teacher(self, name: str) -> Entry | None:
        """The registry entry of the teacher of model ``name`` (None: it has none)."""
        t = self.entry(name).cls.teacher
        return resolve([t])[0] if t else None

    def units(self) -> list[Unit]:
        """Every fit unit, teachers' models first so that students find their checkpoint."""
        order = sorted(self.entries, key=lambda e: e.cls.teacher is not None)
        only = self.plan.trial_datasets
        return [Unit(e.name, d, s) for e in order for d in self.plan.datasets for s in self.plan.seeds
                if e.name not in only or d in only[e.name]]

    def cells(self, units) -> list[Cell]:
        """The cells of fit units."""
        return [Cell(*u, k) for u in units for k in self.steps[u[0]]]

    def chains(self) -> list[list[Unit]]:
        """Fit units grouped so that a student runs after its teacher in the same process (it then
        loads the teacher's checkpoint instead of training it again); the longest chains first."""
        groups: dict[tuple, list[Unit]] = {}
        for u in self.units():
            groups.setdefault((self.entry(u.model).cls.teacher or u.model, u.dataset, u.seed), []).append(u)
        return sorted(groups.values(), key=len, reverse=True)

    def tasks(self, done: set, spread: int = 1) -> list[list[Unit]]:
        """The chains with cells left to do, as tasks, the largest first: a chain each, or, where
        units are fitted side by side, the chains of the same models split into ``spread`` tasks
        (those that can run at once) of at most ``max_members`` chains, teachers' units first."""
        todo = [c for c in self.chains() if set(self.cells(c)) - done]
        if not self.side_by_side:
            tasks = todo
        else:
            groups: dict[tuple, list] = {}
            for c in todo:
                groups.setdefault(tuple(u.model for u in c), []).append(c)
            tasks = []
            for same in groups.values():
                size = min(self.plan.max_members, -(-len(same) // max(1, spread)))
                for at in range(0, len(same), size):
                    part = same[at:at + size]
                    tasks.append([c[i] for i in range(len(part[0])) for c in part])
        return sorted(tasks, key=lambda t: len(set(self.cells(t)) - done), reverse=True)

    @property
    def side_by_side(self) -> bool:
        return self.device.startswith("cuda") if self.plan.side_by_side is None else self.plan.side_by_side

    @property
    def metric_device(self) -> str:
        """Where the GPU-capable metrics run: the run's CUDA device, unless scoring processes
        score on the CPU beside the fits; else the CPU."""
        return self.device if self.device.startswith("cuda") and not self.plan.score_jobs else "cpu"

    @property
    def converged(self) -> bool:
        """Fits evaluate on their validation sample and stop (the ``converged`` budget)."""
        return self.plan.budget == CONVERGED

    def data(self, dataset: str, seed: int):
        """(the dataset, its training set, reference sample, held-out sample), each from its own
        stream of the seed (the floor draws are stream 3, the validation sample will be another)."""
        ds = ds_mod.get(dataset)
        return (ds, ds.sample(N_TRAIN, [seed, 0]), ds.sample(self.plan.n_samples, [seed, 1]),
                ds.sample(N_TEST, [seed, 2]))


def model_params(plan: Plan, name: str, dataset: str | None) -> dict[str, str]:
    """Model ``name``'s config overrides on ``dataset``: its tuned config there, then ``--param``."""
    return {**plan.tuned.get(name, {}).get(dataset, {}), **plan.params.get(name, {})}


def config_source(plan: Plan, name: str, dataset: str) -> str:
    """Where model ``name``'s config on ``dataset`` came from, as rows record it."""
    parts = ([f"tuned {plan.tuned_source}"] if dataset in plan.tuned.get(name, {}) else []) + (
        ["--param"] if plan.params.get(name) else [])
    return " + ".join(parts) or "default"


def make_model(entry: Entry, plan: Plan, dataset: str | None = None) -> Generator:
    model = entry.cls(budget=plan.budget, params=model_params(plan, entry.name, dataset))
    model.name = entry.name  # the registered name is the one rows and files use
    return model


def check(plan: Plan) -> Resolved:
    """Every check of a plan, so that every command that runs one gets it; raises UsageError before
    anything is created or trained. Returns the resolved plan; ``plan`` itself is not changed."""
    from .executors import make_executor

    if plan.budget not in (*BUDGETS, CONVERGED, AUTO):
        raise UsageError(f"unknown budget {plan.budget!r}; valid: {', '.join((*BUDGETS, CONVERGED, AUTO))}")
    if plan.threads < 1:
        raise UsageError(f"--threads {plan.threads}: must be >= 1")
    if plan.threads > cpu_cores():
        raise UsageError(f"--threads {plan.threads}: this process may use {cpu_cores()} CPU core(s); "
                         f"give 1..{cpu_cores()} (more threads than cores only slows each step)")
    if plan.jobs < 0:
        raise UsageError(f"--jobs {plan.jobs}: must be >= 1, or 0 for auto")
    if not 1 <= plan.groups_at_once <= MAX_GROUPS_AT_ONCE:
        raise UsageError(f"--groups-at-once {plan.groups_at_once}: must be 1..{MAX_GROUPS_AT_ONCE} (1: one group after "
                         "another; each group holds up to three of the GPU's 64 pooled streams)")
    if plan.max_members < 1:
        raise UsageError(f"--max-members {plan.max_members}: must be >= 1 (fit units in one side-by-side group)")
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
    entries = tuple(_entries(plan))
    _check_teachers(entries)
    executor = make_executor(plan)  # checks the executor's options and that its package is installed
    device = resolve_device(plan.device, here=executor.local_device)
    if plan.budget == AUTO:  # the grid is cheap on a GPU: trained to convergence there
        plan = dataclasses.replace(plan, budget=CONVERGED if device.startswith("cuda") else "default")
    for d in plan.datasets:
        ds_mod.get(d)
    steps = _check_steps(plan, entries)
    configs = {}
    for e in entries:  # instantiated once to validate the budget and --param values
        try:
            configs[e.name] = dataclasses.asdict(make_model(e, plan).config)
            for d in plan.tuned.get(e.name, {}):
                make_model(e, plan, d)
        except UsageError as err:
            raise UsageError(f"model {e.name}: {err}") from None
    teachers = {e.cls.teacher for e in entries if e.cls.teacher}
    unknown = set(plan.params) - {e.name for e in entries} - teachers
    if unknown:
        raise UsageError(f"--param names model(s) not in this run: {', '.join(sorted(unknown))}")
    if plan.score_jobs is not None and plan.score_jobs < 0:
        raise UsageError(f"--score-jobs {plan.score_jobs}: must be >= 0 (0: score in the fit process)")
    if plan.score_jobs is not None and plan.score_jobs > cpu_cores():
        raise UsageError(f"--score-jobs {plan.score_jobs}: this process may use {cpu_cores()} CPU core(s); give "
                         f"0..{cpu_cores()} (more scoring processes than cores only slow each other)")
    r = Resolved(plan, device, entries, configs, steps, executor)
    jobs = min(plan.jobs or auto_jobs(r), len(r.chains()))
    score_jobs = plan.score_jobs if plan.score_jobs is not None else auto_score_jobs(device, jobs)
    check_memory(plan.metrics, plan.n_samples, jobs + score_jobs)
    out = plan.out.replace("{budget}", plan.budget).replace("{device}", device)
    executor.jobs = jobs  # the local executor's processes: known only now
    return dataclasses.replace(r, plan=dataclasses.replace(plan, jobs=jobs, score_jobs=score_jobs, out=out))


def _entries(plan: Plan) -> list:
    """The plan's models' registry entries; a trial's is its model's, under the trial's name."""
    out = []
    for name in plan.models:
        if name in plan.trials:
            out.append(dataclasses.replace(resolve([plan.trials[name]])[0], name=name))
        else:
            out += [e for e in resolve([name]) if e not in out]
    return out


def _check_teachers(entries) -> None:
    """Each student's teacher is installed and has the capabilities the student needs."""
    for e in entries:
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


def _check_steps(plan: Plan, entries) -> dict[str, tuple]:
    """Each model's step counts (``--steps``, per model or for every multistep model)."""
    by_name = {e.name: e for e in entries}
    multi = [e.name for e in entries if e.cls.multistep]
    for name in plan.steps_by_model:
        if name not in by_name:
            raise UsageError(f"--steps {name}=...: {name!r} is not in this run's models ({', '.join(by_name)})")
        if not by_name[name].cls.multistep:
            raise UsageError(f"--steps {name}=...: {name} samples in one pass (not multistep); "
                             f"multistep models here: {', '.join(multi) or 'none'}")
    if plan.steps and not multi:
        raise UsageError(f"--steps: none of this run's models samples in several steps "
                         f"({', '.join(by_name)}); the sweep would be ignored")
    out = {}
    for e in entries:
        if not e.cls.multistep:
            out[e.name] = (None,)
        elif e.name in plan.steps_by_model:
            out[e.name] = tuple(plan.steps_by_model[e.name])
        elif plan.steps:
            out[e.name] = tuple(plan.steps)
        else:
            try:
                out[e.name] = (make_model(e, plan).default_steps(),)
            except UsageError as err:
                raise UsageError(f"model {e.name}: {err}") from None
    return out


def check_memory(metrics, n_samples: int, procs: int) -> None:
    """Refuses an --n-samples whose scoring, in ``procs`` processes at once, would not fit in this
    machine's memory (naming the largest n that does)."""
    need = scoring.memory_bytes(list(metrics), n_samples)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    procs = max(procs, 1)
    if need * procs > 0.8 * have:
        per = max(scoring.METRICS[m].bytes_per_n2 for m in metrics)
        most = int((0.8 * have / procs / per) ** 0.5)
        raise UsageError(f"--n-samples {n_samples}: scoring needs about {need / 2**30:.3g} GiB per "
                         f"process, more than this machine's {have / 2**30:.3g} GiB allows; at most {most} here "
                         "(or fewer --jobs, or leave out energy / sinkhorn / prdc with --metrics)")


def auto_jobs(r: Resolved) -> int:
    """One process per ``threads`` CPU cores on the CPU; one on a GPU, where processes sharing
    the device would time each other's kernels."""
    if r.device != "cpu":
        return 1
    return max(1, min(cpu_cores() // r.plan.threads, len(r.chains())))


def auto_score_jobs(device: str, jobs: int) -> int:
    """On a GPU with one fit process, the CPU cores but two score cells while the GPU fits and
    samples the next ones; on the CPU the cores are the fits', and each fit process scores its
    own cells."""
    if device == "cpu" or jobs != 1:
        return 0
    return max(0, cpu_cores() - 2)


# -- the machine --------------------------------------------------------------------------------
def resolve_device(device: str, here: bool = True) -> str:
    """The device a run uses. ``here``: the fits run on this machine, so the device must exist
    here; a cluster executor's driver may lack it (its tasks check on their nodes)."""
    import torch

    if not here and device in ("cuda", "mps"):
        return device
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
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "none here (the tasks' nodes have it)"
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


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def json_norm(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))
