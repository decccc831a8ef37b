"""Evaluation during training on a validation sample, and the stopping rule (the ``converged``
budget). A ``ValidationMonitor`` is handed to a model's ``fit(..., monitor=)``; at log-spaced
steps it scores the model's current samples against the validation sample (true points from their
own stream of the seed: never the reference sample the tables use, nor the training set), keeps
the curve, says which evaluation is the best so far (the model keeps those weights), and ends the
fit when the validation score has not improved by more than its noise for a patience window: there
it anneals first (the learning rate decays over half as many steps again; the ``plateau`` schedule of
the training base) and stops at the end of the decay.

The validation score watches two metrics, each in units of its noise floor's spread: the energy
distance to the validation sample (global shape, mode weights, dropped modes) and the fraction of
samples off the data's support (samples between the modes or off the curve, which the energy
distance of 2,000 points barely sees). The score is the sum of each metric's excess over the
data's own value, divided by that value's spread over true samples of the same size; an
evaluation is a new best when its score is below the best's by more than the best's own noise.
Time to target: the first evaluation within the data's floor band, per metric and for both."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..scoring import validation_score
from ..api import Monitor, Verdict

#: true samples scored against the validation sample for the metrics' noise floors
FLOOR_DRAWS = 5
#: evaluations at log-spaced steps, the first at this step (or the first window's end) ...
FIRST_STEP = 100
#: ... each at least this factor past the previous one (the same steps whatever the cap: a fit that
#: stops before its cap stops at the same step, with the same weights kept, under a larger cap)
GROWTH = 1.15
#: stop once the best evaluation is this many evaluations old and the step at least this factor past
#: it, and never before MIN_STEPS: early curves have flat stretches that later steps leave (on one
#: H200, flows stopped at 3,000-8,000 steps kept 2-4x the validation score of their seed siblings
#: that trained on; baselines/README.md, "The plateau schedule on two H200s"). A stacked fit's
#: group sheds its stopped members only once a quarter of them has stopped (``fits.SHED_SHARE``).
PATIENCE_EVALS = 5
PATIENCE_FACTOR = 2.0
MIN_STEPS = 10_000
#: at that plateau the fit anneals (its learning rate decays to a twentieth) over this fraction of
#: the steps it has made, or up to its cap, and stops at the end of the decay
ANNEAL_FRACTION = 0.5
#: the data's floor band: floor mean + BAND x floor std
BAND = 3.0


def off_support(ds, x: np.ndarray) -> float:
    """The fraction of the points ``x`` off the data's support (1 - hq_frac)."""
    return float(1.0 - ds.on_support(x).mean())


def binomial_sd(p: float, n: int) -> float:
    """The spread of a fraction p of n points (p at least 1/n: a fraction seen as 0 is no certainty)."""
    p = min(max(p, 1.0 / n), 1.0 - 1.0 / n)
    return math.sqrt(p * (1.0 - p) / n)


def validation_floor(ds, seed: int, val: np.ndarray, device: str = "cpu") -> dict:
    """Each validation metric's value for FLOOR_DRAWS further true samples of the validation
    sample's size (stream 5 of the seed): {metric: (mean, std)}. The energy distance's spread is
    measured; the off-support fraction's is the binomial spread at its pooled mean (five draws
    would estimate a fraction near 0 poorly)."""
    draws = [ds.sample(len(val), [seed, 5, i]) for i in range(FLOOR_DRAWS)]
    to_val = metrics.EnergyTo(val, device=device)
    energy = [to_val(x) for x in draws]
    off = float(np.mean([off_support(ds, x) for x in draws]))
    return {"energy": (float(np.mean(energy)), float(np.std(energy, ddof=1))),
            "off_support": (off, binomial_sd(off, len(val)))}


