"""Networks and training helpers shared by the diffusion and consistency models."""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class TimeMLP(nn.Module):
    """MLP of a 2D point and a noise level, with a sinusoidal embedding of the level.

    The point and the embedding are projected separately and added: concatenating the 2D point
    with a 64-dim embedding into one first layer was measured to train to nothing (loss stuck
    near 1), the point's two coordinates drowned by 64 embedding features.
    A level shared by the whole batch may be given as one value: its embedding is then computed
    once and broadcast (the samplers rely on this).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 64, max_freq: float = 100.0):
        super().__init__()
        half = emb_dim // 2
        self.hidden, self.depth, self.emb_dim = hidden, depth, emb_dim
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), half)))
        self.point = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(2 * half, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        layers += [nn.SiLU(), nn.Linear(hidden, dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        args = c_noise.reshape(-1, 1) * self.freqs
        emb = torch.cat([torch.sin(args), torch.cos(args)], 1)
        return self.body(self.point(x) + self.time(emb))


class EMA:
    """Exponential moving average of a module's parameters: ``ema <- mu ema + (1 - mu) online``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: "float | torch.Tensor | None" = None) -> None:
        """``decay`` may be a 0-dim tensor on the parameters' device (a step-dependent decay inside
        a captured training step)."""
        ema_update(list(self.model.parameters()), list(model.parameters()), self.decay if decay is None else decay)


@torch.no_grad()
def ema_update(ema: list, online: list, decay) -> None:
    """``ema <- decay ema + (1 - decay) online`` for lists of tensors; ``decay`` a number or a 0-dim tensor."""
    if isinstance(decay, torch.Tensor):
        delta = torch._foreach_sub(online, ema)
        torch._foreach_mul_(delta, 1.0 - decay)
        torch._foreach_add_(ema, delta)
    else:
        torch._foreach_lerp_(ema, online, 1.0 - decay)


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


