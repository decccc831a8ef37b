"""Where a `genbench run` spends its wall time: the run's own command, with wall-time accumulators
wrapped around the runner's phases (fitting side by side and alone, the evaluations during
training, the models' `evaluate`, the cells' sampling and timing, trajectories, samples files, and
the wait for the scoring processes),
printed to stderr at the end, for a run in one fit process (the GPU default; `--jobs 1` on the
CPU: worker processes are not wrapped). Phases nest (a cell's timing is inside its unit); the final blocking
drain is the wait for the scoring processes after the last cell.

    python benchmarks/grid_phases.py run --models diffusion,cm,vae,flow ... --out DIR > /dev/null
    python benchmarks/grid_phases.py tune --models diffusion ... --out DIR > /dev/null

Groups trained at once run in threads: their phases overlap, so the accumulators can add up to
more than the wall time.
"""
import collections
import signal
import sys
import time

T: dict = collections.defaultdict(float)
N: collections.Counter = collections.Counter()


def timed(fn, label):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        ended = "stopped after"  # an exception (a stop request, an interrupt) ended it
        try:
            out = fn(*a, **k)
            ended = "fitted in"
            return out
        finally:
            key = label(*a, **k) if callable(label) else label
            T[key] += time.perf_counter() - t0
            N[key] += 1
            if key.startswith("group "):  # each group as it ends: a run stopped early still says where it was
                print(f"[{time.perf_counter() - START:7.1f} s] {key} {ended} {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
    return wrapper


START = time.perf_counter()


def main() -> None:
    start = START
    # a run stopped by `timeout` (SIGTERM) prints its split too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from genbench import store
    from genbench.cli import main as genbench
    from genbench.registry import resolve
    from genbench.models import train
    from genbench.runner import cell, core, fits, scoring_pool

    S, F, P = core.Session, fits.FitStore, scoring_pool.Scorer
    S.run_units = timed(S.run_units, "run_units (everything after setup)")
    F.fit_side_by_side = timed(F.fit_side_by_side, "fit side by side")
    F.fit_group = timed(F.fit_group, lambda self, chunk: f"group {chunk[0][0].model} ({len(chunk)} fits)")
    F.fit_or_load = timed(F.fit_or_load, "fit or load alone")
    S.run_unit = timed(S.run_unit, "units (sampling, timing, dispatch)")
    P.evaluate = timed(P.evaluate, "evaluate (here, or its dispatch)")
    S.sample_cell = timed(S.sample_cell, "cells (sample, NFE, time, save)")
    P.drain = timed(P.drain, lambda self, block=False: "drain (final, blocking)" if block else "drain")
    core.measure = timed(core.measure, "cell.measure")
    cell.time_call = timed(cell.time_call, "time_call")
    store.RunDir.save_samples = timed(store.RunDir.save_samples, "save_samples")
    train.Keeper.on_log = timed(train.Keeper.on_log, "evaluations during training (all groups)")
    train.Keeper._sample_together = timed(train.Keeper._sample_together, "members sampled at once (inside those)")
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
