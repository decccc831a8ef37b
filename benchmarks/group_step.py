"""Training step time of a side-by-side group on CUDA: 24 members of one family at the converged
preset, each at its own learning rate (member rates on, as the plateau anneal turns them on in a
converged run), the step captured in a CUDA graph. The group's wall time (``group_train_s``,
warm-up steps and capture included) over its steps.

    python benchmarks/group_step.py [--models flow,vae,gan,diffusion] [--steps 3000] [--members 24] [--member-beta1]
                                    [--replay window,step] [--rounds 1] [--pacgan PACK]

``--replay window,step`` times each model with a logged window captured as one graph (the default,
``train.WINDOW_REPLAY``) and with one step a replay, alternating, ``--rounds`` times each.

To compare two versions of genbench side by side, run it alternately with each on PYTHONPATH
(``git archive REV genbench | tar -x -C /tmp/old``; ``PYTHONPATH=/tmp/old python benchmarks/group_step.py``):
the line says which source it ran.
"""
import argparse

import torch

import genbench
from genbench import datasets
from genbench.registry import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="flow,vae,gan,diffusion")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--members", type=int, default=24)
    ap.add_argument("--member-beta1", action="store_true",
                    help="each member its own Adam beta1 (MemberAdam; a model with beta1 among its member fields)")
    ap.add_argument("--replay", default="window", help="window, step, or both in turn (window,step)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pacgan", type=int, default=0, metavar="PACK",
                    help="gan only: at the PacGAN reproduction's settings with this packing degree")
    args = ap.parse_args()
    from genbench.models import train

    datas = [datasets.get("ring8").sample(20000, [s, 0]) for s in range(args.members)]
    for name in args.models.split(","):
        cls = resolve([name])[0].cls
        if cls.teacher is not None:
            raise SystemExit(f"{name}: a distilled model needs teachers; time its teacher's family instead")
        extra = {}
        if args.pacgan:
            from genbench.reproduce import PACGAN

            extra = dict(PACGAN.params) | {"pack": str(args.pacgan)}
        base = float(cls(budget="converged", params=extra).config.lr)
        beta1 = lambda i: {"beta1": str(0.5 + 0.01 * i)} if args.member_beta1 else {}  # noqa: E731
        for _ in range(args.rounds):
            for replay in args.replay.split(","):
                if replay not in ("window", "step"):
                    raise SystemExit(f"--replay {replay!r}: valid: window, step")
                train.WINDOW_REPLAY = replay == "window"
                group = [cls(budget="converged", params=extra | {"train_steps": str(args.steps), "lr": str(base * (1 + 0.01 * i))}
                             | beta1(i)) for i in range(args.members)]
                infos = cls.fit_side_by_side(group, datas, device="cuda", seeds=list(range(args.members)))
                g = infos[0].extras["group_train_s"]
                print(f"{genbench.__file__}: {name}{f' (PacGAN{args.pacgan})' if args.pacgan else ''} x{args.members}"
                      f"{' (a beta1 each)' if args.member_beta1 else ''}, "
                      f"{args.steps} steps, a {replay} a replay: group {g:.2f} s, {g / args.steps * 1e3:.3f} ms/step "
                      f"({torch.cuda.get_device_name()}, torch {torch.__version__})", flush=True)


if __name__ == "__main__":
    main()