@dataclass
class ValidationMonitor(Monitor):
    """One fit's evaluation during training: ``cap`` is its step budget (the config's train_steps),
    ``log_every`` its logging window (evaluations fall on window ends), ``floor`` the validation
    metrics' floors (``validation_floor``)."""

    ds: object
    val: np.ndarray
    floor: dict
    cap: int
    log_every: int
    seed: int
    device: str = "cpu"
    curve: list = field(default_factory=list)  # per evaluation: step, train_s, energy, hq_frac, score
    best_step: int | None = None
    best_score: float = math.inf
    best_noise: float = 0.0
    anneal: bool = True  # at the plateau, anneal and stop after the decay (False: stop at the plateau)
    anneal_from: int | None = None  # the step the decay began
    anneal_to: int | None = None  # ... and ends
    stop_reason: str | None = None
    next_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    evaluating_s: float = 0.0
    #: no evaluation before this step (but at the cap): the schedule's steps before it are passed
    #: over, so the later evaluations fall on the steps they would (a tune's rungs before the last,
    #: where only the best evaluation's score counts: runner.plan.Plan.evaluate_from)
    first_step: int = 0
    _energy: object = field(default=None, init=False, repr=False)  # the energy distance to val (metrics.EnergyTo)

    def __post_init__(self):
        self.next_step = max(self.log_every, FIRST_STEP)
        self._energy = metrics.EnergyTo(self.val, device=self.device)

    def measure(self, x: np.ndarray, energy: float | None = None) -> tuple[dict, float, float]:
        """The validation metrics of samples ``x`` (energy, and hq_frac as the tables name the
        on-support fraction), their score and the score's noise (its spread at these values);
        ``energy``: x's energy distance where it is already computed."""
        energy = self._energy(x) if energy is None else energy
        off = off_support(self.ds, x)
        noise = math.sqrt(1.0 + (binomial_sd(off, len(self.val)) / self.floor["off_support"][1]) ** 2)
        return {"energy": energy, "hq_frac": 1.0 - off}, validation_score(energy, off, self.floor), noise

    @property
    def sample_args(self) -> tuple[int, int]:
        """What ``evaluate`` asks its ``sample`` for: (points, seed), the same at every evaluation."""
        return len(self.val), 20_000 + self.seed

    def due(self, step: int) -> bool:
        if step < self.first_step and step < self.cap:
            if step >= self.next_step:  # an evaluation passed over: the next one is where it would be
                self.next_step = max(step + self.log_every, math.ceil(step * GROWTH))
            return False
        return step >= self.next_step or step >= self.cap  # next_step is at most a decay's end

    def evaluate(self, step: int, sample, train_s: float | None = None) -> Verdict:
        t0 = time.perf_counter()
        if train_s is None:  # a model off the training base: this monitor's own clock
            train_s = t0 - self.started - self.evaluating_s
        x = np.asarray(sample(*self.sample_args).detach().cpu().numpy(), dtype=np.float64)
        verdict = self._judge(step, train_s, self.measure(x) if np.isfinite(x).all() else None)
        self.evaluating_s += time.perf_counter() - t0
        return verdict

    @classmethod
    def evaluate_many(cls, monitors: list["ValidationMonitor"], step: int, samples: list,
                      train_s: float | None = None) -> list[Verdict]:
        """``evaluate`` of each, their samples (tensors on one device, of one size) scored at once:
        the energy distances in batched passes on the device (``metrics.EnergyTo.many``), one
        read-back of the samples for the support fractions. The same values as one at a time (to
        float64 rounding: the sums run in another order). Each monitor's evaluation seconds are
        its share of the pass."""
        if train_s is None or len({len(m.val) for m in monitors}) > 1 or len({m.device for m in monitors}) > 1:
            return super().evaluate_many(monitors, step, samples, train_s)
        import torch

        t0 = time.perf_counter()
        xs = torch.stack([x.detach() for x in samples])
        host = xs.cpu().numpy().astype(np.float64)
        energies = metrics.EnergyTo.many([m._energy for m in monitors], xs)
        verdicts = [m._judge(step, train_s, m.measure(x, e) if np.isfinite(x).all() else None)
                    for m, x, e in zip(monitors, host, energies)]
        share = (time.perf_counter() - t0) / len(monitors)
        for m in monitors:
            m.evaluating_s += share
        return verdicts

    def _judge(self, step: int, train_s: float, measured: tuple | None) -> Verdict:
        """The evaluation at ``step`` of a sample ``measure``d (None: the sample is not finite):
        the curve's point, the best so far, the plateau, the anneal, the stop."""
        point = {"step": step, "train_s": train_s}
        if measured is None:
            point |= {"energy": None, "hq_frac": None, "score": None}
            self.curve.append(point)
            self.stop_reason = f"diverged (non-finite samples at step {step})"
            return Verdict(best=False, stop=True)
        values, score, noise = measured
        point |= values | {"score": score}
        self.curve.append(point)
        best = self.best_step is None or score < self.best_score - self.best_noise
        if best:
            self.best_score, self.best_noise, self.best_step = score, noise, step
        since = sum(1 for p in self.curve if p["step"] > self.best_step)
        plateau = (since >= PATIENCE_EVALS and step >= PATIENCE_FACTOR * self.best_step and step >= MIN_STEPS)
        anneal = 0
        if self.anneal_from is not None:  # annealing: the fit ends with its decay
            stop = step >= self.anneal_to
        elif plateau and self.anneal and step < self.cap:
            stop, anneal = False, max(self.log_every, min(self._anneal_length(step), self.cap - step))
            self.anneal_from, self.anneal_to = step, step + anneal
        else:
            stop = plateau
        if stop and self.anneal_to is not None and self.anneal_to - self.anneal_from < self._anneal_length(self.anneal_from):
            self.stop_reason = f"cap reached while annealing (plateau at step {self.anneal_from})"  # a decay cut short
        elif stop:
            self.stop_reason = f"converged at step {step}"
        elif step >= self.cap:
            self.stop_reason = "cap reached"
        self.next_step = max(step + self.log_every, math.ceil(step * GROWTH))
        if self.anneal_to is not None and step < self.anneal_to:
            self.next_step = min(self.next_step, self.anneal_to)
        return Verdict(best=best, stop=stop, anneal=anneal)

    def diverged(self, step: int) -> None:
        # the kept step is the row's kept_step (a reason holds one step, so the report can group reasons)
        self.stop_reason = f"diverged (non-finite loss at step {step}; the best weights before it kept)"

    #: what ``state`` keeps: everything an evaluation changes
    _STATE = ("curve", "best_step", "best_score", "best_noise", "anneal_from", "anneal_to", "stop_reason", "next_step",
              "evaluating_s")

    def state(self) -> dict:
        """A copy (the curve's points too: a state kept while the fit goes on stays as it was)."""
        return ({name: getattr(self, name) for name in self._STATE} | {"curve": [dict(p) for p in self.curve],
                                                                       "elapsed_s": time.perf_counter() - self.started})

    def load_state(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state[name])
        self.curve = [dict(p) for p in self.curve]
        self.started = time.perf_counter() - float(state["elapsed_s"])  # the time stopped is not the fit's

    def _anneal_length(self, step: int) -> int:
        """The decay's length from a plateau at ``step`` (ANNEAL_FRACTION of it, on a window's end)."""
        return math.ceil(ANNEAL_FRACTION * step / self.log_every) * self.log_every

    def bands(self) -> dict:
        """Each validation metric's floor band as a bound on the curve's own column."""
        (e_mean, e_sd), (o_mean, o_sd) = self.floor["energy"], self.floor["off_support"]
        return {"energy": e_mean + BAND * e_sd, "hq_frac": 1.0 - (o_mean + BAND * o_sd)}

    def _reached(self, which: tuple[str, ...]):
        bands = self.bands()
        inside = {"energy": lambda p: p["energy"] <= bands["energy"], "hq_frac": lambda p: p["hq_frac"] >= bands["hq_frac"]}
        return next((p for p in self.curve if p.get("score") is not None and all(inside[m](p) for m in which)), None)

    def record(self) -> dict:
        """What the fit record keeps: the curve, the stop reason, the step kept, the floors, the cap, and the
        time to target (the first evaluation within the floor band: of each metric, and of both;
        None where none was)."""
        out = {"eval_metric": "score", "eval_curve": self.curve, "eval_floor": self.floor["energy"][0],
               "eval_floor_std": self.floor["energy"][1], "eval_floor_off": self.floor["off_support"][0],
               "eval_floor_off_std": self.floor["off_support"][1],
               "stopped_step": self.curve[-1]["step"] if self.curve else None,
               "stop_reason": self.stop_reason or "cap reached", "kept_step": self.best_step,
               "kept_score": None if self.best_step is None else self.best_score, "eval_s": self.evaluating_s,
               "anneal_step": self.anneal_from, "eval_cap": self.cap}
        kept = next((p for p in self.curve if p["step"] == self.best_step), None)
        out |= {"kept_energy": kept and kept["energy"], "kept_hq_frac": kept and kept["hq_frac"]}
        for suffix, which in (("", ("energy", "hq_frac")), ("_energy", ("energy",)), ("_support", ("hq_frac",))):
            p = self._reached(which)
            out |= {f"target_step{suffix}": p["step"] if p else None, f"target_s{suffix}": p["train_s"] if p else None}
        return out
