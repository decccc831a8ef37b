"""Rectified flow (Liu et al. 2022; conditional flow matching with straight paths, Lipman et al.
2023) as a genbench plugin, written against genbench's public API: the generator contract
(``genbench.api``) and the training base of torch families (``genbench.models.train``), whose three
hooks (``setup``, ``draws``, ``loss``) give it the shared training loop, fits side by side and, on
CUDA, captured training steps without a line of loop code here.

Training regresses a velocity field on straight noise-to-data paths: x_t = (1 - t) z + t x with
z ~ N(0, I), t ~ U(0, 1), loss |v(x_t, t) - (x - z)|^2. Sampling integrates dx/dt = v(x, t) from
t = 0 to 1 with ``steps`` Euler steps, one network evaluation each, so ``--steps 1,2,4,...``
traces the method's NFE-quality frontier.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from genbench.api import Choice, LogUniform, check_config
from genbench.models.train import Setup, TorchGenerator, at_most


@dataclass
class RectFlowConfig:
    hidden: int = 128
    depth: int = 3
    lr: float = 2e-3
    batch: int = 512
    train_steps: int = 15000  # the budget that keeps every grid25 mode (README, "Samplers at low NFE")
    ema_decay: float = 0.999  # sampling uses the EMA of the weights (warmed up: min(decay, (1+k)/(10+k)))
    default_steps: int = 50
    log_every: int = 50  # the loss curve's window (the training base reads it)
    cuda_graph: bool = True  # on CUDA, capture the training step in a CUDA graph (the training base reads it)

    def __post_init__(self):
        check_config(self, positive=("hidden", "depth", "lr", "batch", "train_steps", "default_steps", "log_every"),
                     fraction=("ema_decay",))


class Velocity(nn.Module):
    """v(x, t): an MLP on x and a sinusoidal embedding of t."""

    def __init__(self, hidden: int, depth: int, emb: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), emb // 2)))
        layers: list[nn.Module] = [nn.Linear(2 + emb, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = t.reshape(-1, 1) * self.freqs
        return self.mlp(torch.cat([x, torch.sin(a), torch.cos(a)], 1))


class RectifiedFlow(TorchGenerator):
    """Rectified flow (flow matching, straight paths); Euler sampler, NFE = steps."""

    name = "rectflow"
    Config = RectFlowConfig
    budgets = {"quick": {"train_steps": 300}, "default": {}, "full": {"train_steps": 40000},
               "converged": {"train_steps": 80000}}  # the cap; genbench's training base stops it on its validation curve
    # what `genbench tune` may vary, and over which range (a trial always includes the defaults)
    search_space = {"lr": LogUniform(3e-4, 1e-2), "batch": Choice((256, 512, 1024)),
                    "ema_decay": Choice((0.99, 0.999, 0.9999))}
    multistep = True
    colour = "#17becf"
    no_likelihood = "not computed by this example (the flow's ODE would give one, as the diffusion model's does)"

    # -- training: the three hooks of genbench.models.train.TorchGenerator -------------------------
    def setup(self, data, *, device, seed, teacher=None) -> Setup:
        """The velocity network and its EMA copy built from the seed, the data standardised."""
        self.device = device
        x = torch.as_tensor(np.asarray(data), dtype=torch.float32, device=device)
        self.mean, self.scale = x.mean(0), x.std()  # standardised data: one scale keeps shapes
        with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
            torch.manual_seed(seed)
            self.net = Velocity(self.config.hidden, self.config.depth).to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        decay = self.config.ema_decay
        return Setup((x - self.mean) / self.scale, g, self.net, ema=self.ema,
                     ema_decay=lambda t: at_most((1 + t) / (10 + t), decay))  # warm-up: early weights fade fast

    def draws(self, x0, g):
        """One step's random numbers, from ``g`` in a fixed order: data indices, noise, times."""
        b = self.config.batch
        return (torch.randint(len(x0), (b,), generator=g, device=x0.device),
                torch.randn(b, 2, generator=g, device=x0.device), torch.rand(b, 1, generator=g, device=x0.device))

    def loss(self, v, context, x0, i, z, t):
        """Flow matching on straight paths: |v((1 - t) z + t x, t) - (x - z)|^2 for x = ``x0[i]``."""
        x1 = x0[i]
        return (v((1 - t) * z + t * x1, t) - (x1 - z)).square().sum(1).mean()

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def _paths(self, n: int, steps: int, seed: int | None, keep: bool):
        g = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        x = torch.randn(n, 2, generator=g, device=self.device)
        path = [x] if keep else None
        for i in range(steps):
            t = torch.full((n,), i / steps, device=self.device)
            x = x + self.ema(x, t) / steps
            if keep:
                path.append(x)
        out = torch.stack(path) if keep else x
        return out * self.scale + self.mean

    def sample(self, n, *, steps=None, seed=None):
        return self._paths(n, steps or self.config.default_steps, seed, keep=False)

    def trajectory_sample(self, n, *, steps=None, seed=None):
        return self._paths(n, steps or self.config.default_steps, seed, keep=True).cpu()

    def nfe(self, steps=None) -> int:
        return steps or self.config.default_steps

    def default_steps(self) -> int:
        return self.config.default_steps

    @property
    def nfe_module(self):
        return self.ema

    @property
    def variant(self) -> str:
        return "euler"

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "ema": self.ema.state_dict(), "mean": self.mean, "scale": self.scale}

    def load_state_dict(self, state, device="cpu") -> None:
        self.device = device
        self.ema = Velocity(self.config.hidden, self.config.depth).to(device).requires_grad_(False)
        self.ema.load_state_dict(state["ema"])
        self.mean, self.scale = state["mean"].to(device), state["scale"].to(device)
