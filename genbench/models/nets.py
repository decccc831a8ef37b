"""Networks and what the torch families keep beside them: the TimeMLP, EMA copies, the data
standardiser, seeded construction and generators. The training loop is ``train.py``."""
from __future__ import annotations

import contextlib
import copy
import math
import threading

import torch
from torch import nn


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
    """``ema <- decay ema + (1 - decay) online`` for lists of tensors; ``decay`` a number, a 0-dim
    tensor, or a list of one tensor per tensor that broadcasts against it (stacked members, each
    at its own decay: [members, 1, ...])."""
    if isinstance(decay, (list, tuple)):
        for e, o, d in zip(ema, online, decay):
            e.lerp_(o, 1.0 - d)
    elif isinstance(decay, torch.Tensor):
        delta = torch._foreach_sub(online, ema)
        torch._foreach_mul_(delta, 1.0 - decay)
        torch._foreach_add_(ema, delta)
    else:
        torch._foreach_lerp_(ema, online, 1.0 - decay)


#: held while a block uses torch's process-wide state (the global RNGs in ``seeded``, a CUDA graph
#: capture in ``graphs.capture_step``): groups trained at once in threads take turns there
PROCESS_STATE = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int, device: str = "cpu"):
    """Runs the block with torch's RNG seeded, restoring the caller's RNG state after (so weight
    initialisation is reproducible without touching global RNG state); one thread at a time."""
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with PROCESS_STATE, torch.random.fork_rng(devices=devices):
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
    def identity(cls, dim: int, device: str) -> "Standardizer":
        """The map that leaves data as they are (a model trained in data units)."""
        s = cls.__new__(cls)
        s.mean, s.scale = torch.zeros(dim, device=device), 1.0
        return s

    @classmethod
    def from_state(cls, state: dict, device: str) -> "Standardizer":
        s = cls.__new__(cls)
        s.mean, s.scale = state["mean"].to(device), state["scale"]
        return s
