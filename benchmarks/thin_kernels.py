"""The fused sampling loops on CUDA with and without the Triton kernels for the thin layers
(FusedSteps ``thin``): both loops captured in CUDA graphs in one process and replayed in alternating
rounds (median and min of 40), and the largest difference of each from the module's eager loop.

    python benchmarks/thin_kernels.py

Models: diffusion and cm-cd trained at the quick budget on ring8 (weights do not change the cost,
trained ones make the sample comparison meaningful); n = 2000.
"""
import json
import statistics
import time

import torch

from genbench import datasets
from genbench.models.consistency import ConsistencyDistillation
from genbench.models.diffusion import Diffusion
from genbench.models.graphs import capture_graph

N, ROUNDS = 2000, 40


def main():
    data = datasets.RING8.sample(20000, [0, 0])
    teacher = Diffusion(budget="quick")
    teacher.fit(data, device="cuda", seed=0)
    cd = ConsistencyDistillation(budget="quick")
    cd.fit(data, device="cuda", seed=0, teacher=teacher)
    cases = []
    x = teacher.prior(N, 1)
    eager = teacher.sample(N, steps=100, seed=1)
    cases.append(("diffusion euler", 100, {t: teacher._fused(teacher.grid(100), "euler", thin=t) for t in (False, True)}, x, eager))
    teacher.config.sampler = "heun"
    eager = teacher.sample(N, steps=50, seed=1)
    cases.append(("diffusion heun", 50, {t: teacher._fused(teacher.grid(50), "heun", thin=t) for t in (False, True)}, x, eager))
    teacher.config.sampler = "euler"
    for k in (1, 2):
        noise = torch.randn(k, N, 2, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
        eager = cd.sample(N, steps=k, seed=1)
        cases.append(("cm-cd multistep", k, {t: cd._fused(*cd.levels(k), thin=t) for t in (False, True)}, noise, eager))
    for name, steps, loops, x, eager in cases:
        assert loops[True].fused.kernels is not None, "Triton kernels unavailable on this machine"
        with torch.no_grad():
            graphs = {t: capture_graph(fn, x) for t, fn in loops.items()}
        times = {t: [] for t in graphs}
        for r in range(ROUNDS):
            for t in ((False, True) if r % 2 else (True, False)):
                graph, (static,), out = graphs[t]
                static.copy_(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                graph.replay()
                torch.cuda.synchronize()
                times[t].append(time.perf_counter() - t0)
        row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "case": name, "steps": steps, "n": N}
        for t, tag in ((False, "cublas"), (True, "thin")):
            row[f"{tag}_ms"] = round(statistics.median(times[t]) * 1e3, 4)
            row[f"{tag}_ms_min"] = round(min(times[t]) * 1e3, 4)
            row[f"{tag}_max_abs_diff_vs_eager"] = float((graphs[t][2] - eager).abs().max())
        row["speedup"] = round(row["cublas_ms"] / row["thin_ms"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
