"""Training step time of a side-by-side group on CUDA: 24 members of one family at the converged
preset, each at its own learning rate (member rates on, as the plateau anneal turns them on in a
converged run), the step captured in a CUDA graph. The group's wall time (``group_train_s``,
warm-up steps and capture included) over its steps.

    python benchmarks/group_step.py [--models flow,vae,gan,diffusion] [--steps 3000] [--members 24] [--member-beta1]
                                    [--batches B[,B...]] [--replay window,step] [--rounds 1] [--pacgan PACK]
                                    [--at-once 1,4,8 [--processes]] [--together [--first MODEL]
                                    [--main-sample MODEL [--switch-interval S,...]]] [--profile]
                                    [--device cuda]

``--replay window,step`` times each model with a logged window captured as one graph (the default,
``train.WINDOW_REPLAY``) and with one step a replay, alternating, ``--rounds`` times each.

``--batches 256,512,1024``: the members' batches in turn (a batch is a member field of a family
whose loss is a mean over it: a member whose batch is smaller trains on its draws repeated up to the
group's largest); against ``--batches B --members M/3`` for each B, one mixed group's step against
the three groups a knob outside the member fields would make.

``--at-once 1,4,8`` trains that many such groups at the same time, each in a thread of its own on a
CUDA stream of its own (as a grid's or a tune's groups at once), and prints the wall from the first
group's start to the last one's end, each group's pace and the groups' steps a second together
against one group alone; ``--processes`` puts each group in a process of its own instead (its own
interpreter: the groups then share no interpreter lock, but the GPU time-slices between processes).
Together they say what bounds groups at once: the GPU, or the one interpreter that launches them.

``--together`` trains one group of each model at the same time (threads, a CUDA stream each: a grid's
groups at once), after each alone, and prints each group's pace alone and together and the wall of
the whole; ``--first MODEL`` gives that model's group a high-priority stream (the GPU schedules its
kernels before the others': a grid's longest group, its critical path). Run it with and without
``CUDA_DEVICE_MAX_CONNECTIONS=32`` in the environment (the GPU's hardware queues, 8 by default, that
the streams share) to see whether the groups' streams wait on each other there.
``--main-sample MODEL`` has the main thread, meanwhile, do what a run's thread does with each fitted
unit while the other groups train: read a fitted MODEL back from its checkpoint's bytes (onto the
GPU) and sample 3,000 points (eager, the preset's steps), again and again; it prints the medians of
both alone and while the groups train. ``--switch-interval 0.005,0.001``: the interpreter's switch
interval (``sys.setswitchinterval``) for each such round in turn, to tell the interpreter lock
(what a thread waits for between the small operations of its Python loop) from the GPU's queues.

``--profile`` runs each model's group under torch's profiler and prints where the device's time
went: the kernels by total time (their count per training step, their share), and the kernels a
step launches in all. What a faster step has to cut: the member count's share (each member's own
random draws are kernels of their own) against the matmuls' and the element-wise work's.

To compare two versions of genbench side by side, run it alternately with each on PYTHONPATH
(``git archive REV genbench | tar -x -C /tmp/old``; ``PYTHONPATH=/tmp/old python benchmarks/group_step.py``):
the line says which source it ran.
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch

import genbench
from genbench import datasets
from genbench.registry import resolve
from genbench.runner import NFECounter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="flow,vae,gan,diffusion")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--members", type=int, default=24)
    ap.add_argument("--member-beta1", action="store_true",
                    help="each member its own Adam beta1 (MemberAdam; a model with beta1 among its member fields)")
    ap.add_argument("--batches", default="", help="B[,B...]: the members' batch sizes in turn (default: the preset's)")
    ap.add_argument("--replay", default="window", help="window, step, or both in turn (window,step)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pacgan", type=int, default=0, metavar="PACK",
                    help="gan only: at the PacGAN reproduction's settings with this packing degree")
    ap.add_argument("--at-once", default="", help="K[,K...]: that many groups trained at the same time (threads)")
    ap.add_argument("--processes", action="store_true", help="with --at-once: each group in a process of its own")
    ap.add_argument("--together", action="store_true", help="one group of each model at the same time (threads)")
    ap.add_argument("--first", default="", help="with --together: this model's group on a high-priority stream")
    ap.add_argument("--main-sample", default="", metavar="MODEL",
                    help="with --together: the main thread reads back and samples a fitted MODEL meanwhile")
    ap.add_argument("--switch-interval", default="", help="with --main-sample: S[,S...] seconds, a round each")
    ap.add_argument("--profile", action="store_true", help="the kernels each model's group spends its time in")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of this script)")
    args = ap.parse_args()
    if args.at_once:
        return at_once(args)
    if args.together:
        return together(args)
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
        sizes = args.batches.split(",") if args.batches else []
        batch = lambda i: {"batch": sizes[i % len(sizes)]} if sizes else {}  # noqa: E731
        for _ in range(args.rounds):
            for replay in args.replay.split(","):
                if replay not in ("window", "step"):
                    raise SystemExit(f"--replay {replay!r}: valid: window, step")
                train.WINDOW_REPLAY = replay == "window"
                group = [cls(budget="converged", params=extra | {"train_steps": str(args.steps), "lr": str(base * (1 + 0.01 * i))}
                             | beta1(i) | batch(i)) for i in range(args.members)]
                with _profiled(args.profile, args.device, args.steps):
                    infos = cls.fit_side_by_side(group, datas, device=args.device, seeds=list(range(args.members)))
                g = infos[0].extras["group_train_s"]
                print(f"{genbench.__file__}: {name}{f' (PacGAN{args.pacgan})' if args.pacgan else ''} x{args.members}"
                      f"{' (a beta1 each)' if args.member_beta1 else ''}"
                      f"{f' (batches {args.batches} in turn)' if sizes else ''}, "
                      f"{args.steps} steps, a {replay} a replay: group {g:.2f} s, {g / args.steps * 1e3:.3f} ms/step "
                      f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
                      f"torch {torch.__version__})", flush=True)


class _profiled:
    """``with _profiled(on, device, steps)``: the block under torch's profiler where ``on``, then the
    kernels (on the CPU: the operators) by their total time, each with its launches a step."""

    def __init__(self, on: bool, device: str, steps: int):
        self.on, self.cuda, self.steps = on, device.startswith("cuda"), steps

    def __enter__(self):
        if self.on:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU])
            self.prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.on:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(*exc)
        if exc[0] is not None:
            return
        total = lambda e: getattr(e, "device_time_total" if self.cuda else "self_cpu_time_total", 0)  # noqa: E731
        events = [e for e in self.prof.key_averages() if total(e) > 0 and (not self.cuda or e.device_type.name == "CUDA")]
        whole = sum(total(e) for e in events) or 1
        launches = sum(e.count for e in events)
        print(f"  {'kernels' if self.cuda else 'operators'}: {launches / self.steps:.0f} a step, "
              f"{whole / 1e3 / self.steps:.3f} ms a step of device time; by total time:")
        for e in sorted(events, key=total, reverse=True)[:25]:
            print(f"  {total(e) / whole:6.1%}  {e.count / self.steps:7.1f}/step  {total(e) / max(e.count, 1):8.1f} us  {e.key[:110]}")


def together(args) -> None:
    """``--together``: each model's group alone, then all of them at once (``--first``'s on a
    high-priority stream); each group's pace in both, and the wall of the whole."""
    names = args.models.split(",")
    for name in names:
        if resolve([name])[0].cls.teacher is not None:
            raise SystemExit(f"{name}: a distilled model needs teachers; time its teacher's family instead")
    if args.first and args.first not in names:
        raise SystemExit(f"--first {args.first}: not one of --models {args.models}")
    alone = {}
    for name in names:
        _group(name, 100, args.members, 10_000, args.device)  # warm-up
        _, _, alone[name] = _group(name, args.steps, args.members, 0, args.device)
    if args.main_sample:
        unit = _fitted_bytes(args.main_sample, args.device)
        idle = [_read_and_sample(*unit, args.device) for _ in range(5)]
        print(f"main thread, {args.main_sample} read back and sampled (3,000 points), no group training: read "
              f"{np.median([r for r, _ in idle]) * 1e3:.1f} ms, sample {np.median([s for _, s in idle]) * 1e3:.1f} ms "
              f"(median of 5; switch interval {sys.getswitchinterval() * 1e3:g} ms)", flush=True)
        default = sys.getswitchinterval()
        for interval in [float(x) for x in args.switch_interval.split(",") if x] or [default]:
            sys.setswitchinterval(interval)
            threads, calls = _at_once(names, args).pop("threads"), []
            while any(t.is_alive() for t in threads):
                calls.append(_read_and_sample(*unit, args.device))
            print(f"  while the {len(names)} groups train (switch interval {interval * 1e3:g} ms): read "
                  f"{np.median([r for r, _ in calls]) * 1e3:.1f} ms, sample {np.median([s for _, s in calls]) * 1e3:.1f} ms "
                  f"(median of {len(calls)})", flush=True)
        sys.setswitchinterval(default)
    got = _at_once(names, args)
    for t in got.pop("threads"):
        t.join()
    t0 = min(s for s, _, _ in got.values())
    wall = max(e for _, e, _ in got.values()) - t0
    env = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default")
    print(f"{len(names)} groups of {args.members} at once, {args.steps} steps each"
          f"{f', {args.first} first' if args.first else ''} (CUDA_DEVICE_MAX_CONNECTIONS {env}; "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, torch {torch.__version__}): "
          f"wall {wall:.1f} s, the groups alone one after another {sum(alone.values()):.1f} s", flush=True)
    for name in names:
        _, e, g = got[name]
        print(f"  {name:10s} alone {alone[name] / args.steps * 1e3:6.2f} ms/step, together {g / args.steps * 1e3:6.2f} "
              f"ms/step, ended {e - t0:6.1f} s", flush=True)


