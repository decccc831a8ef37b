"""This machine's worker processes: a pool that Ctrl-C, a killed parent and a killed worker cannot
leave running or waiting. Knows nothing of runs; the executors, the scoring pool and calibrate use
it.

The pool is ``concurrent.futures.ProcessPoolExecutor`` (spawned processes): a worker that dies
(SIGKILL, the out-of-memory killer, a crash) fails every future of the pool at once with
``BrokenProcessPool``, so the caller is told instead of waiting for a result that never comes
(``multiprocessing.Pool`` silently replaces a dead worker and loses its task: a run waited
forever)."""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

__all__ = ["BrokenProcessPool", "Pool", "single_thread_worker_init", "worker_init", "worker_pool"]


class Pool:
    """``jobs`` spawned worker processes. ``submit(fn, *args)`` gives a ``concurrent.futures.Future``;
    workers start with SIGINT ignored (Ctrl-C reaches only this process) and leave when this
    process is killed. ``terminate()`` ends them at once."""

    def __init__(self, jobs: int, initializer=None):
        import multiprocessing as mp

        self.jobs, self.initializer = jobs, initializer or worker_init
        self.executor = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=self.initializer,
                                            initargs=(os.getpid(),))

    def submit(self, fn, *args):
        # the processes start at a submit: with SIGINT ignored, which they inherit
        return _ignoring_sigint(lambda: self.executor.submit(fn, *args))

    def imap(self, fn, items):
        """``fn`` over ``items`` in the workers, results in order."""
        for future in [self.submit(fn, item) for item in items]:
            yield future.result()

    def renew(self) -> "Pool":
        """A fresh pool of the same size, after this one broke (a worker died)."""
        self.terminate()
        return Pool(self.jobs, self.initializer)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def terminate(self) -> None:
        """Every worker ended at once, whatever it was doing; nothing queued runs."""
        procs = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(5)


@contextlib.contextmanager
def worker_pool(jobs: int, initializer=None):
    """A ``Pool`` for the block: closed when it ends normally, terminated at once on any
    interruption (Ctrl-C, an error), so finished work stays and nothing runs on.
    ``initializer(parent_pid)`` runs in each worker (default ``worker_init``)."""
    pool = Pool(jobs, initializer)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()


def worker_init(parent: int) -> None:
    """Worker processes leave when the run that started them is gone (killed, not just ended)."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def single_thread_worker_init(parent: int) -> None:
    """A worker of one thread (torch, and the BLAS and OpenMP pools of numpy, scipy and
    scikit-learn), leaving with its parent."""
    import torch
    from threadpoolctl import threadpool_limits

    worker_init(parent)
    torch.set_num_threads(1)
    threadpool_limits(1)


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
