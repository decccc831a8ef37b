"""Consistency models (Song et al. 2023): distillation from the diffusion model (``cm-cd``) and
improved consistency training from scratch (``cm-ct``, Song & Dhariwal 2023).

The consistency function is ``f(x, t) = c_skip(t) x + c_out(t) F(c_in x, c_noise)`` with
``c_skip(eps) = 1`` and ``c_out(eps) = 0``, so ``f(x, eps) = x`` holds exactly for any weights.
Two parametrisations:

- ``song`` (default): c_skip = sd^2 / ((t - eps)^2 + sd^2), c_out = sd (t - eps) / sqrt(sd^2 + t^2)
  (the EDM coefficients shifted by eps). With the same c_in / c_noise as the diffusion model, a
  student initialised from the teacher's weights starts as the teacher's one-step denoiser.
- ``linear`` (the source report's): s = clamp((t - eps)/(T - eps), 0, 1), c_skip = 1 - s, c_out = s.

As for diffusion, data are standardised to sd = 0.5 so that the constants of the papers (eps = 0.002,
sd = 0.5, the pseudo-Huber c = 0.00054 sqrt(dim), P_mean / P_std) apply as published; every time
below is in those units. T is 20 rather than 80 (40 data stds; see diffusion.py and
baselines/README.md, "Measurements behind the defaults").

Sampling: one step ``f(x_T, T)``, ``x_T ~ N(0, T^2 I)`` (1 NFE), or multistep (Algorithm 1 of the
paper): after the first step, for each tau_n of a decreasing schedule, ``x <- f(x + sqrt(tau_n^2 -
eps^2) z, tau_n)`` (k steps = k NFE). The schedule for k steps is the k - 1 points of a Karras
(rho = 7) grid from ``tau_max`` down towards eps, without eps itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..api import Choice, Generator, LogUniform, PFODEDenoiser, Uniform, UsageError, check_config
from .diffusion import time_grid
from .graphs import FusedSteps, GraphCache, graphs_available
from .nets import EMA, Standardizer, TimeMLP, generator, seeded
from .samplers import ONE_STEP, euler_step, heun_correction
from .train import SampleParts, Setup, TorchGenerator

PARAMETRIZATIONS = ("song", "linear")
DISTANCES = ("l2", "huber")


class ConsistencyFunction(torch.nn.Module):
    def __init__(self, hidden: int, depth: int, emb_dim: int, eps: float, T: float, sd: float, form: str = "song"):
        super().__init__()
        if form not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {form!r}; valid: {', '.join(PARAMETRIZATIONS)}")
        self.eps, self.T, self.sd, self.form = eps, T, sd, form
        self.net = TimeMLP(2, hidden, depth, emb_dim)

    def coefficients(self, t: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at times t."""
        if self.form == "song":
            c_skip = self.sd**2 / ((t - self.eps) ** 2 + self.sd**2)
            c_out = self.sd * (t - self.eps) / (self.sd**2 + t**2).sqrt()
        else:
            s = ((t - self.eps) / (self.T - self.eps)).clamp(0, 1)
            c_skip, c_out = 1 - s, s
        return c_skip, c_out, 1 / (t**2 + self.sd**2).sqrt(), t.log() / 4

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = self.coefficients(t)
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``sqrt(|a - b|^2 + c^2) - c`` per row."""
    return (((a - b) ** 2).sum(1) + c * c).sqrt() - c


def ct_discretisation(k: int, total: int, s0: int = 10, s1: int = 1280, stage: int = 0) -> int:
    """iCT's curriculum: N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1)),
    or K' = ``stage`` steps where given (a curriculum that does not depend on the budget K)."""
    k_prime = stage or max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def lognormal_level_probs(sigmas: torch.Tensor, p_mean, p_std: float) -> torch.Tensor:
    """iCT's discretised lognormal: p(i) ∝ erf((ln s_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln s_i - P_mean)/(sqrt2 P_std))
    over the N - 1 adjacent pairs of the ascending grid ``sigmas``."""
    e = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return (p / p.sum()).float()


