"""Score-based diffusion with the variance-exploding perturbation ``x_t = x + t z`` and
probability-flow ODE samplers (Song et al. 2021; Karras et al. 2022, "EDM").

Parametrisation. The network F is wrapped as a denoiser ``D(x; t) = c_skip x + c_out F(c_in x,
c_noise)`` and the score is ``s = (D - x) / t^2``. Two wrappings are available:
``edm`` (default; Karras et al. Table 1: c_skip = sd^2/(t^2+sd^2), c_out = t sd/sqrt(t^2+sd^2)) and
``score`` (plain denoising score matching: c_skip = 1, c_out = t, so F predicts -z and the loss is
the classic ``t^2 |s - (-(x_t - x)/t^2)|^2``). Both use c_in = 1/sqrt(t^2+sd^2), c_noise = ln(t)/4
and the loss weight lambda(t) = 1/c_out^2, which makes the target of F unit-variance at every t.

Scale. The data are standardised to sd = 0.5 (zero mean, one scale for both axes) so that EDM's
constants (sigma_min = 0.002, sd = 0.5, P_mean = -1.2, P_std = 1.2) hold unchanged; all times t in
this module are in those units, and the mapping is undone on the samples. T = sigma_max is 20, not
EDM's 80: at T = 20 = 40 data stds, N(0, T^2) is already indistinguishable from the noised data, and
the rest of the range only costs accuracy (the measurement, for diffusion and for consistency
training, which shares T: baselines/README.md, "Measurements behind the defaults").

Training times: ln t ~ N(P_mean, P_std^2) (EDM's lognormal). Sampling integrates
``dx/dt = -t s(x, t) = (x - D(x; t)) / t`` from ``x_T ~ N(0, T^2 I)`` down to ``eps`` with Euler
(N NFE) or Heun (EDM Algorithm 1, last step Euler: 2N - 1 NFE) on a Karras (rho = 7) or uniform grid.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..api import Choice, LogUniform, PFODEDenoiser, Uniform, UsageError, check_config
from . import samplers
from .graphs import FusedSteps, GraphCache, graphs_available
from .nets import EMA, Standardizer, TimeMLP, generator, seeded
from .train import SampleParts, Setup, TorchGenerator, at_most


@dataclass
class DiffusionConfig:
    sigma_min: float = 0.002  # eps, in standardised units
    sigma_max: float = 20.0  # T (see the module docstring)
    sigma_data: float = 0.5
    parametrization: str = "edm"  # edm | score
    p_mean: float = -1.8  # EDM's -1.2 shifted down: tight 2D modes need more low-noise training
    p_std: float = 1.2
    hidden: int = 96
    depth: int = 4
    emb_dim: int = 64
    lr: float = 2e-3
    batch: int = 512
    train_steps: int = 4500  # the default budget (baselines/README.md, "Measurements behind the defaults")
    ema_decay: float = 0.999
    sampler: str = "euler"  # euler | heun | lms | dpmpp_2m (models/samplers.py)
    grid: str = "karras"  # karras | uniform
    rho: float = 7.0
    default_steps: int = 100
    cuda_graph: bool = True  # on CUDA, capture the training step and the sampling loop in CUDA graphs (false: eager)
    nll_points: int = 2000  # held-out points whose PF-ODE log-likelihood is reported (0: none)
    nll_rtol: float = 1e-5  # dopri5 tolerances of the likelihood ODE
    nll_atol: float = 1e-5

    def __post_init__(self):
        check_config(self, positive=("sigma_min", "sigma_max", "sigma_data", "p_std", "hidden", "depth", "emb_dim",
                                     "lr", "batch", "train_steps", "rho", "default_steps", "nll_rtol", "nll_atol"),
                     nonnegative=("nll_points",), fraction=("ema_decay",),
                     choices={"parametrization": PARAMETRIZATIONS, "sampler": SAMPLERS, "grid": GRIDS})
        if self.sigma_min >= self.sigma_max:
            raise UsageError(f"DiffusionConfig: sigma_min = {self.sigma_min} must be below sigma_max = {self.sigma_max}")


PARAMETRIZATIONS = ("edm", "score")
SAMPLERS = tuple(samplers.SAMPLERS)  # euler, heun, lms, dpmpp_2m
GRIDS = ("karras", "uniform")


def time_grid(steps: int, t_min: float, t_max: float, kind: str = "karras", rho: float = 7.0) -> torch.Tensor:
    """``steps + 1`` decreasing times from t_max to t_min (Karras et al. eq. 5, or uniform)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    i = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "karras":
        t = (t_max ** (1 / rho) + i * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    elif kind == "uniform":
        t = t_max + i * (t_min - t_max)
    else:
        raise ValueError(f"unknown grid {kind!r}; valid: {', '.join(GRIDS)}")
    return t.float()


class Denoiser(torch.nn.Module):
    """``D(x; t) = c_skip x + c_out F(c_in x, c_noise)`` around a TimeMLP F."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        if cfg.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {cfg.parametrization!r}; valid: {', '.join(PARAMETRIZATIONS)}")
        self.sd = cfg.sigma_data
        self.edm = cfg.parametrization == "edm"
        self.net = TimeMLP(2, cfg.hidden, cfg.depth, cfg.emb_dim)

    def coefficients(self, t: torch.Tensor):
        sd2 = self.sd**2
        if self.edm:
            c_skip = sd2 / (t**2 + sd2)
            c_out = t * self.sd / (t**2 + sd2).sqrt()
        else:
            c_skip, c_out = torch.ones_like(t), t
        return c_skip, c_out, 1 / (t**2 + sd2).sqrt(), t.log() / 4

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t``: one time per row ([n, 1]) or one for the batch ([1, 1])."""
        c_skip, c_out, c_in, c_noise = self.coefficients(t)
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


@torch.no_grad()
def pf_ode(denoise, x: torch.Tensor, ts: torch.Tensor, sampler: str = "euler", trajectory: list | None = None,
           ts_device: torch.Tensor | None = None) -> torch.Tensor:
    """Integrates ``dx/dt = (x - D(x; t)) / t`` along the decreasing grid ``ts`` (a CPU tensor;
    ``ts_device``, its copy on x's device, may be given so that the loop makes no host transfer and
    can be captured in a CUDA graph) with one of ``samplers.SAMPLERS``.

    An Euler step is ``x + (t' - t)(x - D)/t = lerp(D, x, t'/t)``: one fused op per step, so the loop
    adds little to the network's own time (benchmarked by ``genbench bench-sampler``)."""
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(samplers.SAMPLERS)}")
    return samplers.SAMPLERS[sampler][0](denoise, x, ts, ts_device, trajectory)


