"""The runner, the one place that ties datasets, models, metrics, timing and the store together.
Its rooms, each a module (no import runs back up this list):

- ``plan.py``: the frozen ``Plan`` (what, with what, where), ``check`` -> a ``Resolved`` plan, the
  fit units (``Unit``), cells (``Cell``), chains and tasks;
- ``processes.py``: this machine's worker processes;
- ``executors.py``: where tasks run (local processes, Ray, SLURM): task function + tasks in, bundles out;
- ``cell.py``: one cell's measurement (a fitted model -> the row's figures);
- ``ledger.py``: the run dir's manifest, settings, done cells and rows; bundles absorbed;
- ``fits.py``: the fit store (reuse, fit, save; fits side by side);
- ``scoring_pool.py``: cells, floors and evaluations scored, beside the fits where it can;
- ``core.py``: ``Session`` (one process's part of a run) and ``Run`` (the driver), the task functions.

Names are imported lazily, so that ``genbench.runner.plan`` (torch-free) can be read by the CLI
without importing torch.
"""
import importlib

_WHERE = {
    "Plan": "plan", "Resolved": "plan", "Unit": "plan", "Cell": "plan", "check": "plan", "MAX_SEED": "plan",
    "MAX_SIDE_BY_SIDE": "plan", "N_SAMPLES": "plan", "N_TEST": "plan", "N_TRAIN": "plan", "cpu_cores": "plan",
    "device_name": "plan", "git_sha": "plan", "json_norm": "plan", "make_model": "plan", "resolve_device": "plan",
    "NFECounter": "cell", "measure": "cell", "worker_pool": "processes",
    "EXECUTORS": "executors", "SLURM_KEYS": "executors", "make_executor": "executors",
    "Progress": "core", "Run": "core", "Session": "core", "run": "core",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'genbench.runner' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
