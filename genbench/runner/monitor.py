"""Evaluation during training on a validation sample, and the stopping rule (the ``converged``
budget). A ``ValidationMonitor`` is handed to a model's ``fit(..., monitor=)``; at log-spaced
steps it scores the model's current samples against the validation sample (true points from their
own stream of the seed: never the reference sample the tables use, nor the training set), keeps
the curve, says which evaluation is the best so far (the model keeps those weights), and ends the
fit when the validation metric has not improved by more than its noise floor's spread for a
patience window. Time to target: the first evaluation within the data's floor band."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..api import Monitor, Verdict

#: points sampled at each evaluation, and in the validation sample
N_VALIDATION = 2000
#: true samples scored against the validation sample for the stopping metric's noise floor
FLOOR_DRAWS = 5
#: evaluations at log-spaced steps: each at least this factor past the previous one ...
GROWTH = 1.15
#: ... and at least this many over a fit (the first at the cap / FIRST_AT, or the first window)
FIRST_AT = 100
#: stop once the best evaluation is this many evaluations old and the step at least this factor past
#: it, and never before this fraction of the cap (early curves are noisy)
PATIENCE_EVALS = 5
PATIENCE_FACTOR = 2.0
MIN_FRACTION = 0.1
#: the data's floor band: floor mean + BAND x floor std
BAND = 3.0


def validation_sample(ds, seed: int, n: int = N_VALIDATION) -> np.ndarray:
    """The validation sample of (dataset, seed): stream 4 of the seed (training 0, reference 1,
    held-out 2, floor draws 3)."""
    return ds.sample(n, [seed, 4])


def validation_floor(ds, seed: int, val: np.ndarray, device: str = "cpu") -> tuple[float, float]:
    """The stopping metric (energy distance) between the validation sample and FLOOR_DRAWS further
    true samples of its size (stream 5 of the seed): its mean and std."""
    values = [metrics.energy(ds.sample(len(val), [seed, 5, i]), val, device=device) for i in range(FLOOR_DRAWS)]
    return float(np.mean(values)), float(np.std(values, ddof=1))


@dataclass
class ValidationMonitor(Monitor):
    """One fit's evaluation during training: ``cap`` is its step budget (the config's train_steps),
    ``log_every`` its logging window (evaluations fall on window ends)."""

    ds: object
    val: np.ndarray
    floor: tuple[float, float]
    cap: int
    log_every: int
    seed: int
    device: str = "cpu"
    curve: list = field(default_factory=list)  # one dict per evaluation: step, train_s, energy, hq_frac
    best_step: int | None = None
    best_value: float = math.inf
    stop_reason: str | None = None
    next_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    evaluating_s: float = 0.0

    def __post_init__(self):
        self.next_step = max(self.log_every, self.cap // FIRST_AT)

    def score(self, x: np.ndarray) -> float:
        """The stopping metric of samples ``x``: their energy distance to the validation sample."""
        return metrics.energy(x, self.val, device=self.device)

    @property
    def delta(self) -> float:
        """An improvement counts when it exceeds the noise floor's spread."""
        return self.floor[1]

    def due(self, step: int) -> bool:
        return step >= self.next_step or step >= self.cap

    def evaluate(self, step: int, sample) -> Verdict:
        t0 = time.perf_counter()
        x = np.asarray(sample(len(self.val), 20_000 + self.seed).detach().cpu().numpy(), dtype=np.float64)
        point = {"step": step, "train_s": t0 - self.started - self.evaluating_s}
        if not np.isfinite(x).all():
            point |= {"energy": None, "hq_frac": None}
            self.curve.append(point)
            self.stop_reason = f"diverged (non-finite samples at step {step})"
            self.evaluating_s += time.perf_counter() - t0
            return Verdict(best=False, stop=True)
        value = self.score(x)
        point |= {"energy": value, "hq_frac": float(self.ds.on_support(x).mean())}
        self.curve.append(point)
        best = value < self.best_value - (self.delta if self.best_step is not None else 0.0)
        if best:
            self.best_value, self.best_step = value, step
        since = sum(1 for p in self.curve if p["step"] > self.best_step)
        stop = (since >= PATIENCE_EVALS and step >= PATIENCE_FACTOR * self.best_step
                and step >= MIN_FRACTION * self.cap)
        if stop:
            self.stop_reason = f"converged at step {step}"
        elif step >= self.cap:
            self.stop_reason = "cap reached"
        self.next_step = max(step + self.log_every, math.ceil(step * GROWTH))
        self.evaluating_s += time.perf_counter() - t0
        return Verdict(best=best, stop=stop)

    def record(self) -> dict:
        """What the fit record keeps: the curve, the stop reason, the step kept, the floor, and the
        time to target (the first evaluation within the floor band; None where none was)."""
        band = self.floor[0] + BAND * self.floor[1]
        reached = next((p for p in self.curve if p["energy"] is not None and p["energy"] <= band), None)
        return {"eval_metric": "energy", "eval_curve": self.curve, "eval_floor": self.floor[0],
                "stopped_step": self.curve[-1]["step"] if self.curve else None,
                "eval_floor_std": self.floor[1], "stop_reason": self.stop_reason or "cap reached",
                "kept_step": self.best_step, "kept_energy": None if self.best_step is None else self.best_value,
                "target_step": reached["step"] if reached else None,
                "target_s": reached["train_s"] if reached else None}
