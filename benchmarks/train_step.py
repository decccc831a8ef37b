"""Training step time of each built-in family on CUDA: eager against the step captured in a CUDA
graph (``fit_loop``'s default on CUDA). Each fit is timed whole (``FitInfo.train_s``, which includes
the eager warm-up steps and the capture); models alternate between the two forms in one process.

    python benchmarks/train_step.py [--steps 2000] [--rounds 3]
"""
import argparse
import statistics

import torch

from genbench import datasets
from genbench.registry import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = datasets.RING8.sample(50000, [0, 1])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} steps, median of {args.rounds}")
    print("| model | eager ms/step | graph ms/step | speed-up |\n|---|--:|--:|--:|")
    teacher = None
    for name in ("diffusion", "cm-cd", "cm-ct", "vae", "flow"):
        cls = resolve([name])[0].cls
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for graph in (True, False):
                m = cls(params={"train_steps": str(args.steps), "cuda_graph": str(graph).lower()})
                kw = {"teacher": teacher} if name == "cm-cd" else {}
                times[graph].append(m.fit(data, device="cuda", seed=0, **kw).train_s / args.steps)
                if name == "diffusion":
                    teacher = m
        g, e = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {name} | {e * 1e3:.3f} | {g * 1e3:.3f} | {e / g:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