def pf_ode_log_prob(denoise, x: torch.Tensor, t_min: float, t_max: float, rtol: float = 1e-5,
                    atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """Exact log-density of x under the PF-ODE model (Song et al. 2021, eq. 39), by the
    instantaneous change of variables: integrate ``dx/ds = x - D(x; t)`` with s = ln t (the
    PF-ODE ``dx/dt = (x - D)/t`` in log time, smooth down to t_min) from t_min to t_max together
    with the divergence of that field, and add the log-density of the prior N(0, t_max^2 I) at the
    end point: ``log p(x) = log N(x(t_max); 0, t_max^2) + int div f ds``.

    In 2D the divergence is exact (two vector-Jacobian products per evaluation; no Hutchinson
    estimator). Solver: torchdiffeq's adaptive Dormand-Prince 5(4) with the given tolerances.
    Returns (log p per point, the number of field evaluations)."""
    from torchdiffeq import odeint

    calls = 0

    def field(s, state):
        nonlocal calls
        calls += 1
        y = state[0].detach().requires_grad_(True)
        with torch.enable_grad():
            f = y - denoise(y, s.exp().reshape(1, 1))
            div = sum(torch.autograd.grad(f[:, i].sum(), y, retain_graph=i == 0)[0][:, i] for i in range(2))
        return f.detach(), div.detach()

    x = torch.as_tensor(x, dtype=torch.float32)
    s_span = torch.tensor([math.log(t_min), math.log(t_max)], dtype=torch.float32, device=x.device)
    ys, divs = odeint(field, (x, torch.zeros(len(x), device=x.device)), s_span, rtol=rtol, atol=atol,
                      method="dopri5")
    end, integral = ys[-1], divs[-1]
    prior = -0.5 * (end**2).sum(1) / t_max**2 - 2 * math.log(t_max) - math.log(2 * math.pi)
    return prior + integral, calls


class Diffusion(TorchGenerator):
    """VE diffusion (EDM-preconditioned score network) with PF-ODE samplers: Euler, Heun, LMS, DPM-Solver++(2M)."""

    name = "diffusion"
    colour = "#1f77b4"
    Config = DiffusionConfig
    budgets = {"quick": {"train_steps": 300, "batch": 256}, "default": {}, "full": {"train_steps": 20000},
               "converged": {"train_steps": 80000}}  # converged: the cap; the validation curve stops it
    #: the tuning space (3 knobs, as every built-in): the learning rate, the batch, the training noise levels' centre
    search_space = {"lr": LogUniform(3e-4, 1e-2), "batch": Choice((256, 512, 1024)), "p_mean": Uniform(-2.4, -0.6)}
    #: members of one stacked fit (tuning trials) may differ in these: p_mean reaches the loss as a draw
    member_fields = ("lr", "p_mean", "batch")
    multistep = True

    def _build(self, device: str):
        cfg = self.config
        if cfg.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {cfg.sampler!r}; valid: {', '.join(SAMPLERS)}")
        time_grid(1, cfg.sigma_min, cfg.sigma_max, cfg.grid)  # validates the grid name
        self.device = device
        self.model = Denoiser(cfg).to(device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.graphs = GraphCache(device)

    def setup(self, data, *, device: str, seed: int, teacher=None) -> Setup:
        """The network and its EMA built from the seed, the data standardised to sigma_data."""
        cfg = self.config
        with seeded(seed, device):
            self._build(device)
        data = torch.as_tensor(data, dtype=torch.float32, device=device)
        self.std = Standardizer(data, cfg.sigma_data)
        return Setup(self.std.to(data), generator(seed + 1, device), self.model, ema=self.ema.model,
                     ema_decay=lambda t: at_most((1 + t) / (10 + t), cfg.ema_decay))

    def draws(self, x0: torch.Tensor, g: torch.Generator):
        """One step's random draws: data indices, standard normals for the noise levels, noise; and
        the fit's own p_mean (a member field: members of a stacked fit each train at their own)."""
        cfg, device = self.config, x0.device
        return (torch.randint(len(x0), (cfg.batch,), generator=g, device=device),
                torch.randn(cfg.batch, 1, generator=g, device=device),
                torch.randn(cfg.batch, x0.shape[1], generator=g, device=device), self.member_value("p_mean", device))

    def loss(self, denoise, context, x0, i, e, z, p_mean) -> torch.Tensor:
        """Denoising score matching with EDM's weighting, |D(x + t z; t) - x|^2 / c_out(t)^2, on the
        data points ``x0[i]`` at EDM's lognormal levels t = exp(p_mean + p_std e)."""
        cfg = self.config
        x, t = x0[i], (p_mean + cfg.p_std * e).exp()
        _, c_out, _, _ = self.model.coefficients(t)
        return (((denoise(x + t * z, t) - x) / c_out) ** 2).sum(1).mean()

    # -- sampling -------------------------------------------------------------------------------
    def default_steps(self) -> int:
        return self.config.default_steps

    def grid(self, steps: int) -> torch.Tensor:
        cfg = self.config
        return time_grid(steps, cfg.sigma_min, cfg.sigma_max, cfg.grid, cfg.rho)

    def prior(self, n: int, seed: int | None) -> torch.Tensor:
        return self.config.sigma_max * torch.randn(n, 2, generator=generator(seed, self.device), device=self.device)

    @torch.no_grad()
    def sample(self, n, *, steps=None, seed=None, trajectory: bool = False):
        cfg = self.config
        steps = steps or cfg.default_steps
        sampler = cfg.sampler
        traj = [] if trajectory else None

        def loop(x):
            grid = self.grid(steps)
            return self.std.back(pf_ode(self.ema.model, x, grid, sampler, traj, grid.to(self.device)))

        if cfg.cuda_graph and self.device.startswith("cuda") and not trajectory and graphs_available():
            # Euler and Heun steps fold into FusedSteps; the multistep samplers' loop is captured as it
            # is. The grid is computed only to build the loop (a replayed call costs its kernels).
            def build():
                grid = self.grid(steps)
                if sampler in samplers.ONE_STEP:
                    return self._fused(grid, sampler)
                grid_dev = grid.to(self.device)  # before the capture, which cannot copy from the host
                return lambda x: self.std.back(pf_ode(self.ema.model, x, grid, sampler, None, grid_dev))

            prior = lambda g: cfg.sigma_max * torch.randn(n, 2, generator=g, device=self.device)  # noqa: E731
            key = (n, steps, sampler, cfg.grid, cfg.sigma_min, cfg.sigma_max, cfg.rho)
            return self.graphs.run(key, prior, loop, seed, build=build)
        x = self.prior(n, seed)
        if traj is not None:
            traj.append(x)
        if trajectory:
            return loop(x), torch.stack([self.std.back(p) for p in traj])
        return loop(x)

    def sample_parts(self, n: int, seed: int | None) -> SampleParts:
        """``sample_now(n, seed)`` in parts: the prior's draw, then the PF-ODE of the given
        denoiser (the default sampler and steps)."""
        cfg = self.config
        grid = self.grid(cfg.default_steps)
        grid_dev = grid.to(self.device)
        return SampleParts((self.prior(n, seed),), lambda denoise, x: pf_ode(denoise, x, grid, cfg.sampler, None, grid_dev),
                           self.std.back)

    def _fused(self, grid: torch.Tensor, sampler: str = "euler", thin: bool = True):
        """The PF-ODE loop as FusedSteps (``thin``: see there), with the standardisation undone in
        the last step: the samplers' step coefficients (``samplers.euler_coefficients``,
        ``heun_coefficients``) composed with the denoiser's D = c_skip x + c_out F. An Euler step is
        x_e = a x + b D = (a + b c_skip) x + b c_out F; a Heun corrector (all steps but the last)
        x' = a' x + b' x_e + c' D' = a' x + (b' + c' c_skip') x_e + c' c_out' F(x_e, t')."""
        t, t_next = grid[:-1].double(), grid[1:].double()
        heun = sampler == "heun"
        a, b = samplers.euler_coefficients(t, t_next)
        a2, b2, c2 = samplers.heun_coefficients(t, t_next)
        c_skip, c_out, c_in, c_noise = self.ema.model.coefficients(t)
        cs, co, ci, cn = self.ema.model.coefficients(t_next)  # the corrector's, at t' (not used at t' = 0)
        rows = []  # (c_in, c_noise, a, b, g) of FusedSteps, in the order the loop uses them
        for i in range(len(t)):
            rows.append((c_in[i], c_noise[i], a[i] + b[i] * c_skip[i], b[i] * c_out[i], 0.0))
            if heun and i < len(t) - 1:
                rows.append((ci[i], cn[i], b2[i] + c2[i] * cs[i], c2[i] * co[i], a2))
        ci, cn, a, b, g = ([float(v) for v in col] for col in zip(*rows))
        fs = FusedSteps(self.ema.model.net, ci, cn, a, b, out_scale=1 / self.std.scale, out_shift=self.std.mean,
                        thin=thin, g=g)

        def loop(x):
            j = 0  # the FusedSteps row
            for i in range(len(t)):
                x_e, j = fs(x, j), j + 1
                if heun and i < len(t) - 1:
                    x_e, j = fs(x_e, j, x0=x), j + 1
                x = x_e
            return x

        loop.fused = fs
        return loop

    def trajectory_sample(self, n, *, steps=None, seed=None):
        """[steps + 1, n, 2]: the PF-ODE path of n samples in data units, x_T first."""
        return self.sample(n, steps=steps, seed=seed, trajectory=True)[1].cpu()

    def nfe(self, steps=None) -> int:
        return samplers.SAMPLERS[self.config.sampler][1](steps or self.config.default_steps)

    @property
    def nfe_module(self):
        return self.ema.model.net

    @property
    def variant(self) -> str:
        return f"{self.config.sampler}/{self.config.grid}"

    def evaluate(self, test_data) -> dict[str, float]:
        """Test negative log-likelihood (nats per point, data units) of the first ``nll_points``
        held-out points under the PF-ODE of the EMA network (``pf_ode_log_prob``), and the
        solver's field evaluations per point set."""
        cfg = self.config
        if not cfg.nll_points:
            return {}
        x = self.std.to(torch.as_tensor(test_data[: cfg.nll_points], dtype=torch.float32, device=self.device))
        logp, calls = pf_ode_log_prob(self.ema.model, x, cfg.sigma_min, cfg.sigma_max, cfg.nll_rtol, cfg.nll_atol)
        return {"nll": float(-(logp.mean() + 2 * math.log(self.std.scale))), "nll_nfe": calls}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "ema": self.ema.model.state_dict(), "std": self.std.state()}

    def load_state_dict(self, state: dict, device: str = "cpu") -> None:
        self._build(device)
        self.ema.model.load_state_dict(state["ema"])
        self.std = Standardizer.from_state(state["std"], device)

    def pf_ode_denoiser(self) -> PFODEDenoiser:
        """The EMA denoiser in standardised units (the teacher of consistency distillation)."""
        cfg = self.config
        return PFODEDenoiser(self.ema.model, cfg.sigma_min, cfg.sigma_max, cfg.sigma_data, self.std.mean,
                             self.std.scale, net=self.ema.model.net)
