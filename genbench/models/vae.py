"""Variational autoencoder (Kingma & Welling 2014) with MLP encoder and decoder.

The decoder is a Gaussian ``p(x|z) = N(mu(z), diag(sigma^2))`` with one learned variance per axis.
``sample`` returns a decoder *sample* ``mu(z) + sigma eps`` with ``z ~ N(0, I)``: that is the model's
own density ``p(x) = E_z p(x|z)``, the one its ELBO bounds, so W2 and mode metrics judge the same
distribution. (The decoder mean alone is a 2D surface pushed through an MLP; it hides the learned
noise level and would flatter or punish the model depending on the dataset.)
The data are standardised (zero mean, unit std) before training and mapped back on sampling.
KL annealing over the first ``kl_warmup`` steps avoids the posterior collapsing early.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..api import Choice, IntRange, LogUniform, check_config
from .nets import Standardizer, generator, seeded
from .train import SampleParts, Setup, TorchGenerator, at_most


@dataclass
class VAEConfig:
    latent: int = 2
    hidden: int = 128
    depth: int = 3
    lr: float = 2e-3
    batch: int = 512
    train_steps: int = 2500
    kl_warmup: int = 600
    elbo_samples: int = 1  # Monte-Carlo samples of z per point for the reported test ELBO
    iwae_samples: int = 128  # importance samples of the reported bound on the test NLL (0: none)
    cuda_graph: bool = True  # on CUDA, capture the training step in a CUDA graph (false: eager)

    def __post_init__(self):
        check_config(self, positive=("latent", "hidden", "depth", "lr", "batch", "train_steps", "elbo_samples"),
                     nonnegative=("kl_warmup", "iwae_samples"))


def _mlp(i: int, h: int, o: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(i, h)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(h, h)]
    return nn.Sequential(*layers, nn.SiLU(), nn.Linear(h, o))


class VAENet(nn.Module):
    """The encoder, the decoder and the decoder's log-std; ``forward`` is the negative ELBO per
    point given the reparametrisation noise (so that stacked members can draw it from their own
    generators)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.enc = _mlp(2, c.hidden, 2 * c.latent, c.depth)
        self.dec = _mlp(c.latent, c.hidden, 2, c.depth)
        self.log_sigma = nn.Parameter(torch.full((2,), -1.0))

    def neg_log_px_z(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """-log N(x; rec, diag(sigma^2)) over the last axis: the decoder's Gaussian."""
        return 0.5 * (((x - rec) / self.log_sigma.exp()) ** 2).sum(-1) + self.log_sigma.sum() + math.log(2 * math.pi)

    def forward(self, x: torch.Tensor, eps: torch.Tensor, beta=1.0) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, -1)
        z = mu + (0.5 * logvar).exp() * eps
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
        return self.neg_log_px_z(x, self.dec(z)) + beta * kl


