"""Where a `genbench run` spends its wall time: the run's own command, with wall-time accumulators
wrapped around the runner's phases (fitting side by side and alone, the models' `evaluate`, the
cells' sampling and timing, trajectories, samples files, and the wait for the scoring processes),
printed to stderr at the end, for a run in one fit process (the GPU default; `--jobs 1` on the
CPU: worker processes are not wrapped). Phases nest (a cell's timing is inside its unit); the final blocking
drain is the wait for the scoring processes after the last cell.

    python benchmarks/grid_phases.py run --models diffusion,cm,vae,flow ... --out DIR > /dev/null
"""
import collections
import sys
import time

T: dict = collections.defaultdict(float)
N: collections.Counter = collections.Counter()


def timed(fn, label):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            key = label(*a, **k) if callable(label) else label
            T[key] += time.perf_counter() - t0
            N[key] += 1
    return wrapper


def main() -> None:
    start = time.perf_counter()
    from genbench import store
    from genbench.cli import main as genbench
    from genbench.registry import resolve
    from genbench.runner import cell, core

    R = core.Runner
    R.run_units = timed(R.run_units, "run_units (everything after setup)")
    R._fit_side_by_side = timed(R._fit_side_by_side, "fit side by side")
    R._fit_or_load = timed(R._fit_or_load, "fit or load alone")
    R._run_unit = timed(R._run_unit, "units (sampling, timing, dispatch)")
    R._evaluate = timed(R._evaluate, "evaluate (here, or its dispatch)")
    R._sample_cell = timed(R._sample_cell, "cells (sample, NFE, time, save)")
    R._drain = timed(R._drain, lambda self, block=False: "drain (final, blocking)" if block else "drain")
    core.measure = timed(core.measure, "cell.measure")
    cell.time_call = timed(cell.time_call, "time_call")
    store.RunDir.save_samples = timed(store.RunDir.save_samples, "save_samples")
    for entry in resolve(["diffusion", "cm-cd", "cm-ct", "vae", "flow"]):
        if "trajectory_sample" in entry.cls.__dict__:
            entry.cls.trajectory_sample = timed(entry.cls.trajectory_sample, "trajectories")
    try:
        sys.argv = ["genbench"] + sys.argv[1:]
        genbench()
    finally:
        print(f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for k in sorted(T, key=T.get, reverse=True):
            print(f"{k:36s} {T[k]:8.1f} s {N[k]:6d} calls", file=sys.stderr)


if __name__ == "__main__":
    main()
