"""Wall time of scoring one cell: the chosen metric set applied to n samples against a reference
sample of n points, per dataset, median of several calls after one warm-up (one CPU thread by
default; the GPU-capable metrics run on --device).

    python benchmarks/score_time.py                                  # default metrics, n = 2000, CPU
    python benchmarks/score_time.py --n 20000 --metrics all --device cuda
"""
import argparse
import statistics
import time

import torch

from genbench import datasets, scoring
from genbench.timing import synchronize

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=2000)
p.add_argument("--metrics", default="default")
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--datasets", default="all")
a = p.parse_args()
torch.set_num_threads(a.threads)
names = scoring.parse_metrics(a.metrics)
dsets = list(datasets.DATASETS) if a.datasets == "all" else a.datasets.split(",")
print(f"n = {a.n}, metrics {','.join(names)}, device {a.device}, {torch.get_num_threads()} CPU thread(s), "
      f"median of {a.repeats} after a warm-up")
totals = []
for name in dsets:
    ds = datasets.get(name)
    ref, x = ds.sample(a.n, [0, 1]), ds.sample(a.n, [0, 9])
    per: dict[str, list] = {m: [] for m in names}
    for rep in range(a.repeats + 1):
        for m in names:
            synchronize(a.device)
            t0 = time.perf_counter()
            _, errors = scoring.score(x, ref, ds, [m], device=a.device)
            synchronize(a.device)
            if rep:
                per[m].append(time.perf_counter() - t0)
            if errors and rep == 0:
                print(f"  {name} {m}: {errors[m]}")
    med = {m: statistics.median(v) for m, v in per.items()}
    totals.append(sum(med.values()))
    print(f"{name:13s} total {sum(med.values()):7.3f} s  " + "  ".join(f"{m} {v:.3f}" for m, v in med.items()))
print(f"max over datasets: {max(totals):.3f} s per cell")