def _decode(net: VAENet, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return net.dec(z) + net.log_sigma.exp() * eps


class VAE(TorchGenerator):
    """Gaussian VAE; one decoder pass per sample batch (NFE = 1)."""

    name = "vae"
    colour = "#2ca02c"
    Config = VAEConfig
    # converged: a cap of 240,000 (at 120,000, 18 of the canonical grid's 24 fits ran into it and the
    # doubled cap was better in 12 of 80 cells: baselines/README.md, "Today's code on two H200s")
    budgets = {"quick": {"train_steps": 300, "kl_warmup": 100}, "default": {}, "full": {"train_steps": 15000},
               "converged": {"train_steps": 240000}}
    #: the tuning space: the learning rate, the batch, the KL annealing's length
    search_space = {"lr": LogUniform(3e-4, 1e-2), "batch": Choice((256, 512, 1024)), "kl_warmup": IntRange(0, 2000)}
    #: members of one stacked fit (tuning trials) may differ in these: the warm-up reaches the loss as a draw
    member_fields = ("lr", "kl_warmup", "batch")

    def _build(self, device: str):
        self.device = device
        self.net = VAENet(self.config).to(device)
        self.enc, self.dec, self.log_sigma = self.net.enc, self.net.dec, self.net.log_sigma

    def _neg_elbo(self, x: torch.Tensor, g: torch.Generator, beta=1.0) -> torch.Tensor:
        """The negative ELBO per point, one reparametrisation draw from ``g``."""
        return self.net(x, torch.randn(len(x), self.config.latent, generator=g, device=x.device), beta)

    def setup(self, data, *, device: str, seed: int, teacher=None) -> Setup:
        """The networks built from the seed, the data standardised (zero mean, unit std)."""
        with seeded(seed, device):
            self._build(device)
        data = torch.as_tensor(data, dtype=torch.float32, device=device)
        self.std = Standardizer(data, 1.0)
        return Setup(self.std.to(data), generator(seed + 1, device), self.net)

    def draws(self, x0: torch.Tensor, g: torch.Generator):
        """One step's random draws: data indices and the points' reparametrisation noise; and the
        fit's own KL warm-up length (a member field: members of a stacked fit each anneal over their own)."""
        c = self.config
        return (torch.randint(len(x0), (c.batch,), generator=g, device=x0.device),
                torch.randn(c.batch, c.latent, generator=g, device=x0.device), self.member_value("kl_warmup", x0.device))

    def step_context(self, k, t):
        """The step count so far (t + 1), from which each fit's KL weight is computed."""
        return t + 1

    def loss(self, net, steps, x0, i, eps, warmup) -> torch.Tensor:
        """The mean negative ELBO of the data points ``x0[i]``, its KL weighted by beta = steps /
        warmup, at most 1 (annealed over the first kl_warmup steps; a warm-up of 0, whose quotient is
        infinite, or 1 is none)."""
        return net(x0[i], eps, at_most(steps / warmup, 1.0)).mean()

    @torch.no_grad()
    def sample(self, n, *, steps=None, seed=None):
        parts = self.sample_parts(n, seed)
        return parts.back(parts.map(self.net, *parts.draws))

    def sample_parts(self, n: int, seed: int | None) -> SampleParts:
        """The latent and the observation noise drawn, then decoded: x = dec(z) + sigma eps."""
        g = generator(seed, self.device)
        z = torch.randn(n, self.config.latent, generator=g, device=self.device)
        eps = torch.randn(n, 2, generator=g, device=self.device)
        return SampleParts((z, eps), _decode, self.std.back)

    def nfe(self, steps=None) -> int:
        return 1

    @property
    def nfe_module(self):
        return self.dec

    @property
    def variant(self) -> str:
        return f"z{self.config.latent}"

    @torch.no_grad()
    def evaluate(self, test_data) -> dict[str, float]:
        """Test ELBO in nats per point, in the units of the original data (the standardisation's
        log-Jacobian is added back)."""
        x = self.std.to(torch.as_tensor(test_data, dtype=torch.float32, device=self.device))
        g = generator(12345, self.device)
        neg = torch.stack([self._neg_elbo(x, g) for _ in range(self.config.elbo_samples)]).mean(0)
        out = {"elbo": float(-(neg.mean() - 2 * math.log(self.std.scale)))}
        if self.config.iwae_samples:
            logp = torch.cat([self.iwae_log_prob(chunk, self.config.iwae_samples, g) for chunk in x.split(1000)])
            out["nll_bound"] = float(-(logp.mean() + 2 * math.log(self.std.scale)))
        return out

    @torch.no_grad()
    def iwae_log_prob(self, x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
        """The importance-weighted bound (Burda et al. 2016) on log p(x) per point, in standardised
        units: ``log (1/k) sum_i p(x, z_i) / q(z_i | x)``, z_i ~ q(z | x). It rises towards log p(x)
        as k grows (k = 1 is the ELBO), so its negative is an upper bound on the NLL."""
        mu, logvar = self.enc(x).chunk(2, 1)
        std = (0.5 * logvar).exp()
        eps = torch.randn((k, *mu.shape), generator=g, device=x.device)
        z = mu + std * eps
        rec = self.dec(z.reshape(-1, mu.shape[1])).reshape(k, len(x), 2)
        log_px_z = -self.net.neg_log_px_z(x, rec)
        half_log_2pi = 0.5 * mu.shape[1] * math.log(2 * math.pi)
        log_pz = -0.5 * (z**2).sum(-1) - half_log_2pi
        log_qz = -0.5 * (eps**2).sum(-1) - std.log().sum(-1) - half_log_2pi
        return torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k)

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "enc": self.enc.state_dict(), "dec": self.dec.state_dict(),
                "log_sigma": self.log_sigma.detach().cpu(), "std": self.std.state()}

    def load_state_dict(self, state: dict, device: str = "cpu") -> None:
        self._build(device)
        self.enc.load_state_dict(state["enc"])
        self.dec.load_state_dict(state["dec"])
        with torch.no_grad():
            self.log_sigma.copy_(state["log_sigma"])
        self.std = Standardizer.from_state(state["std"], device)
