"""Networks and training helpers shared by the diffusion and consistency models."""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn
from torch.nn import functional as F


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
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        mu = self.decay if decay is None else decay
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - mu)


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
             after_step=None, log_every: int = 50, device: str = "cpu"):
    """The training loop every torch family shares: Adam, warm-up + cosine schedule, gradient
    clipping, a divergence check, and a loss curve averaged over windows of ``log_every`` steps.
    ``loss_fn(step)`` returns the scalar loss; ``after_step(step)`` runs after each update (EMA).
    Returns a ``FitInfo``."""
    import time

    from ..api import FitInfo
    from ..timing import synchronize

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    warmup = max(1, min(warmup, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, steps, warmup))
    curve, window = [], []
    synchronize(device)
    t0 = time.perf_counter()
    for k in range(steps):
        loss = loss_fn(k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(k)
        window.append(loss.detach())
        if len(window) == log_every or k == steps - 1:
            mean = torch.stack(window).mean().item()
            if not math.isfinite(mean):
                raise Diverged(f"non-finite loss at step {k}")
            curve.append(mean)
            window = []
    synchronize(device)
    return FitInfo(steps=steps, final_loss=curve[-1] if curve else float("nan"),
                   train_s=time.perf_counter() - t0, losses=curve, log_every=log_every)


def capture_graph(fn, *inputs: torch.Tensor):
    """``fn`` run once on a side stream (warm-up, as CUDA-graph capture requires), then captured on
    copies of ``inputs``: (graph, the copies, fn's output). Replay after copying new values into
    the copies; the output tensor is overwritten in place."""
    static = [i.clone() for i in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, static, out


class GraphCache:
    """Replays a fixed-shape sampling loop captured in a CUDA graph (tiny MLPs on a GPU are
    launch-bound: one replay launches the whole loop at once).

    Per key, the first call runs eagerly (so NFE counted by hooks is the real count, and kernels are
    warmed up), the second captures the loop on a side stream and replays it, later calls copy their
    inputs into the captured buffers and replay. ``fn`` must be a pure function of its tensor
    inputs (noise is drawn outside it)."""

    def __init__(self):
        self.entries: dict = {}

    def run(self, key, fn, *inputs: torch.Tensor, build=None) -> torch.Tensor:
        """``fn(*inputs)`` runs eagerly on the first call; ``build()``, if given, returns the
        function captured instead (same results, fewer kernels). The entry holds that function and
        whatever it references, so the memory a captured graph reads is never freed and reused."""
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = "eager"
            return fn(*inputs)
        if entry == "eager":
            fn = build() if build is not None else fn
            entry = self.entries[key] = (*capture_graph(fn, *inputs), fn)
        graph, static, out, _ = entry
        for buf, value in zip(static, inputs):
            buf.copy_(value)
        graph.replay()
        return out.clone()


def thin_kernels(device: torch.device):
    """The Triton kernels for FusedSteps' thin layers where they can run (a CUDA device and Triton
    installed), else None."""
    if device.type != "cuda":
        return None
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


class FusedSteps:
    """A fixed sequence of steps ``x <- a_i x + b_i F(c_i x, n_i) [+ g_i x0]`` with F a TimeMLP and x0
    an optional second state (a Heun corrector's start point), evaluated
    with everything that does not depend on x precomputed: the time branch of each level, the
    input scale c_i folded into the first layer, b_i into the last, and an optional output affine
    map into the last step. Used inside CUDA-graph captures, where the loop is replayed without
    Python; the eager path (and NFE counting by hook) goes through the module itself, and tests
    check both give the same samples.

    A step is one cuBLAS matmul per square layer and a SiLU after each; on CUDA with Triton
    (``thin=True``), the thin first layer (K = D = 2) with its SiLU is one Triton kernel and the last
    SiLU, the thin last layer (N = 2) and the update ``a x + ...`` are another (genbench.models.
    kernels): 7 kernels a step at depth 4 instead of 10 (addmm for the thin layers, the SiLUs and
    one add), against about 30 for the module's forward. The loop is bound by the GPU time of these
    tiny kernels, not by launches: a CUDA profile of the cuBLAS-only replay showed ~4 us per GEMM,
    thin ones included, and ~1.6 us per elementwise kernel. Measured on the H100 with
    ``python benchmarks/thin_kernels.py`` (n = 2000, both graphs replayed in alternating rounds in
    one process): 100 Euler steps 2.17 ms with the Triton kernels against 2.91 ms with cuBLAS only
    (1.34x), 50 Heun steps 2.16 ms against 2.99 ms, one consistency step 0.036 ms against 0.044 ms;
    all within 1.5e-6 of the eager samples. Rejected, measured: carrying the last bias as an offset and
    updating x in place with ``x.addmm_(h, W, beta=a)`` was 1.09x slower (cuBLAS picks split-K for
    that in-place [n, 2] product); the whole loop as one Triton kernel was 4.03 ms with fp32 products
    (one program runs all square layers on CUDA cores) and 0.34 ms with TF32 tensor-core products
    but samples off by up to 7.7e-3; ``torch.compile`` of the step, captured the same way, was
    3.68 ms (default mode) and 5.36 ms (max-autotune, fp32 Triton GEMMs) against 2.97 ms for the
    cuBLAS-only loop and 2.29 ms for this one with 32-row blocks (one process, one session)."""

    def __init__(self, net: TimeMLP, c_in, c_noise, a, b, out_scale: float = 1.0, out_shift=None, thin: bool = True,
                 g=None):
        linears = [m for m in net.body if isinstance(m, nn.Linear)]
        dev = net.point.weight.device
        self.kernels = thin_kernels(dev) if thin else None
        self.a = [float(v) for v in a]
        self.g = [0.0] * len(self.a) if g is None else [float(v) for v in g]
        with torch.no_grad():
            args = torch.tensor([float(v) for v in c_noise], device=dev).reshape(-1, 1) * net.freqs
            bias0 = net.point.bias + net.time(torch.cat([torch.sin(args), torch.cos(args)], 1))  # [K, hidden]
            self.first = [(bias0[i], (float(c) * net.point.weight).t().contiguous()) for i, c in enumerate(c_in)]
            self.middle = [(lin.bias, lin.weight.t().contiguous()) for lin in linears[:-1]]
            last, k = linears[-1], len(self.a)
            shift = torch.zeros_like(last.bias) if out_shift is None else torch.as_tensor(out_shift, device=dev)
            self.last = []
            for i, bi in enumerate(b):
                s = out_scale if i == k - 1 else 1.0
                self.last.append((float(bi) * s * last.bias + (shift if i == k - 1 else 0), (float(bi) * s * last.weight).t().contiguous()))
            self.a[-1] *= out_scale
            self.g[-1] *= out_scale

    def __call__(self, x: torch.Tensor, i: int, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Step ``i`` from x; ``x0`` is the second state of steps with g_i != 0."""
        if (x0 is None) != (self.g[i] == 0.0):
            raise ValueError(f"step {i} has g = {self.g[i]}: pass x0 exactly when g != 0")
        if self.kernels is not None:
            x = x.contiguous()
            x0 = None if x0 is None else x0.contiguous()
            h = self.kernels.first_layer(x, self.first[i][1], self.first[i][0])  # SiLU applied
            for j, (bias, w) in enumerate(self.middle):
                h = torch.addmm(bias, h, w)
                if j < len(self.middle) - 1:
                    h = F.silu(h)
            return self.kernels.last_layer(h, self.last[i][1], self.last[i][0], x, self.a[i], act=bool(self.middle),
                                           x2=x0, g=self.g[i])
        h = torch.addmm(self.first[i][0], x, self.first[i][1])
        for bias, w in self.middle:
            h = torch.addmm(bias, F.silu(h), w)
        out = torch.addmm(self.last[i][0], F.silu(h), self.last[i][1]).add_(x, alpha=self.a[i])
        return out if x0 is None else out.add_(x0, alpha=self.g[i])
