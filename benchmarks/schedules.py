"""One converged-budget fit with a given learning-rate schedule and cap, on ring8 seed 0 (the
measurement behind the converged budget's schedule, baselines/README.md "A schedule for the
converged budget"): prints a JSON line with where the fit stopped, the step kept, its validation
score and the table metrics of 3,000 samples against the reference. One thread.

    python benchmarks/schedules.py MODEL SCHEDULE CAP      # e.g. diffusion plateau 40000
"""
import json
import sys
import time

import torch

from genbench import datasets, metrics
from genbench.registry import resolve
from genbench.runner.monitor import ValidationMonitor, validation_floor
from genbench.scoring import validation_sample


def main(model: str, schedule: str, cap: int) -> dict:
    torch.set_num_threads(1)
    cls = resolve([model])[0].cls
    ds = datasets.get("ring8")
    data = ds.sample(50_000, [0, 0])
    val = validation_sample(ds, 0)
    m = cls(budget="converged", params={"train_steps": str(cap)})
    settings = m._loop_settings
    m._loop_settings = lambda: settings() | {"schedule": schedule}
    mon = ValidationMonitor(ds, val, validation_floor(ds, 0, val), cap=cap, log_every=50, seed=0)
    t = time.time()
    m.fit(data, seed=0, monitor=mon)
    rec = mon.record()
    x = m.sample(3000, seed=10_000).numpy()
    ref = ds.sample(3000, [0, 1])
    return {"model": model, "schedule": schedule, "cap": cap, "wall_s": round(time.time() - t, 1),
            "stop": rec["stop_reason"], "kept": rec["kept_step"], "kept_score": round(rec["kept_score"], 2),
            "table_hq": float(ds.on_support(x).mean()), "table_w2": metrics.w2(x, ref), "c2st": metrics.c2st(x, ref)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)
