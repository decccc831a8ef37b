"""Scoring throughput of P worker processes (one thread each), as a GPU run's scoring processes
work: cells of n samples scored against n reference points, 3 P cells (at least 8) over the
datasets, after one warm-up cell per process. Prints cells per second and the median time of a
cell in each process.

    python benchmarks/score_throughput.py --processes 1,8,14 --metrics w2 --metrics default
"""
import argparse
import multiprocessing as mp
import statistics
import time

from genbench import datasets


def _init():
    import torch

    torch.set_num_threads(1)
    import ot  # noqa: F401 - imported before timing, as a scoring process has it

    from genbench import scoring  # noqa: F401


def _cell(args):
    from genbench import scoring

    name, seed, n, metrics = args
    ds = datasets.get(name)
    x, ref = ds.sample(n, [seed, 9]), ds.sample(n, [seed, 1])
    t0 = time.perf_counter()
    scoring.score(x, ref, ds, metrics)
    return time.perf_counter() - t0


def main() -> None:
    from genbench import scoring

    p = argparse.ArgumentParser()
    p.add_argument("--processes", default="1,8,14")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--metrics", action="append", help="a metric set (repeatable); default: the default set")
    a = p.parse_args()
    names = list(datasets.DATASETS)
    for spec in a.metrics or ["default"]:
        metrics = scoring.parse_metrics(spec)
        for procs in (int(v) for v in a.processes.split(",")):
            cells = [(names[i % len(names)], i, a.n, metrics) for i in range(max(8, 3 * procs))]
            with mp.get_context("spawn").Pool(procs, initializer=_init) as pool:
                pool.map(_cell, cells[:procs])
                t0 = time.perf_counter()
                each = pool.map(_cell, cells)
                wall = time.perf_counter() - t0
            print(f"{','.join(metrics)}: {procs} processes, {len(cells)} cells of n = {a.n} in {wall:.1f} s = "
                  f"{len(cells) / wall:.2f} cells/s; a cell {statistics.median(each):.2f} s (median)", flush=True)


if __name__ == "__main__":
    main()
