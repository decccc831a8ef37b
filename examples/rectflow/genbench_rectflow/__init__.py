"""Rectified flow (Liu et al. 2022; conditional flow matching with straight paths, Lipman et al.
2023) as a genbench plugin, written against the public API (``genbench.api``) alone.

Training regresses a velocity field on straight noise-to-data paths: x_t = (1 - t) z + t x with
z ~ N(0, I), t ~ U(0, 1), loss |v(x_t, t) - (x - z)|^2. Sampling integrates dx/dt = v(x, t) from
t = 0 to 1 with ``steps`` Euler steps, one network evaluation each, so ``--steps 1,2,4,...``
traces the method's NFE-quality frontier.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from genbench.api import FitInfo, Generator, check_config


@dataclass
class RectFlowConfig:
    hidden: int = 128
    depth: int = 3
    lr: float = 2e-3
    batch: int = 512
    train_steps: int = 15000  # the budget that keeps every grid25 mode (README, "Samplers at low NFE")
    ema_decay: float = 0.999  # sampling uses the EMA of the weights (warmed up: min(decay, (1+k)/(10+k)))
    default_steps: int = 50
    log_every: int = 50

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


class RectifiedFlow(Generator):
    """Rectified flow (flow matching, straight paths); Euler sampler, NFE = steps."""

    name = "rectflow"
    Config = RectFlowConfig
    budgets = {"quick": {"train_steps": 300}, "default": {}, "full": {"train_steps": 40000}}
    multistep = True
    colour = "#17becf"
    no_likelihood = "not computed by this example (the flow's ODE would give one, as the diffusion model's does)"

    # -- training ---------------------------------------------------------------------------
    def fit(self, data, *, device="cpu", seed=0, teacher=None) -> FitInfo:
        c = self.config
        self.device = device
        x = torch.as_tensor(np.asarray(data), dtype=torch.float32, device=device)
        self.mean, self.scale = x.mean(0), x.std()  # standardised data: one scale keeps shapes
        x = (x - self.mean) / self.scale
        torch.manual_seed(seed)
        self.net = Velocity(c.hidden, c.depth).to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        losses, t0 = [], time.perf_counter()
        for step in range(1, c.train_steps + 1):
            x1 = x[torch.randint(len(x), (c.batch,), generator=g, device=device)]
            z = torch.randn(x1.shape, generator=g, device=device)
            t = torch.rand(c.batch, 1, generator=g, device=device)
            loss = (self.net((1 - t) * z + t * x1, t) - (x1 - z)).square().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay = min(c.ema_decay, (1 + step) / (10 + step))  # warm-up: early weights fade fast
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                    pe.lerp_(p, 1 - decay)
            if step % c.log_every == 0 or step == c.train_steps:
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"non-finite loss at step {step}")
        return FitInfo(steps=c.train_steps, final_loss=losses[-1], train_s=time.perf_counter() - t0, losses=losses,
                       log_every=c.log_every)

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