def _at_once(names: list[str], args) -> dict:
    """One group of each model started at once in threads of their own: name -> (start, end,
    group_train_s) once each has ended, and "threads": the threads, started."""
    got = {}

    def run(name: str) -> None:
        got[name] = _group(name, args.steps, args.members, 0, args.device, high=name == args.first)

    got["threads"] = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in got["threads"]:
        t.start()
    return got


def _fitted_bytes(name: str, device: str) -> tuple:
    """A ``name`` model fitted briefly on ring8 (its class) and its checkpoint's bytes: what a run's thread reads back."""
    from genbench.store import torch_bytes

    cls = resolve([name])[0].cls
    model = cls(budget="converged", params={"train_steps": "200"})
    model.fit(datasets.get("ring8").sample(20000, [0, 0]), device=device, seed=0)
    return cls, torch_bytes(model.state_dict())


def _read_and_sample(cls, data: bytes, device: str) -> tuple[float, float]:
    """Seconds to read a model back from its checkpoint's bytes onto ``device``, and to sample 3,000 points."""
    from genbench.store import load_state

    t0 = time.perf_counter()
    model = cls(budget="converged")
    model.load_state_dict(load_state(data, device), device=device)
    t1 = time.perf_counter()
    with NFECounter(model.nfe_module):  # as a cell is sampled (cell.measure): its evaluations counted
        x = model.sample(3000, seed=1)
    x.detach().float().cpu().numpy()  # (on the host: the run's thread saves and scores it)
    return t1 - t0, time.perf_counter() - t1


