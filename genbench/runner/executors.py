"""Executors: where a run's tasks run. Each takes a task function and a list of tasks and hands
back what each task returned (its bundle) or why it failed; none knows what a task does:

- ``local``: in this process (``--jobs 1``), or in ``--jobs`` worker processes of this machine;
- ``ray``: each task is a Ray task that declares its CPUs and GPU share;
- ``slurm``: each task is a SLURM job submitted through submitit, working in a scratch run dir of
  its own under ``RUN_DIR/slurm/``, collected by the driver from there.

``run(fn, tasks, device=, run_dir=, on_bundle=, on_failure=, tick=)`` calls ``fn(task, scratch)`` for every
task (``scratch``: a folder the task works in and leaves its bundle's marker in, or None: the task
returns its bundle), ``on_bundle(task, bundle)`` for each that ended (what a failed SLURM job left
finished too), ``on_failure(task, error)`` for each that failed for good, and ``tick()`` about
twice a second while it waits.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

from ..api import UsageError
from ..store import RunDir, atomic_write
from .processes import BrokenProcessPool, Pool

EXECUTORS = ("local", "ray", "slurm")

#: ``--slurm KEY=VALUE`` keys and the submitit parameters they set
SLURM_KEYS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
              "constraint": "slurm_constraint", "time": "timeout_min", "gpus": "gpus_per_node",
              "cpus": "cpus_per_task", "mem": "mem_gb", "cluster": None}
_SLURM_INTS = ("time", "gpus", "cpus", "mem")
_SLURM_CLUSTERS = ("slurm", "local", "debug")


@dataclass
class Task:
    """A unit of work an executor runs: fit units, the files it starts from (relative path ->
    bytes, for a task that runs in a scratch run dir), the cells not to run again, and a name that
    is the same for the same work on every run."""

    units: list
    key: str
    inputs: dict = field(default_factory=dict)
    done: list = field(default_factory=list)


def make_executor(plan) -> "Executor":
    """The plan's executor, its options checked (UsageError, before anything is created)."""
    if plan.executor not in EXECUTORS:
        raise UsageError(f"--executor {plan.executor!r}; valid: {', '.join(EXECUTORS)}")
    if plan.address is not None and plan.executor != "ray":
        raise UsageError(f"--address {plan.address}: only --executor ray joins a cluster (this run's executor: "
                         f"{plan.executor})")
    if plan.slurm and plan.executor != "slurm":
        raise UsageError(f"--slurm: only --executor slurm submits jobs (this run's executor: {plan.executor})")
    if plan.retries < 0:
        raise UsageError(f"--retries {plan.retries}: must be >= 0")
    if plan.task_gpus != 1.0 and plan.executor != "ray":
        raise UsageError(f"--task-gpus {plan.task_gpus}: only --executor ray shares GPUs between tasks (this run's "
                         f"executor: {plan.executor})")
    return {"local": LocalExecutor, "ray": RayExecutor, "slurm": SlurmExecutor}[plan.executor](plan)


class Executor:
    #: the device a run names must exist on this machine (the tasks run here)
    local_device = True
    #: the tasks write the run dir themselves (under its locks) instead of handing back bundles
    in_place = False

    def __init__(self, plan):
        self.threads, self.retries = plan.threads, plan.retries
        self.jobs = plan.jobs  # the processes a local run uses (set again once the plan is resolved)

    def spread(self, device: str) -> int:
        """Tasks that can run at once on the GPUs (a model's side-by-side fits are split into as many)."""
        return 1

    def task_score_jobs(self, device: str) -> int:
        """The scoring processes a task of a cluster runs beside its fits (its CPUs but its threads)."""
        return 0

    def run(self, fn, tasks: list[Task], *, device: str, run_dir: Path, on_bundle, on_failure, tick) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    """This process (``jobs`` 1: ``fn`` may then be any callable), or ``jobs`` worker processes
    (``fn`` picklable). A task's error is raised here: a local task records its cells' failures
    itself, so what escapes it stops the run. A worker that dies (killed, out of memory) breaks
    the pool: every task it had not finished runs again in a fresh pool, up to ``retries`` times,
    then fails (``on_failure``); the run never waits on a dead worker. Any interruption terminates
    the workers at once."""

    in_place = True

    def run(self, fn, tasks, *, device, run_dir, on_bundle, on_failure, tick) -> None:
        if self.jobs <= 1:
            for task in tasks:
                on_bundle(task, fn(task, None))
            return
        pool = Pool(self.jobs)
        try:
            pending = {pool.submit(fn, task, None): (task, 1) for task in tasks}
            while pending:
                finished, _ = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
                broken = []
                for future in finished:
                    task, attempts = pending.pop(future)
                    try:
                        bundle = future.result()  # re-raises what failed in a worker
                    except BrokenProcessPool:
                        broken.append((task, attempts))
                    else:
                        on_bundle(task, bundle)
                if broken:  # the pool is broken: every task it still held fails at once
                    futures.wait(pending)
                    broken += [pending[f] for f in pending]
                    pending = {}
                    pool = pool.renew()
                    for task, attempts in broken:
                        if attempts <= self.retries:
                            pending[pool.submit(fn, task, None)] = (task, attempts + 1)
                        else:
                            on_failure(task, RuntimeError(f"a worker process died {attempts} time(s) running this "
                                                          "task (killed by a signal or out of memory)"))
                tick()
        except BaseException:
            pool.terminate()
            raise
        else:
            pool.close()