@dataclass
class ConsistencyConfig:
    sigma_min: float = 0.002
    sigma_max: float = 20.0  # as for diffusion: T = 40 data stds suffices in 2D (measured, see diffusion.py)
    sigma_data: float = 0.5
    parametrization: str = "song"  # song | linear
    distance: str = "l2"  # l2 | huber (pseudo-Huber, c = 0.00054 sqrt(2))
    hidden: int = 96  # as diffusion's (cm-cd copies its teacher's architecture)
    depth: int = 4
    emb_dim: int = 64
    lr: float = 1e-3
    batch: int = 512
    train_steps: int = 4000
    ema_decay: float = 0.999  # the EMA of the weights that sampling uses
    target_decay: float = 0.9  # CD: mu of the target network theta^- (0: stop-gradient of the online net)
    tau_max: float = 0.1  # multistep: the first re-noising level (benchmarks/tau_sweep.py)
    default_steps: int = 1
    cuda_graph: bool = True  # on CUDA, capture the training step and the sampling loop in CUDA graphs (false: eager)
    # CD only
    grid_points: int = 32  # N, Karras (rho = 7) spaced, as in the source report
    teacher_solver: str = "euler"  # euler | heun
    bc_weight: float = 0.0  # the report's optional boundary loss |f(x + eps z, eps) - x|^2
    init_from_teacher: bool = True
    # CT only
    s0: int = 10
    s1: int = 1280
    #: steps per curriculum stage (N doubles each stage); 0: iCT's, the budget split into
    #: log2(s1/s0) + 1 stages. The converged budget fixes it, so that a fit's path does not depend
    #: on its cap (a doubled cap would otherwise stretch every stage).
    stage_steps: int = 0
    p_mean: float = -1.1
    p_std: float = 2.0

    def __post_init__(self):
        check_config(self, positive=("sigma_min", "sigma_max", "sigma_data", "hidden", "depth", "emb_dim", "lr",
                                     "batch", "train_steps", "tau_max", "default_steps", "grid_points", "s0", "s1",
                                     "p_std"),
                     nonnegative=("bc_weight", "stage_steps"), fraction=("ema_decay", "target_decay"),
                     choices={"parametrization": PARAMETRIZATIONS, "distance": DISTANCES,
                              "teacher_solver": ONE_STEP})
        if not self.sigma_min < self.tau_max <= self.sigma_max:
            raise UsageError(f"{type(self).__name__}.tau_max = {self.tau_max}: must lie in (sigma_min, sigma_max] = "
                             f"({self.sigma_min}, {self.sigma_max}]")
        if self.grid_points < 2 or self.s1 < self.s0:
            raise UsageError(f"{type(self).__name__}: need grid_points >= 2 and s1 >= s0 "
                             f"(got {self.grid_points}, {self.s0}, {self.s1})")


