"""CUDA-graph sampling: capture a fixed-shape sampling loop once and replay it.

The networks are tiny, so on a GPU a sampling loop is bound by kernel launches; replayed from a
CUDA graph it launches at once. ``GraphCache`` holds one captured loop per (shape, steps, sampler)
key; ``FusedSteps`` rewrites a loop of preconditioned TimeMLP steps with everything that does not
depend on x precomputed, and (with Triton) its two thin layers as the kernels of
``genbench.models.kernels``. ``benchmarks/thin_kernels.py`` and ``genbench bench-graph`` measure them.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.nn import functional as F

from .nets import PROCESS_STATE, TimeMLP

_HELD: set[int] = set()  # the raw CUDA streams ``own_stream`` has handed out and not taken back
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def own_stream(device=None, high: bool = False):
    """A CUDA stream that no other holder of one has, for the block. ``torch.cuda.Stream()`` hands
    out the streams of a pool of 32 round-robin, so two calls can give one stream; groups trained
    at once (threads, each on a stream of its own) would then share a stream, and work one thread
    puts on a stream that another is capturing goes into that graph instead of running (and its
    replays later read memory that thread has freed). Every stream genbench's CUDA paths train,
    warm up or capture on comes from here: a thread holds three at most (its group's, its warm-up
    steps', a capture's), and once the normal-priority pool is held the high-priority one serves.
    ``high``: a high-priority stream first (the GPU schedules its kernels before the others')."""
    with _HELD_LOCK:
        pools = (-1, 0) if high else (0, -1)
        offered = (torch.cuda.Stream(device, priority=p) for p in pools for _ in range(64))  # each pool twice round
        stream = next((s for s in offered if s.cuda_stream not in _HELD), None)
        if stream is None:
            raise RuntimeError(f"no free CUDA stream ({len(_HELD)} held by groups trained at once): "
                               "train fewer groups at once (--groups-at-once)")
        _HELD.add(stream.cuda_stream)
    try:
        yield stream
    finally:
        with _HELD_LOCK:
            _HELD.discard(stream.cuda_stream)


def capture_graph(fn, *inputs: torch.Tensor, generators: tuple = ()):
    """``fn`` run once on a side stream (warm-up, as CUDA-graph capture requires), then captured on
    copies of ``inputs``: (graph, the copies, fn's output). Replay after copying new values into
    the copies; the output tensor is overwritten in place. ``generators``: the torch.Generators
    ``fn`` draws from, registered with the graph (each replay draws from their state then)."""
    static = [i.clone() for i in inputs]
    with own_stream() as side:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static)
        torch.cuda.current_stream().wait_stream(side)
    out = []
    graph = capture_step(lambda: out.append(fn(*static)), generators)
    return graph, static, out[0]


def capture_step(fn, generators: tuple = ()) -> "torch.cuda.CUDAGraph":
    """``fn()`` captured in a CUDA graph (no warm-up: the caller has run it once already), with the
    torch.Generators it draws from registered (each replay draws from their state then). The
    capture is thread-local: other threads of the process (groups trained at once, each on its own
    stream) go on launching and synchronising their own work meanwhile, but none captures or seeds
    torch's global RNGs (``PROCESS_STATE``). It captures on a stream of its own (``own_stream``),
    not torch's one default capture stream, which another thread's stream can be."""
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    with PROCESS_STATE, own_stream() as stream, torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        fn()
    return graph


class GraphCache:
    """Replays a fixed-shape sampling loop captured in a CUDA graph (tiny MLPs on a GPU are
    launch-bound: one replay launches the whole loop at once), its noise drawn inside the graph.

    Per key, the first call runs eagerly (so NFE counted by hooks is the real count, and kernels are
    warmed up); the second captures the loop, noise draw included, on a side stream, and replays it;
    later calls reseed the cache's generator (registered with every graph) and replay, so a call
    costs the replay and one copy of its output. A call gives the samples of the eager path with the
    same seed: the captured draw reads the generator's seed and offset at each replay."""

    def __init__(self, device: str = "cuda"):
        self.device = device
        self.entries: dict = {}
        self.gen: torch.Generator | None = None

    def run(self, key, noise, loop, seed: int | None, build=None) -> torch.Tensor:
        """``loop(noise(gen))`` with ``gen`` seeded with ``seed``. ``build()``, if given, returns the
        loop captured instead (same results, fewer kernels). The entry holds that loop and whatever
        it references, so the memory a captured graph reads is never freed and reused."""
        seed = 0 if seed is None else int(seed)
        entry = self.entries.get(key)
        if self.gen is None:
            self.gen = torch.Generator(device=self.device)
        if entry is None:
            self.entries[key] = "eager"
            self.gen.manual_seed(seed)
            return loop(noise(self.gen))
        if entry == "eager":
            fn = build() if build is not None else loop
            graph, _, out = capture_graph(lambda: fn(noise(self.gen)), generators=(self.gen,))
            entry = self.entries[key] = (graph, out, fn)
        graph, out, _ = entry
        self.gen.manual_seed(seed)
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
    one add), against about 30 for the module's forward. ``benchmarks/thin_kernels.py`` times both
    forms and the alternatives that were tried and rejected are listed in baselines/README.md."""

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


def graphs_available() -> bool:
    """Whether this torch can capture work that draws from its own generators (training steps,
    sampling loops); where it cannot, the CUDA paths run eagerly."""
    return hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def phase_segments(steps: int, phase=None) -> list[tuple[int, int]]:
    """The runs [start, end) of consecutive steps with equal ``phase(k)``: one captured graph each."""
    if phase is None:
        return [(0, steps)] if steps else []
    out: list[tuple[int, int]] = []
    for k in range(steps):
        if k and phase(k) == phase(k - 1):
            out[-1] = (out[-1][0], k + 1)
        else:
            out.append((k, k + 1))
    return out
