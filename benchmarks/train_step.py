"""Training step time of each built-in family on CUDA: eager against the step captured in a CUDA
graph (``fit_loop``'s default on CUDA). Each fit is timed whole (``FitInfo.train_s``, which includes
the eager warm-up steps and the capture); models alternate between the two forms in one process.

    python benchmarks/train_step.py [--steps 2000] [--rounds 3] [--side-by-side 8,24]

``--side-by-side``: diffusion fits of that many members at once (one stacked network), their time
per step for the group and per member, and the group's peak GPU memory.
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
    ap.add_argument("--side-by-side", default="")
    ap.add_argument("--models", default="diffusion,cm-cd,cm-ct,vae,flow")
    args = ap.parse_args()
    data = datasets.RING8.sample(50000, [0, 1])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} steps, median of {args.rounds}")
    print("| model | eager ms/step | graph ms/step | speed-up |\n|---|--:|--:|--:|")
    teacher = None
    for name in args.models.split(","):
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
    if args.side_by_side:
        side_by_side([int(m) for m in args.side_by_side.split(",")], args.steps)


def side_by_side(sizes: list[int], steps: int) -> None:
    from genbench.models.diffusion import Diffusion

    print("\n| diffusion members | group ms/step | per member ms/step | peak GPU memory (MiB) |\n|--:|--:|--:|--:|")
    for m in sizes:
        datas = [datasets.RING8.sample(50000, [s, 0]) for s in range(m)]
        models = [Diffusion(params={"train_steps": str(steps)}) for _ in range(m)]
        torch.cuda.reset_peak_memory_stats()
        infos = Diffusion.fit_side_by_side(models, datas, device="cuda", seeds=list(range(m)))
        group = infos[0].extras["group_train_s"] / steps
        print(f"| {m} | {group * 1e3:.3f} | {group / m * 1e3:.4f} | {torch.cuda.max_memory_allocated() / 2**20:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
