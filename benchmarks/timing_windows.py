"""How long a cell's timed calls must last: ``time_call`` of ``sample(2000)`` through the CUDA-graph
path, repeated 5 times for each window (minimum timed seconds) and case, first with nothing else
running and then with LOAD processes spinning on the other CPU cores (what a grid's scoring
processes do). Prints each repeat's median and minimum per call.

    python benchmarks/timing_windows.py [--load 14] [--windows 0.02,0.05,0.25]

Models: quick-budget diffusion and cm-cd on ring8 (weights do not change the cost).
"""
import argparse
import multiprocessing as mp
import time

from genbench import datasets
from genbench.models.consistency import ConsistencyDistillation
from genbench.models.diffusion import Diffusion
from genbench.timing import time_call


def spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x += i * i


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", type=int, default=14)
    ap.add_argument("--windows", default="0.02,0.05,0.25")
    args = ap.parse_args()
    data = datasets.RING8.sample(20000, [0, 0])
    teacher = Diffusion(budget="quick")
    teacher.fit(data, device="cuda", seed=0)
    cd = ConsistencyDistillation(budget="quick")
    cd.fit(data, device="cuda", seed=0, teacher=teacher)
    cases = {"cm-cd 1": lambda: cd.sample(2000, steps=1, seed=3), "cm-cd 2": lambda: cd.sample(2000, steps=2, seed=3),
             "diffusion 10": lambda: teacher.sample(2000, steps=10, seed=3),
             "diffusion 100": lambda: teacher.sample(2000, steps=100, seed=3)}
    for f in cases.values():  # eager, then captured: later calls replay
        f(), f(), f()
    for load in (0, args.load):
        stop = mp.Event()
        procs = [mp.Process(target=spin, args=(stop,)) for _ in range(load)]
        for p in procs:
            p.start()
        time.sleep(0.5)
        for window in map(float, args.windows.split(",")):
            for name, f in cases.items():
                runs = [time_call(f, device="cuda", min_time=window) for _ in range(5)]
                print(f"load {load:2d}  window {window:.2f} s  {name:14s} median ms "
                      f"{' '.join(f'{t.median * 1e3:.4f}' for t in runs)}  min ms "
                      f"{' '.join(f'{t.min * 1e3:.4f}' for t in runs)}", flush=True)
        stop.set()
        for p in procs:
            p.join()


if __name__ == "__main__":
    main()
