"""This machine's worker processes: a pool that Ctrl-C and a killed parent cannot leave running.
Knows nothing of runs; the executors and the scoring pool use it."""
from __future__ import annotations

import contextlib
import os
import time


@contextlib.contextmanager
def worker_pool(jobs: int, initializer=None):
    """A pool of ``jobs`` spawned worker processes that ignore SIGINT (Ctrl-C reaches only this
    process) and leave when it is killed; closed when the block ends normally, terminated at once
    on any interruption (Ctrl-C, an error), so finished work stays and nothing runs on.
    ``initializer(parent_pid)`` runs in each (default ``worker_init``)."""
    import multiprocessing as mp

    pool = _ignoring_sigint(lambda: mp.get_context("spawn").Pool(jobs, initializer=initializer or worker_init,
                                                                  initargs=(os.getpid(),)))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


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