class RayExecutor(Executor):
    """Each task is a Ray task asking for ``threads`` CPUs and, on a GPU device, ``task_gpus`` of a
    GPU and its share of the node's CPUs (the task scores its cells on them); a task whose worker
    dies is run again up to ``retries`` times by Ray. Joins the cluster at ``address``, or starts a
    local Ray instance (stopped when the run ends)."""

    def __init__(self, plan):
        super().__init__(plan)
        try:
            import ray  # noqa: F401 - only whether it is installed
        except ImportError:
            raise UsageError("--executor ray needs Ray, an optional extra: pip install 'genbench[ray]'") from None
        if not 0 < plan.task_gpus <= 1:
            raise UsageError(f"--task-gpus {plan.task_gpus}: give the share of one GPU a task uses, in (0, 1]")
        self.address, self.task_gpus = plan.address, plan.task_gpus
        self.local_device = plan.address is None  # a cluster's driver may have no GPU of its own
        self.started = False
        self._connect()

    def _connect(self) -> None:
        import ray

        _check_reachable(self.address)
        if ray.is_initialized():  # a Ray session this process already holds (a caller's, or the tests')
            return
        try:
            ray.init(address=self.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - no cluster there, or one that refuses us
            raise UsageError(f"--address {self.address}: cannot join a Ray cluster there "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); start one "
                             "with 'ray start --head', or leave out --address for a local instance") from None
        self.started = True

    def spread(self, device: str) -> int:
        """The tasks the cluster's GPUs run at once (``task_gpus`` each)."""
        import ray

        if not device.startswith("cuda"):
            return 1
        return max(1, int(ray.cluster_resources().get("GPU", 1) / self.task_gpus))

    def task_score_jobs(self, device: str) -> int:
        return self.cpus(device) - self.threads

    def cpus(self, device: str) -> int:
        """The CPUs a task asks for: its threads, and on a GPU its GPU's share of a node's CPUs."""
        import ray

        if not device.startswith("cuda"):
            return self.threads
        have = ray.cluster_resources()
        return max(self.threads, int(have.get("CPU", 0) / max(have.get("GPU", 1), 1) * self.task_gpus))

    def run(self, fn, tasks, *, device, run_dir, on_bundle, on_failure, tick) -> None:
        import ray

        gpus = self.task_gpus if device.startswith("cuda") else 0
        remote = ray.remote(_call).options(num_cpus=self.cpus(device), num_gpus=gpus, max_retries=self.retries,
                                           retry_exceptions=False)
        pending = {}
        try:
            for task in tasks:
                pending[remote.remote(fn, task)] = task
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        bundle = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the task raised: its cause is the cells' error
                        on_failure(task, e.cause if isinstance(e.cause, BaseException) else e)
                    except ray.exceptions.RayError as e:  # its worker or node died, retries spent
                        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                        on_failure(task, RuntimeError(f"the Ray task died {self.retries + 1} time(s) "
                                                      f"({type(e).__name__}: {first})"))
                    else:
                        on_bundle(task, bundle)
                tick()
        except BaseException:
            for ref in pending:  # Ctrl-C, or a run dir that cannot be written: nothing runs on
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            if self.started:
                ray.shutdown()
                self.started = False


