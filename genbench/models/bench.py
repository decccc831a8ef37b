"""Benchmarks of the built-in families' samplers (timings, never tests; ``genbench bench-sampler``
and ``bench-graph``): how much the sampling loop adds to the network itself, and
eager against CUDA-graph sampling per NFE."""
from __future__ import annotations

import torch

from .. import datasets
from ..runner.plan import device_name, resolve_device
from ..timing import block_time, time_call
from .consistency import ConsistencyDistillation
from .diffusion import Diffusion
from .nets import EMA, Standardizer


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
    """Wall time of ``sample(n, steps)`` against NFE back-to-back forward passes of the denoiser on
    the same batch. The two are timed in alternation, ``repeats`` rounds, and the ratio is the
    median of the per-round ratios, so that a neighbour's load drifting over the run cancels out."""
    import statistics

    from ..api import UsageError
    from .samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    device = resolve_device(device)
    torch.set_num_threads(threads)
    m = _untrained(Diffusion, device, sampler=sampler)
    nfe = m.nfe(steps)
    x = torch.randn(n, 2, device=device)
    t = torch.full((1, 1), 1.0, device=device)

    def forwards():
        with torch.no_grad():
            for _ in range(nfe):
                m.ema.model(x, t)

    def timed(fn) -> float:
        return block_time(fn, 1, device)

    forwards(), m.sample(n, steps=steps, seed=0)  # warm-up
    fwd, loop = [], []
    for _ in range(repeats):
        fwd.append(timed(forwards))
        loop.append(timed(lambda: m.sample(n, steps=steps, seed=0)))
    return {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
            "sampler": sampler, "steps": steps, "nfe": nfe, "n": n,
            "forward_s": statistics.median(fwd) / nfe, "forward_s_min": min(fwd) / nfe,
            "loop_s": statistics.median(loop), "loop_s_min": min(loop),
            "ratio": statistics.median(l / f for l, f in zip(loop, fwd))}


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
            t = time_call(lambda: m.sample(n, steps=steps, seed=0), device=device, min_calls=repeats, warmup=2)
            tag, med = "graph" if graph else "eager", t.median
            row[f"{tag}_ms"], row[f"{tag}_ms_min"], row[f"{tag}_calls"] = med * 1e3, t.min * 1e3, t.calls
            row[f"{tag}_us_per_nfe"] = med * 1e6 / row["nfe"]
        row["speedup"] = row["eager_ms"] / row["graph_ms"]
        out.append(row)
    return out
