"""The training base of torch families: ``TorchGenerator`` and the loop under it.

A family (built-in or plugin) subclasses ``TorchGenerator`` and provides three hooks:

- ``setup(data, *, device, seed, teacher)``: builds its networks (seeded), standardises the data
  and returns a ``Setup``: the standardised data, the torch.Generator its batches draw from, the
  module whose parameters are trained, and what is kept beside it (an EMA copy, a target copy, a
  frozen network such as a distillation teacher's denoiser);
- ``draws(x0, g)``: one step's random numbers (data indices, noise, levels), drawn from ``g`` in a
  fixed order;
- ``loss(nets, context, x0, *draws)``: the step's scalar loss, computed from the draws alone
  (elementwise in them), where ``nets`` runs the networks (``nets(...)`` the trained module,
  ``nets.target(...)``, ``nets.frozen(...)``) and ``context`` is ``step_context(k, t)``.

and optionally ``phase(k)`` (the loss changes with the step k only through it: one captured graph
per phase) and ``step_context(k, t)`` (values every member of a step shares, computed from the
phase or from ``t``, the step as a number or a 0-dim device tensor).

On these hooks the base writes once: ``fit`` (Adam, warm-up + cosine schedule, gradient clipping,
the divergence check, the loss curve, EMA and target updates), ``fit_side_by_side`` (the members
stacked into one network and the loss vmapped over them, each member with its solo fit's draws,
clipping and shadows) and, on CUDA, the training step captured in a CUDA graph and replayed.
The config must have ``train_steps`` and ``lr``; ``cuda_graph`` (default true), ``clip`` (1.0),
``warmup`` (200), ``log_every`` (50), Adam's ``beta1`` (0.9) and ``beta2`` (0.999), and ``schedule``
(one of ``SCHEDULES``; default ``cosine``, and ``plateau`` at the converged budget) are read where it
has them.

``fit_loop``'s ``on_log(k, train_s)`` is called at the end of every logged window (evaluation
during training; ``train_s`` the loop's training seconds so far, the evaluations left out), and
``TorchGenerator.member_fields`` names the config fields that members of one side-by-side fit may
differ in (the learning rate: each member its own, for tuning trials fitted together).
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..api import CONVERGED, Diverged, FitInfo, Generator
from . import graphs
from .nets import ema_update


@dataclass
class Setup:
    """What ``TorchGenerator.setup`` returns: the fit's data and what it trains and keeps."""

    x0: torch.Tensor  #: the training data, standardised, on the device
    generator: torch.Generator  #: the generator every draw of the fit comes from
    trained: nn.Module  #: the module whose parameters the optimiser updates
    ema: nn.Module | None = None  #: a copy moved towards the trained weights after each step
    #: the EMA's decay: a number, or a function of t (the step as a number or 0-dim tensor; see ``at_most``)
    ema_decay: float | Callable[[Any], Any] = 0.999
    target: nn.Module | None = None  #: a target copy (``nets.target``), moved with ``target_decay``
    target_decay: float = 0.0
    frozen: nn.Module | None = None  #: a network that is not trained (``nets.frozen``), e.g. a teacher's


class Nets:
    """A solo fit's networks as the loss sees them (a stacked fit passes a ``Member`` instead)."""

    def __init__(self, setup: Setup):
        self.setup = setup

    def __call__(self, *args):
        return self.setup.trained(*args)

    def target(self, *args):
        return (self.setup.target or self.setup.trained)(*args)

    def frozen(self, *args):
        return self.setup.frozen(*args)


class Member:
    """One member's networks inside a stacked fit's vmapped loss: the same calls as ``Nets``, each a
    ``functional_call`` of the shared module structure on the member's slice of the stacked weights."""

    def __init__(self, shell, params, buffers, target_params, frozen_shell, frozen_state):
        self.shell, self.params, self.buffers = shell, params, buffers
        self.target_params, self.frozen_shell, self.frozen_state = target_params, frozen_shell, frozen_state

    def __call__(self, *args):
        return functional_call(self.shell, (self.params, self.buffers), args)

    def target(self, *args):
        return functional_call(self.shell, (self.target_params or self.params, self.buffers), args)

    def frozen(self, *args):
        return functional_call(self.frozen_shell, self.frozen_state, args)


@dataclass
class SampleParts:
    """A model's sample in parts that the members of a stacked fit can take all at once (one
    vmapped pass instead of one pass a member: ``Keeper``): ``draws``, the random tensors its sample
    draws, in its order and from its generator; ``map(module, *draws)``, the rest, as a function of
    the module sampling reads (``Setup.ema``, else ``Setup.trained``), in the model's standardised
    units; ``back``, from those units to the data's."""

    draws: tuple
    map: Callable
    back: Callable


class _Bound(nn.Module):
    """``map(module, *draws)`` as a module's forward: ``functional_call`` on it swaps the inner
    module's weights for a member's."""

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *draws):
        return self.fn(self.module, *draws)


