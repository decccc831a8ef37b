"""RealNVP normalizing flow (Dinh et al. 2017) built from nflows parts.

``K`` affine coupling layers with alternating masks, each conditioned by an nflows ``ResidualNet``,
an nflows ``ActNorm`` before each coupling, over a standard-normal base; the data are
standardised (zero mean, unit std) first and the log-Jacobian of that map is added to the NLL.

nflows 0.14's ``AffineCouplingTransform`` bounds the scale to ``sigmoid(s + 2) + 1e-3`` in
(0.001, 1.001): a coupling can shrink but never expand by more than ~1, which fits tight modes
badly (baselines/README.md, "Measurements behind the defaults"). ``UnboundedAffineCoupling`` replaces it with
``scale = exp(s_max tanh(s / s_max))`` (a soft clamp of the log-scale at +-s_max, as in Glow-style
flows), which can expand as well as shrink while staying numerically safe.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.nn.nets import ResidualNet
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import AffineCouplingTransform
from nflows.transforms.normalization import ActNorm

from ..api import Choice, LogUniform, check_config
from .nets import Standardizer, generator, seeded
from .train import SampleParts, Setup, TorchGenerator


class StackableCoupling(AffineCouplingTransform):
    """nflows' affine coupling whose forward, on two features, splits the columns and concatenates
    them back (views and one ``cat``) instead of indexing them by tensors and assembling the output
    by index assignment: the same values, a layer that ``torch.vmap`` can batch (it cannot batch
    index assignment), and about ten fewer kernels a coupling in a training step (nflows' index,
    zeros and two ``index_copy``, and their backward), which is what a captured step of a tiny flow
    is bound by. (The inverse, used by sampling, is nflows' own.)"""

    def __init__(self, mask, transform_net_create_fn, unconditional_transform=None):
        super().__init__(mask, transform_net_create_fn, unconditional_transform)
        mask = torch.as_tensor(mask).tolist()
        #: on the host: whether the first of two columns is transformed (None: not two features)
        self.first_moves = mask[0] > 0 if len(mask) == 2 else None

    def forward(self, inputs, context=None):
        if self.first_moves is None or inputs.dim() != 2 or self.unconditional_transform is not None:
            return super().forward(inputs, context)
        first, second = inputs.split(1, dim=1)
        moved, identity = (first, second) if self.first_moves else (second, first)
        transform, logabsdet = self._coupling_transform_forward(
            inputs=moved, transform_params=self.transform_net(identity, context))
        return torch.cat((transform, identity) if self.first_moves else (identity, transform), dim=1), logabsdet


class UnboundedAffineCoupling(StackableCoupling):
    """Affine coupling whose scale ``exp(s_max tanh(s / s_max))`` lies in (e^-s_max, e^s_max)."""

    s_max = 3.0

    def _scale_and_shift(self, transform_params):
        raw = transform_params[:, self.num_transform_features :, ...]
        shift = transform_params[:, : self.num_transform_features, ...]
        return torch.exp(self.s_max * torch.tanh(raw / self.s_max)), shift

    def _coupling_transform_forward(self, inputs, transform_params):
        """nflows' forward with the log-scale used as it is computed (nflows takes the log of the
        scale again: a log and its backward more per coupling)."""
        shift, raw = transform_params.split(self.num_transform_features, dim=1)  # nflows' order; split's
        log_scale = self.s_max * torch.tanh(raw / self.s_max)  # backward is one cat (a slice's: zeros and a copy)
        return torch.addcmul(shift, inputs, torch.exp(log_scale)), log_scale.reshape(len(inputs), -1).sum(1)


class LeanActNorm(ActNorm):
    """nflows' ActNorm, on 2D inputs in fewer kernels: ``shift + exp(log_scale) x`` as one
    ``addcmul``, and the log-determinant (the same for every point) one sum expanded over the batch
    rather than multiplied by a vector of ones. The same values and parameters."""

    def forward(self, inputs, context=None):
        if inputs.dim() != 2:
            return super().forward(inputs, context)
        if self.training and not self.initialized:
            self._initialize(inputs)
        return torch.addcmul(self.shift, inputs, torch.exp(self.log_scale)), self.log_scale.sum().expand(len(inputs))


@dataclass
class FlowConfig:
    layers: int = 6
    hidden: int = 64
    blocks: int = 1
    coupling: str = "unbounded"  # unbounded | nflows (the bounded original, for comparison)
    actnorm: bool = True
    lr: float = 3e-3
    batch: int = 256
    train_steps: int = 4500
    cuda_graph: bool = True  # on CUDA, capture the training step in a CUDA graph (false: eager)

    def __post_init__(self):
        check_config(self, positive=("layers", "hidden", "blocks", "lr", "batch", "train_steps"),
                     choices={"coupling": ("unbounded", "nflows")})


class NegLogProb(torch.nn.Module):
    """-log p(x) under the flow as a module call (a flow itself cannot be called)."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.flow.log_prob(x)


class InversePass(torch.nn.Module):
    """The flow's inverse, noise -> data, as one module call: the network evaluation that one
    ``sample`` call makes (NFE = 1), whatever the number of couplings inside."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _inverse(self.flow, z)


def _inverse(flow: Flow, z: torch.Tensor) -> torch.Tensor:
    return flow._transform.inverse(z)[0]


def _invert(neg_log_prob: NegLogProb, z: torch.Tensor) -> torch.Tensor:
    """The inverse pass of the flow inside the module a fit trains (``SampleParts.map``)."""
    return _inverse(neg_log_prob.flow, z)


class RealNVP(TorchGenerator):
    """RealNVP on nflows; sampling is one inverse pass through the flow (NFE = 1)."""

    name = "flow"
    colour = "#9467bd"
    Config = FlowConfig
    budgets = {"quick": {"train_steps": 300}, "default": {}, "full": {"train_steps": 25000, "layers": 8},
               "converged": {"train_steps": 100000, "layers": 8}}
    #: the tuning space: the learning rate, the batch, the coupling networks' width
    search_space = {"lr": LogUniform(3e-4, 1e-2), "batch": Choice((128, 256, 512)), "hidden": Choice((32, 64, 128))}
    #: members of one stacked fit (tuning trials) may differ in these: the loss is a mean over the batch
    member_fields = ("lr", "batch")

    def _build(self, device: str):
        c = self.config
        if c.coupling not in ("unbounded", "nflows"):
            raise ValueError(f"unknown coupling {c.coupling!r}; valid: unbounded, nflows")
        cls = UnboundedAffineCoupling if c.coupling == "unbounded" else StackableCoupling
        transforms = []
        for i in range(c.layers):
            if c.actnorm:
                transforms.append(LeanActNorm(2))
            mask = torch.tensor([1, 0] if i % 2 == 0 else [0, 1])
            transforms.append(cls(mask, lambda i_, o_: ResidualNet(i_, o_, c.hidden, num_blocks=c.blocks, activation=F.silu)))
        self.device = device
        self.flow = Flow(CompositeTransform(transforms), StandardNormal([2])).to(device)
        self._inverse = InversePass(self.flow)

    def setup(self, data, *, device: str, seed: int, teacher=None) -> Setup:
        """The flow built from the seed, the data standardised (zero mean, unit std) and ActNorm
        initialised from a first batch; what is trained is -log p as a module (``NegLogProb``)."""
        with seeded(seed, device):
            self._build(device)
        data = torch.as_tensor(data, dtype=torch.float32, device=device)
        self.std = Standardizer(data, 1.0)
        x0 = self.std.to(data)
        g = generator(seed + 1, device)
        with torch.no_grad():  # ActNorm initialises itself from its first batch
            self.flow.log_prob(x0[torch.randint(len(x0), (4096,), generator=g, device=device)])
        for m in self.flow.modules():  # ActNorm reads its "initialised" flag on every forward: on the host
            if isinstance(m, ActNorm):  # (a read from the GPU would sync, and break graph capture)
                m.initialized = torch.tensor(True)
        return Setup(x0, g, NegLogProb(self.flow))

    def draws(self, x0: torch.Tensor, g: torch.Generator):
        """One step's random draws: data indices."""
        return (torch.randint(len(x0), (self.config.batch,), generator=g, device=x0.device),)

    def loss(self, neg_log_prob, context, x0, i) -> torch.Tensor:
        """The mean negative log-likelihood of the data points ``x0[i]``."""
        return neg_log_prob(x0[i]).mean()

    @torch.no_grad()
    def sample(self, n, *, steps=None, seed=None):
        parts = self.sample_parts(n, seed)
        return parts.back(self._inverse(*parts.draws))

    def sample_parts(self, n: int, seed: int | None) -> SampleParts:
        """The base draw (torch's RNG seeded, as nflows samples), then the inverse pass of the
        flow in ``-log p``'s module (``NegLogProb``: what the fit trains)."""
        with seeded(0 if seed is None else seed, self.device):
            z = torch.randn(n, 2, device=self.device)
        return SampleParts((z,), _invert, self.std.back)

    def nfe(self, steps=None) -> int:
        return 1

    @property
    def nfe_module(self):
        """One inverse pass through the whole flow (every coupling's conditioner runs inside it)."""
        return self._inverse

    @property
    def variant(self) -> str:
        return f"realnvp-{self.config.layers}{'-bounded' if self.config.coupling == 'nflows' else ''}"

    @torch.no_grad()
    def log_prob(self, x) -> torch.Tensor:
        """Exact log-density in the original data's units (the standardisation's log-Jacobian added)."""
        x = self.std.to(torch.as_tensor(x, dtype=torch.float32, device=self.device))
        return self.flow.log_prob(x) + 2 * math.log(self.std.scale)

    def evaluate(self, test_data) -> dict[str, float]:
        """Exact test negative log-likelihood in nats per point."""
        return {"nll": float(-self.log_prob(test_data).mean())}

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "flow": self.flow.state_dict(), "std": self.std.state()}

    def load_state_dict(self, state: dict, device: str = "cpu") -> None:
        self._build(device)
        self.flow.load_state_dict(state["flow"])
        self.std = Standardizer.from_state(state["std"], device)
