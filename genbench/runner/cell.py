"""The measurement of one cell: a fitted model and its dataset's reference sample in, the row's
figures out (network evaluations counted, sample calls timed, samples scored). Nothing here
touches a run dir or knows which model it measures."""
from __future__ import annotations

import threading

import numpy as np
import torch

from .. import scoring
from ..api import Diverged, Generator
from ..timing import time_call


class NFECounter:
    """Counts network evaluations, the forward calls of the declared ``nfe_module``, and checks the
    declaration. The rule: every outermost module call made meanwhile (one not made inside another
    module's forward) is a call of ``nfe_module`` or calls it inside (a wrapper, e.g. a
    preconditioning module around the network). An outermost call that never reaches it is work
    the declaration hides (a second network, say); its class names are collected in
    ``undeclared``. Uses torch's global module hooks, so it sees every module, including ones the
    generator does not hold as attributes; only the calls of the thread that made the counter
    count (groups that train in other threads meanwhile are not this sample's work)."""

    def __init__(self, module):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"nfe_module is {type(module).__name__}, not a torch.nn.Module")
        self.module, self.count, self.undeclared = module, 0, set()
        self.thread = threading.get_ident()
        self._stack: list[tuple[torch.nn.Module, int]] = []  # open module calls with the count at entry
        self.handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]

    def _pre(self, m, *_):
        if threading.get_ident() != self.thread:
            return
        if m is self.module:
            self.count += 1
        self._stack.append((m, self.count))

    def _post(self, m, *_):
        if threading.get_ident() != self.thread or not self._stack:
            return
        while self._stack:
            top, start = self._stack.pop()
            if top is m:
                break
        if not self._stack and m is not self.module and self.count == start:
            self.undeclared.add(type(m).__qualname__)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def cell_sample_seed(seed: int) -> int:
    """The seed of a cell's sample call (what ``measure`` scores and ``time_cell`` times)."""
    return 10_000 + seed


def measure(model: Generator, ds, seed: int, k, ref, row: dict, *, n: int, device: str, metrics: list[str],
            min_calls: int, min_time: float, timed: bool = True, extras: bool = True) -> tuple[np.ndarray, dict]:
    """Samples ``n`` points with ``k`` steps, counts the network evaluations against the model's
    declaration and times the sample call (``time_cell``) into ``row``; returns the samples and
    the arrays a cell's samples file holds (the samples, the reference, and a short trajectory or
    one-step map where the model has one). Non-finite samples end the cell as diverged (raised as
    Diverged), their metric columns in ``row`` empty, each with its reason. ``timed=False``: no
    timing here (``time_cell`` later, on a quiet device, or never); ``extras=False``: no trajectory
    or one-step map either."""
    sample_seed = cell_sample_seed(seed)
    with NFECounter(model.nfe_module) as counter:
        x = model.sample(n, steps=k, seed=sample_seed)
    declared = model.nfe(k)
    if counter.undeclared:
        raise RuntimeError(f"NFE declaration is false: {', '.join(sorted(counter.undeclared))} ran during sample "
                           f"outside nfe_module ({type(model.nfe_module).__name__}); nfe_module must be the "
                           "network every evaluation calls (or a module wrapping all of it)")
    if counter.count != declared:
        raise RuntimeError(f"NFE mismatch: declared {declared}, counted {counter.count} forward passes")
    x = x.detach().float().cpu().numpy()
    row["nfe"] = counter.count
    if timed:
        time_cell(model, seed, k, row, n=n, device=device, min_calls=min_calls, min_time=min_time)
    if not np.isfinite(x).all():
        values, errors = scoring.score(x, ref, ds, metrics, seed=seed, device="cpu")
        row |= values | {"metric_errors": errors or None}
        raise Diverged(f"{int((~np.isfinite(x)).any(1).sum())} of {n} samples are not finite")
    arrays = {"x": x, "ref": ref}
    caps = model.capabilities() if extras else set()
    if "trajectory" in caps:
        arrays["trajectory"] = np.asarray(model.trajectory_sample(64, steps=k, seed=sample_seed))
    if "one-step map" in caps:
        arrays["one_step_map"] = np.asarray(model.one_step_map(64, steps=k, seed=sample_seed))
    return x, arrays


def time_cell(model: Generator, seed: int, k, row: dict, *, n: int, device: str, min_calls: int,
              min_time: float) -> None:
    """Times the cell's sample call (``timing.time_call``: the same call ``measure`` samples with)
    into ``row``."""
    t = time_call(lambda: model.sample(n, steps=k, seed=cell_sample_seed(seed)), device=device, min_calls=min_calls,
                  min_time=min_time)
    row |= {"sample_s": t.median, "sample_s_min": t.min, "sample_s_iqr": t.iqr, "sample_calls": t.calls,
            "sample_calls_per_block": t.per_block, "sample_min_time_s": min_time}
