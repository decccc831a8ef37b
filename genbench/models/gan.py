"""Generative adversarial network (Goodfellow et al. 2014), non-saturating, with PacGAN packing
(Lin, Khetan, Fanti, Oh 2018).

The generator maps z ~ N(0, I) through an MLP with batch normalisation and ReLU to a 2D point;
the discriminator is an MLP of maxout units (Goodfellow et al. 2013) that sees ``pack`` samples
at once, concatenated (``pack`` = 1: the plain GAN; m > 1: PacGAN with m packed samples, real
with real, generated with generated). The losses are PacGAN's code's: the discriminator's
``softplus(-D(real)) + softplus(D(fake))`` and the generator's non-saturating
``softplus(-D(fake))``, both players updated at once from the same batch (the ALI algorithm the
PacGAN code trains with), each by Adam with the same settings. One loss for the training base:
the discriminator's term sees the generated points detached, the generator's term sees the
discriminator's weights detached, so each player's gradient is its own loss's.

The generator's batch normalisation uses each packed slot's batch statistics in training (PacGAN's
code applies its decoder once per slot) and running averages (momentum ``bn_momentum``, one update
per step from the slots' mean statistics, as that code merges them) when sampling. NFE = 1: one generator pass per sample batch. No likelihood: the
generator is an implicit model (a 2D push-forward of a 2D latent without a tractable density
through the batch-normalised MLP, and no encoder for a bound).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..api import Choice, LogUniform, Uniform, check_config
from .nets import Standardizer, generator, seeded
from .train import SampleParts, Setup, TorchGenerator


@dataclass
class GANConfig:
    """genbench's defaults (a smaller network than PacGAN's, which ``genbench reproduce pacgan``
    uses; hand-picked on ring8 and grid25 like the other built-ins' until they are tuned): PacGAN2,
    packing being the paper's cure for mode collapse at no change to the networks."""

    pack: int = 2  # samples per discriminator input (1: GAN; m > 1: PacGAN-m)
    latent: int = 2
    g_hidden: int = 128
    g_depth: int = 3  # hidden layers of the generator (batch norm + ReLU each)
    d_hidden: int = 128
    d_depth: int = 2  # maxout layers of the discriminator
    maxout: int = 5  # pieces per maxout unit
    init_std: float = 0.02  # weights ~ N(0, init_std^2), biases 0 (PacGAN's code)
    bn_momentum: float = 0.05  # running batch-norm statistics for sampling
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch: int = 256  # packed examples per step (each holds `pack` points)
    train_steps: int = 5000
    warmup: int = 1  # steps of linear learning-rate warm-up (1: none)
    schedule: str = "constant"  # constant | cosine | rsqrt | plateau (models/train.py SCHEDULES)
    clip: float = 0.0  # gradient-norm clip (0: none)
    standardize: bool = True  # train on standardised data (false: in data units, as PacGAN did)
    cuda_graph: bool = True  # on CUDA, capture the training step in a CUDA graph (false: eager)

    def __post_init__(self):
        check_config(self, positive=("pack", "latent", "g_hidden", "g_depth", "d_hidden", "d_depth", "maxout",
                                     "init_std", "bn_momentum", "lr", "batch", "train_steps", "warmup"),
                     nonnegative=("clip",), fraction=("beta1", "beta2", "bn_momentum"),
                     choices={"schedule": ("constant", "cosine", "rsqrt", "plateau")})


def _linear(x: torch.Tensor, layer: nn.Linear, detach: bool) -> torch.Tensor:
    """``layer(x)``, with its weights cut from the graph where ``detach`` (the generator's term)."""
    return F.linear(x, layer.weight.detach(), layer.bias.detach()) if detach else layer(x)


class Maxout(nn.Module):
    """``pieces`` linear maps, their elementwise maximum (Goodfellow et al. 2013)."""

    def __init__(self, i: int, o: int, pieces: int):
        super().__init__()
        self.o, self.pieces = o, pieces
        self.lin = nn.Linear(i, o * pieces)

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        return _linear(x, self.lin, detach).unflatten(-1, (self.o, self.pieces)).amax(-1)


