"""Multistep consistency sampling against tau_max (the first re-noising level), one trained model
per (family, dataset): W2 (mean and std over 4 independent reference draws) and hq_frac.

    python benchmarks/tau_sweep.py cuda ring8,grid25

The default tau_max = 0.1 was chosen from its output (H100; the CPU run of ring8 agreed):
2-step W2 moved only within its noise across 0.05-1.5, and 0.1 gave the best 2-step hq_frac for
cm-ct and near-best for cm-cd.
"""
import json
import sys

import numpy as np
import torch

from genbench import datasets, metrics
from genbench.models.consistency import ConsistencyDistillation, ConsistencyTraining
from genbench.models.diffusion import Diffusion

torch.set_num_threads(1)
device, names = sys.argv[1], sys.argv[2].split(",")
for dsn in names:
    ds = datasets.get(dsn)
    data = ds.sample(50000, [0, 0])
    refs = [ds.sample(2000, [0, 1, r]) for r in range(4)]
    teacher = Diffusion()
    teacher.fit(data, device=device, seed=0)
    cd = ConsistencyDistillation()
    cd.fit(data, device=device, seed=0, teacher=teacher)
    ct = ConsistencyTraining()
    ct.fit(data, device=device, seed=0)
    for name, m in (("cm-cd", cd), ("cm-ct", ct)):
        for tau in (0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
            m.config.tau_max = tau
            for k in (1, 2, 4):
                if k == 1 and tau != 0.05:
                    continue  # one step does not re-noise
                w, hq = [], []
                for r, ref in enumerate(refs):
                    x = m.sample(2000, steps=k, seed=100 + r).cpu().numpy()
                    w.append(metrics.w2(x, ref))
                    if ds.is_mixture:
                        hq.append(metrics.mode_stats(x, ds.means, ds.stds, ds.weights)["hq_frac"])
                print(json.dumps({"dataset": dsn, "model": name, "tau_max": tau, "steps": k,
                                  "w2": round(float(np.mean(w)), 4), "w2_std": round(float(np.std(w)), 4),
                                  "hq_frac": round(float(np.mean(hq)), 3) if hq else None}), flush=True)
