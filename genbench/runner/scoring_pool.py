"""The scoring pool: a cell's samples scored against its reference sample, each (dataset, seed)'s
noise floors, and a fitted model's ``evaluate`` (held-out likelihood). With ``score_jobs`` CPU
processes this runs beside the fits and the rows are written as their scores arrive; without, it
runs in the fit process and each row is written at once."""
from __future__ import annotations

import contextlib
import functools
from concurrent.futures import Future

from .. import datasets as ds_mod
from .. import scoring
from ..api import RunDirError
from ..store import RunDir, cell_name, floor_name
from .plan import Resolved, Unit, make_model
from .processes import BrokenProcessPool, Pool, single_thread_worker_init


class Scorer:
    def __init__(self, store: RunDir, r: Resolved, write):
        self.store, self.r, self.plan, self.write = store, r, r.plan, write
        self.pool = None  # the scoring processes, while open
        self.pending: list[tuple] = []  # cells being scored: (row, its scores to come, the rest of it, a resubmit or None)
        self._floors: dict[tuple, object] = {}  # (dataset, seed) -> a function giving its floors

    @contextlib.contextmanager
    def processes(self, progress):
        """``score_jobs`` CPU worker processes for the block (none where the plan has none). Closed
        (or, on an interruption, terminated: cells not yet written are run again on resume) when
        the block ends."""
        if not self.plan.score_jobs:
            yield
            return
        progress.update(f"starting {self.plan.score_jobs} scoring processes")
        self.pool = Pool(self.plan.score_jobs, initializer=single_thread_worker_init)
        try:
            yield
        except BaseException:
            self.pool.terminate()
            raise
        else:
            self.pool.close()
        finally:
            self.pool = None

    def _submit(self, fn, *args):
        """``fn(*args)`` in a scoring process; a pool broken by a dead worker is replaced first."""
        try:
            return self.pool.submit(fn, *args)
        except BrokenProcessPool:
            self.pool = self.pool.renew()
            return self.pool.submit(fn, *args)

    def _score_async(self, x, ref, ds_name: str, seed: int):
        return self._submit(score_task, x, ref, ds_name, list(self.plan.metrics), seed)

    def submit(self, row: dict, x, ref, ds, seed: int, late, ready=None) -> None:
        """Scores a cell's samples ``x`` into ``row`` and writes it with ``late()`` (its floors and
        evaluation) added: now, or when the scoring processes have scored it. ``ready``: where given,
        the row waits until it says True as well (a cell sampled before it is timed)."""
        if self.pool is not None:
            again = lambda: self._score_async(x, ref, ds.name, seed)  # noqa: E731 - once more, if a worker dies
            self.pending.append((row, again(), late, again, ready))
            self.drain()
            return
        values, errors = scoring.score(x, ref, ds, list(self.plan.metrics), seed=seed, device=self.r.metric_device)
        if ready is not None and not ready():
            scored = Future()
            scored.set_result((values, errors))
            self.pending.append((row, scored, late, None, ready))
            return
        self.write(row | values | {"metric_errors": errors or None} | late(), None)

    def drain(self, block: bool = False) -> None:
        """Writes the rows whose scores have arrived and that are ready (all of them with ``block``).
        A cell whose scoring process died is scored once more (in a fresh pool); a second death is
        its error."""
        while True:
            waiting = []
            for row, result, late, again, ready in self.pending:
                if not block and not (result.done() and (ready is None or ready())):
                    waiting.append((row, result, late, again, ready))
                    continue
                try:
                    try:
                        values, errors = result.result()
                    except BrokenProcessPool:
                        if again is None:
                            raise
                        waiting.append((row, again(), late, None, ready))
                        continue
                    row |= values | {"metric_errors": errors or None} | late()
                except RunDirError:
                    raise
                except Exception as e:  # noqa: BLE001 - a scoring failure is the cell's error
                    self.write(row, e)
                else:
                    self.write(row, None)
            self.pending = waiting
            if not (block and waiting):
                return

    def evaluate(self, unit: Unit, model, record: dict, test):
        """``model.evaluate(test)`` (held-out likelihood and the like), as a function that gives its
        result. With scoring processes and a checkpoint, it runs in one of them, on the CPU, on the
        model loaded from the checkpoint, while this process samples and fits on; else here."""
        sha = record.get("checkpoint_sha256")
        if self.pool is None or not sha or "evaluation" not in model.capabilities():
            here = model.evaluate(test) if "evaluation" in model.capabilities() else {}
            return lambda: here
        state = self.store.checkpoint_bytes(cell_name(*unit), sha)  # the bytes saved
        return functools.cache(self._submit(evaluate_task, self.r.entry(unit.model), self.plan, state, test,
                                                 unit.dataset).result)

    def floors_for(self, ds, seed: int, ref):
        """Every metric's noise floor for (dataset, seed): ``floor_draws`` independent true samples
        of n points scored against the reference sample. Computed once per run dir (saved under
        floors/, shared by the worker processes under a lock) and reused by every model; with
        scoring processes, the draws are scored there while the fits go on. Returns a function
        that gives the floors (waiting for them, the first time, if they are being scored)."""
        key = (ds.name, seed)
        if key in self._floors:
            return self._floors[key]
        name = floor_name(ds.name, seed)
        ident = {"dataset": ds.name, "dataset_version": ds.version, "seed": seed, "n": len(ref),
                 "metrics": list(self.plan.metrics), "draws": self.plan.floor_draws, "device": self.r.device,
                 "metric_device": self.r.metric_device}
        draws = lambda: [ds.sample(len(ref), [seed, 3, i]) for i in range(self.plan.floor_draws)]  # noqa: E731
        if self.pool is None:  # computed here (or by another worker process, under the file's lock)
            value = self.store.cached_json("floors", name, ident, lambda: scoring.floors(
                draws(), ref, ds, list(self.plan.metrics), seed=seed, device=self.r.metric_device))
        else:  # the run's one process: saved by an earlier run, or scored by the scoring processes
            value = self.store.saved_value("floors", name, ident)
        if value is not None:
            self._floors[key] = lambda: value
            return self._floors[key]
        results = [self._score_async(d, ref, ds.name, scoring.floor_seed(seed, i)) for i, d in enumerate(draws())]

        @functools.cache
        def floors() -> dict:
            value = scoring.floor_summary([r.result()[0] for r in results])
            return self.store.cached_json("floors", name, ident, lambda: value)

        self._floors[key] = floors
        return floors


def score_task(x, ref, ds_name: str, metrics: list[str], seed: int):
    """A cell's scores in a scoring process."""
    return scoring.score(x, ref, ds_mod.get(ds_name), metrics, seed=seed, device="cpu")


def evaluate_task(entry, plan, state: bytes, test, dataset: str | None = None) -> dict:
    """A fitted model's ``evaluate(test)`` in a scoring process: the model rebuilt on the CPU from its
    checkpoint's bytes (``store.load_state``: data, never code)."""
    from ..store import load_state

    model = make_model(entry, plan, dataset)
    model.load_state_dict(load_state(state, "cpu"), device="cpu")
    return model.evaluate(test)