class SlotBatchNorm(nn.Module):
    """Batch normalisation of [..., slots, b, h] with each slot's own batch statistics (the points
    of one packed slot are one generator call in PacGAN's code) and one update of the running
    statistics per step, from their mean over the slots (as that code merges its calls' updates);
    on [n, h] in eval mode, the running statistics."""

    def __init__(self, h: int, momentum: float, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(h))
        self.bias = nn.Parameter(torch.zeros(h))
        self.register_buffer("running_mean", torch.zeros(h))
        self.register_buffer("running_var", torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(-2, keepdim=True)
            var = x.var(-2, unbiased=False, keepdim=True)
            with torch.no_grad():
                n = x.shape[-2]
                batch_mean = mean.reshape(-1, x.shape[-1]).mean(0)
                batch_var = var.reshape(-1, x.shape[-1]).mean(0) * n / max(n - 1, 1)
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * batch_mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * batch_var)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class GANNet(nn.Module):
    """The generator and the discriminator; ``forward`` is the step's loss, both players' terms."""

    def __init__(self, c: GANConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = c.latent
        for _ in range(c.g_depth):  # PacGAN's decoder: linear without bias, batch norm, ReLU
            layers += [nn.Linear(width, c.g_hidden, bias=False), SlotBatchNorm(c.g_hidden, c.bn_momentum), nn.ReLU()]
            width = c.g_hidden
        self.g = nn.Sequential(*layers, nn.Linear(width, 2))
        self.d_hidden = nn.ModuleList(Maxout(2 * c.pack if i == 0 else c.d_hidden, c.d_hidden, c.maxout)
                                      for i in range(c.d_depth))
        self.d_out = nn.Linear(c.d_hidden, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, c.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def discriminate(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """D's logits of packed inputs [b, 2 pack]; ``detach``: with its weights cut from the graph."""
        for layer in self.d_hidden:
            x = layer(x, detach)
        return _linear(x, self.d_out, detach).squeeze(-1)

    def forward(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``real`` [b, 2 pack] packed data, ``z`` [pack, b, latent]: the discriminator's loss plus the
        generator's, each reaching only its own player's weights. As PacGAN's code: D sees the data
        and the generated examples in one batch; G's term is D's logits of the same generated
        examples through D's detached weights."""
        fake = pack(self.g(z))  # each slot batch-normalised on its own
        logits = self.discriminate(torch.cat([real, fake.detach()]))
        d_loss = F.softplus(-logits[: len(real)]).mean() + F.softplus(logits[len(real):]).mean()
        g_loss = F.softplus(-self.discriminate(fake, detach=True)).mean()
        return d_loss + g_loss


def pack(points: torch.Tensor) -> torch.Tensor:
    """[pack, b, 2] (slot, example, coordinate) -> [b, 2 pack]: example i is the concatenation of
    the i-th point of every slot, in slot order (PacGAN's packing)."""
    return points.permute(1, 0, 2).reshape(points.shape[1], -1)


def _generate(net, z: torch.Tensor) -> torch.Tensor:
    """G(z) in evaluation mode (the running batch-norm statistics)."""
    was = net.g.training
    net.g.eval()
    try:
        return net.g(z)
    finally:
        net.g.train(was)


class GAN(TorchGenerator):
    """Non-saturating GAN with PacGAN packing (``pack``); one generator pass per sample batch (NFE = 1)."""

    name = "gan"
    colour = "#8c564b"
    Config = GANConfig
    budgets = {"quick": {"train_steps": 400}, "default": {}, "full": {"train_steps": 20000},
               "converged": {"train_steps": 60000, "schedule": "plateau"}}
    #: the tuning space: the learning rate, Adam's beta1, the batch
    search_space = {"lr": LogUniform(5e-5, 2e-3), "beta1": Uniform(0.0, 0.9), "batch": Choice((128, 256, 512))}
    #: members of one stacked fit (tuning trials) may differ in these: Adam's beta1 through MemberAdam
    member_fields = ("lr", "beta1")
    no_likelihood = ("an implicit model: the generator pushes a 2D latent through a batch-normalised MLP, with no "
                     "tractable density and no encoder for a bound")

    def _build(self, device: str):
        self.device = device
        self.net = GANNet(self.config).to(device)

    def setup(self, data, *, device: str, seed: int, teacher=None) -> Setup:
        """The networks built from the seed; the data standardised (or not, ``standardize``)."""
        with seeded(seed, device):
            self._build(device)
        data = torch.as_tensor(data, dtype=torch.float32, device=device)
        self.std = Standardizer(data, 1.0) if self.config.standardize else Standardizer.identity(2, device)
        self.net.train()
        return Setup(self.std.to(data), generator(seed + 1, device), self.net)

    def draws(self, x0: torch.Tensor, g: torch.Generator):
        """One step's draws: the indices of ``pack`` x ``batch`` data points and as many latents."""
        c = self.config
        return (torch.randint(len(x0), (c.pack, c.batch), generator=g, device=x0.device),
                torch.randn(c.pack, c.batch, c.latent, generator=g, device=x0.device))

    def loss(self, net, context, x0, i, z) -> torch.Tensor:
        return net(pack(x0[i]), z)

    @torch.no_grad()
    def sample(self, n, *, steps=None, seed=None):
        parts = self.sample_parts(n, seed)
        return parts.back(parts.map(self.net, *parts.draws))

    def sample_parts(self, n: int, seed: int | None) -> SampleParts:
        """The latent drawn, then the generator (its running batch-norm statistics)."""
        z = torch.randn(n, self.config.latent, generator=generator(seed, self.device), device=self.device)
        return SampleParts((z,), _generate, self.std.back)

    def nfe(self, steps=None) -> int:
        return 1

    @property
    def nfe_module(self):
        return self.net.g

    @property
    def variant(self) -> str:
        return f"pack{self.config.pack}"

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "net": self.net.state_dict(), "std": self.std.state()}

    def load_state_dict(self, state: dict, device: str = "cpu") -> None:
        self._build(device)
        self.net.load_state_dict(state["net"])
        self.std = Standardizer.from_state(state["std"], device)