class _Consistency(TorchGenerator):
    Config = ConsistencyConfig
    multistep = True
    no_likelihood = ("a consistency model is a learned map from noise to data with no tractable density "
                     "(its multistep sampler re-noises, so no ODE gives a change of variables)")

    def _build(self, device: str, arch: dict | None = None):
        """The consistency function on ``device``; ``arch`` (hidden, depth, emb_dim) overrides the
        config's network shape (a student initialised from its teacher takes the teacher's)."""
        c = self.config
        if c.distance not in DISTANCES:
            raise ValueError(f"unknown distance {c.distance!r}; valid: {', '.join(DISTANCES)}")
        self.device = device
        self.arch = arch or {"hidden": c.hidden, "depth": c.depth, "emb_dim": c.emb_dim}
        self.model = ConsistencyFunction(self.arch["hidden"], self.arch["depth"], self.arch["emb_dim"], c.sigma_min,
                                         c.sigma_max, c.sigma_data, c.parametrization).to(device)
        self.graphs = GraphCache(device)

    def _distance(self, a, b):
        if self.config.distance == "huber":
            return pseudo_huber(a, b, 0.00054 * math.sqrt(a.shape[1]))
        return ((a - b) ** 2).sum(1)

    def _t(self, v) -> torch.Tensor:
        return torch.full((1, 1), float(v), device=self.device)

    # -- sampling -------------------------------------------------------------------------------
    def taus(self, steps: int) -> list[float]:
        c = self.config
        if steps <= 1:
            return []
        return time_grid(steps - 1, c.sigma_min, c.tau_max)[:-1].tolist()

    @torch.no_grad()
    def sample(self, n, *, steps=None, seed=None):
        c = self.config
        steps = steps or c.default_steps
        noise = lambda g: torch.randn(steps, n, 2, generator=g, device=self.device)  # noqa: E731

        def loop(noise):
            return self.std.back(self._chain(steps)(self.ema.model, noise))

        if c.cuda_graph and self.device.startswith("cuda") and graphs_available():
            # the levels are computed only to build the loop (a replayed call costs its kernels):
            # the key holds what they depend on
            key = (n, steps, c.sigma_min, c.sigma_max, c.tau_max)
            return self.graphs.run(key, noise, loop, seed, build=lambda: self._fused(*self.levels(steps)))
        return loop(noise(generator(seed, self.device)))

    def _chain(self, steps: int):
        """Multistep sampling as ``chain(f, noise)``: x = f(T z_0, T), then x = f(x + s_i z_i, tau_i)
        (``levels``), ``noise`` [steps, n, 2]."""
        scales, levels = self.levels(steps)
        times = torch.tensor(levels, device=self.device).reshape(-1, 1, 1)

        def chain(f, noise):
            x = f(scales[0] * noise[0], times[0])
            for i in range(1, steps):
                x = f(x + scales[i] * noise[i], times[i])
            return x

        return chain

    def sample_parts(self, n: int, seed: int | None) -> SampleParts:
        """The noise of every step drawn, then the chain of the given consistency function."""
        steps = self.config.default_steps
        noise = torch.randn(steps, n, 2, generator=generator(seed, self.device), device=self.device)
        return SampleParts((noise,), self._chain(steps), self.std.back)

    def levels(self, steps: int) -> tuple[list[float], list[float]]:
        """Multistep sampling's noise scales and levels: x = T z at level T, then for each re-noising
        level tau, x + sqrt(tau^2 - eps^2) z at level tau."""
        c = self.config
        taus = self.taus(steps)
        return [c.sigma_max] + [math.sqrt(tau**2 - c.sigma_min**2) for tau in taus], [c.sigma_max, *taus]

    def _fused(self, scales: list[float], times: list[float], thin: bool = True):
        """The sampling loop as FusedSteps: f(x, t) = c_skip x + c_out F(c_in x, c_noise); the first
        step's x_T = T z is folded into its coefficients, the standardisation undone in the last
        (``thin``: see FusedSteps)."""
        t = torch.tensor(times, dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = self.ema.model.coefficients(t)
        c_in[0], c_skip[0] = c_in[0] * scales[0], c_skip[0] * scales[0]
        fs = FusedSteps(self.ema.model.net, c_in.tolist(), c_noise.tolist(), c_skip.tolist(), c_out.tolist(),
                        out_scale=1 / self.std.scale, out_shift=self.std.mean, thin=thin)

        def loop(noise):
            x = fs(noise[0], 0)
            for i in range(1, len(times)):
                x = fs(torch.add(x, noise[i], alpha=scales[i]), i)
            return x

        loop.fused = fs
        return loop

    @torch.no_grad()
    def one_step_map(self, n, *, steps=None, seed=None):
        """[n, 2, 2]: pairs (z, f(T z, T)) for the one-step arrow figure: the unit noise z (x_T = T z,
        shown at unit scale since x_T itself lies far outside the data) and its image in data units."""
        c = self.config
        z = torch.randn(n, 2, generator=generator(seed, self.device), device=self.device)
        y = self.ema.model(c.sigma_max * z, self._t(c.sigma_max))
        return torch.stack([z, self.std.back(y)], 1).cpu()

    def nfe(self, steps=None) -> int:
        return steps or self.config.default_steps

    def default_steps(self) -> int:
        return self.config.default_steps

    @property
    def nfe_module(self):
        return self.ema.model.net

    @property
    def variant(self) -> str:
        return f"{self.config.parametrization}/{self.config.distance}"

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "arch": self.arch, "ema": self.ema.model.state_dict(),
                "std": self.std.state()}

    def load_state_dict(self, state: dict, device: str = "cpu") -> None:
        saved = state.get("arch") or state["config"]  # checkpoints before "arch" kept the shape in the config
        self._build(device, {k: int(saved[k]) for k in ("hidden", "depth", "emb_dim")})
        self.ema = EMA(self.model, self.config.ema_decay)
        self.ema.model.load_state_dict(state["ema"])
        self.std = Standardizer.from_state(state["std"], device)


