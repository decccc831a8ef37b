"""The runner, the one place that ties datasets, models, metrics, timing and the store together, in
three rooms:

- ``plan.py``: the plan, every check made of it before anything is created or trained, and the fit
  units and chains it breaks into;
- ``cell.py``: the measurement of one cell (a fitted model and its reference sample -> the row's
  figures: network evaluations counted, sample calls timed);
- ``executors.py``: where fit units run (this machine's processes, Ray, SLURM);

and ``core.py``, the run itself: a checked plan carried out into a run dir (fits or their
checkpoints, cells measured, scored and written, resume).
"""
from .cell import NFECounter, measure
from .core import Progress, Runner, run
from .executors import EXECUTORS, SLURM_KEYS, make_executor, worker_pool
from .plan import (MAX_SEED, MAX_SIDE_BY_SIDE, N_SAMPLES, N_TEST, N_TRAIN, Plan, PlannedRun, cpu_cores, device_name,
                   git_sha, json_norm, make_model, resolve_device)

__all__ = ["EXECUTORS", "MAX_SEED", "MAX_SIDE_BY_SIDE", "N_SAMPLES", "N_TEST", "N_TRAIN", "SLURM_KEYS", "NFECounter",
           "Plan", "PlannedRun", "Progress", "Runner", "cpu_cores", "device_name", "git_sha", "json_norm",
           "make_executor", "make_model", "measure", "resolve_device", "run", "worker_pool"]