def _call(fn, task):
    """A task on a cluster worker: it returns its bundle."""
    return fn(task, None)


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that accepts no connection within 5 s is refused
    at once (Ray itself retries for minutes, printing warnings)."""
    import socket

    if address is None or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise UsageError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"--address {address}: nothing accepts connections there ({e.strerror or e}); start "
                         "the head with 'ray start --head', or leave out --address for a local instance") from None


class SlurmExecutor(Executor):
    """Each task is a SLURM job submitted through submitit (``--slurm cluster=local`` runs the same
    jobs as local processes). A job works in ``RUN_DIR/slurm/<task key>/`` (on a file system the
    nodes share), starting from its inputs, and marks it done; the driver polls, collects and
    removes it. A driver that was disconnected and is run again collects the tasks finished
    meanwhile and waits for the ones still running (their scratch dir is locked), instead of
    submitting them again."""

    def __init__(self, plan):
        super().__init__(plan)
        try:
            import submitit  # noqa: F401 - only whether it is installed
        except ImportError:
            raise UsageError("--executor slurm needs submitit, an optional extra: pip install 'genbench[slurm]'") from None
        for k, v in plan.slurm.items():
            if k not in SLURM_KEYS:
                raise UsageError(f"--slurm {k}={v}: unknown key; valid: {', '.join(SLURM_KEYS)}")
            if k in _SLURM_INTS and not (str(v).isdigit() and int(v) > 0 or k == "gpus" and str(v) == "0"):
                raise UsageError(f"--slurm {k}={v}: expected a positive integer"
                                 + (" (minutes)" if k == "time" else " (GB)" if k == "mem" else ""))
        self.cluster = plan.slurm.get("cluster", "slurm")
        if self.cluster not in _SLURM_CLUSTERS:
            raise UsageError(f"--slurm cluster={self.cluster}; valid: {', '.join(_SLURM_CLUSTERS)}")
        if self.cluster == "slurm" and shutil.which("srun") is None:
            raise UsageError("--executor slurm: no SLURM here ('srun' is not on PATH); run on the cluster's login "
                             "node, or give --slurm cluster=local to run the same jobs as processes of this machine")
        self.local_device = self.cluster in ("local", "debug")
        self.slurm = dict(plan.slurm)
        self.folder: Path | None = None  # RUN_DIR/slurm, while it runs

    def task_score_jobs(self, device: str) -> int:
        return max(0, int(self.slurm.get("cpus", self.threads)) - self.threads)

    def submitter(self, device: str):
        import submitit

        ex = submitit.AutoExecutor(folder=self.folder / "logs", cluster=self.cluster)
        params = {"name": "genbench", "timeout_min": 60, "cpus_per_task": self.threads,
                  "gpus_per_node": 1 if device.startswith("cuda") else 0}
        for k, v in self.slurm.items():
            if SLURM_KEYS[k]:
                params[SLURM_KEYS[k]] = int(v) if k in _SLURM_INTS else v
        # parameters of another cluster kind (slurm_* on the local executor) are left out
        ex.update_parameters(**{k: v for k, v in params.items() if not k.startswith("slurm_") or ex.cluster == "slurm"})
        return ex

    def run(self, fn, tasks, *, device, run_dir, on_bundle, on_failure, tick) -> None:
        self.folder = Path(run_dir) / "slurm"
        ex = self.submitter(device)
        jobs: dict[str, list] = {}  # task key -> [the task, its job (None: an earlier driver's), attempts]
        try:
            for task in tasks:
                scratch = self.folder / task.key
                if (scratch / "done.json").exists() or _locked(scratch / "run" / ".lock"):
                    jobs[task.key] = [task, None, 1]  # finished, or still running, since an earlier driver left
                else:
                    jobs[task.key] = [task, self.submit(ex, fn, task), 1]
            while jobs:
                for key in list(jobs):
                    task, job, attempts = jobs[key]
                    scratch = self.folder / key
                    ended = job.done() if job is not None else not _locked(scratch / "run" / ".lock")
                    if (scratch / "done.json").exists():  # looked at after 'ended': a job ends after its marker
                        self._collect(task, scratch, on_bundle)
                        del jobs[key]
                    elif ended:
                        if attempts <= self.retries:  # the job ended without its marker: run again
                            jobs[key] = [task, self.submit(ex, fn, task), attempts + 1]
                            continue
                        self._collect(task, scratch, on_bundle)
                        on_failure(task, RuntimeError(f"the SLURM job failed {self.retries + 1} time(s): "
                                                      f"{_last_line(job)}"))
                        del jobs[key]
                tick()
                time.sleep(0.5)
        except BaseException:
            for _, job, _ in jobs.values():  # Ctrl-C, or a run dir that cannot be written
                if job is not None:
                    with contextlib.suppress(Exception):
                        job.cancel(check=False)
            raise

    def submit(self, ex, fn, task: Task):
        """The task's scratch dir made afresh with its inputs (written by the driver), then its job."""
        scratch = self.folder / task.key
        shutil.rmtree(scratch, ignore_errors=True)
        for rel, data in task.inputs.items():
            atomic_write(scratch / "run" / rel, data)
        return ex.submit(fn, Task(task.units, task.key, {}, task.done), str(scratch))

    @staticmethod
    def _collect(task: Task, scratch: Path, on_bundle) -> None:
        """A task's scratch dir handed back as its bundle (what a failed job finished, too) and removed."""
        marker = {}
        with contextlib.suppress(Exception):
            marker = json.loads((scratch / "done.json").read_text())
        before = marker.get("before") if isinstance(marker.get("before"), dict) else {}
        notes = marker.get("notes") if isinstance(marker.get("notes"), list) else []
        if (scratch / "run").is_dir():
            on_bundle(task, RunDir(scratch / "run").bundle(before, notes))
        shutil.rmtree(scratch, ignore_errors=True)


def _locked(lock: Path) -> bool:
    """Whether a process holds the run-dir lock file ``lock`` (a task still at work)."""
    import fcntl

    try:
        fh = open(lock, "a")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _last_line(job) -> str:
    """The last line a failed job wrote to stderr (read as text), or its state."""
    text = ""
    with contextlib.suppress(Exception):
        text = job.stderr() or ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        return lines[-1][:300]
    with contextlib.suppress(Exception):
        return f"state {job.state}"
    return "no output"
