"""Planning: a run's plan, every check made of it before anything is created or trained, and the fit
units and chains it breaks into. Nothing here touches a run dir."""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import datasets as ds_mod
from .. import scoring
from ..api import BUDGETS, Generator, UsageError
from ..registry import Entry, resolve
from ..store import dumps
from ..timing import MIN_CALLS, MIN_TIME_S

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
    executor: str = "local"  # where fit units run: local (this machine's processes), ray or slurm
    address: str | None = None  # ray: the cluster to join (auto, HOST:PORT, ray://...); None: a local instance
    retries: int = 2  # ray, slurm: times a task whose worker or job died is run again before its cells fail
    task_gpus: float = 1.0  # ray on a GPU device: the share of one GPU each task asks for (below 1: tasks share)
    slurm: dict[str, str] = field(default_factory=dict)  # slurm: the job's resources (see executors.SLURM_KEYS)

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


def resolve_device(device: str, here: bool = True) -> str:
    """The device a run uses. ``here``: the fits run on this machine, so the device must exist
    here; a cluster executor's driver may lack it (its tasks check on their nodes)."""
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


class PlannedRun:
    """A plan checked whole (models, teachers, datasets, steps, params, device, memory) and broken
    into fit units; the checks raise UsageError before anything is created or trained."""

    def __init__(self, plan: Plan):
        self.plan = plan
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
        from .executors import make_executor

        self.executor = make_executor(plan)  # checks the executor's options and that its package is installed
        self.device = resolve_device(plan.device, here=self.executor.local_device)
        if plan.score_jobs is not None and plan.score_jobs < 0:
            raise UsageError(f"--score-jobs {plan.score_jobs}: must be >= 0 (0: score in the fit process)")
        plan.jobs = min(plan.jobs or self.auto_jobs(), len(self.chains()))
        if plan.score_jobs is None:
            plan.score_jobs = self.auto_score_jobs()
        self._check_memory()
        plan.out = plan.out.replace("{budget}", plan.budget).replace("{device}", self.device)

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

def json_norm(v):
    import json

    return json.loads(json.dumps(v, sort_keys=True, default=str))

