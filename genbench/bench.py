"""Benchmarks (timings, never tests): how much the sampling loop adds to the network itself, and
eager against CUDA-graph sampling per NFE."""
from __future__ import annotations

import torch

from . import datasets
from .models.consistency import ConsistencyDistillation
from .models.diffusion import Diffusion
from .models.nets import EMA, Standardizer
from .runner import device_name, resolve_device
from .timing import time_call


def _untrained(cls, device: str, **params):
    """A model ready to sample without training: weights do not change the cost of sampling."""
    m = cls(params={k: str(v) for k, v in params.items()})
    m._build(device)
    if not hasattr(m, "ema"):
        m.ema = EMA(m.model, 0.999)
    m.std = Standardizer(torch.as_tensor(datasets.RING8.sample(10000, 0), device=device), m.config.sigma_data)
    return m


def sampler_overhead(steps: int = 100, n: int = 2000, device: str = "cpu", threads: int = 1,
                     repeats: int = 7, sampler: str = "euler") -> dict:
    """Median wall time of ``sample(n, steps)`` against NFE x the median time of one denoiser
    forward pass on the same batch."""
    device = resolve_device(device)
    torch.set_num_threads(threads)
    m = _untrained(Diffusion, device, sampler=sampler)
    x = torch.randn(n, 2, device=device)
    t = torch.full((1, 1), 1.0, device=device)
    with torch.no_grad():
        fwd_med, fwd_min = time_call(lambda: m.ema.model(x, t), device=device, repeats=max(50, 5 * repeats))
    loop_med, loop_min = time_call(lambda: m.sample(n, steps=steps, seed=0), device=device, repeats=repeats)
    nfe = m.nfe(steps)
    return {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
            "sampler": sampler, "steps": steps, "nfe": nfe, "n": n, "forward_s": fwd_med, "forward_s_min": fwd_min,
            "loop_s": loop_med, "loop_s_min": loop_min, "ratio": loop_med / (nfe * fwd_med)}


def graph_vs_eager(n: int = 2000, device: str = "cuda", repeats: int = 20) -> list[dict]:
    """Sampling time eager and from a captured CUDA graph, for diffusion (Euler 100, Heun 50) and a
    consistency model (1, 2, 4 steps); per-NFE times alongside."""
    device = resolve_device(device)
    out = []
    cases = [(Diffusion, {"sampler": "euler"}, 100), (Diffusion, {"sampler": "heun"}, 50)]
    cases += [(ConsistencyDistillation, {}, k) for k in (1, 2, 4)]
    for cls, params, steps in cases:
        m = _untrained(cls, device, **params)
        row = {"model": cls.name, "sampler": params.get("sampler", "multistep"), "steps": steps, "nfe": m.nfe(steps), "n": n}
        for graph in (False, True):
            m.config.cuda_graph = graph
            m.sample(n, steps=steps, seed=0)  # the eager first call of the graph path
            med, mn = time_call(lambda: m.sample(n, steps=steps, seed=0), device=device, repeats=repeats, warmup=2)
            tag = "graph" if graph else "eager"
            row[f"{tag}_ms"], row[f"{tag}_ms_min"] = med * 1e3, mn * 1e3
            row[f"{tag}_us_per_nfe"] = med * 1e6 / row["nfe"]
        row["speedup"] = row["eager_ms"] / row["graph_ms"]
        out.append(row)
    return out