class ConsistencyDistillation(_Consistency):
    """Consistency distillation from the diffusion model of the same dataset and seed."""

    name = "cm-cd"
    colour = "#d62728"
    teacher = "diffusion"
    teacher_needs = ("pf-ode denoiser",)
    budgets = {"quick": {"train_steps": 300, "batch": 256}, "default": {}, "full": {"train_steps": 15000},
               "converged": {"train_steps": 30000}}
    #: the tuning space: the learning rate, the batch, the target network's decay
    search_space = {"lr": LogUniform(1e-4, 1e-2), "batch": Choice((256, 512, 1024)), "target_decay": Uniform(0.0, 0.99)}
    #: members of one stacked fit (tuning trials) may differ in these: each member's target moves at its own decay
    member_fields = ("lr", "target_decay", "batch")

    def setup(self, data, *, device: str, seed: int, teacher: Generator | None = None) -> Setup:
        """Checks the teacher, builds the student (from the teacher's network where it starts from
        it) with its EMA and target copies, and standardises the data as the teacher did; the
        teacher's PF-ODE denoiser is the frozen network."""
        c = self.config
        if teacher is None or "pf-ode denoiser" not in teacher.capabilities():
            raise ValueError("cm-cd needs a fitted teacher that provides pf_ode_denoiser()")
        pf: PFODEDenoiser = teacher.pf_ode_denoiser()
        if (pf.sigma_min, pf.sigma_max, pf.sigma_data) != (c.sigma_min, c.sigma_max, c.sigma_data):
            raise ValueError(f"cm-cd and its teacher must share sigma_min, sigma_max and sigma_data: the teacher has "
                             f"{pf.sigma_min}, {pf.sigma_max}, {pf.sigma_data}; cm-cd {c.sigma_min}, {c.sigma_max}, "
                             f"{c.sigma_data}")
        init = c.init_from_teacher and pf.net is not None
        if c.init_from_teacher and not init:
            raise ValueError("init_from_teacher needs a teacher whose PF-ODE denoiser exposes its network (net); "
                             "set init_from_teacher=false")
        with seeded(seed, device):  # the student takes the teacher's architecture and weights
            self._build(device, {k: getattr(pf.net, k) for k in ("hidden", "depth", "emb_dim")} if init else None)
        if init:
            self.model.net.load_state_dict(pf.net.state_dict())
        self.ema = EMA(self.model, c.ema_decay)
        # the target copy theta^- (at decay 0 an exact copy of the online weights after each step:
        # the stop-gradient of the online net), kept at every decay so that fits at several decays stack
        self.target = EMA(self.model, c.target_decay)
        self.std = Standardizer.from_state({"mean": pf.mean, "scale": pf.scale}, device)
        self.grid = time_grid(c.grid_points - 1, c.sigma_min, c.sigma_max).flip(0).to(device)  # ascending t_1..t_N
        x0 = self.std.to(torch.as_tensor(data, dtype=torch.float32, device=device))
        return Setup(x0, generator(seed + 1, device), self.model, ema=self.ema.model, ema_decay=c.ema_decay,
                     target=self.target.model, target_decay=c.target_decay,
                     frozen=pf.denoise)

    def draws(self, x0: torch.Tensor, g: torch.Generator):
        """One step's random draws: data indices, the lower of a pair of adjacent grid levels per
        point, and noise."""
        c, device = self.config, x0.device
        return (torch.randint(len(x0), (c.batch,), generator=g, device=device),
                torch.randint(0, c.grid_points - 1, (c.batch, 1), generator=g, device=device),
                torch.randn(c.batch, x0.shape[1], generator=g, device=device))

    def loss(self, f, context, x0, i, n, z) -> torch.Tensor:
        """d(f(x_{t'}, t'), f_target(x_hat, t)) on the data points x = ``x0[i]`` at the grid levels
        t = t_n, t' = t_{n+1}: x_hat is the teacher D's PF-ODE step from x_{t'} = x + t' z down to t,
        as its samplers take it; plus the optional boundary term. ``f`` runs the student,
        ``f.target`` its target copy, ``f.frozen`` the teacher's denoiser D."""
        c = self.config
        f_target, D = f.target, f.frozen
        x, t_n, t_next = x0[i], self.grid[n], self.grid[n + 1]
        x_next = x + t_next * z
        with torch.no_grad():
            d = D(x_next, t_next)
            x_hat = euler_step(x_next, d, t_next, t_n)
            if c.teacher_solver == "heun":
                x_hat = heun_correction(x_next, d, x_hat, D(x_hat, t_n), t_next, t_n)
            target = f_target(x_hat, t_n)
        loss = self._distance(f(x_next, t_next), target).mean()
        if c.bc_weight:
            eps_t = torch.full_like(t_n, c.sigma_min)
            loss = loss + c.bc_weight * ((f(x + c.sigma_min * z, eps_t) - x) ** 2).sum(-1).mean()
        return loss