class TorchGenerator(Generator):
    """The base of torch families: implement ``setup``, ``draws`` and ``loss`` (module docstring);
    ``fit`` and ``fit_side_by_side`` (with graph capture on CUDA) come from here."""

    #: config fields in which the members of one side-by-side fit may differ: the learning rate
    #: (each member's own, ``fit_loop``); a family adds fields its hooks read per member (``draws``
    #: is called on each member's own model). Training knobs only: members evaluated at once
    #: (``sample_parts``) sample through the first member's map. ``batch`` may be one where the loss
    #: is a mean over the batch's points: a member whose batch divides the group's largest trains on
    #: its own draws repeated up to it (``repeat_draws``), the same mean, so the same step
    member_fields: tuple[str, ...] = ("lr",)
    #: fit takes monitor= (evaluation during training, stopping, the best weights kept)
    monitored = True
    #: fit takes snapshots= (a fit stopped in its middle continues from its last snapshot)
    resumable = True

    # -- the hooks ------------------------------------------------------------------------------
    def setup(self, data, *, device: str, seed: int, teacher: Generator | None = None) -> Setup:
        raise NotImplementedError

    def draws(self, x0: torch.Tensor, g: torch.Generator) -> tuple:
        raise NotImplementedError

    def loss(self, nets, context, x0: torch.Tensor, *draws) -> torch.Tensor:
        raise NotImplementedError

    #: the step's phase: the loss changes with k only through it (None: one phase for the whole fit)
    phase: Callable[[int], Any] | None = None

    def member_value(self, name: str, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Config field ``name`` as a 0-dim tensor on ``device``, made once (no kernel per step): what
        ``draws`` returns for ``loss`` where the field is a member field (each member its own)."""
        cache = self.__dict__.setdefault("_member_values", {})
        value = cache.get((name, dtype))
        if value is None or value.device != torch.device(device):
            value = cache[(name, dtype)] = torch.tensor(float(getattr(self.config, name)), device=device, dtype=dtype)
        return value

    def repeat_draws(self, draws: tuple, times: int) -> tuple:
        """One step's ``draws`` for a batch ``times`` as large: each tensor whose first dimension is
        the batch repeated along it (the same points ``times`` over: a loss that is their mean is
        unchanged, and so are its gradients), the others (a member value) as they are. What a
        member of a stacked fit whose batch is smaller than the group's trains on; a family whose
        draws are shaped otherwise overrides it."""
        b = self.config.batch
        return tuple(d.repeat(times, *[1] * (d.dim() - 1)) if d.dim() and d.shape[0] == b else d for d in draws)

    def sample_parts(self, n: int, seed: int) -> SampleParts | None:
        """``sample_now(n, seed)`` in parts (``SampleParts``: the same points), for evaluating the
        members of a stacked fit at once; None (the default): they are sampled one by one."""
        return None

    def step_context(self, k: int, t):
        """Values that every member of step k shares, passed to ``loss`` (default: None). Within a
        captured graph it is computed once per phase, with the phase's first k, and ``t`` is the
        step as a 0-dim device tensor: depend on k only through ``phase`` and on t by arithmetic."""
        return None

    # -- written once on them -------------------------------------------------------------------
    def _loop_settings(self) -> dict:
        c = self.config
        return dict(steps=c.train_steps, lr=c.lr, device=None, cuda_graph=getattr(c, "cuda_graph", True),
                    clip=getattr(c, "clip", 1.0), warmup=getattr(c, "warmup", 200),
                    log_every=getattr(c, "log_every", 50), phase=self.phase,
                    betas=(getattr(c, "beta1", 0.9), getattr(c, "beta2", 0.999)),
                    schedule=getattr(c, "schedule", "plateau" if self.budget == CONVERGED else "cosine"))

    def continues_to_longer_caps(self) -> bool:
        """The plateau schedule (the converged budget's) makes the fit's path independent of its cap:
        a constant rate after the warm-up, each fit's decay begun by its own validation curve."""
        return self._loop_settings()["schedule"] == "plateau"

    def cap_grain(self) -> int:
        """The logged window (``log_every``): the loss curve's points and the evaluations fall on its ends."""
        return self._loop_settings()["log_every"]

    def sample_now(self, n: int, seed: int):
        """``sample(n, seed=)`` from the weights as they are now, mid-fit: eagerly (a captured
        sampling loop would hold copies of earlier weights), without gradients."""
        config = self.config
        if getattr(config, "cuda_graph", False):
            self.config = dataclasses.replace(config, cuda_graph=False)
        try:
            with torch.no_grad():
                return self.sample(n, seed=seed)
        finally:
            self.config = config

    def fit(self, data, *, device: str = "cpu", seed: int = 0, teacher: Generator | None = None,
            monitor=None, snapshots: Snapshots | None = None) -> FitInfo:
        s = self.setup(data, device=device, seed=seed, teacher=teacher)
        settings = self._loop_settings() | {"device": device}
        keeper = Keeper([self], [s], [monitor], settings, device) if monitor is not None else None
        nets = Nets(s)
        if snapshots is not None:  # the modules whole (buffers too: ActNorm's flag), then the evaluation's
            modules = [m for m in (s.trained, s.ema, s.target) if m is not None]
            snapshots.add("modules", lambda: [{k: v.to("cpu", copy=True) for k, v in m.state_dict().items()}
                                              for m in modules],
                          lambda saved: [m.load_state_dict(st) for m, st in zip(modules, saved, strict=True)])
            if keeper:
                keeper.snapshot_part(snapshots)

        def loss_fn(k, t):
            return self.loss(nets, self.step_context(k, t), s.x0, *self.draws(s.x0, s.generator))

        def after_step(t):
            if s.ema is not None:
                ema_update(list(s.ema.parameters()), list(s.trained.parameters()), _decay(s.ema_decay, t))
            if s.target is not None:
                ema_update(list(s.target.parameters()), list(s.trained.parameters()), s.target_decay)

        info = fit_loop(s.trained.parameters(), loss_fn, after_step=after_step, generators=(s.generator,),
                        on_log=keeper.on_log if keeper else None, anneal=keeper.anneal if keeper else None,
                        on_diverge=keeper.on_diverge if keeper else None, snapshots=snapshots, **settings)
        if keeper:
            keeper.restore()
        return info

    @classmethod
    def fit_side_by_side(cls, models: list["TorchGenerator"], datas: list, *, device: str, seeds: list[int],
                         teachers: list | None = None, monitors: list | None = None,
                         snapshots: Snapshots | None = None) -> list:
        """Fits ``models`` (one config, but for ``member_fields``) as one stacked network
        (``fit_stacked``), each member from its own ``setup`` (seeded weights, data, teacher), drawing
        from its own generator in its solo fit's order, with its own clipping, EMA and target."""
        first = models[0]
        differ = {f.name for f in dataclasses.fields(first.config) for m in models
                  if getattr(m.config, f.name) != getattr(first.config, f.name)}
        if differ - set(cls.member_fields):
            raise ValueError(f"fits side by side need models of one config (they differ in {', '.join(sorted(differ))})")
        teachers = teachers if teachers is not None else [None] * len(models)
        if len(teachers) != len(models):
            raise ValueError("fits side by side need a teacher per model, or none")
        setups = [m.setup(d, device=device, seed=s, teacher=t) for m, d, s, t in zip(models, datas, seeds, teachers)]
        s0 = setups[0]
        frozen = None
        if s0.frozen is not None:
            frozen = [s.frozen for s in setups]
            if not all(isinstance(f, nn.Module) and type(f) is type(frozen[0]) for f in frozen):
                raise TypeError("the members' frozen networks are not modules of one structure; fit one by one")
        x0s = torch.stack([s.x0 for s in setups])
        rows = max(m.config.batch for m in models) if "batch" in cls.member_fields else None
        if rows is not None and any(rows % m.config.batch for m in models):
            raise ValueError(f"fits side by side: batches {sorted({m.config.batch for m in models})} do not all divide "
                             f"the largest ({rows}); group by batch_groups")

        def own(m, s):  # a member's draws, repeated up to the group's batch where its own is smaller
            d = m.draws(s.x0, s.generator)
            return d if rows is None or m.config.batch == rows else m.repeat_draws(d, rows // m.config.batch)

        def draw(k, t):
            return (x0s, *stack_draws(own(m, s) for m, s in zip(models, setups)))

        settings = first._loop_settings() | {"device": device, "lr": [m.config.lr for m in models]}
        if "beta1" in cls.member_fields:  # each member's own (MemberAdam)
            settings["betas"] = ([m.config.beta1 for m in models], settings["betas"][1])
        keeper = Keeper(models, setups, monitors, settings, device) if monitors is not None else None
        if keeper and snapshots is not None:
            keeper.snapshot_part(snapshots)
            keeper.shed = snapshots.shed
        infos = fit_stacked([s.trained for s in setups], lambda member, context, *batch: first.loss(member, context, *batch),
                            draw, context=first.step_context, generators=tuple(s.generator for s in setups),
                            ema=[s.ema for s in setups] if s0.ema is not None else None,
                            ema_decay=lambda t: _decay(s0.ema_decay, t),
                            target=[s.target for s in setups] if s0.target is not None else None,
                            target_decay=[s.target_decay for s in setups], frozen=frozen, evaluate=keeper,
                            anneal=keeper.anneal if keeper else None, snapshots=snapshots, **settings)
        if keeper:
            keeper.restore()
            if keeper.shed_at is not None:  # the state the members that go on continue from
                snapshots.shed_state = snapshots.state(keeper.shed_at)
                snapshots.shed_active = [i for i, (stopped, info) in enumerate(zip(keeper.stopped, infos))
                                         if not stopped and not isinstance(info, BaseException)]
        return infos


#: device types on which the members of a stacked fit are evaluated in one vmapped pass
#: (``Keeper``); on the CPU, where the batched matmuls were measured slower than one member at a
#: time (``benchmarks/member_eval.py``), each member samples on its own
EVALUATE_TOGETHER_ON = ("cuda",)


class Keeper:
    """Evaluation during training for fits (one, or the members of a stacked fit): at the end of
    each logged window, each fit whose monitor says an evaluation is due samples from its current
    weights (``sample_now``) and is evaluated; a best verdict keeps a copy of its sampling weights
    (the EMA copy, or the trained module), a stop verdict ends it. The loop stops when every fit
    has stopped; ``restore`` loads each fit's best weights. With the ``plateau`` schedule an anneal
    verdict starts that fit's learning-rate decay (``anneal``, handed to the loop)."""

    def __init__(self, models: list, setups: list[Setup], monitors: list, settings: dict | None = None,
                 device: str = "cpu"):
        if len(monitors) != len(models):
            raise ValueError("one monitor per fit")
        self.models, self.monitors = models, monitors
        plateau = (settings or {}).get("schedule") == "plateau"
        self.anneal = Anneal(len(models), device) if plateau else None
        self.modules = [s.ema if s.ema is not None else s.trained for s in setups]
        self.best: list[dict | None] = [None] * len(models)
        # a stacked fit's members drawn at once keep their best weights stacked too: slices of
        # ``best_stack`` (those in ``in_stack``), copied in one kernel a tensor for all of them
        self.best_stack: dict | None = None
        self.in_stack: set[int] = set()
        self.stopped = [m is None for m in monitors]
        self.together = torch.device(device).type in EVALUATE_TOGETHER_ON
        self.shed: Callable[[list[bool], int], bool] | None = None  # (``Snapshots.shed``)
        self.shed_at: int | None = None  # the step the group ended at to shed its stopped members

    def on_log(self, k: int, train_s: float, sync=None, stacked=None) -> bool:
        """After step ``k`` (0-based), ``train_s`` seconds of training (the loop's, evaluations
        left out); ``sync(i)`` writes member i's current weights into its modules (a stacked fit),
        where it is sampled on its own; ``stacked()``: the stacked fit's sampling weights and
        floating buffers ({name: [members, ...]}), which the members drawn at once are sampled
        from and keep their best in, their modules left as they are. Each evaluation is stamped
        with the fit's share of those seconds (a stacked fit's
        members share the group's, as their ``train_s`` does: every member's evaluations are left
        out of every member's time). Returns True when every fit has stopped."""
        step, share = k + 1, train_s / len(self.models)
        due = [i for i, m in enumerate(self.monitors) if not self.stopped[i] and m.due(step)]
        view = stacked() if stacked is not None and self.together else None
        if sync is not None and view is None:
            for i in due:
                sync(i)
        drawn = self._sample_together(due, view) if sync is not None and self.together else {}
        if sync is not None and view is not None:
            for i in due:
                if i not in drawn:  # sampled on its own, from its modules
                    sync(i)
        verdicts = {}
        for kind in {type(self.monitors[i]) for i in drawn}:  # scored at once where the monitor class can
            mine = [i for i in drawn if type(self.monitors[i]) is kind]
            verdicts |= zip(mine, kind.evaluate_many([self.monitors[i] for i in mine], step, [drawn[i] for i in mine],
                                                     train_s=share))
        best_in_view = []
        for i in due:
            monitor = self.monitors[i]
            verdict = verdicts[i] if i in verdicts else monitor.evaluate(step, self.models[i].sample_now, train_s=share)
            if verdict.anneal and self.anneal is not None:
                self.anneal.start(i, step, verdict.anneal)
            if verdict.best and view is not None and i in drawn:
                best_in_view.append(i)
            elif verdict.best:
                self.best[i] = {k_: v.detach().clone() for k_, v in self.modules[i].state_dict().items()}
                self.in_stack.discard(i)
            self.stopped[i] = verdict.stop
        if best_in_view:
            self._keep_stacked(best_in_view, view)
        if all(self.stopped):
            return True
        if self.shed is not None and self.shed(list(self.stopped), step):
            self.shed_at = step  # the loop ends here; the members that go on continue in a smaller group
            return True
        return False

    def _keep_stacked(self, members: list[int], view: dict) -> None:
        """Members' best weights: their slices of the stacked sampling weights, into ``best_stack``."""
        with torch.no_grad():
            if self.best_stack is None:
                self.best_stack = {k: torch.empty_like(v) for k, v in view.items()}
            idx = torch.tensor(members, device=next(iter(view.values())).device)
            for k, v in view.items():
                self.best_stack[k].index_copy_(0, idx, v.index_select(0, idx))
        for i in members:
            self.best[i] = None
            self.in_stack.add(i)

    def _best(self, i: int) -> dict | None:
        """Member i's best weights (its sampling module's floating tensors at least), or None."""
        if i in self.in_stack:
            return {k: v[i] for k, v in self.best_stack.items()}
        return self.best[i]

    def _sample_together(self, due: list[int], view: dict | None = None) -> dict:
        """The evaluation samples of the members ``due``, drawn in one vmapped pass over their
        stacked sampling weights (their slices of ``view``, the stacked fit's; without it, their
        modules' weights, written there first) where their model offers ``sample_parts`` and their
        monitors say what they will ask for (``sample_args``: n, seed): {member: points}; {} where
        not (each is then sampled on its own)."""
        args = [getattr(self.monitors[i], "sample_args", None) for i in due]
        if len(due) < 2 or any(a is None for a in args) or len({a[0] for a in args}) > 1:
            return {}  # (one stacked pass needs one sample size)
        parts = [self.models[i].sample_parts(*a) for i, a in zip(due, args)]
        if any(p is None for p in parts):
            return {}
        modules = [self.modules[i] for i in due]
        if view is None:
            params, buffers = _stack(modules)
        else:
            idx = torch.tensor(due, device=next(iter(view.values())).device)
            names = {k for k, _ in modules[0].named_parameters()}
            with torch.no_grad():
                taken = {k: v.index_select(0, idx) for k, v in view.items()}
            params = {k: v for k, v in taken.items() if k in names}
            buffers = {k: v for k, v in taken.items() if k not in names}
        bound = _Bound(modules[0], parts[0].map)  # the members share the config sampling reads

        def one(p, b, *draws):
            return functional_call(bound, ({f"module.{k}": v for k, v in p.items()} |
                                           {f"module.{k}": v for k, v in b.items()}), draws)

        with torch.no_grad():
            x = vmap(one)(params, buffers, *stack_draws(p.draws for p in parts))
        return {i: p.back(x[j]) for j, (i, p) in enumerate(zip(due, parts))}

    def on_diverge(self, i: int, step: int) -> bool:
        """Fit i's loss stopped being finite at ``step``: where it has kept a best evaluation, it
        ends with those weights (True); else it is a diverged fit (False)."""
        if self._best(i) is None or self.monitors[i] is None:
            return False
        self.monitors[i].diverged(step)
        self.stopped[i] = True
        return True

    def restore(self) -> None:
        with torch.no_grad():
            for i, module in enumerate(self.modules):
                best = self._best(i)
                if best is not None:  # (a stacked best holds the floating tensors, non-persistent buffers
                    own = module.state_dict()  # too: the flags stay the module's, those are not loaded)
                    module.load_state_dict(own | {k: v for k, v in best.items() if k in own})

    def snapshot_part(self, snapshots: "Snapshots") -> None:
        """Registers what a continued fit needs of the evaluation: each monitor's state, the best
        weights kept, which fits stopped, the anneals begun."""
        def state():
            return {"monitors": [m.state() if m is not None else None for m in self.monitors],
                    "best": [None if b is None else {k: v.to("cpu", copy=True) for k, v in b.items()}
                             for b in map(self._best, range(len(self.models)))],
                    "stopped": list(self.stopped),
                    "anneal": None if self.anneal is None else _cpu([self.anneal.begin, self.anneal.length])}

        def load(saved):
            for m, st in zip(self.monitors, saved["monitors"], strict=True):
                if m is not None:
                    m.load_state(st)
            self.best = list(saved["best"])  # on the host: ``restore`` loads them into the modules
            self.in_stack = set()
            self.stopped = list(saved["stopped"])
            if self.anneal is not None:
                _copy_into([self.anneal.begin, self.anneal.length], saved["anneal"])

        snapshots.add("keeper", state, load)


def _decay(decay, t):
    return decay(t) if callable(decay) else decay


#: a stop asked for (``request_stop``; the CLI asks on a SIGTERM: a command's time limit, a cluster
#: taking its node back): every fit that keeps snapshots saves one at its next logged window's end and
#: ends (``Stopped``), so that the re-run continues from there, not from the last timed snapshot
STOP = threading.Event()
_TRAINING = {"fits": 0}  # fits keeping snapshots that are in their loop now, in any thread of the process
_TRAINING_LOCK = threading.Lock()


class Stopped(KeyboardInterrupt):
    """A fit ended on a stop request, its snapshot saved: the run ends as an interrupted one does."""


def request_stop() -> bool:
    """Asks every fit that keeps snapshots to save one and end at its next logged window. True where
    such a fit is training in this process (the caller lets them end: each raises ``Stopped``);
    False where none is (the caller stops the run itself)."""
    STOP.set()
    with _TRAINING_LOCK:
        return _TRAINING["fits"] > 0


class Snapshots:
    """Mid-fit snapshots, so that a fit stopped in its middle (a killed worker, a command's time
    limit) continues where it was instead of from step 0. The loop's whole state (step, weights,
    optimizer, random generators, loss curve, and each registered part: EMA and target copies,
    evaluation during training) is handed to ``save(state)`` at the end of a logged window once
    ``every_s`` seconds have passed since the last; a fit given ``saved`` (a state ``save`` was
    handed, read back) starts from it: the same steps, draws and weights as the fit that was not
    stopped. The state holds tensors and plain containers only (read back as data)."""

    def __init__(self, saved: dict | None, save: Callable[[dict], None], every_s: float = 60.0,
                 at_cap: Callable[[dict], None] | None = None,
                 shed: Callable[[list[bool], int], bool] | None = None):
        self.saved, self._save, self.every_s = saved, save, every_s
        #: a stacked fit that evaluates asks ``shed(stopped, step)`` at each logged window's end; True
        #: ends the group there (``shed_state``: its whole state; ``shed_active``: the members that
        #: have not stopped), so that those members go on as a smaller group (``member_states``) and
        #: the stopped ones no longer cost a step each
        self.shed = shed
        self.shed_state: dict | None = None
        self.shed_active: list[int] | None = None
        self.parts: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self.last = time.perf_counter()
        self.resumed_at: int | None = None  # the step a fit continued from
        #: handed the fit's state at its cap, before that window's evaluation (``pending_log``): the
        #: state a longer fit of the same path continues from (a tune's promoted trial, next rung)
        self.at_cap = at_cap
        self.pending_log = False  # the state restored was taken before its window's evaluation

    def add(self, name: str, state: Callable[[], Any], load: Callable[[Any], None]) -> None:
        """A part of the fit's state: ``state()`` what it saves, ``load(saved)`` what restores it."""
        self.parts[name] = (state, load)

    def restore(self) -> int:
        """Loads every part from the saved state; returns the step to continue from (0: none saved)."""
        if not self.saved or not all(name in self.saved for name in self.parts):
            return 0  # none, or of a fit with other parts: the fit starts over
        for name, (_, load) in self.parts.items():
            load(self.saved[name])
        self.resumed_at = int(self.saved["step"])
        self.pending_log = bool(self.saved.get("pending_log"))
        return self.resumed_at

    def state(self, step: int) -> dict:
        """The fit's whole state after ``step`` steps: copies (each part's ``state`` copies), which
        the fit going on leaves as they were."""
        return {"step": step} | {name: state() for name, (state, _) in self.parts.items()}

    def capped(self, step: int) -> None:
        """At the cap (``step`` steps made), before the last window's evaluation: ``at_cap`` is
        handed the state, marked so that a fit continuing from it makes that evaluation first."""
        if self.at_cap is not None:
            self.at_cap(self.state(step) | {"pending_log": True})

    def due(self, step: int) -> None:
        """At the end of a logged window (``step`` steps made): a snapshot where one is due, or where a
        stop was asked for (``STOP``: then the fit ends here, raising ``Stopped``)."""
        stop = STOP.is_set()
        if stop or time.perf_counter() - self.last >= self.every_s:
            self._save(self.state(step))
            self.last = time.perf_counter()
        if stop:
            raise Stopped(f"stopped at step {step}, its snapshot saved")


def member_states(state: dict, members: int) -> list[dict]:
    """A stacked fit's state (``Snapshots.state``: its parts "loop", "stacked" and, where it
    evaluates, "keeper") split into one state per member, each that of a group of one (its slices of
    the stacked tensors, its generator, curve, flags, monitor, best weights and anneal; the step,
    the group's seconds and shared scalars as they are); ``join_states`` stacks members' states
    back into a group's, in any order and from any groups at one step. Each member's tensors are
    copies of its own rows, not views: ``torch.save`` writes a view's whole storage, so a member's
    kept state would otherwise weigh its group's (96 members' states wrote 64 GB in a tune)."""
    def part(x, i):  # a stacked tensor's member i, kept as a stack of one
        return x[i:i + 1].clone() if isinstance(x, torch.Tensor) and x.dim() > 0 else x

    out = []
    for i in range(members):
        loop = state["loop"]
        log = loop["log"]
        one = {k: v for k, v in state.items() if k not in ("loop", "stacked", "keeper")}
        one["loop"] = {"params": [part(p, i) for p in loop["params"]],
                       "opt": [{k: part(v, i) for k, v in st.items()} for st in loop["opt"]],
                       "generators": [loop["generators"][i]],
                       "log": log | {"curves": [log["curves"][i]], "diverged": [log["diverged"][i]],
                                     "ended": [0] if i in log["ended"] else []}}
        st = state["stacked"]
        one["stacked"] = {"buffers": [part(b, i) for b in st["buffers"]],
                          "shadows": {n: [part(w, i) for w in ws] for n, ws in st["shadows"].items()},
                          "flags": [st["flags"][i]]}
        if "keeper" in state:
            kp = state["keeper"]
            one["keeper"] = {"monitors": [kp["monitors"][i]], "best": [kp["best"][i]], "stopped": [kp["stopped"][i]],
                             "anneal": None if kp["anneal"] is None else [part(a, i) for a in kp["anneal"]]}
        out.append(one)
    return out


def join_states(states: list[dict]) -> dict:
    """Members' states (``member_states``, each a group of one at one step) as one group's state,
    in the order given; the group's training seconds so far are the longest of theirs."""
    first = states[0]
    if len({int(s["step"]) for s in states}) > 1:
        raise ValueError("members at different steps cannot continue as one group")
    cat = lambda xs: torch.cat(list(xs))  # noqa: E731
    logs = [s["loop"]["log"] for s in states]
    longest = max(logs, key=lambda lg: lg["train_s"] - lg["paused"])  # its clock: seconds and evaluations
    out = {k: v for k, v in first.items() if k not in ("loop", "stacked", "keeper")}
    out["loop"] = {"params": [cat(ps) for ps in zip(*(s["loop"]["params"] for s in states))],
                   "opt": [{k: cat(x[k] for x in sts) if sts[0][k].dim() > 0 else sts[0][k] for k in sts[0]}
                           for sts in zip(*(s["loop"]["opt"] for s in states))],
                   "generators": [g for s in states for g in s["loop"]["generators"]],
                   "log": logs[0] | {"curves": [c for lg in logs for c in lg["curves"]],
                                     "diverged": [d for lg in logs for d in lg["diverged"]],
                                     "ended": [i for i, lg in enumerate(logs) if lg["ended"]],
                                     "paused": longest["paused"], "train_s": longest["train_s"]}}
    sts = [s["stacked"] for s in states]
    out["stacked"] = {"buffers": [cat(b) for b in zip(*(st["buffers"] for st in sts))],
                      "shadows": {n: [cat(w) for w in zip(*(st["shadows"][n] for st in sts))]
                                  for n in sts[0]["shadows"]},
                      "flags": [f for st in sts for f in st["flags"]]}
    if "keeper" in first:
        kps = [s["keeper"] for s in states]
        out["keeper"] = {"monitors": [m for kp in kps for m in kp["monitors"]],
                         "best": [b for kp in kps for b in kp["best"]],
                         "stopped": [x for kp in kps for x in kp["stopped"]],
                         "anneal": None if kps[0]["anneal"] is None
                         else [cat(a) for a in zip(*(kp["anneal"] for kp in kps))]}
    return out


def _cpu(tensors) -> list:
    return [t.detach().to("cpu", copy=True) for t in tensors]


def _copy_into(tensors, saved) -> None:
    with torch.no_grad():
        for t, v in zip(tensors, saved, strict=True):
            t.copy_(v)


def _optimizer_state(opt, params) -> list:
    """Each parameter's optimizer state (Adam's moments and step), on the host; the parameter
    groups (their learning rate: a device tensor in a captured step) stay the loop's own."""
    return [{n: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
             for n, v in opt.state[p].items()} for p in params]


def _load_optimizer_state(opt, params, saved: list) -> None:
    for p, st in zip(params, saved, strict=True):
        opt.state[p] = {n: v.to(p.device) if isinstance(v, torch.Tensor) else v for n, v in st.items()}


def _loop_part(snapshots, params, opt, generators, log, t0: float) -> int:
    """Registers the loop's own state (weights, optimizer, generators, loss curve, the loop's
    seconds so far: before it was continued, and since ``t0``) with ``snapshots`` and restores
    every part; returns the step to start at."""
    def state():
        return {"params": _cpu(params), "opt": _optimizer_state(opt, params), "generators": [g.get_state() for g in generators],
                "log": {"curves": [list(c) for c in log.curves], "diverged": list(log.diverged), "trained": log.trained,
                        "paused": log.paused,
                        "ended": sorted(log.ended), "train_s": log.before_s + time.perf_counter() - t0}}

    def load(saved):
        _copy_into(params, saved["params"])
        _load_optimizer_state(opt, params, saved["opt"])
        for g, st in zip(generators, saved["generators"], strict=True):
            g.set_state(st.to("cpu"))
        d = saved["log"]
        log.curves, log.diverged, log.trained = [list(c) for c in d["curves"]], list(d["diverged"]), int(d["trained"])
        log.paused, log.before_s, log.ended = float(d["paused"]), float(d["train_s"]), set(d["ended"])

    snapshots.add("loop", state, load)
    log.at_cap = snapshots.capped
    first = snapshots.restore()
    if first and snapshots.pending_log:  # continued from a state taken before its window's evaluation
        log.log_now(first - 1)
    return first


# -- the loop ---------------------------------------------------------------------------------
def _sync(device: str) -> None:
    """Waits for the current stream's work (a fit's own: groups trained at once each have a stream
    of their own, and one must not wait for, or stall on, the others')."""
    if device.startswith("cuda"):
        torch.cuda.current_stream().synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def at_most(value, bound: float):
    """``min(value, bound)`` of a number or a 0-dim tensor (a step-dependent value in a captured
    training step, see ``fit_loop``)."""
    return value.clamp(max=bound) if isinstance(value, torch.Tensor) else min(value, bound)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def warmup_rsqrt(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then inverse square-root decay from 10 warm-ups on
    (EDM2's schedule): independent of the total, so a fit's path does not depend on its cap."""
    return min(1.0, (step + 1) / warmup) / math.sqrt(max(1.0, (step + 1) / (10 * warmup)))


def warmup_constant(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then the peak rate."""
    return min(1.0, (step + 1) / warmup)


#: learning-rate schedules: factor of the peak rate at (step, total steps, warm-up steps)
SCHEDULES = {"cosine": warmup_cosine,
             "constant": warmup_constant,
             "rsqrt": warmup_rsqrt,
             # warm-up, then the peak rate until the monitor sees a plateau and each fit anneals on
             # its own (``Anneal``): the converged budget's, so that no step depends on the cap
             "plateau": warmup_constant}


def fit_loop(params, loss_fn, *, steps: int, lr, warmup: int = 200, clip: float = 1.0,
             after_step=None, log_every: int = 50, device: str = "cpu", cuda_graph: bool = True,
             generators: tuple = (), phase=None, members: int = 0, on_log=None, betas=(0.9, 0.999),
             schedule: str = "cosine", anneal: "Anneal | None" = None, snapshots: "Snapshots | None" = None,
             on_diverge=None):
    """The training loop every torch family shares: Adam (``betas``), a warm-up + ``schedule`` (one of
    ``SCHEDULES``; cosine decay by default), gradient
    clipping, a divergence check, and a loss curve averaged over windows of ``log_every`` steps.
    ``loss_fn(k, t)`` returns the scalar loss of step k; ``after_step(t)`` runs after each update
    (EMA). ``t`` is the step as a number: k itself in the eager loop. ``on_log(k, train_s)``, if given,
    is called at the end of each logged window (k its last step; ``train_s`` the loop's seconds so
    far, less those spent in ``on_log``: the clock of ``FitInfo.train_s``). Returns a ``FitInfo``.

    ``members`` > 0 trains that many models side by side, their parameters stacked along a first
    dimension: ``loss_fn`` returns the [members] losses, each member's gradient is clipped by its own
    norm, and a list of one FitInfo per member is returned (a ``Diverged`` error in place of a
    member whose loss stopped being finite; the others train on, unaffected). ``lr`` may then be
    one rate per member: Adam's update (no weight decay) is linear in its rate, so the step is taken
    at rate 1 (times the schedule) and each member's update scaled by its own rate; ``betas[0]`` may
    be one beta1 per member too (``MemberAdam``). ``anneal``: each
    fit's own decay (``Anneal``), started by ``on_log``'s caller when its score plateaus.
    ``snapshots`` (``Snapshots``): the loop's state saved now and then, and a fit continued from a
    saved one. ``on_diverge(i, step)``: fit i's loss stopped being finite; True where it ends with
    weights kept earlier (``Keeper.on_diverge``) rather than as a diverged fit.

    On CUDA with ``cuda_graph`` the step (batch draw, loss, backward, clipping, Adam, ``after_step``)
    is captured in a CUDA graph and replayed; the loss is read back once per ``log_every`` steps. A
    captured step follows three rules: its random numbers come from ``generators`` (the
    torch.Generators it draws from, registered with the graph); ``loss_fn`` is called once per
    ``phase(k)`` (default: one phase for the whole fit) with the phase's first step as k, so it may
    use k only through ``phase(k)``; and ``t`` is a 0-dim float tensor on the device holding the
    current step, so what depends on it must be arithmetic that works on a number and a tensor
    alike (``at_most``)."""
    params = [p for p in params if p.requires_grad]
    if schedule != "plateau":  # (the plateau schedule's path does not depend on the cap: nor its warm-up)
        warmup = min(warmup, steps // 10)
    warmup = max(1, warmup)
    log = LossLog(steps, log_every, members, on_log, on_diverge)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if isinstance(lr, (list, tuple)) and len(set(lr)) == 1:
        lr = lr[0]  # one rate for all: the plain step
    if isinstance(lr, (list, tuple)) and len(lr) != members:
        raise ValueError(f"{len(lr)} learning rates for {members} members")
    if isinstance(betas[0], (list, tuple)) and len(betas[0]) != members:
        raise ValueError(f"{len(betas[0])} beta1 values for {members} members")
    factor = SCHEDULES[schedule]
    kw = dict(steps=steps, lr=lr, warmup=warmup, clip=clip, after_step=after_step, device=device, members=members,
              log=log, betas=tuple(betas), factor=factor, anneal=anneal, snapshots=snapshots)
    if snapshots is not None:  # a stop request waits for this fit's next window (request_stop)
        with _TRAINING_LOCK:
            _TRAINING["fits"] += 1
    try:
        if cuda_graph and device.startswith("cuda") and graphs.graphs_available():
            return _fit_graphed(params, loss_fn, generators=generators, phase=phase, **kw)
        return _fit_eager(params, loss_fn, generators=generators, **kw)
    finally:
        if snapshots is not None:
            with _TRAINING_LOCK:
                _TRAINING["fits"] -= 1


class PerMember:
    """Multiplies stacked tensors (the members the first dimension of each, shaped like ``like``) by
    one value per member in one gather and one multi-tensor kernel, whatever the number of tensors:
    the values spread to every element of a flat buffer whose slices have the tensors' shapes. (A
    broadcast multiply per tensor is a kernel per tensor, and a captured step of tiny networks is
    bound by its kernel count.) The same products as the broadcast, to the bit."""

    def __init__(self, like: list, members: int):
        sizes = [p.numel() for p in like]
        device = like[0].device
        self.index = torch.cat([torch.arange(members, device=device).repeat_interleave(n // members) for n in sizes])
        self.flat = torch.empty(sum(sizes), device=device, dtype=like[0].dtype)
        self.views = [v.view(p.shape) for v, p in zip(self.flat.split(sizes), like)]

    def mul_(self, tensors: list, values: torch.Tensor) -> None:
        torch.index_select(values.to(self.flat.dtype), 0, self.index, out=self.flat)
        torch._foreach_mul_(tensors, self.views)


class MemberAdam(torch.optim.Optimizer):
    """Adam (no weight decay) over stacked parameters whose members each have their own ``beta1``
    (a tuning knob that would otherwise split trials into groups): member i's first moment moves
    at its rate 1 - beta1_i and is bias-corrected by 1 - beta1_i^t; the rate (the group's ``lr``,
    a number or a device tensor), beta2 and eps are shared. Each member's update is
    ``torch.optim.Adam``'s at its own beta1 (test: members against their solo fits). Capturable:
    its state is on the device, the step a device tensor, and the per-member factors go through
    ``PerMember`` (a gather and a multi-tensor kernel each, not a kernel per parameter)."""

    def __init__(self, params, lr, beta1: list[float], beta2: float, spread: PerMember, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps))
        self.params = self.param_groups[0]["params"]
        self.beta1 = torch.tensor(beta1, device=self.params[0].device, dtype=self.params[0].dtype)
        self.spread = spread

    @torch.no_grad()
    def step(self, closure=None):
        group, ps = self.param_groups[0], self.params
        for p in ps:
            if not self.state[p]:  # first step: on the device (and outside any capture: the loops' eager steps)
                self.state[p] = {"step": torch.zeros((), device=p.device, dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in ps]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        t, b1, b2 = states[0]["step"], self.beta1, group["beta2"]
        self.spread.mul_(m, b1)  # m = beta1 m + (1 - beta1) g, beta1 each member's
        scaled = torch._foreach_mul(grads, 1.0)
        self.spread.mul_(scaled, 1.0 - b1)
        torch._foreach_add_(m, scaled)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1.0 - b2 ** t).sqrt())
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(m, denom)
        self.spread.mul_(update, group["lr"] / (1.0 - b1 ** t))  # the step size, each member's bias correction
        torch._foreach_sub_(ps, update)


def _adam(params, lr, betas, spread: PerMember | None, capturable: bool = False):
    """Adam for ``fit_loop``: torch's fused one, or ``MemberAdam`` where members differ in beta1
    (``betas[0]`` a list)."""
    beta1, beta2 = betas
    if isinstance(beta1, (list, tuple)):
        if len(set(beta1)) > 1:
            if spread is None:
                raise ValueError("one beta1 per member needs members")
            return MemberAdam(params, lr, list(beta1), beta2, spread)
        beta1 = beta1[0]
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), fused=True, capturable=capturable)


def clip_gradients(params: list, clip: float, members: int = 0, spread: PerMember | None = None) -> None:
    """``clip_grad_norm_``: of the whole model, or with ``members`` of each member's slice (the
    first dimension of every parameter) by its own norm. Makes no host sync (capturable).
    ``spread``: a ``PerMember`` over the parameters (made once per fit; made here without one)."""
    if not members:
        torch.nn.utils.clip_grad_norm_(params, clip)
        return
    # each member's parameter norms by one multi-tensor kernel over the members' slices, then the
    # norm of those, as clip_grad_norm_ computes a solo fit's (a captured step of tiny networks is
    # bound by its kernel count)
    norms = torch.stack(torch._foreach_norm([p.grad[i] for i in range(members) for p in params]))
    coef = (clip / (torch.linalg.vector_norm(norms.reshape(members, -1), dim=1) + 1e-6)).clamp(max=1.0)
    (spread or PerMember(params, members)).mul_([p.grad for p in params], coef)


#: an annealed learning rate ends at this fraction of its peak
ANNEAL_FLOOR = 0.05


class Anneal:
    """Each fit's own learning-rate decay once its validation score plateaus (the ``plateau``
    schedule): ``start(i, step, length)`` makes fit i's rate fall linearly from its peak to
    ANNEAL_FLOOR of it over ``length`` steps from ``step``; ``factor(t)`` is every fit's factor at
    step t (a number, or a 0-dim device tensor inside a captured step), computed on the device."""

    def __init__(self, fits: int, device: str):
        self.begin = torch.full((fits,), 1e12, device=device)  # far in the future: no decay yet
        self.length = torch.ones(fits, device=device)

    def start(self, i: int, step: int, length: int) -> None:
        self.begin[i] = float(step)  # between steps (replays): the captured step reads the new values
        self.length[i] = float(max(1, length))

    def factor(self, t) -> torch.Tensor:
        done = ((torch.as_tensor(t, dtype=torch.float32, device=self.begin.device) - self.begin) / self.length)
        return (1.0 - (1.0 - ANNEAL_FLOOR) * done.clamp(0.0, 1.0))


class MemberRates:
    """Per-fit learning rates: ``before()`` keeps the weights, the optimizer then steps at rate 1
    (times the schedule), and ``after(t)`` scales each fit's update by its own rate, times its
    ``Anneal`` factor at step t where it has one (Adam's update is linear in the rate). Stacked
    members are the first dimension of every parameter; a solo fit is one. No host sync: capturable."""

    def __init__(self, params: list, rates, device: str, members: int, anneal: "Anneal | None" = None,
                 spread: "PerMember | None" = None):
        self.params, self.members, self.anneal = params, members, anneal
        self.rates = torch.as_tensor(rates, dtype=torch.float32, device=device).reshape(-1)
        self.kept = [torch.empty_like(p) for p in params]
        self.spread = (spread or PerMember(params, members)) if members else None

    @torch.no_grad()
    def before(self) -> None:
        torch._foreach_copy_(self.kept, self.params)

    @torch.no_grad()
    def after(self, t=None) -> None:
        rates = self.rates * self.anneal.factor(t) if self.anneal is not None else self.rates
        torch._foreach_sub_(self.params, self.kept)
        if self.spread is not None:
            self.spread.mul_(self.params, rates)
        else:
            torch._foreach_mul_(self.params, rates.reshape(()))
        torch._foreach_add_(self.params, self.kept)


class LossLog:
    """The loss curve(s) of a fit: the mean of each window of ``log_every`` steps, per member."""

    def __init__(self, steps: int, log_every: int, members: int = 0, on_log=None, on_diverge=None):
        self.steps, self.log_every, self.members, self.on_log = steps, log_every, members, on_log
        self.on_diverge = on_diverge  # (i, step) -> True where fit i ends with its kept weights instead
        self.curves: list[list[float]] = [[] for _ in range(max(members, 1))]
        self.diverged: list[int | None] = [None] * max(members, 1)
        self.trained = 0  # steps made so far (the fit's steps, where on_log stopped it early)
        self.stop = False  # on_log asked the loop to stop
        self.paused = 0.0  # seconds spent in on_log (evaluation), left out of the training time
        self.before_s = 0.0  # the loop's seconds before it was stopped and continued (Snapshots)
        self.started = time.perf_counter()  # the loop's start (the loops set it once they start timing)
        self.ended: set[int] = set()  # fits whose loss diverged after a kept best (they end with it)
        self.at_cap: Callable[[int], None] | None = None  # called at the cap, before its window's on_log

    def add(self, means: torch.Tensor, k: int) -> None:
        """The window ending at step k (its mean: a scalar, or [members]); reads it to the host."""
        for i, v in enumerate(means.reshape(-1).tolist()):
            self.curves[i].append(v)
            if not math.isfinite(v) and self.diverged[i] is None and i not in self.ended:
                if self.on_diverge is not None and self.on_diverge(i, k + 1):
                    self.ended.add(i)  # it ends with its kept weights: not a diverged fit
                else:
                    self.diverged[i] = k
        if not self.members and self.diverged[0] is not None:
            raise Diverged(f"non-finite loss at step {k}")
        self.trained = k + 1
        if self.trained == self.steps and self.at_cap is not None:
            self.at_cap(self.trained)
        self.log_now(k)

    def log_now(self, k: int) -> None:
        """The end of the window ending at step k: ``on_log`` (the evaluations), its time left out."""
        if self.on_log is not None:
            t0 = time.perf_counter()
            self.stop = bool(self.on_log(k, max(0.0, self.before_s + t0 - self.started - self.paused)))
            self.paused += time.perf_counter() - t0

    def result(self, train_s: float):
        """One FitInfo per member (a Diverged in place of a member that diverged); ``train_s`` is the
        loop's wall time less the time spent evaluating."""
        train_s = max(0.0, self.before_s + train_s - self.paused)
        infos = [Diverged(f"non-finite loss at step {d}") if d is not None else
                 FitInfo(steps=self.trained, final_loss=next((v for v in reversed(c) if math.isfinite(v)), float("nan")),
                         train_s=train_s, losses=c,
                         log_every=self.log_every) for c, d in zip(self.curves, self.diverged)]
        return infos if self.members else infos[0]


def _member_rates(params, lr, device, members, anneal, spread=None):
    """The per-fit rates (``MemberRates``) where fits differ in rate or anneal; None: one plain rate."""
    if not isinstance(lr, (list, tuple)) and anneal is None:
        return None
    return MemberRates(params, lr if isinstance(lr, (list, tuple)) else [lr] * max(members, 1), device, members, anneal,
                       spread)


def _fit_eager(params, loss_fn, *, steps, lr, warmup, clip, after_step, device, members, log, betas, factor,
               anneal=None, snapshots=None, generators: tuple = ()):
    spread = PerMember(params, members) if members else None  # shared by the clipping and the member rates
    rates = _member_rates(params, lr, device, members, anneal, spread)
    opt = _adam(params, 1.0 if rates else lr, betas, spread)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factor(k, steps, warmup))
    window = []
    _sync(device)
    t0 = log.started = time.perf_counter()
    start = 0
    if snapshots is not None:
        start = _loop_part(snapshots, params, opt, generators, log, t0)
        if start:  # the schedule at the step the fit continues from
            sched.last_epoch = start
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * factor(start, steps, warmup)
    for k in range(start, steps if not log.stop else start):
        loss = loss_fn(k, k)
        opt.zero_grad(set_to_none=True)
        (loss.sum() if members else loss).backward()
        if clip:
            clip_gradients(params, clip, members, spread)
        if rates:
            rates.before()
        opt.step()
        if rates:
            rates.after(float(k))
        sched.step()
        if after_step is not None:
            after_step(k)
        window.append(loss.detach())
        if len(window) == log.log_every or k == steps - 1:
            log.add(torch.stack(window).mean(0), k)
            window = []
            if log.stop:
                break
            if snapshots is not None and k < steps - 1:
                snapshots.due(k + 1)
    _sync(device)
    return log.result(time.perf_counter() - t0)


def _fit_graphed(params, loss_fn, *, steps, lr, warmup, clip, after_step, device, members, log, betas, factor,
                 generators: tuple = (), phase=None, anneal=None, snapshots=None):
    """``fit_loop`` on CUDA with the training step captured in a CUDA graph and replayed.

    The same step as the eager loop: Adam (fused, capturable, its learning rate a device tensor set
    from the precomputed warm-up + cosine schedule inside the graph), gradient clipping, then
    ``after_step``. The step counter, the schedule and the loss of every step live on the device;
    the host reads the losses back once per ``log_every`` steps (the loss curve and the divergence
    check). The first steps of each ``phase`` run eagerly on a side stream (they are real steps:
    they warm up the optimizer state and the kernels that capture needs), then the step is
    captured once and replayed to the phase's end."""
    spread = PerMember(params, members) if members else None  # shared by the clipping and the member rates
    rates = _member_rates(params, lr, device, members, anneal, spread)
    base = 1.0 if rates else lr
    sched = torch.tensor([base * factor(k, steps, warmup) for k in range(steps)], device=device)
    lr_t = sched[0].clone()
    opt = _adam(params, lr_t, betas, spread, capturable=True)
    k_long = torch.zeros(1, dtype=torch.long, device=device)  # the step, as an index ...
    k_float = torch.zeros((), device=device)  # ... and as a number for after_step
    losses = torch.zeros(steps, max(members, 1), device=device)

    def one_step(k: int) -> None:
        lr_t.copy_(sched.index_select(0, k_long).reshape(()))
        loss = loss_fn(k, k_float)
        (loss.sum() if members else loss).backward()
        if clip:
            clip_gradients(params, clip, members, spread)
        if rates:
            rates.before()
        opt.step()
        if rates:
            rates.after(k_float)
        if after_step is not None:
            after_step(k_float)
        losses.index_copy_(0, k_long, loss.detach().reshape(1, -1).float())
        k_long.add_(1)
        k_float.add_(1)

    _sync(device)
    t0 = log.started = time.perf_counter()
    first = 0
    if snapshots is not None:
        first = _loop_part(snapshots, params, opt, generators, log, t0)
        k_long.fill_(first)  # the step continued from (the captured step reads its rate from it)
        k_float.fill_(first)
    logged = first

    def log_upto(k: int) -> bool:  # the mean loss of each finished window, read back at its end; True: stop
        nonlocal logged
        if k - logged == log.log_every or k == steps:
            log.add(losses[logged:k].mean(0), k - 1)
            logged = k
            if snapshots is not None and not log.stop and k < steps:
                snapshots.due(k)
        return log.stop

    with graphs.own_stream() as side:  # the eager warm-up steps' stream (no other thread's)
        if not log.stop:  # (a continued fit's pending evaluation may have stopped it)
            _replay_segments(side, steps, first, phase, opt, one_step, log_upto, log, generators,
                             window_start=lambda k: k == logged)
    _sync(device)
    return log.result(time.perf_counter() - t0)


#: a whole logged window captured in one CUDA graph and replayed at once (False: one step a replay).
#: Before each replay torch launches two small kernels per random generator registered with the graph
#: (it writes the generator's seed and offset for the graph to read), so with a generator per member a
#: stacked fit paid twice its member count in launches every step; a window a replay pays them once a
#: window. The same kernels in the same order, and the same random numbers (each draw's offset is the
#: one the step-by-step replays give it).
WINDOW_REPLAY = True


def replay_chunks(begin: int, end: int, origin: int, width: int) -> list[tuple[int, int]]:
    """The replays that make steps [begin, end): (first step, number of steps) each. A chunk of
    ``width`` steps where a whole window [origin + j * width, origin + (j + 1) * width) lies in the
    range; single steps before the first such window, after the last, and everywhere for
    ``width`` <= 1."""
    out: list[tuple[int, int]] = []
    k = begin
    while k < end:
        n = width if width > 1 and (k - origin) % width == 0 and k + width <= end else 1
        out.append((k, n))
        k += n
    return out


def _replay_segments(side, steps: int, first: int, phase, opt, one_step, log_upto, log, generators,
                     window_start=None) -> None:
    """``_fit_graphed``'s loop from step ``first``: each phase's first steps eager on ``side``, then
    its step captured once and replayed; where a whole logged window lies in the phase (and
    ``WINDOW_REPLAY``), the window's steps are captured as one graph too and replayed window by
    window (``replay_chunks``), to the phase's end or until ``log_upto`` says stop."""
    segments = [(max(a, first), b) for a, b in graphs.phase_segments(steps, phase) if b > first]
    width = log.log_every if WINDOW_REPLAY else 1
    for i, (start, end) in enumerate(segments):
        eager = min(end - start, 2 if i == 0 else 1)  # real steps that warm up what capture needs
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(start, start + eager):
                opt.zero_grad(set_to_none=True)
                one_step(k)
                if log_upto(k + 1):
                    break
        torch.cuda.current_stream().wait_stream(side)
        if log.stop:
            break
        if start + eager == end:
            continue
        opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes
        graph = graphs.capture_step(lambda: one_step(start + eager), generators)
        window = None  # the window's graph, captured where the first whole window begins

        def window_steps(k0: int) -> None:
            for j in range(width):
                opt.zero_grad(set_to_none=True)  # each captured backward writes gradients of its own
                one_step(k0)  # (k only through phase(k), constant in the segment)

        for k, n in replay_chunks(start + eager, end, first, width):
            if n > 1 and window_start is not None and not window_start(k):
                raise RuntimeError(f"step {k}: a window's replay must begin where a logged window does")
            if n > 1:
                if window is None:
                    window = graphs.capture_step(lambda: window_steps(k), generators)
                window.replay()
            else:
                graph.replay()
            if log_upto(k + n):
                break
        del graph, window  # the phase's graphs and their memory go before the next are captured
        if log.stop:
            break


# -- side by side -----------------------------------------------------------------------------
def _stack(modules: list[nn.Module]) -> tuple[dict, dict]:
    """Stacked parameters and floating buffers; flags (ActNorm's "initialised") stay the modules'
    own: a batched flag cannot steer Python."""
    params, buffers = stack_module_state(modules)
    return params, {k: v for k, v in buffers.items() if v.is_floating_point()}


def batch_groups(batches: list[int]) -> list[int]:
    """For the batch of each member of a would-be stacked fit (``batch`` a member field), the index
    of its group: the fewest groups, each of batches that divide the group's largest (a batch goes
    to the largest that it divides), so that each member trains on its draws repeated up to it."""
    tops: list[int] = []
    for b in sorted(set(batches), reverse=True):
        if not any(t % b == 0 for t in tops):
            tops.append(b)
    return [next(i for i, t in enumerate(tops) if t % b == 0) for b in batches]


def stack_draws(per_member) -> tuple:
    """Each member's tuple of draws, stacked over the members: ((x_1, t_1), (x_2, t_2)) -> (x, t)."""
    return tuple(torch.stack(v) for v in zip(*per_member))


def fit_stacked(modules: list[nn.Module], member_loss, draw, *, steps: int, lr, device: str,
                cuda_graph: bool, generators: tuple, context=None, ema: list[nn.Module] | None = None,
                ema_decay=None, target: list[nn.Module] | None = None, target_decay: float | list | None = None,
                frozen: list[nn.Module] | None = None, phase=None, evaluate: "Keeper | None" = None,
                snapshots: Snapshots | None = None, **loop) -> list:
    """Fits ``modules`` (one per member, one structure) side by side as one stacked network: their
    parameters stacked along a first dimension (``torch.func.stack_module_state``), the loss
    ``member_loss(member, context(k, t), *batch)`` vmapped over the members, where ``member`` (a
    ``Member``) runs a member's networks, the context is shared by all members, and ``batch =
    draw(k, t)`` holds tensors stacked over the members. ``ema``: the members' EMA copies, moved
    towards the weights with ``ema_decay(t)`` after each step; ``target``: their target copies
    (``member.target``), moved with ``target_decay`` (one, or one per member); ``frozen``: a network per member that is not
    trained (``member.frozen``). The trained (and EMA and target) weights are loaded back into the
    modules. Returns ``fit_loop``'s per-member results, each FitInfo's ``train_s`` the group's wall
    time over the members (``extras``: the group's size and wall time)."""
    params, buffers = _stack(modules)
    shadows = {}  # name -> (the modules it is written back to, its stacked weights, its decay)
    if ema is not None:
        shadows["ema"] = (ema, {k: v.detach().clone() for k, v in params.items()}, ema_decay)
    if target is not None:
        decays = target_decay if isinstance(target_decay, (list, tuple)) else [target_decay]
        decay = decays[0]
        if len(set(decays)) > 1:  # each member's own decay (a member field): per parameter, [members, 1, ...]
            per = torch.tensor(decays, device=device)
            decay = [per.reshape(-1, *[1] * (v.dim() - 1)) for v in params.values()]
        shadows["target"] = (target, {k: v.detach().clone() for k, v in params.items()}, lambda t: decay)
    frozen_state = ({}, {}) if frozen is None else tuple({k: v.detach() for k, v in d.items()} for d in _stack(frozen))
    shell, frozen_shell = modules[0], frozen[0] if frozen is not None else None
    target_params = shadows["target"][1] if target is not None else {}

    def loss_fn(k, t):
        shared = context(k, t) if context is not None else None  # closed over: not batched by vmap

        def one(p, b, tp, fs, *batch):
            return member_loss(Member(shell, p, b, tp, frozen_shell, fs), shared, *batch)

        return vmap(one)(params, buffers, target_params, frozen_state, *draw(k, t))

    def after_step(t):
        for _, weights, decay in shadows.values():
            ema_update(list(weights.values()), list(params.values()), decay(t))

    def write_back(i: int) -> None:  # member i's trained (and EMA and target) weights into its modules
        with torch.no_grad():
            own = {k: v[i] for k, v in buffers.items()}
            for to, weights in ((modules[i], params), *((mods[i], w) for mods, w, _ in shadows.values())):
                missing = to.load_state_dict({k: v[i] for k, v in weights.items()} | own, strict=False).missing_keys
                if set(missing) - set(dict(to.named_buffers())) - set(buffers):
                    raise RuntimeError(f"stacked fit: weights not written back: {missing}")

    if snapshots is not None:  # the stacked buffers and shadows, and each module's own flags (ActNorm's)
        flags = [{k: b for k, b in m.named_buffers() if not b.is_floating_point()} for m in modules]

        def state():
            return {"buffers": _cpu(buffers.values()), "shadows": {n: _cpu(w.values()) for n, (_, w, _) in shadows.items()},
                    "flags": [_cpu(f.values()) for f in flags]}

        def load(saved):
            _copy_into(list(buffers.values()), saved["buffers"])
            for n, (_, w, _) in shadows.items():
                _copy_into(list(w.values()), saved["shadows"][n])
            for f, v in zip(flags, saved["flags"], strict=True):
                _copy_into(list(f.values()), v)

        snapshots.add("stacked", state, load)
    sampling = shadows["ema"][1] if ema is not None else params  # the weights the members sample with

    def stacked() -> dict:
        return sampling | buffers

    on_log = (lambda k, train_s: evaluate.on_log(k, train_s, sync=write_back, stacked=stacked)
              if evaluate is not None else None)
    infos = fit_loop(list(params.values()), loss_fn, steps=steps, lr=lr, after_step=after_step, device=device,
                     cuda_graph=cuda_graph, generators=generators, phase=phase, members=len(modules), on_log=on_log,
                     on_diverge=evaluate.on_diverge if evaluate is not None else None, snapshots=snapshots, **loop)
    for i in range(len(modules)):
        write_back(i)
    for info in infos:
        if isinstance(info, FitInfo):
            info.extras = {"side_by_side": len(modules), "group_train_s": info.train_s}
            info.train_s /= len(modules)
    return infos
