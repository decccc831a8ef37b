"""Executors: where a run's fit units run. One interface, three implementations:

- ``local``: this process, or ``--jobs`` worker processes of this machine that append their rows to
  the run dir themselves (under the rows file's lock);
- ``ray``: each task (a fit chain, or a group of chains fitted side by side) is a Ray task that
  declares its CPUs and GPU share and returns its rows and files (a GPU task also takes its
  share of the node's CPUs, and scores its cells there beside its fits);
- ``slurm``: each task is a SLURM job submitted through submitit; it works in a scratch run dir of
  its own under ``RUN_DIR/slurm/`` and the driver collects it.

With ``ray`` and ``slurm`` the driver (the ``genbench run`` process) alone writes the run dir: a task
fits and measures into a scratch run dir (the same code as a local run), and the driver copies its
files in (names checked, atomic writes) and appends its rows. Resume, the manifest and the rows
file are then exactly a local run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .. import datasets as ds_mod
from .. import scoring
from ..api import UsageError
from ..store import RunDir, atomic_write, sha256

EXECUTORS = ("local", "ray", "slurm")

#: ``--slurm KEY=VALUE`` keys and the submitit parameters they set
SLURM_KEYS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
              "constraint": "slurm_constraint", "time": "timeout_min", "gpus": "gpus_per_node",
              "cpus": "cpus_per_task", "mem": "mem_gb", "cluster": None}
_SLURM_INTS = ("time", "gpus", "cpus", "mem")
_SLURM_CLUSTERS = ("slurm", "local", "debug")

#: the run-dir files a task may hand back: kind/name.suffix, a plain name in one of these folders
_TASK_FILE = re.compile(r"^(samples/[A-Za-z0-9][A-Za-z0-9._+-]*\.npz|(fits|floors)/[A-Za-z0-9][A-Za-z0-9._+-]*\.json"
                        r"|checkpoints/[A-Za-z0-9][A-Za-z0-9._+-]*\.pt)$")


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
    return {"local": LocalExecutor, "ray": RayExecutor, "slurm": SlurmExecutor}[plan.executor](plan)


class Executor:
    """Runs the plan's fit units that have cells left to do (``done``: the finished cells' keys)
    for ``runner`` (a core.Runner holding the run dir's lock)."""

    #: the device a run names must exist on this machine (the fits run here)
    local_device = True

    def __init__(self, plan):
        self.plan = plan

    def run(self, runner, units: list, keys: set, done: set) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    """This process (``--jobs 1``, with scoring processes beside it where the run has them), or
    ``--jobs`` worker processes, each fitting whole chains and appending its own rows."""

    def run(self, runner, units, keys, done) -> None:
        if self.plan.jobs == 1:
            with runner._scoring_pool():
                runner.run_units(units, done)
            return
        runner._fit_side_by_side(units, done)  # groups fitted side by side here; the workers reuse their checkpoints
        self._run_parallel(runner, keys, done)

    def _run_parallel(self, runner, keys: set, done: set) -> None:
        """Chains of fit units in ``jobs`` worker processes; each appends its own rows (whole, under
        the rows file's lock), the progress bar follows the rows file. Any interruption
        (Ctrl-C, an error) terminates the workers at once: finished rows stay, the rest resumes.
        Workers ignore SIGINT, so that Ctrl-C reaches only this process, which terminates them
        (a worker interrupted while importing printed a traceback)."""
        chains = [[(e.name, d, s) for e, d, s in c] for c in runner.chains()]
        runner.progress.update(f"{len(chains)} fit chains in {self.plan.jobs} processes")
        runner.progress.advance(len(done & keys))
        rows_path = runner.store.rows_path
        lines = lambda: rows_path.read_text().count("\n") if rows_path.exists() else 0  # noqa: E731
        start, seen = lines(), 0
        with worker_pool(self.plan.jobs) as pool:
            results = [pool.apply_async(_run_chain, (self.plan, c)) for c in chains]
            while results:
                time.sleep(0.5)
                for r in [r for r in results if r.ready()]:
                    r.get()  # re-raises what failed in a worker outside a unit's own error handling
                    results.remove(r)
                now = lines() - start  # every row a worker writes is one of this plan's cells
                runner.progress.advance(now - seen)
                seen = now


# -- the task a cluster runs ------------------------------------------------------------------
def run_task(plan, units: list, scratch: str | None, inputs: dict | None, device: str, done: list,
             score_jobs: int = 0) -> dict | None:
    """One task on a cluster node: the fit units ``units`` [(model, dataset, seed)] of ``plan``
    fitted, measured and scored into a scratch run dir (``scratch``/run, or a temporary one), the
    same code as a local run. ``inputs`` (relative path -> bytes: the manifest, and the checkpoints,
    fit records and floors the driver already has) are written there first; ``done`` are the
    cells not to run again; ``score_jobs`` processes score cells beside the fits (the task's
    CPUs but its threads). Returns the bundle (``collect``) when it made the scratch dir itself;
    else leaves the bundle's marker, ``scratch``/done.json, for the driver to collect."""
    from .core import Runner

    own = scratch is None
    root = Path(tempfile.mkdtemp(prefix="genbench-task-") if own else scratch)
    try:
        run_dir = root / "run"
        for rel, data in (inputs or {}).items():
            atomic_write(run_dir / rel, data)
        before = _file_shas(run_dir)
        sub = dataclasses.replace(plan, out=str(run_dir), device=device, jobs=1, score_jobs=score_jobs,
                                  executor="local", address=None, slurm={})
        runner = Runner(sub)
        runner.store.lock()
        try:
            runner._setup_process()
            runner.prov["executor"] = plan.executor
            entries = {e.name: e for e in runner.entries}
            with runner._scoring_pool():
                runner.run_units([(entries[m], d, s) for m, d, s in units], {tuple(k) for k in done})
        finally:
            runner.store.unlock()
        if own:
            return collect(run_dir, before, runner.notes)
        atomic_write(root / "done.json", json.dumps({"before": before, "notes": runner.notes}).encode())
        return None
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _file_shas(run_dir: Path) -> dict[str, str]:
    """relative path -> sha256 of the files a task may hand back."""
    out = {}
    for kind in ("samples", "fits", "checkpoints", "floors"):
        for p in sorted((run_dir / kind).glob("*")) if (run_dir / kind).is_dir() else []:
            rel = f"{kind}/{p.name}"
            if _TASK_FILE.match(rel) and p.is_file():
                out[rel] = sha256(p.read_bytes())
    return out


def collect(run_dir: Path, before: dict, notes: list) -> dict:
    """A task's bundle: its rows, the files it wrote or changed (relative path -> bytes), its notes.
    Read as data: rows through the store's reader, files as bytes."""
    files = {}
    for rel, sha in _file_shas(run_dir).items():
        if before.get(rel) != sha:
            files[rel] = (run_dir / rel).read_bytes()
    return {"rows": RunDir(run_dir).rows(), "files": files, "notes": [str(n) for n in notes]}


def task_file(root: Path, rel) -> Path:
    """Where a task's file goes under ``root``; a name a task may not hand back is refused."""
    if not isinstance(rel, str) or not _TASK_FILE.match(rel) or ".." in rel:
        raise ValueError(f"a task handed back {str(rel)[:80]!r}, not a run-dir file it may write")
    return root / rel


class RemoteExecutor(Executor):
    """What the Ray and SLURM executors share: tasks built from the plan's chains, a driver that
    absorbs each task's bundle and turns a task that failed for good into error rows."""

    def run(self, runner, units, keys, done) -> None:
        tasks = runner.tasks(done, self.spread(runner))
        runner.progress.advance(len(done & keys))
        runner.progress.update(f"{len(tasks)} task(s) on {self.plan.executor}")
        if tasks:
            self.run_tasks(runner, tasks, done)

    def run_tasks(self, runner, tasks: list, done: set) -> None:
        raise NotImplementedError

    def spread(self, runner) -> int:
        """Tasks that can run at once on the GPUs (a model's side-by-side fits are split into as many)."""
        return 1

    @staticmethod
    def task_done(runner, units, done: set) -> list:
        """The cells of ``units`` already done, as a list (sent with the task)."""
        mine = set(map(tuple, units))
        return sorted((k for k in done if k[:3] in mine), key=str)


class RayExecutor(RemoteExecutor):
    """Each task is a Ray task asking for ``threads`` CPUs and, on a GPU device, ``task_gpus`` of a
    GPU; a task whose worker dies is run again up to ``retries`` times by Ray. Joins the cluster at
    ``address``, or starts a local Ray instance (stopped when the run ends)."""

    def __init__(self, plan):
        super().__init__(plan)
        try:
            import ray  # noqa: F401 - only whether it is installed
        except ImportError:
            raise UsageError("--executor ray needs Ray, an optional extra: pip install 'genbench[ray]'") from None
        if not 0 < plan.task_gpus <= 1:
            raise UsageError(f"--task-gpus {plan.task_gpus}: give the share of one GPU a task uses, in (0, 1]")
        self.local_device = plan.address is None  # a cluster's driver may have no GPU of its own
        self.started = False
        self._connect()

    def _connect(self) -> None:
        import ray

        _check_reachable(self.plan.address)
        if ray.is_initialized():  # a Ray session this process already holds (a caller's, or the tests')
            return
        try:
            ray.init(address=self.plan.address, include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - no cluster there, or one that refuses us
            raise UsageError(f"--address {self.plan.address}: cannot join a Ray cluster there "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); start one "
                             "with 'ray start --head', or leave out --address for a local instance") from None
        self.started = True

    def spread(self, runner) -> int:
        """The tasks the cluster's GPUs run at once (``task_gpus`` each)."""
        import ray

        if not runner.device.startswith("cuda"):
            return 1
        return max(1, int(ray.cluster_resources().get("GPU", 1) / self.plan.task_gpus))

    def run_tasks(self, runner, tasks, done) -> None:
        import ray

        gpus, cpus = 0, self.plan.threads
        if runner.device.startswith("cuda"):  # a GPU task takes its share of its node's CPUs too, to score beside its fits
            have = ray.cluster_resources()
            gpus = self.plan.task_gpus
            cpus = max(cpus, int(have.get("CPU", 0) / max(have.get("GPU", 1), 1) * gpus))
        remote = ray.remote(run_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=self.plan.retries,
                                              retry_exceptions=False)
        pending = {}
        try:
            for units in tasks:
                ref = remote.remote(self.plan, units, None, runner.task_inputs(units), runner.device,
                                    self.task_done(runner, units, done), cpus - self.plan.threads)
                pending[ref] = units
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    units = pending.pop(ref)
                    try:
                        bundle = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the task raised: its cause is the cells' error
                        runner.fail_cells(units, e.cause if isinstance(e.cause, BaseException) else e)
                    except ray.exceptions.RayError as e:  # its worker or node died, retries spent
                        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                        runner.fail_cells(units, RuntimeError(f"the Ray task died {self.plan.retries + 1} time(s) "
                                                              f"({type(e).__name__}: {first})"))
                    else:
                        runner.absorb(bundle, units)
        except BaseException:
            for ref in pending:  # Ctrl-C, or a run dir that cannot be written: nothing runs on
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            if self.started:
                ray.shutdown()
                self.started = False


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


class SlurmExecutor(RemoteExecutor):
    """Each task is a SLURM job submitted through submitit (``--slurm cluster=local`` runs the same
    jobs as local processes). A job works in ``RUN_DIR/slurm/<task>/`` (on a file system the nodes
    share) and marks it done; the driver polls, collects and removes it. A driver that was
    disconnected and is run again collects the tasks finished meanwhile and waits for the ones
    still running (their scratch dir is locked), instead of submitting them again."""

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

    def _executor(self, runner, folder: Path):
        import submitit

        ex = submitit.AutoExecutor(folder=folder / "logs", cluster=self.cluster)
        params = {"name": "genbench", "timeout_min": 60, "cpus_per_task": self.plan.threads,
                  "gpus_per_node": 1 if runner.device.startswith("cuda") else 0}
        for k, v in self.plan.slurm.items():
            if SLURM_KEYS[k]:
                params[SLURM_KEYS[k]] = int(v) if k in _SLURM_INTS else v
        # parameters of another cluster kind (slurm_* on the local executor) are left out
        ex.update_parameters(**{k: v for k, v in params.items()
                                if not k.startswith("slurm_") or ex.cluster == "slurm"})
        return ex

    def run_tasks(self, runner, tasks, done) -> None:
        folder = runner.store.path / "slurm"
        ex = self._executor(runner, folder)
        jobs: dict[str, list] = {}  # task id -> [its units, its job (None: an earlier driver's), attempts]
        try:
            for units in tasks:
                tid = task_id(self.plan, units)
                scratch = folder / tid
                if (scratch / "done.json").exists() or _locked(scratch / "run" / ".lock"):
                    jobs[tid] = [units, None, 1]  # finished, or still running, since an earlier driver left
                else:
                    jobs[tid] = [units, self._submit(ex, runner, units, scratch, done), 1]
            while jobs:
                for tid in list(jobs):
                    units, job, attempts = jobs[tid]
                    scratch = folder / tid
                    ended = job.done() if job is not None else not _locked(scratch / "run" / ".lock")
                    if (scratch / "done.json").exists():  # looked at after 'ended': a job ends after its marker
                        self._collect(runner, units, scratch)
                        del jobs[tid]
                    elif ended:
                        if attempts <= self.plan.retries:  # the job ended without its marker: run again
                            jobs[tid] = [units, self._submit(ex, runner, units, scratch, done), attempts + 1]
                            continue
                        self._collect(runner, units, scratch, failed=_last_line(job))
                        del jobs[tid]
                time.sleep(0.5)
        except BaseException:
            for units, job, _ in jobs.values():  # Ctrl-C, or a run dir that cannot be written
                if job is not None:
                    with contextlib.suppress(Exception):
                        job.cancel(check=False)
            raise

    def _submit(self, ex, runner, units, scratch: Path, done: set):
        """The task's scratch dir made afresh with its inputs (written by the driver), then its job."""
        shutil.rmtree(scratch, ignore_errors=True)
        for rel, data in runner.task_inputs(units).items():
            atomic_write(scratch / "run" / rel, data)
        cpus = int(self.plan.slurm.get("cpus", self.plan.threads))
        return ex.submit(run_task, self.plan, units, str(scratch), None, runner.device,
                         self.task_done(runner, units, done), max(0, cpus - self.plan.threads))

    def _collect(self, runner, units, scratch: Path, failed: str | None = None) -> None:
        """A task's scratch dir absorbed into the run dir (what a failed job finished, too), the
        cells it left undone made error rows, and the scratch dir removed."""
        marker = {}
        with contextlib.suppress(Exception):
            marker = json.loads((scratch / "done.json").read_text())
        before = marker.get("before") if isinstance(marker.get("before"), dict) else {}
        notes = marker.get("notes") if isinstance(marker.get("notes"), list) else []
        if (scratch / "run").is_dir():
            runner.absorb(collect(scratch / "run", before, notes), units)
        if failed is not None:
            runner.fail_cells(units, RuntimeError(f"the SLURM job failed {self.plan.retries + 1} time(s): {failed}"))
        shutil.rmtree(scratch, ignore_errors=True)


def task_id(plan, units) -> str:
    """A task's name, the same for the same units and settings on every run."""
    return hashlib.sha256(json.dumps([plan.settings_hash(), units], default=str).encode()).hexdigest()[:16]


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


# -- this machine's processes -----------------------------------------------------------------
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
    import torch
    from threadpoolctl import threadpool_limits

    _worker_init(parent)
    torch.set_num_threads(1)
    threadpool_limits(1)


def _score_task(x, ref, ds_name: str, metrics: list[str], seed: int):
    return scoring.score(x, ref, ds_mod.get(ds_name), metrics, seed=seed, device="cpu")


def _evaluate_task(entry, plan, state: bytes, test) -> dict:
    """A fitted model's ``evaluate(test)`` in a scoring process: the model rebuilt on the CPU from its
    checkpoint's bytes (``store.load_state``: data, never code)."""
    from ..store import load_state
    from .plan import make_model

    model = make_model(entry, plan)
    model.load_state_dict(load_state(state, "cpu"), device="cpu")
    return model.evaluate(test)


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


def _run_chain(plan, chain: list[tuple[str, str, int]]) -> None:
    from .core import Runner

    runner = Runner(plan)
    runner._setup_process()
    entries = {e.name: e for e in runner.entries}
    runner.run_units([(entries[m], d, s) for m, d, s in chain])