@dataclass
class CTConfig(ConsistencyConfig):
    distance: str = "huber"  # iCT's pseudo-Huber
    # the default budget's steps and batch: baselines/README.md, "Measurements behind the defaults"
    batch: int = 384
    train_steps: int = 10000


class ConsistencyTraining(_Consistency):
    """Improved consistency training (iCT) from scratch: no teacher."""

    name = "cm-ct"
    colour = "#ff7f0e"
    Config = CTConfig
    # converged: iCT's stages at a 60,000-step budget (7,500 steps each), whatever the cap, at a
    # constant rate of 3e-4: at the cosine budgets' 1e-3 every fit blew up once the curriculum reached
    # N = 321 (baselines/README.md, "The converged grid on one H200"); 3e-4 trains through every
    # stage and scored best on the validation sample of 1e-4, 3e-4 and 1e-3. The cap: the stages reach
    # the largest N at step 52,500; with a 60,000 cap every fit still improved there (the doubled-cap
    # check, baselines/README.md "Today's code on two H200s"), so the final N gets 67,500 steps
    budgets = {"quick": {"train_steps": 300, "batch": 256}, "default": {}, "full": {"train_steps": 30000},
               "converged": {"train_steps": 120000, "stage_steps": 7500, "lr": 3e-4}}
    #: the tuning space: the learning rate, the batch, the training noise levels' centre
    search_space = {"lr": LogUniform(1e-4, 1e-2), "batch": Choice((256, 384, 512, 1024)), "p_mean": Uniform(-2.0, -0.2)}
    #: members of one stacked fit (tuning trials) may differ in these: each member draws its levels
    #: from its own p_mean's distribution
    member_fields = ("lr", "p_mean", "batch")

    def setup(self, data, *, device: str, seed: int, teacher=None) -> Setup:
        """The network and its EMA built from the seed, the data standardised to sigma_data."""
        with seeded(seed, device):
            self._build(device)
        self.ema = EMA(self.model, self.config.ema_decay)
        data = torch.as_tensor(data, dtype=torch.float32, device=device)
        self.std = Standardizer(data, self.config.sigma_data)
        return Setup(self.std.to(data), generator(seed + 1, device), self.model, ema=self.ema.model,
                     ema_decay=self.config.ema_decay)

    def phase(self, k: int) -> int:
        """The discretisation N(k) of step k: the loss changes with k through it alone."""
        c = self.config
        return ct_discretisation(k, c.train_steps, c.s0, c.s1, c.stage_steps)

    def continues_to_longer_caps(self) -> bool:
        return super().continues_to_longer_caps() and bool(self.config.stage_steps)  # (else N(k) follows the cap)

    def train_levels(self, N: int, device: str) -> torch.Tensor:
        """The N ascending noise levels of discretisation N (cached per N)."""
        cache = self.__dict__.setdefault("_train_levels", {})
        if N not in cache:
            c = self.config
            cache[N] = time_grid(N - 1, c.sigma_min, c.sigma_max).flip(0).to(device)
        return cache[N]

    def step_context(self, k, t):
        """The levels of step k's discretisation (``train_levels``): fixed within a phase."""
        return self.train_levels(self.phase(k), self.device)

    def draws(self, x0: torch.Tensor, g: torch.Generator):
        """One step's random draws: data indices, a uniform per point (its pair of adjacent levels
        by inverse CDF) and noise."""
        c, device = self.config, x0.device
        return (torch.randint(len(x0), (c.batch,), generator=g, device=device),
                torch.rand(c.batch, 1, generator=g, device=device),
                torch.randn(c.batch, x0.shape[1], generator=g, device=device),
                self.member_value("p_mean", device, torch.float64))

    def loss(self, f, sig, x0, i, u, z, p_mean) -> torch.Tensor:
        """iCT's loss: d(f(x + s' z, s'), sg f(x + s z, s)) / (s' - s), the same z for both, on the
        data points x = ``x0[i]``, with the pair of adjacent levels ``sig`` that u falls in by
        inverse CDF of iCT's level distribution at ``p_mean`` (the member's own, side by side: a few
        kernels a step over the N levels, in float64 as a cached CDF would be)."""
        cdf = lognormal_level_probs(sig, p_mean, self.config.p_std).cumsum(0)
        j = torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1)
        x, s_i, s_next = x0[i], sig[j], sig[j + 1]
        with torch.no_grad():
            target = f(x + s_i * z, s_i)  # stop-gradient of the online net
        return (self._distance(f(x + s_next * z, s_next), target) / (s_next - s_i).squeeze(1)).mean()