@contextlib.contextmanager
def seeded(seed: int, device: str = "cpu"):
    """Runs the block with torch's RNG seeded, restoring the caller's RNG state after (so weight
    initialisation is reproducible without touching global RNG state)."""
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generator(seed: int | None, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


class Standardizer:
    """Maps data to zero mean and a given overall std (one scale for both axes, so shapes keep
    their aspect), and back."""

    def __init__(self, data: torch.Tensor, target_std: float = 1.0):
        self.mean = data.mean(0)
        self.scale = float(target_std / data.std().clamp_min(1e-8))

    def to(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale

    def back(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.mean

    def state(self) -> dict:
        return {"mean": self.mean.cpu(), "scale": float(self.scale)}

    @classmethod
    def from_state(cls, state: dict, device: str) -> "Standardizer":
        s = cls.__new__(cls)
        s.mean, s.scale = state["mean"].to(device), state["scale"]
        return s


class Diverged(RuntimeError):
    """Training produced a non-finite loss; the runner records the cell as ``diverged``."""


def fit_loop(params, loss_fn, *, steps: int, lr: float, warmup: int = 200, clip: float = 1.0,
             after_step=None, log_every: int = 50, device: str = "cpu", cuda_graph: bool = True,
             generators: tuple = (), phase=None, members: int = 0):
    """The training loop every torch family shares: Adam, warm-up + cosine schedule, gradient
    clipping, a divergence check, and a loss curve averaged over windows of ``log_every`` steps.
    ``loss_fn(k, t)`` returns the scalar loss of step k; ``after_step(t)`` runs after each update
    (EMA). ``t`` is the step as a number: k itself in the eager loop. Returns a ``FitInfo``.

    ``members`` > 0 trains that many models side by side, their parameters stacked along a first
    dimension: ``loss_fn`` returns the [members] losses, each member's gradient is clipped by its own
    norm, and a list of one FitInfo per member is returned (a ``Diverged`` error in place of a
    member whose loss stopped being finite; the others train on, unaffected).

    On CUDA with ``cuda_graph`` the step (batch draw, loss, backward, clipping, Adam, ``after_step``)
    is captured in a CUDA graph and replayed (``graphs.fit_graphed``); the loss is read back once per
    ``log_every`` steps. A captured step follows three rules: its random numbers come from
    ``generators`` (the torch.Generators it draws from, registered with the graph); ``loss_fn`` is
    called once per ``phase(k)`` (default: one phase for the whole fit) with the phase's first
    step as k, so it may use k only through ``phase(k)``; and ``t`` is a 0-dim float tensor on the
    device holding the current step, so what depends on it must be arithmetic that works on a number
    and a tensor alike (``at_most``)."""
    kw = dict(steps=steps, lr=lr, warmup=warmup, clip=clip, after_step=after_step, log_every=log_every,
              device=device, members=members)
    if cuda_graph and device.startswith("cuda"):
        from .graphs import fit_graphed, graphs_available

        if graphs_available():
            return fit_graphed(params, loss_fn, generators=generators, phase=phase, **kw)
    return _fit_eager(params, loss_fn, **kw)


def clip_gradients(params: list, clip: float, members: int = 0) -> None:
    """``clip_grad_norm_``: of the whole model, or with ``members`` of each member's slice (the
    first dimension of every parameter) by its own norm. Makes no host sync (capturable)."""
    if not members:
        torch.nn.utils.clip_grad_norm_(params, clip)
        return
    # each member's parameter norms by one multi-tensor kernel over the members' slices, then the
    # norm of those, as clip_grad_norm_ computes a solo fit's (a captured step of tiny networks is
    # bound by its kernel count: this was four kernels per parameter)
    norms = torch.stack(torch._foreach_norm([p.grad[i] for i in range(members) for p in params]))
    coef = (clip / (torch.linalg.vector_norm(norms.reshape(members, -1), dim=1) + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.reshape(-1, *[1] * (p.dim() - 1)))


class LossLog:
    """The loss curve(s) of a fit: the mean of each window of ``log_every`` steps, per member."""

    def __init__(self, steps: int, log_every: int, members: int = 0):
        self.steps, self.log_every, self.members = steps, log_every, members
        self.curves: list[list[float]] = [[] for _ in range(max(members, 1))]
        self.diverged: list[int | None] = [None] * max(members, 1)

    def add(self, means: torch.Tensor, k: int) -> None:
        """The window ending at step k (its mean: a scalar, or [members]); reads it to the host."""
        for i, v in enumerate(means.reshape(-1).tolist()):
            self.curves[i].append(v)
            if not math.isfinite(v) and self.diverged[i] is None:
                self.diverged[i] = k
        if not self.members and self.diverged[0] is not None:
            raise Diverged(f"non-finite loss at step {k}")

    def result(self, train_s: float):
        from ..api import FitInfo

        infos = [Diverged(f"non-finite loss at step {d}") if d is not None else
                 FitInfo(steps=self.steps, final_loss=c[-1] if c else float("nan"), train_s=train_s, losses=c,
                         log_every=self.log_every) for c, d in zip(self.curves, self.diverged)]
        return infos if self.members else infos[0]


def _fit_eager(params, loss_fn, *, steps, lr, warmup, clip, after_step, log_every, device, members):
    import time

    from ..timing import synchronize

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    warmup = max(1, min(warmup, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, steps, warmup))
    log, window = LossLog(steps, log_every, members), []
    synchronize(device)
    t0 = time.perf_counter()
    for k in range(steps):
        loss = loss_fn(k, k)
        opt.zero_grad(set_to_none=True)
        (loss.sum() if members else loss).backward()
        if clip:
            clip_gradients(params, clip, members)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(k)
        window.append(loss.detach())
        if len(window) == log_every or k == steps - 1:
            log.add(torch.stack(window).mean(0), k)
            window = []
    synchronize(device)
    return log.result(time.perf_counter() - t0)


class Member:
    """A member's networks inside a vmapped loss (``fit_stacked``): calling it runs the member's
    trained network; ``target`` its target copy (``target_decay``), ``frozen`` its frozen network."""

    def __init__(self, shell, params, buffers, target_params, frozen_shell, frozen_state):
        self.shell, self.params, self.buffers = shell, params, buffers
        self.target_params, self.frozen_shell, self.frozen_state = target_params, frozen_shell, frozen_state

    def __call__(self, *args):
        return functional_call(self.shell, (self.params, self.buffers), args)

    def target(self, *args):
        return functional_call(self.shell, (self.target_params, self.buffers), args)

    def frozen(self, *args):
        return functional_call(self.frozen_shell, self.frozen_state, args)


def _stack(modules: list[nn.Module]) -> tuple[dict, dict]:
    """Stacked parameters and floating buffers; flags (ActNorm's "initialised") stay the modules'
    own: a batched flag cannot steer Python."""
    params, buffers = stack_module_state(modules)
    return params, {k: v for k, v in buffers.items() if v.is_floating_point()}


def fit_stacked(modules: list[nn.Module], member_loss, draw, *, steps: int, lr: float, device: str,
                cuda_graph: bool, generators: tuple, ema: list[nn.Module] | None = None, ema_decay=None,
                target: list[nn.Module] | None = None, target_decay: float | None = None,
                frozen: list[nn.Module] | None = None, phase=None) -> list:
    """Fits ``modules`` (one per member, one structure) side by side as one stacked network: their
    parameters stacked along a first dimension (``torch.func.stack_module_state``), the loss
    ``member_loss(member, *batch)`` vmapped over the members, where ``member`` (a ``Member``) runs a
    member's networks and ``batch = draw(k, t)`` holds tensors stacked over the members (each
    member's draws from its own generator, in its solo fit's order). ``ema``: the members' EMA
    copies, moved towards the weights with ``ema_decay(t)`` after each step; ``target``: their
    target copies (``member.target``), moved with ``target_decay``; ``frozen``: a network per member
    that is not trained (``member.frozen``, e.g. a distillation teacher). The trained (and EMA and
    target) weights are loaded back into the modules. Returns ``fit_loop``'s per-member results,
    each FitInfo's ``train_s`` the group's wall time over the members (``extras``: the group's size
    and wall time)."""
    from ..api import FitInfo

    params, buffers = _stack(modules)
    shadows = {}  # name -> (the modules it is written back to, its stacked weights, its decay)
    if ema is not None:
        shadows["ema"] = (ema, {k: v.detach().clone() for k, v in params.items()}, ema_decay)
    if target is not None:
        shadows["target"] = (target, {k: v.detach().clone() for k, v in params.items()}, lambda t: target_decay)
    frozen_state = ({}, {}) if frozen is None else tuple({k: v.detach() for k, v in d.items()} for d in _stack(frozen))
    shell, frozen_shell = modules[0], frozen[0] if frozen is not None else None
    target_params = shadows["target"][1] if target is not None else {}

    def one(p, b, tp, fs, *batch):
        return member_loss(Member(shell, p, b, tp, frozen_shell, fs), *batch)

    batched = vmap(one)

    def after_step(t):
        for _, weights, decay in shadows.values():
            ema_update(list(weights.values()), list(params.values()), decay(t))

    infos = fit_loop(list(params.values()),
                     lambda k, t: batched(params, buffers, target_params, frozen_state, *draw(k, t)), steps=steps,
                     lr=lr, after_step=after_step, device=device, cuda_graph=cuda_graph, generators=generators,
                     phase=phase, members=len(modules))
    with torch.no_grad():
        for i, m in enumerate(modules):
            own = {k: v[i] for k, v in buffers.items()}
            for to, weights in ((m, params), *((mods[i], w) for mods, w, _ in shadows.values())):
                missing = to.load_state_dict({k: v[i] for k, v in weights.items()} | own, strict=False).missing_keys
                if set(missing) - set(dict(to.named_buffers())) - set(buffers):
                    raise RuntimeError(f"stacked fit: weights not written back: {missing}")
    for info in infos:
        if isinstance(info, FitInfo):
            info.extras = {"side_by_side": len(modules), "group_train_s": info.train_s}
            info.train_s /= len(modules)
    return infos


def start_members(models: list, datas: list, seeds: list[int], device: str) -> tuple:
    """The shared config of ``models`` (fits side by side need one) and each member's ``_start``
    (its seeded build and standardised data, and the generator of its batches)."""
    config = models[0].config
    if any(m.config != config for m in models):
        raise ValueError("fits side by side need models of one config")
    return config, [m._start(data, device, seed) for m, data, seed in zip(models, datas, seeds)]


def stack_draws(per_member) -> tuple:
    """Each member's tuple of draws, stacked over the members: ((x_1, t_1), (x_2, t_2)) -> (x, t)."""
    return tuple(torch.stack(v) for v in zip(*per_member))
