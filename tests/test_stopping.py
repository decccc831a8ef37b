"""Evaluation during training and stopping (the converged budget): the stopping rule on synthetic
curves, the kept weights are the validation best, the validation sample is its own, evaluation
time is not training time, and a plugin without evaluation keeps a fixed budget."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from genbench import datasets
from genbench.api import FitInfo, Monitor, Verdict
from genbench.runner.monitor import MIN_STEPS, PATIENCE_EVALS, ValidationMonitor, binomial_sd, validation_floor
from genbench.scoring import validation_sample

RING8 = datasets.get("ring8")


class Curve(ValidationMonitor):
    """A monitor whose energy at each step is read off a given curve (the samples are ignored; every
    sample on the support): its score is the energy's excess in units of the floor's std."""

    def __init__(self, values, cap=100_000, floor=(0.01, 0.002), log_every=50, anneal=False, first_step=0):
        floors = {"energy": floor, "off_support": (0.0, binomial_sd(0.0, 2000))}
        super().__init__(RING8, np.zeros((4, 2)), floors, cap=cap, log_every=log_every, seed=0, anneal=anneal,
                         first_step=first_step)
        self.values = values
        self.anneals = []

    def measure(self, x):
        value = float(self.values(self._step))
        return {"energy": value, "hq_frac": 1.0}, (value - self.floor["energy"][0]) / self.floor["energy"][1], 1.0

    def run(self):
        """Evaluates every logged window up to the cap, as a fit would; returns the stop step."""
        for step in range(self.log_every, self.cap + 1, self.log_every):
            if self.due(step):
                self._step = step
                verdict = self.evaluate(step, lambda n, seed: torch.zeros(n, 2))
                if verdict.anneal:
                    self.anneals.append((step, verdict.anneal))
                if verdict.stop:
                    return step
        return None


def test_a_plateau_stops_after_the_patience_window_and_keeps_the_best():
    m = Curve(lambda s: max(0.5 - s / 40_000, 0.1))  # improves until step 16000, flat after
    stop = m.run()
    assert stop is not None and 16_000 <= m.best_step <= 16_000 * 1.15 and stop >= 2 * m.best_step
    assert sum(p["step"] > m.best_step for p in m.curve) == PATIENCE_EVALS
    assert m.record()["stop_reason"] == f"converged at step {stop}" and m.record()["kept_step"] == m.best_step


def test_at_the_plateau_the_fit_anneals_then_stops_at_the_end_of_the_decay():
    m = Curve(lambda s: max(0.5 - s / 40_000, 0.1) - (0.05 if s > 36_000 else 0.0), anneal=True)  # the decay helps
    stop = m.run()
    (start, length), = m.anneals  # one decay, begun where the plain rule would have stopped
    plain = Curve(lambda s: max(0.5 - s / 40_000, 0.1))
    assert start == plain.run() < 36_000 and length == 50 * math.ceil(0.5 * start / 50)
    assert stop == start + length and m.record()["anneal_step"] == start
    assert m.record()["stop_reason"] == f"converged at step {stop}"
    assert m.best_step > start  # the weights kept are the annealed ones, where they are better
    capped = Curve(lambda s: max(0.5 - s / 40_000, 0.1), cap=start + 1000, anneal=True)
    assert capped.run() == start + 1000 and capped.anneals[0][0] + capped.anneals[0][1] == start + 1000  # cut by the cap
    assert capped.record()["stop_reason"] == f"cap reached while annealing (plateau at step {start})"


def test_the_evaluations_and_the_stop_do_not_depend_on_the_cap():
    curve = lambda s: max(0.5 - s / 40_000, 0.1)  # noqa: E731 - improves until step 16000, flat after
    small, large = Curve(curve, cap=100_000), Curve(curve, cap=400_000)
    assert small.run() == large.run() is not None and small.best_step == large.best_step
    assert [p["step"] for p in small.curve] == [p["step"] for p in large.curve]


def test_evaluations_from_a_first_step_fall_on_the_schedules_later_steps():
    """A tune's rungs before the last evaluate from a quarter of their steps on: the same steps as
    the whole schedule has there (so the same scores), the earlier ones passed over, the cap kept."""
    curve = lambda s: 0.5 - s / 40_000 + (0.2 if 1_000 < s < 1_400 else 0.0)  # noqa: E731 - a bump, then better
    full, late = Curve(curve, cap=8_000), Curve(curve, cap=8_000, first_step=2_000)
    full.run(), late.run()
    steps = [p["step"] for p in full.curve]
    assert [p["step"] for p in late.curve] == [s for s in steps if s >= 2_000] and steps[0] < 2_000
    drop = lambda c: [{k: v for k, v in p.items() if k != "train_s"} for p in c]  # noqa: E731 - its own clock
    assert drop(late.curve) == drop([p for p in full.curve if p["step"] >= 2_000])
    assert late.best_step == full.best_step == 8_000 and late.record()["kept_score"] == full.record()["kept_score"]
    short = Curve(curve, cap=1_500, first_step=2_000)
    short.run()
    assert [p["step"] for p in short.curve] == [1_500]  # a fit shorter than its first step: evaluated at its cap


def test_slow_steady_improvement_runs_to_the_cap():
    m = Curve(lambda s: 1.0 - s * 1e-4, cap=20_000)  # improves by more than the floor's spread between evaluations
    assert m.run() is None and m.best_step == m.cap and m.record()["stop_reason"] == "cap reached"


def test_noise_within_the_floor_is_no_improvement():
    rng = np.random.default_rng(0)
    noise = {}
    # down to 0.1 by step 500, then wobbles within +-0.0009: two never differ by the floor's std, 0.002
    m = Curve(lambda s: 0.2 - 0.1 * min(s, 500) / 500 + noise.setdefault(s, rng.uniform(-0.0009, 0.0009)))
    stop = m.run()
    assert stop is not None and m.best_step <= 600  # wobbles of less than the floor's std never count
    assert stop >= MIN_STEPS


def test_non_finite_samples_stop_the_fit_as_diverged():
    m = Curve(lambda s: 0.5)
    assert m.evaluate(100, lambda n, seed: torch.full((n, 2), float("nan"))).stop
    assert m.record()["stop_reason"].startswith("diverged")


def test_the_time_to_target_is_the_first_evaluation_in_the_floor_band():
    m = Curve(lambda s: 0.05 - s * 1e-5, floor=(0.01, 0.001))  # enters the band (<= 0.013) at step 3700
    m.run()
    first = m.record()["target_step"]
    before = max(p["step"] for p in m.curve if p["step"] < first)
    assert first is not None and first >= 3700 > before  # the first evaluation inside the band
    never = Curve(lambda s: 0.05, floor=(0.01, 0.001))
    never.run()
    assert never.record()["target_step"] is None


def _monitor(ds, seed=0):
    val = validation_sample(ds, seed)
    return ValidationMonitor(ds, val, validation_floor(ds, seed, val), cap=10_000, log_every=50, seed=seed)


def test_true_samples_score_within_the_noise_and_off_support_samples_far_outside():
    m = _monitor(RING8)
    assert set(m.floor) == {"energy", "off_support"} and m.floor["energy"][1] > 0
    true = RING8.sample(2000, [0, 9])
    _, score, noise = m.measure(true)
    assert abs(score) < 4 * math.sqrt(2)  # the sum of two metrics each within a few of their spreads
    # one point in ten moved off the ring into the middle: the energy distance hardly moves, the score does
    moved = true.copy()
    moved[::10] *= 0.5
    values, worse, _ = m.measure(moved)
    assert values["hq_frac"] < 0.91 and worse > score + 20 * noise


def test_either_metric_improving_beyond_its_noise_is_a_new_best():
    m = _monitor(RING8)
    true = RING8.sample(2000, [0, 9])
    blurred = true + np.random.default_rng(0).normal(0, 0.15, true.shape).astype(np.float32)
    steps = iter(range(100, 10_000, 100))
    first = m.evaluate(next(steps), lambda n, seed: torch.as_tensor(blurred))
    better = m.evaluate(next(steps), lambda n, seed: torch.as_tensor(true))
    same = m.evaluate(next(steps), lambda n, seed: torch.as_tensor(RING8.sample(2000, [0, 10])))
    assert first.best and better.best and not same.best  # true points again are no improvement on true points
    assert m.record()["kept_step"] == 200 and m.record()["target_step"] == 200


def test_the_validation_sample_is_its_own_stream():
    for seed in (0, 3):
        val = validation_sample(RING8, seed)
        for other in (RING8.sample(50_000, [seed, 0]), RING8.sample(3000, [seed, 1]), RING8.sample(5000, [seed, 2])):
            assert not (val[:, None, :] == other[None, :2000, :]).all(-1).any()  # no point shared


class KeepSecond(Monitor):
    """Evaluates every window; the second evaluation is the best, the fifth stops the fit."""

    def __init__(self):
        self.samples = []

    def due(self, step):
        return True

    def evaluate(self, step, sample, train_s=None):
        self.samples.append(sample(200, 7).clone())
        n = len(self.samples)
        return Verdict(best=n == 2, stop=n == 5)


@pytest.mark.parametrize("name", ["diffusion", "vae", "flow"])
def test_the_kept_weights_are_the_validation_best_and_the_fit_stops_when_told(name):
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    data = RING8.sample(4000, [0, 0])
    model = cls(budget="quick", params={"train_steps": "400"})
    monitor = KeepSecond()
    info = model.fit(data, seed=0, monitor=monitor)
    assert len(monitor.samples) == 5 and info.steps == 5 * 50  # stopped at the fifth window
    torch.testing.assert_close(model.sample_now(200, 7), monitor.samples[1])  # the second evaluation's weights
    assert not torch.equal(monitor.samples[1], monitor.samples[4])


def test_members_side_by_side_keep_their_own_best():
    from genbench.models.vae import VAE

    datas = [RING8.sample(4000, [s, 0]) for s in (0, 1)]
    group = [VAE(budget="quick", params={"train_steps": "300"}) for _ in datas]
    monitors = [KeepSecond(), KeepSecond()]
    VAE.fit_side_by_side(group, datas, device="cpu", seeds=[0, 1], monitors=monitors)
    for member, monitor in zip(group, monitors):
        torch.testing.assert_close(member.sample_now(200, 7), monitor.samples[1])


def test_evaluation_time_is_not_training_time(monkeypatch):
    """On a fake clock: each evaluation costs 100 s, the training steps nothing."""
    from genbench.models import train
    from genbench.models.vae import VAE

    now = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])

    class Slow(KeepSecond):
        def evaluate(self, step, sample, train_s=None):
            now[0] += 100.0
            return super().evaluate(step, sample)

    info = VAE(budget="quick", params={"train_steps": "400"}).fit(RING8.sample(4000, [0, 0]), seed=0, monitor=Slow())
    assert info.train_s == 0.0


def test_a_members_curve_leaves_out_every_members_evaluations(monkeypatch):
    """Two VAEs side by side on a fake clock where each evaluation costs 100 s and training nothing:
    every point of both curves is at 0 training seconds, so the time to target is never longer than
    the fit (a member's own clock, less only its own evaluations, counted the other's: 100 s a
    point, and the baseline's seconds to reach the data exceeded their fits' training time)."""
    from genbench.models import train
    from genbench.models.vae import VAE
    from genbench.runner.monitor import ValidationMonitor, validation_floor
    from genbench.scoring import validation_sample

    now = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])

    class Slow(ValidationMonitor):
        def evaluate(self, step, sample, train_s=None):
            def slow(n, seed):  # sampling is where an evaluation's time goes
                now[0] += 100.0
                return sample(n, seed)

            return super().evaluate(step, slow, train_s)

    datas = [RING8.sample(4000, [s, 0]) for s in (0, 1)]
    monitors = []
    for s in (0, 1):
        val = validation_sample(RING8, s)
        monitors.append(Slow(RING8, val, validation_floor(RING8, s, val), cap=300, log_every=50, seed=s))
    group = [VAE(budget="converged", params={"train_steps": "300"}) for _ in datas]
    infos = VAE.fit_side_by_side(group, datas, device="cpu", seeds=[0, 1], monitors=monitors)
    for info, monitor in zip(infos, monitors):
        assert len(monitor.curve) >= 3 and [p["train_s"] for p in monitor.curve] == [0.0] * len(monitor.curve)
        assert info.train_s == 0.0 and monitor.record()["eval_s"] == 100.0 * len(monitor.curve)


def test_a_plugin_without_evaluation_keeps_a_fixed_budget(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--models", "gauss", "--budget", "converged", "--n-samples", "200", "--floor-draws", "2",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    assert row["budget"] == "converged" and row["stop_reason"].startswith("fixed budget")


def test_a_converged_run_records_its_curve_and_stop(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--models", "vae", "--budget", "converged", "--param", "vae.train_steps=1500",
            "--n-samples", "300", "--floor-draws", "2", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    assert row["stop_reason"] and row["kept_step"] <= row["train_steps"] <= 1500
    fit = json.loads((out / "fits" / "vae__ring8__s0.json").read_text())
    steps = [p["step"] for p in fit["eval_curve"]]
    assert steps == sorted(steps) and len(steps) >= 5 and fit["kept_step"] in steps
    from genbench import plots, report, store

    rd = store.RunDir(out)
    df = report.tidy(rd.rows())
    figs = plots.figures(rd, df, notice=lambda m: None)
    assert "learning_curves.png" in figs and plots.text_outside(figs["learning_curves.png"]) == []
    assert "## Training to convergence" in report.markdown(df)


def test_the_auto_budget_is_converged_on_a_gpu_and_default_on_the_cpu(monkeypatch):
    from genbench.runner import plan as plan_mod

    assert plan_mod.Plan(models=("vae",)).budget == plan_mod.AUTO
    cpu = plan_mod.check(plan_mod.Plan(models=("vae",), device="cpu"))
    assert cpu.plan.budget == "default" and not cpu.converged and cpu.plan.out == "results/default-cpu"
    monkeypatch.setattr(plan_mod, "resolve_device", lambda *a, **k: "cuda")
    gpu = plan_mod.check(plan_mod.Plan(models=("vae",), device="cuda"))
    assert gpu.plan.budget == "converged" and gpu.converged and gpu.plan.out == "results/converged-cuda"
    assert gpu.configs["vae"] == dataclasses.asdict(plan_mod.make_model(gpu.entries[0], gpu.plan).config)


class EveryWindowBest(Monitor):
    """Evaluates every window and calls each evaluation the best; records a divergence."""

    def __init__(self):
        self.samples, self.diverged_at = [], None

    def due(self, step):
        return True

    def evaluate(self, step, sample, train_s=None):
        self.samples.append(sample(200, 7).clone())
        return Verdict(best=True, stop=False)

    def diverged(self, step):
        self.diverged_at = step


def _nan_after(cls, calls: int):
    """``cls`` whose loss turns non-finite after ``calls`` calls (one per training step)."""
    class NaNAfter(cls):
        def loss(self, *a):
            self._calls = getattr(self, "_calls", 0) + 1
            loss = super().loss(*a)
            return loss * float("nan") if self._calls > calls else loss

    return NaNAfter


def test_a_fit_whose_loss_diverges_after_a_kept_best_ends_with_it():
    """Its kept weights are the last evaluation's before the divergence, and the fit is not a
    diverged one; without a kept best (no monitor) it is."""
    from genbench.api import Diverged
    from genbench.models.vae import VAE

    data = RING8.sample(4000, [0, 0])
    model, monitor = _nan_after(VAE, 120)(budget="quick", params={"train_steps": "400"}), EveryWindowBest()
    info = model.fit(data, seed=0, monitor=monitor)
    assert monitor.diverged_at == 150 and info.steps == 150 and math.isfinite(info.final_loss)
    assert len(monitor.samples) == 2  # steps 50 and 100: the window of the divergence is not evaluated
    torch.testing.assert_close(model.sample_now(200, 7), monitor.samples[-1])
    with pytest.raises(Diverged):
        _nan_after(VAE, 120)(budget="quick", params={"train_steps": "400"}).fit(data, seed=0)


def test_a_member_whose_loss_diverges_after_a_kept_best_ends_with_it_and_the_others_train_on():
    from genbench.models.vae import VAE

    class Poisoned(VAE):
        """Its loss times a per-member draw: 1, or non-finite after 120 steps for a poisoned member."""

        def draws(self, x0, g):
            self._calls = getattr(self, "_calls", 0) + 1
            bad = getattr(self, "poisoned", False) and self._calls > 120
            return (*super().draws(x0, g), torch.tensor(float("nan") if bad else 1.0))

        def loss(self, nets, context, x0, *draws):
            return super().loss(nets, context, x0, *draws[:-1]) * draws[-1]

    datas = [RING8.sample(4000, [s, 0]) for s in (0, 1)]
    group = [Poisoned(budget="quick", params={"train_steps": "300"}) for _ in datas]
    group[1].poisoned = True
    monitors = [EveryWindowBest(), EveryWindowBest()]
    infos = Poisoned.fit_side_by_side(group, datas, device="cpu", seeds=[0, 1], monitors=monitors)
    assert monitors[1].diverged_at == 150 and monitors[0].diverged_at is None
    assert all(isinstance(i, FitInfo) for i in infos) and infos[0].steps == 300
    for member, monitor in zip(group, monitors):
        x = member.sample_now(200, 7)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, monitor.samples[-1])


class FirstEvaluation(Monitor):
    """Asks for its sample at the first evaluation, calls it the best and stops the fit there."""

    sample_args = (300, 7)

    def due(self, step):
        return True

    def evaluate(self, step, sample, train_s=None):
        self.x = sample(*self.sample_args).clone()
        return Verdict(best=True, stop=True)


@pytest.mark.parametrize("name,params", [("diffusion", {"default_steps": "8"}), ("cm-ct", {"default_steps": "2"}),
                                         ("vae", {}), ("gan", {}), ("flow", {})])
def test_members_evaluated_at_once_sample_what_each_samples_alone(name, params, monkeypatch):
    """A stacked fit's members are evaluated in one vmapped pass (``sample_parts``: no member's own
    ``sample_now`` is called): each member's evaluation sample is the one its kept weights give
    alone, to float rounding (members on two datasets, two seeds, and their own member fields)."""
    from genbench.models import train
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    fields = [{}, {}, {}]
    if "p_mean" in cls.member_fields:
        fields = [{"p_mean": "-1.0"}, {"p_mean": "-1.5"}, {"p_mean": "-0.8"}]
    group = [cls(budget="quick", params={"train_steps": "100", **params, **f}) for f in fields]
    datas = [datasets.get(d).sample(2000, [s, 0]) for d, s in (("ring8", 0), ("moons", 1), ("ring8", 2))]
    calls = []
    own = cls.sample_now
    monkeypatch.setattr(cls, "sample_now", lambda self, n, seed: (calls.append(n), own(self, n, seed))[1])
    monkeypatch.setattr(train, "EVALUATE_TOGETHER_ON", ("cuda", "cpu"))  # on the CPU only where asked to
    monitors = [FirstEvaluation() for _ in group]
    cls.fit_side_by_side(group, datas, device="cpu", seeds=[0, 1, 2], monitors=monitors)
    assert calls == []
    for member, monitor in zip(group, monitors):
        torch.testing.assert_close(monitor.x, own(member, 300, 7), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(monitors[0].x, monitors[2].x)  # members of one dataset, their own weights


class BestAt(Monitor):
    """Best at the evaluations ``best``, stopping at evaluation ``stop`` (each member its own)."""

    sample_args = (300, 7)

    def __init__(self, best, stop):
        self.best_at, self.stop_at, self.samples = best, stop, []

    def due(self, step):
        return True

    def evaluate(self, step, sample, train_s=None):
        self.samples.append(sample(*self.sample_args).clone())
        return Verdict(best=len(self.samples) in self.best_at, stop=len(self.samples) == self.stop_at)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "gan", "flow"])
def test_members_evaluated_at_once_from_the_stacked_weights_are_those_written_back(name, monkeypatch):
    """Members drawn at once sample from the stacked fit's own weights and keep their best there
    (``Keeper``'s stacked view), their modules untouched until the end: the same samples at every
    evaluation, the same weights kept and restored, to the bit, as when each member's weights are
    written into its modules at every evaluation (EMA, target networks, ActNorm's flags; members
    stopping at their own evaluations, one best at once with another's)."""
    from genbench.models import train
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    monkeypatch.setattr(train, "EVALUATE_TOGETHER_ON", ("cuda", "cpu"))
    datas = [datasets.get(d).sample(2000, [s, 0]) for d, s in (("ring8", 0), ("moons", 1), ("ring8", 2))]
    plans = [({1, 2}, 3), ({2}, 2), ({1, 3}, 4)]  # (best at evaluations, stop at): 50 steps apart
    out = {}
    for view in (True, False):
        if not view:  # every evaluation writes each due member's weights into its modules first
            on_log = train.Keeper.on_log
            monkeypatch.setattr(train.Keeper, "on_log", lambda self, k, t, sync=None, stacked=None: on_log(self, k, t, sync))
        group = [cls(budget="quick", params={"train_steps": "200"}) for _ in datas]
        monitors = [BestAt(*p) for p in plans]
        cls.fit_side_by_side(group, datas, device="cpu", seeds=[0, 1, 2], monitors=monitors)
        out[view] = ([m.samples for m in monitors], [m.state_dict() for m in group], [m.sample_now(300, 9) for m in group])
    assert [len(s) for s in out[True][0]] == [3, 2, 4]
    for a, b in zip(out[True][0], out[False][0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    assert all(same(a, b) for a, b in zip(out[True][1], out[False][1]))
    assert all(torch.equal(x, y) for x, y in zip(out[True][2], out[False][2]))


def test_on_the_cpu_members_are_evaluated_one_at_a_time(monkeypatch):
    """Where the batched pass is slower (the CPU: ``EVALUATE_TOGETHER_ON``), each member samples on its own."""
    from genbench.models.vae import VAE

    calls = []
    own = VAE.sample_now
    monkeypatch.setattr(VAE, "sample_now", lambda self, n, seed: (calls.append(n), own(self, n, seed))[1])
    group = [VAE(budget="quick", params={"train_steps": "100"}) for _ in range(2)]
    VAE.fit_side_by_side(group, [RING8.sample(2000, [s, 0]) for s in (0, 1)], device="cpu", seeds=[0, 1],
                         monitors=[FirstEvaluation(), FirstEvaluation()])
    assert calls == [300, 300]


def test_members_scored_at_once_are_scored_as_one_at_a_time():
    """``ValidationMonitor.evaluate_many`` (a stacked fit's members, their samples drawn at once)
    gives each monitor the curve, verdicts and stop reason ``evaluate`` gives it alone: members on
    three datasets and seeds, samples near and far from the data, one not finite."""
    from genbench.runner.monitor import ValidationMonitor

    dss = [datasets.get(d) for d in ("ring8", "moons", "spirals", "ring8")]
    pairs = [[_monitor(ds, s) for ds, s in zip(dss, (0, 1, 2, 3))] for _ in range(2)]
    rng = np.random.default_rng(0)
    for step in (100, 200, 300):
        xs = [torch.as_tensor(ds.sample(2000, [s, 9, step]) + rng.normal(0, 0.05 * k, (2000, 2)), dtype=torch.float32)
              for k, (ds, s) in enumerate(zip(dss, (0, 1, 2, 3)))]
        if step == 300:
            xs[3][5, 0] = float("nan")
        alone = [m.evaluate(step, lambda n, seed, x=x: x, train_s=1.0) for m, x in zip(pairs[0], xs)]
        together = ValidationMonitor.evaluate_many(pairs[1], step, xs, train_s=1.0)
        assert alone == together
    for a, b in zip(*pairs):
        assert a.stop_reason == b.stop_reason and a.best_step == b.best_step
        assert [p["step"] for p in a.curve] == [p["step"] for p in b.curve]
        for pa, pb in zip(a.curve, b.curve):
            assert pa["hq_frac"] == pb["hq_frac"]
            for k in ("energy", "score"):
                assert (pa[k] is None) == (pb[k] is None)
                if pa[k] is not None:
                    assert pb[k] == pytest.approx(pa[k], rel=1e-9, abs=1e-12)
    assert pairs[1][3].stop_reason.startswith("diverged") and pairs[1][0].curve[-1]["energy"] > 0