def _group(name: str, steps: int, members: int, index: int, device: str, high: bool = False) -> tuple[float, float, float]:
    """One group of ``members`` (seeds of their own: ``index``) trained ``steps`` steps on its own CUDA
    stream (``high``: a high-priority one): (its start, its end, its group_train_s)."""
    import contextlib

    from genbench.models.graphs import own_stream

    cls = resolve([name])[0].cls
    base = float(cls(budget="converged").config.lr)
    seeds = [index * members + i for i in range(members)]
    datas = [datasets.get("ring8").sample(20000, [s, 0]) for s in seeds]
    group = [cls(budget="converged", params={"train_steps": str(steps), "lr": str(base * (1 + 0.01 * i))})
             for i in range(members)]
    cuda = device.startswith("cuda")
    with (own_stream(device, high=high) if cuda else contextlib.nullcontext()) as stream, \
            (torch.cuda.stream(stream) if cuda else contextlib.nullcontext()):
        start = time.time()
        infos = cls.fit_side_by_side(group, datas, device=device, seeds=seeds)
        if cuda:
            torch.cuda.current_stream().synchronize()
        end = time.time()
    return start, end, infos[0].extras.get("group_train_s", end - start)


def _in_process(queue, *a) -> None:
    torch.set_num_threads(1)
    _group(a[0], 100, a[2], 10_000, a[4])  # warm-up: the process's CUDA context, kernels' first loads
    queue.put(_group(*a))


def at_once(args) -> None:
    """``--at-once``: K groups of each model at the same time, for each K."""
    for name in args.models.split(","):
        if resolve([name])[0].cls.teacher is not None:
            raise SystemExit(f"{name}: a distilled model needs teachers; time its teacher's family instead")
        alone = None
        _group(name, 100, args.members, 10_000, args.device)  # warm-up (as each process's, below)
        for k in [int(x) for x in args.at_once.split(",")]:
            a = (name, args.steps, args.members)
            if args.processes:
                ctx = multiprocessing.get_context("spawn")
                q = ctx.Queue()
                procs = [ctx.Process(target=_in_process, args=(q, *a, i, args.device)) for i in range(k)]
                for p in procs:
                    p.start()
                got = [q.get() for _ in procs]
                for p in procs:
                    p.join()
            else:
                got = [None] * k

                def run(i: int) -> None:
                    got[i] = _group(*a, i, args.device)

                threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            wall = max(e for _, e, _ in got) - min(s for s, _, _ in got)
            rate = k * args.steps / wall
            alone = alone or rate
            pace = statistics.median(g / args.steps * 1e3 for _, _, g in got)
            print(f"{name} x{args.members}, {k} group(s) at once ({'processes' if args.processes else 'threads'}), "
                  f"{args.steps} steps each: wall {wall:.1f} s, a group's pace {pace:.2f} ms/step (median), "
                  f"{rate:.0f} group-steps/s together, {rate / alone:.2f}x the first line's "
                  f"({args.device}{': ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}, "
                  f"torch {torch.__version__})", flush=True)


if __name__ == "__main__":
    main()
