"""Evaluation during training of a side-by-side group: its members' validation samples (2,000
points each, the validation sample's size) drawn one member at a time (``sample_now``, as a solo
fit draws) against all at once (``Keeper``'s vmapped pass over the stacked sampling weights,
``sample_parts``), at the converged preset's network and default sampling steps. Medians of
``--repeats`` rounds, the two alternating; the samples' sizes and the two paths' largest difference
are printed with them.

    python benchmarks/member_eval.py [--models diffusion,cm-ct,vae,flow,gan] [--members 24] [--device cpu]

On the CPU pass ``--threads`` (1 by default) and say so with the figures.
"""
import argparse
import statistics
import time

import torch

from genbench import datasets
from genbench.models.train import Keeper
from genbench.registry import resolve


class Args:
    """A monitor stand-in: what the group's evaluation asks each member for."""

    def __init__(self, seed: int):
        self.sample_args = (2000, 20_000 + seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="diffusion,cm-ct,vae,flow,gan")
    ap.add_argument("--members", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(datasets.DATASETS)[:8]
    for name in args.models.split(","):
        cls = resolve([name])[0].cls
        if cls.teacher is not None:
            raise SystemExit(f"{name}: a distilled model needs teachers; time its student's family (cm-ct) instead")
        group = [cls(budget="converged") for _ in range(args.members)]
        setups = [m.setup(datasets.get(names[i % 8]).sample(5000, [i // 8, 0]), device=args.device, seed=i // 8)
                  for i, m in enumerate(group)]
        keeper = Keeper(group, setups, [Args(i // 8) for i in range(args.members)], device=args.device)
        due = list(range(args.members))
        one, together = [], []
        for _ in range(args.repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            alone = [m.sample_now(*keeper.monitors[i].sample_args) for i, m in enumerate(group)]
            _sync(args.device)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            drawn = keeper._sample_together(due)
            _sync(args.device)
            together.append(time.perf_counter() - t0)
        diff = max(float((drawn[i] - alone[i]).abs().max()) for i in due)
        a, b = statistics.median(one), statistics.median(together)
        print(f"{name} x{args.members} ({args.device}, {args.threads} thread(s), torch {torch.__version__}): "
              f"one at a time {a * 1e3:.1f} ms, at once {b * 1e3:.1f} ms, {a / b:.2f}x; "
              f"largest difference {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
