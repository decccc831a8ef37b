"""The host's cost of one evaluation during training of a stacked fit, beyond drawing and scoring the
samples: each due member's weights written into its modules and stacked again, and each best copied
from its module (``Keeper`` before), against slices of the fit's own stacked weights and one index
copy a tensor for the bests (``Keeper``'s stacked view). A group of ``--members`` trains
``--steps`` steps with a monitor due at every window that asks for ``--points`` points and calls
every evaluation the best; the medians of ``--rounds`` rounds of the time spent in ``Keeper.on_log``,
per evaluation, the two paths alternating (the members drawn at once on this device too).

    python benchmarks/evaluation_overhead.py [--model vae] [--members 80] [--steps 500] [--points 10] [--device cpu]

On the CPU pass ``--threads`` (1 by default) and say so with the figures."""
import argparse
import statistics
import time

import torch

from genbench import datasets
from genbench.api import Monitor, Verdict
from genbench.models import train
from genbench.registry import resolve


class EveryWindow(Monitor):
    def __init__(self, points: int, seed: int):
        self.sample_args = (points, seed)

    def due(self, step):
        return True

    def evaluate(self, step, sample, train_s=None):
        sample(*self.sample_args)
        return Verdict(best=True, stop=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vae")
    ap.add_argument("--members", type=int, default=80)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train.EVALUATE_TOGETHER_ON = ("cuda", "cpu")
    cls = resolve([args.model])[0].cls
    datas = [datasets.get("ring8").sample(2000, [i, 0]) for i in range(args.members)]
    on_log = train.Keeper.on_log
    spent: list[float] = []

    def timed(self, k, t, sync=None, stacked=None, view=True):
        t0 = time.perf_counter()
        try:
            return on_log(self, k, t, sync, stacked if view else None)
        finally:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - t0)

    out = {True: [], False: []}
    for _ in range(args.rounds):
        for view in (True, False):
            train.Keeper.on_log = lambda self, k, t, sync=None, stacked=None, view=view: timed(self, k, t, sync, stacked, view)
            spent.clear()
            group = [cls(budget="converged", params={"train_steps": str(args.steps)}) for _ in range(args.members)]
            cls.fit_side_by_side(group, datas, device=args.device, seeds=list(range(args.members)),
                                 monitors=[EveryWindow(args.points, i) for i in range(args.members)])
            out[view].append(statistics.median(spent))
    a, b = statistics.median(out[False]), statistics.median(out[True])
    print(f"{args.model} x{args.members}, {args.points} points a member ({args.device}, {args.threads} thread(s), "
          f"torch {torch.__version__}): an evaluation's Keeper.on_log {a * 1e3:.1f} ms written back and stacked, "
          f"{b * 1e3:.1f} ms from the stacked weights ({a / b:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
