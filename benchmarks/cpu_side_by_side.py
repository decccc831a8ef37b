"""Diffusion fits on the CPU, one thread: M solo fits one after another against the same M fitted
side by side as one stacked network (``fit_side_by_side``), alternating in each round.

    python benchmarks/cpu_side_by_side.py [--members 8] [--steps 300] [--rounds 3]
"""
import argparse
import statistics
import time

import torch

from genbench import datasets
from genbench.models.diffusion import Diffusion


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m, params = args.members, {"train_steps": str(args.steps)}
    datas = [datasets.RING8.sample(20000, [s, 0]) for s in range(m)]
    solo, side = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        for s in range(m):
            Diffusion(params=params).fit(datas[s], device="cpu", seed=s)
        solo.append(time.perf_counter() - t)
        t = time.perf_counter()
        Diffusion.fit_side_by_side([Diffusion(params=params) for _ in range(m)], datas, device="cpu", seeds=list(range(m)))
        side.append(time.perf_counter() - t)
        print(f"round {r}: {m} solo fits {solo[-1]:.2f} s, side by side {side[-1]:.2f} s", flush=True)
    s, g = statistics.median(solo), statistics.median(side)
    print(f"median of {args.rounds}: solo {s:.2f} s, side by side {g:.2f} s ({s / g:.2f}x); "
          f"{args.steps} steps, 1 thread, torch {torch.__version__}")


if __name__ == "__main__":
    main()
