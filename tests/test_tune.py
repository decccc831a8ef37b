"""Equal-budget tuning: declared search spaces, quasirandom trials with the defaults among them,
selection on the validation sample only, resumable tunes, tuned files and 'run --tuned'."""
import json
import math

import numpy as np
import pytest

from genbench import api, tune
from genbench.runner import monitor
from genbench.registry import resolve

VAE = resolve(["vae"])[0].cls
QUICK = ("--budget", "quick", "--device", "cpu", "--datasets", "ring8")


def test_every_built_in_declares_a_valid_space_of_equal_size():
    sizes = set()
    for name in ("diffusion", "cm-cd", "cm-ct", "vae", "flow", "gan"):
        cls = resolve([name])[0].cls
        api.check_space(cls)
        assert "tuning" in cls.capabilities() and "lr" in cls.search_space
        sizes.add(len(cls.search_space))
    assert sizes == {3}  # the same number of knobs for every family


def test_draws_are_quasirandom_reproducible_and_nested():
    space = {"a": api.Uniform(0.0, 1.0), "b": api.LogUniform(1e-4, 1e-2)}
    first, again, other = tune.draws(space, 16, seed=3), tune.draws(space, 16, seed=3), tune.draws(space, 16, seed=4)
    assert first == again and first != other
    assert tune.draws(space, 5, seed=3) == first[:5]  # more trials extend the same sequence
    a = np.array([p["a"] for p in first])
    assert sorted(np.floor(a * 16).astype(int)) == list(range(16))  # Sobol: one point in each 1/16 of a coordinate
    b = np.log10([p["b"] for p in first])
    assert sorted(np.floor((b + 4) / 2 * 16).astype(int)) == list(range(16))  # log-uniform: even in the log
    assert all(1e-4 <= p["b"] <= 1e-2 for p in first)


def test_the_defaults_are_trial_zero_of_every_study():
    trials = tune.trials(VAE, 4, studies=2, seed=0, budget="quick")
    defaults = VAE(budget="quick").config  # the budget's preset included: what 'run --budget quick' trains
    assert defaults.kl_warmup != VAE.Config().kl_warmup
    assert [(t.study, t.index) for t in trials] == [(s, i) for s in (0, 1) for i in range(4)]
    for t in trials:
        if t.index == 0:
            assert t.params == {k: str(getattr(defaults, k)) for k in VAE.search_space}
    assert trials[1].params != trials[5].params  # the studies scramble differently
    model = VAE(budget="quick", params=trials[2].params)  # a drawn trial is a valid config
    assert model.config.batch in (256, 512, 1024)


@pytest.mark.parametrize("space,why", [
    ({"lr": api.LogUniform(1e-2, 1e-3)}, "empty range"),
    ({"lr": api.LogUniform(-1e-3, 1e-2)}, "must be > 0"),
    ({"lr": api.Uniform(0.0, 0.0)}, "empty range"),
    ({"latnet": api.IntRange(1, 4)}, "not a field"),
    ({"batch": api.Choice((512,))}, "at least 2"),
    ({"lr": api.LogUniform(1e-4, 1e-3)}, "outside"),  # the default, 2e-3, is not in it
])
def test_bad_spaces_are_refused_before_anything_runs(space, why, monkeypatch, cli, tmp_path):
    monkeypatch.setattr(VAE, "search_space", space)
    with pytest.raises(api.UsageError, match=why):
        api.check_space(VAE)
    out = tmp_path / "tune"
    r = cli("tune", "--models", "vae", "--trials", "2", *QUICK, "--out", str(out))
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args,why", [(("--max-members", "0"), "--max-members 0"),
                                      (("--groups-at-once", "0"), "--groups-at-once 0"),
                                      (("--jobs", "-1"), "--jobs -1")])
def test_bad_resources_are_refused_before_anything_runs(args, why, cli, tmp_path):
    out = tmp_path / "tune"
    r = cli("tune", "--models", "vae,gan", "--trials", "2", *QUICK, *args, "--out", str(out))
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_selection_reads_only_the_validation_columns():
    floors = {("ring8", 0): {"energy": (0.001, 0.0005), "off_support": (0.003, 0.0012)}}
    row = {"dataset": "ring8", "seed": 0, "status": "done", "val_energy": 0.002, "hq_frac": 0.99,
           "w2": 0.3, "energy": 0.002, "c2st": 0.55, "precision": 0.9}
    score = tune.validation_scores([row], floors)[("ring8", 0)]
    assert score == pytest.approx((0.002 - 0.001) / 0.0005 + (0.01 - 0.003) / 0.0012)
    scrambled = row | {"w2": 9.0, "energy": 1.0, "c2st": 1.0, "precision": 0.0}  # every reference-sample column
    assert tune.validation_scores([scrambled], floors)[("ring8", 0)] == score
    assert math.isinf(tune.validation_scores([row | {"status": "diverged"}], floors)[("ring8", 0)])
    assert set(tune.SELECTION_COLUMNS) == {"val_energy", "hq_frac"}


def _tuned(out):
    return json.loads((out / "tuned.json").read_text())


def test_selection_never_reads_the_reference_sample(monkeypatch, cli, tmp_path):
    """Two tunes, the second with every reference sample replaced by far-off points: the same
    trials win (a selection that read the reference would change, or fail)."""
    from genbench.runner import plan

    a = tmp_path / "a"
    assert cli("tune", "--models", "vae", "--trials", "3", *QUICK, "--out", str(a), timeout=600).returncode == 0
    real = plan.Resolved.data

    def poisoned(self, dataset, seed):
        ds, train, ref, test = real(self, dataset, seed)
        return ds, train, ref + 100.0, test

    monkeypatch.setattr(plan.Resolved, "data", poisoned)
    b = tmp_path / "b"
    assert cli("tune", "--models", "vae", "--trials", "3", *QUICK, "--out", str(b), timeout=600).returncode == 0
    ta, tb = _tuned(a)["configs"], _tuned(b)["configs"]
    assert ta == tb
    assert [t["scores"] for t in json.loads((a / "tune.json").read_text())["trials"]] == \
           [t["scores"] for t in json.loads((b / "tune.json").read_text())["trials"]]


def test_a_small_tune_resumes_without_redoing_finished_trials(cli, tmp_path):
    """One model, one dataset, 8 trials at the quick budget on the CPU: a tune stopped after 5
    trials, re-run with 8, trains only the 3 missing (the first 5 trials' rows are untouched)."""
    out = tmp_path / "tune"
    assert cli("tune", "--models", "vae", "--trials", "5", *QUICK, "--out", str(out), timeout=900).returncode == 0
    rows = out / "trials" / "vae" / "rows.jsonl"  # a run dir for each model, its trials its models
    before = rows.read_bytes()
    assert len({json.loads(line)["model"] for line in before.splitlines()}) == 5
    fits = {p.name: p.read_bytes() for p in (out / "trials" / "vae" / "fits").glob("*.json")}
    r = cli("tune", "--models", "vae", "--trials", "8", *QUICK, "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    after = rows.read_bytes()
    assert after.startswith(before)  # the first 5 trials' rows untouched, the 3 new ones appended
    assert len({json.loads(line)["model"] for line in after.splitlines()}) == 8
    assert all((out / "trials" / "vae" / "fits" / k).read_bytes() == v for k, v in fits.items())  # not refitted
    assert "5 of 8 trials were already done" in r.stderr
    results = json.loads((out / "tune.json").read_text())["trials"]
    assert [t["index"] for t in results] == list(range(8)) and results[0]["params"]["kl_warmup"] == "100"
    chosen = _tuned(out)["configs"]["vae"]["ring8"]
    best = min(results, key=lambda t: t["scores"]["ring8"])
    assert chosen["trial"] == best["index"] and chosen["params"] == best["params"]


def test_run_tuned_uses_each_datasets_config_and_refuses_other_settings(cli, tmp_path):
    out = tmp_path / "tune"
    assert cli("tune", "--models", "vae", "--trials", "2", *QUICK, "--out", str(out), timeout=600).returncode == 0
    tuned = out / "tuned.json"
    chosen = _tuned(out)["configs"]["vae"]["ring8"]["params"]
    run = tmp_path / "run"
    r = cli("run", "--models", "vae", "--datasets", "ring8", "--seeds", "7", "--budget", "quick", "--device", "cpu",
            "--n-samples", "300", "--floor-draws", "2", "--tuned", str(tuned), "--out", str(run), timeout=600)
    assert r.returncode == 0, r.stderr
    row = json.loads((run / "rows.jsonl").read_text().splitlines()[0])
    assert row["config_source"].startswith("tuned tuned.json ")
    import torch

    state = torch.load(next((run / "checkpoints").glob("*.pt")), weights_only=True)
    assert {k: str(state["config"][k]) for k in chosen} == chosen  # the fit used the tuned config
    again = cli("run", "--models", "vae", "--datasets", "ring8", "--seeds", "7", "--budget", "quick", "--device", "cpu",
                "--n-samples", "300", "--floor-draws", "2", "--tuned", str(tuned), "--out", str(run), timeout=600)
    assert again.returncode == 0, again.stderr  # the same tuned run resumes: nothing left to do
    assert len((run / "rows.jsonl").read_text().splitlines()) == 1
    refused = {
        "--seeds 0": ("--seeds", "0"),  # a tuning seed
        "budget": ("--budget", "default"),
        "model": ("--models", "vae,flow"),
    }
    for why, extra in refused.items():
        args = {"--models": "vae", "--datasets": "ring8", "--seeds": "7", "--budget": "quick"}
        args[extra[0]] = extra[1]
        bad = cli("run", *[x for kv in args.items() for x in kv], "--device", "cpu", "--tuned", str(tuned),
                  "--out", str(tmp_path / why.replace(" ", "")))
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (why, bad.stderr)
        assert not (tmp_path / why.replace(" ", "")).exists()
    edited = json.loads(tuned.read_text())
    edited["configs"]["vae"]["ring8"]["params"]["lr"] = "0.5"
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(edited))
    bad = cli("run", "--models", "vae", "--datasets", "ring8", "--seeds", "7", "--budget", "quick", "--device", "cpu",
              "--tuned", str(forged), "--out", str(tmp_path / "forged"))
    assert bad.returncode == 2 and "checksum" in bad.stderr


def test_best_of_k_curves_fall_from_a_typical_trial_to_the_best():
    from genbench import plots

    med, lo, hi = plots.best_of_k(np.array([3.0, 1.0, 2.0]))
    assert med[0] == 2.0 and med[-1] == 1.0  # one trial: the median trial; three: the best, 70% of the time
    assert (np.diff(med) <= 0).all() and (lo <= med).all() and (med <= hi).all()
    tune_json = {"trials": [{"model": m, "study": 0, "index": i, "params": {"lr": str(1e-3 * (i + 1))},
                             "scores": {"ring8": float(i), "moons": 2.0 - i}} for m in ("a", "b") for i in range(3)]}
    figs = plots.tune_figures(tune_json)
    assert set(figs) == {"best_of_k.png", "trial_scores.png", "sensitivity.png"}
    for fig in figs.values():
        assert plots.text_outside(fig) == []


def test_trials_that_differ_in_member_fields_are_one_stacked_fit_and_share_the_teacher(tmp_path, monkeypatch):
    """A tune's run: trials are models of their own; fitting side by side, those that differ only in
    member fields (diffusion: lr, p_mean, a batch that divides the group's largest) are one stacked
    fit, one with a batch that divides no other its own, and
    the distilled model's trials share one teacher fit per dataset and seed, fitted first."""
    from genbench.models.consistency import ConsistencyDistillation
    from genbench.models.diffusion import Diffusion
    from genbench.runner import Plan, run

    groups = []
    for cls in (Diffusion, ConsistencyDistillation):
        real = cls.fit_side_by_side.__func__

        def spy(klass, models, *a, _real=real, **k):
            groups.append(sorted(m.name for m in models))
            return _real(klass, models, *a, **k)

        monkeypatch.setattr(cls, "fit_side_by_side", classmethod(spy))
    trials = {"diffusion~a": "diffusion", "diffusion~b": "diffusion", "diffusion~c": "diffusion",
              "diffusion~d": "diffusion", "cm-cd~a": "cm-cd", "cm-cd~b": "cm-cd"}
    params = {"diffusion~a": {"lr": "1e-3", "p_mean": "-2.0"}, "diffusion~b": {"lr": "3e-3", "p_mean": "-1.0"},
              "diffusion~c": {"batch": "96"}, "diffusion~d": {"batch": "128"}, "cm-cd~a": {"lr": "1e-3"},
              "cm-cd~b": {"lr": "2e-3", "batch": "512"}}
    rows = run(Plan(models=["diffusion", *trials], trials=trials, params=params, datasets=["ring8"], seeds=[0, 1],
                    budget="quick", n_samples=200, metrics=tune.METRICS, floor_draws=2, device="cpu",
                    side_by_side=True, jobs=1, score_jobs=0,
                    out=str(tmp_path / "run")))
    assert all(r["status"] == "done" for r in rows) and {r["model"] for r in rows} == {"diffusion", *trials}
    # the teacher at its defaults differs from trials a and b in member fields only: one group with them
    assert sorted(groups) == sorted([["diffusion", "diffusion", "diffusion~a", "diffusion~a", "diffusion~b",
                                     "diffusion~b", "diffusion~d", "diffusion~d"], ["diffusion~c", "diffusion~c"],
                                     ["cm-cd~a", "cm-cd~a", "cm-cd~b", "cm-cd~b"]])
    fits = sorted(p.name for p in (tmp_path / "run" / "fits").glob("diffusion__*.json"))
    assert fits == ["diffusion__ring8__s0.json", "diffusion__ring8__s1.json"]  # one teacher per dataset and seed


def test_successive_halving_rungs():
    assert tune.halving_rungs(32, 3, 27_000) == [(32, 1000), (11, 3000), (4, 9000), (2, 27_000)]
    assert tune.halving_rungs(4, 2, 300) == [(4, 75), (2, 150), (1, 300)]
    assert tune.halving_rungs(8, 0, 300) == [(8, None)]  # off: every trial at the budget's own steps
    # the rungs before the last end on a window's end (a promoted trial's fit continues from there)
    assert tune.halving_rungs(32, 3, 240_000, 50) == [(32, 8850), (11, 26_650), (4, 80_000), (2, 240_000)]
    assert tune.halving_rungs(4, 2, 430, 50) == [(4, 100), (2, 200), (1, 430)]
    assert tune.halving_rungs(8, 2, 120, 50) == [(8, 50), (4, 50), (2, 50), (1, 120)]  # at least one window
    with pytest.raises(api.UsageError, match="halving 1"):
        tune.halving_rungs(8, 1, 300)


def test_a_halving_tune_promotes_the_best_per_dataset_and_selects_at_the_last_rung(cli, tmp_path):
    """4 trials, eta 2, on two datasets (quick budget, CPU): each rung's trials are the best half of
    the rung before on that dataset, fitted at twice the steps; the tuned config is the best at
    the last rung, without the rung's steps in it."""
    out = tmp_path / "tune"
    r = cli("tune", "--models", "vae", "--datasets", "ring8,moons", "--trials", "4", "--halving", "2",
            "--budget", "quick", "--device", "cpu", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    assert "14 fits in all over 3 rungs" in r.stderr
    trials = json.loads((out / "tune.json").read_text())["trials"]
    for d in ("ring8", "moons"):
        for rung, keep in ((0, 2), (1, 1)):
            at = [t for t in trials if len(t["rungs"]) > rung and d in t["rungs"][rung]["scores"]]
            best = sorted(at, key=lambda t: (t["rungs"][rung]["scores"][d], t["index"]))[:keep]
            assert {t["index"] for t in trials if len(t["rungs"]) > rung + 1 and d in t["rungs"][rung + 1]["scores"]} \
                == {t["index"] for t in best}
        chosen = _tuned(out)["configs"]["vae"][d]
        last = [t for t in trials if len(t["rungs"]) == 3 and d in t["rungs"][2]["scores"]]
        assert len(last) == 1 and chosen["trial"] == last[0]["index"] and "train_steps" not in chosen["params"]
    fits = {p.name: json.loads(p.read_text()) for p in (out / "trials" / "vae" / "fits").glob("*.json")}
    assert len(fits) == 14 and all(f["steps"] == int(name.split("__")[0].rsplit("~", 1)[1]) for name, f in fits.items())


def test_an_untimed_plan_times_no_cell_and_saves_no_trajectory(plugin_path, monkeypatch, tmp_path):
    """A tune's trials run an untimed plan (selection reads their validation columns alone): its
    rows carry no sample time, its samples files no trajectory; a timed run of the same plan has
    both, and a run dir of one is refused to the other."""
    import numpy as np

    from genbench.runner import Plan, run

    monkeypatch.syspath_prepend(str(plugin_path))
    common = dict(models=["gauss-paths"], datasets=["ring8"], n_samples=200, floor_draws=2, score_jobs=0)
    for timed in (True, False):
        out = tmp_path / f"timed-{timed}"
        rows = run(Plan(**common, timed=timed, out=str(out)))
        assert [r["status"] for r in rows] == ["done"]
        assert (rows[0]["sample_s"] is not None) == timed and rows[0]["w2"] is not None
        with np.load(next((out / "samples").glob("*.npz"))) as saved:
            assert ("trajectory" in saved.files) == timed
    with pytest.raises(api.UsageError, match="timed"):
        run(Plan(**common, timed=True, out=str(tmp_path / "timed-False")))


def test_max_members_bounds_a_stacked_group_and_bad_values_are_refused(tmp_path, monkeypatch):
    """``max_members`` splits a model's side-by-side units into groups of at most that many (its
    rows record it); below 1 it is refused before anything is created."""
    from genbench.models.vae import VAE
    from genbench.runner import Plan, run

    sizes = []
    real = VAE.fit_side_by_side.__func__

    def spy(klass, models, *a, **k):
        sizes.append(len(models))
        return real(klass, models, *a, **k)

    monkeypatch.setattr(VAE, "fit_side_by_side", classmethod(spy))
    common = dict(models=["vae"], datasets=["ring8", "moons"], seeds=[0, 1, 2], budget="quick", n_samples=200,
                  metrics=("energy",), floor_draws=2, device="cpu", side_by_side=True, jobs=1, score_jobs=0,
                  params={"vae": {"train_steps": "20"}})
    rows = run(Plan(**common, max_members=4, out=str(tmp_path / "run")))
    assert sorted(sizes) == [2, 4] and {r["max_members"] for r in rows} == {4}
    with pytest.raises(api.UsageError, match="--max-members 0"):
        run(Plan(**common, max_members=0, out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_rungs_before_the_last_promote_by_the_kept_evaluation_and_sample_no_cell(tmp_path, monkeypatch):
    """At the converged budget (the VAE's cap cut to 600 steps), a halving tune's rungs before the
    last write their fits' rows alone (no samples, no metric), each trial going on by its fit's
    score at its kept evaluation during training, evaluated from a fraction of the rung's steps on
    (here 0.7: the schedule's steps are 100, 150, 200, 250, ...); the last rung's cells (fresh
    samples) select, its fits evaluated from the start."""
    from genbench.models.vae import VAE

    monkeypatch.setattr(VAE, "budgets", {**VAE.budgets, "converged": {"train_steps": 600}})
    monkeypatch.setattr(tune, "PROMOTION_EVALUATIONS_FROM", 0.7)
    out = tmp_path / "tune"
    _, results, best, _ = tune.run_tune(models=["vae"], datasets=["ring8"], seeds=[0], n_trials=4, studies=1,
                                        budget="converged", out=out, device="cpu", threads=1, jobs=1, seed=0,
                                        run=lambda runner: runner.run(), halving=2)
    rows = [json.loads(line) for line in (out / "trials" / "vae" / "rows.jsonl").read_text().splitlines()]
    by_steps = {s: [r for r in rows if r["model"].endswith(f"~{s}")] for s in (150, 300, 600)}
    assert [len(v) for v in by_steps.values()] == [4, 2, 1] and all(r["status"] == "done" for r in rows)
    curves = {s: [json.loads((out / "trials" / "vae" / "fits" / f"{r['model']}__ring8__s0.json").read_text())["eval_curve"]
                  for r in rs] for s, rs in by_steps.items()}
    assert {c[0]["step"] for c in curves[150]} == {150} and {c[0]["step"] for c in curves[300]} == {250}
    assert curves[600][0][0]["step"] == monitor.FIRST_STEP  # the last rung's fits: the whole schedule
    for r in by_steps[150] + by_steps[300]:  # fit rows: the kept score, nothing sampled or scored
        assert math.isfinite(r["kept_score"]) and r.get("samples_sha256") is None
        assert all(r.get(c) is None for c in ("val_energy", "hq_frac", "w2", "energy"))
    last = by_steps[600][0]
    assert last["val_energy"] is not None and last["samples_sha256"] is not None
    assert len(list((out / "trials" / "vae" / "samples").glob("*.npz"))) == 1
    kept = {r["model"].split("~")[1]: r["kept_score"] for r in by_steps[150]}
    for t in results:  # each rung's score of a cell-less rung is its fit's kept score
        assert t["rungs"][0]["scores"]["ring8"] == kept[t["key"]]
    went_on = {t["key"] for t in results if len(t["rungs"]) > 1}
    assert went_on == set(sorted(kept, key=lambda k: (kept[k], [t["key"] for t in results].index(k)))[:2])
    chosen = best[("vae", "ring8", 0)]
    assert chosen["rung"] == 2 and last["model"].split("~")[1] == next(t["key"] for t in results
                                                                      if t["index"] == chosen["trial"])
    assert json.loads((out / "tune.json").read_text())["settings"]["promoted_by"].startswith("kept evaluation")


def test_promotion_reads_only_the_kept_score():
    row = {"dataset": "ring8", "seed": 0, "status": "done", "kept_score": 3.5, "kept_energy": 0.002,
           "val_energy": None, "w2": 0.3, "energy": 0.002}
    assert tune.kept_scores([row]) == {("ring8", 0): 3.5}
    assert tune.kept_scores([row | {"w2": 9.0, "energy": 1.0, "kept_energy": 5.0}]) == {("ring8", 0): 3.5}
    assert math.isinf(tune.kept_scores([row | {"status": "error"}])[("ring8", 0)])
    assert math.isinf(tune.kept_scores([row | {"kept_score": None}])[("ring8", 0)])
    assert set(tune.PROMOTION_COLUMNS) == {"kept_score"}


@pytest.mark.slow
def test_a_promoted_trial_continues_its_fits_from_the_previous_rung(tmp_path, monkeypatch):
    """Side by side at the converged budget (the VAE's cap cut to 430 steps, halving 2: rungs of 100,
    200 and 430 steps, the first two cut at a logged window's end, not at 107 and 215): a rung's
    fits keep their state at their cap (ends/), and a promoted trial's fits continue from it: their
    records say so and the rung trains only the steps it adds; and they are the fits that the same
    tune trains from step 0 without continuing (the same losses, each fit a stack of its own); a tune stopped
    after its second rung continues them as well when re-run (its replay of the finished rungs keeps
    the states that the last rung continues from)."""
    import functools

    from genbench import runner
    from genbench.models.vae import VAE
    from genbench.runner import fits as fits_mod

    monkeypatch.setattr(VAE, "budgets", {**VAE.budgets, "converged": {"train_steps": 430}})
    monkeypatch.setattr(runner, "Plan", functools.partial(runner.Plan, side_by_side=True))

    kept = []  # the states kept when each rung starts

    def run(runner):
        kept.append(sorted(p.stem for p in (runner.store.path / "ends").glob("*.pt")))
        return runner.run()

    def tune_into(out):
        tune.run_tune(models=["vae"], datasets=["ring8"], seeds=[0, 1], n_trials=4, studies=1, budget="converged",
                      out=out, device="cpu", threads=1, jobs=1, seed=0, run=run, halving=2, max_members=1)
        fits = {}
        for f in (out / "trials" / "vae" / "fits").glob("*.json"):
            fits[f.stem] = json.loads(f.read_text())
        return fits

    continued = tune_into(tmp_path / "a")
    rungs = {s: {n: r for n, r in continued.items() if n.split("__")[0].endswith(f"~{s}")} for s in (100, 200, 430)}
    assert [len(v) for v in rungs.values()] == [8, 4, 2]
    went_on = [sorted({n.split("__")[0].replace(f"~{s}", "~100" if s == 200 else "~200") for n in rungs[s]})
               for s in (200, 430)]
    assert [len(k) for k in kept] == [0, 4, 2]  # the next rung's: two trials, then one, on two seeds
    assert [sorted({n.split("__")[0] for n in k}) for k in kept[1:]] == went_on
    assert not (tmp_path / "a" / "trials" / "vae" / "ends").exists()  # none left after the last rung
    for steps, prev in ((200, 100), (430, 200)):
        for name, record in rungs[steps].items():
            assert record["continued_from"] == name.replace(f"~{steps}__", f"~{prev}__")
            assert record["resumed_step"] == prev and record["steps"] == steps

    class Stop(Exception):
        pass

    def stop_at_the_last_rung(runner):  # a tune stopped once its second rung has ended
        if any(n.endswith("~430") for n in runner.plan.trials):
            raise Stop
        return runner.run()

    with pytest.raises(Stop):
        tune.run_tune(models=["vae"], datasets=["ring8"], seeds=[0, 1], n_trials=4, studies=1, budget="converged",
                      out=tmp_path / "c", device="cpu", threads=1, jobs=1, seed=0, run=stop_at_the_last_rung, halving=2,
                      max_members=1)
    resumed = tune_into(tmp_path / "c")  # its re-run replays the first two rungs: their states stay for the last
    for name, record in rungs[430].items():
        assert resumed[name]["continued_from"] == record["continued_from"]
        assert resumed[name]["losses"] == record["losses"]
    monkeypatch.setattr(fits_mod.FitStore, "continuation", lambda self, unit, model: None)
    fresh = tune_into(tmp_path / "b")
    assert fresh.keys() == continued.keys() and all("continued_from" not in r for r in fresh.values())
    for name, record in continued.items():  # the same fits, to the bit: every fit a stack of its own
        # (max_members 1), as in both tunes (in stacks of other members, the same to float rounding,
        # which hundreds of steps amplify: a smaller batch's draws repeated up to the group's largest
        # sum otherwise than alone)
        assert record["losses"] == fresh[name]["losses"]
        assert record["kept_step"] == fresh[name]["kept_step"]
    for name, record in rungs[200].items():  # the steps before the cap are the previous rung's own
        prev = continued[record["continued_from"]]
        assert record["losses"][:len(prev["losses"])] == prev["losses"]


def test_models_go_on_at_once_each_to_its_next_rung_when_its_own_rung_ends(tmp_path, monkeypatch):
    """Side by side with two groups at once, every model's rungs go on at once, each model in its run
    dir OUT/trials/MODEL: the VAE's first rung is held until the flow's second has begun (with the
    rungs of every model one run, as before, the flow's second rung waited for the VAE's first);
    never more groups train at once than asked; and the trials, scores and picks are those of the
    models tuned one after another."""
    import functools
    import threading

    from genbench import runner
    from genbench.runner import fits as fits_mod

    monkeypatch.setattr(runner, "Plan", functools.partial(runner.Plan, side_by_side=True))
    rungs_begun = {"vae": 0, "flow": 0}
    flow_second = threading.Event()
    training, most = [0], [0]
    lock = threading.Lock()
    fit_group = fits_mod.FitStore.fit_group

    def counted(self, chunk):
        with lock:
            training[0] += 1
            most[0] = max(most[0], training[0])
        try:
            return fit_group(self, chunk)
        finally:
            with lock:
                training[0] -= 1

    monkeypatch.setattr(fits_mod.FitStore, "fit_group", counted)

    def held(r):
        model = next(iter(r.plan.trials.values()))
        rungs_begun[model] += 1
        if model == "flow" and rungs_begun[model] == 2:
            flow_second.set()
        if model == "vae" and rungs_begun[model] == 1:
            assert flow_second.wait(300), "the flow's second rung waited for the VAE's first"
        return r.run()

    def tune_into(out, at_once, run):
        _, results, best, _ = tune.run_tune(models=["vae", "flow"], datasets=["ring8"], seeds=[0], n_trials=4,
                                            studies=1, budget="quick", out=out, device="cpu", threads=1, jobs=1,
                                            seed=0, run=run, groups_at_once=at_once, halving=2)
        return results, best

    together = tune_into(tmp_path / "a", 2, held)
    assert flow_second.is_set() and rungs_begun == {"vae": 3, "flow": 3} and most[0] <= 2
    assert {p.name for p in (tmp_path / "a" / "trials").iterdir()} == {"vae", "flow"}
    assert fits_mod.SLOTS is None  # (the shared slots are the tune's alone)
    apart = tune_into(tmp_path / "b", 1, lambda r: r.run())
    assert together == apart


class _Asker:
    """Threads that ask ``slots`` for a slot one after another (each waiting before the next asks),
    each holding its slot until ``release(tag)``; ``order``: the tags in the order granted."""

    def __init__(self, slots):
        import threading

        self.slots, self.order, self.lock, self.threads, self.go = slots, [], threading.Lock(), [], {}

    def ask(self, steps, chain, tag):
        import threading
        import time

        self.go[tag] = threading.Event()

        def hold():
            with self.slots.slot(steps, chain):
                with self.lock:
                    self.order.append(tag)
                self.go[tag].wait(10)

        waiting = len(self.slots.waiting)
        self.threads.append(threading.Thread(target=hold, daemon=True))
        self.threads[-1].start()
        while len(self.slots.waiting) == waiting and tag not in self.order:
            time.sleep(0.005)
        return self

    def granted(self, n, wait=2.0):
        import time

        end = time.monotonic() + wait
        while len(self.order) < n and time.monotonic() < end:
            time.sleep(0.005)
        time.sleep(0.05)  # (none more than n)
        return list(self.order)

    def release(self, *tags):
        for t in tags or list(self.go):
            self.go[t].set()
        for t in self.threads:
            t.join(0.05 if tags else 5)


def test_shared_slots_go_to_the_longest_group_waiting():
    """``fits.Slots`` of one chain: no more holders than slots, and a freed slot goes to the longest
    group waiting (ties: the first to ask)."""
    from genbench.runner.fits import Slots

    slots = Slots(1)
    a = _Asker(slots).ask(5, None, "first")  # held while the others ask
    for steps, tag in ((10, "a"), (30, "b"), (20, "c"), (30, "d")):
        a.ask(steps, None, tag)
    assert a.granted(2) == ["first"]
    for n, tag in enumerate(["first", "b", "d", "c", "a"][:-1], 2):
        a.release(tag)
        a.granted(n)
    a.release()
    assert a.order == ["first", "b", "d", "c", "a"] and slots.free == 1


def test_shared_slots_go_to_the_chain_that_holds_fewest_and_keep_one_for_a_chain_not_started():
    """``fits.Slots`` of several chains: a freed slot goes to the chain holding the fewest slots,
    however short its groups (the VAE's long groups do not starve a consistency model's short ones);
    a chain that has not asked yet has a slot kept for it, so the first chain to ask does not take
    them all; the kept slot is the others' once that chain asked, left, or the time ran out."""
    import time

    from genbench.runner.fits import Slots

    slots = Slots(3, ["vae", "cm", "flow"])
    a = _Asker(slots).ask(100, "vae", "vae1").ask(100, "vae", "vae2")
    assert a.granted(2) == ["vae1"] and slots.free == 2  # two kept: cm and flow have not asked
    a.ask(1, "cm", "cm1").ask(1, "cm", "cm2")
    assert a.granted(2) == ["vae1", "cm1"]  # cm holds fewest (0 < 1), however short; flow's slot kept
    slots.leave("flow")  # flow ended without a group: its slot to the longest of those holding fewest
    assert a.granted(3) == ["vae1", "cm1", "vae2"]  # (vae 1 = cm 1 held: the longest)
    a.ask(100, "vae", "vae3")
    a.release("cm1")
    assert a.granted(4) == ["vae1", "cm1", "vae2", "cm2"]  # cm holds 0, the VAE 2: cm's short group
    a.release("cm2")
    assert a.granted(5) == ["vae1", "cm1", "vae2", "cm2", "vae3"]  # none waiting but the VAE's
    a.release()
    assert slots.free == 3 and set(slots.held.values()) == {0}

    few = Slots(2, ["a", "b", "c"])  # fewer slots than chains: one is never kept
    c = _Asker(few).ask(1, "a", "a1").ask(1, "a", "a2")
    assert c.granted(2) == ["a1"]
    c.release()

    late = Slots(2, ["a", "b"], keep_s=0.3)  # b never asks: its kept slot is the others' after keep_s
    t0 = time.monotonic()
    b = _Asker(late).ask(1, "a", "a1").ask(1, "a", "a2")
    assert b.granted(1) == ["a1"]
    assert b.granted(2) == ["a1", "a2"] and time.monotonic() - t0 >= 0.3
    b.release()


def test_an_error_in_one_models_rungs_ends_the_tune_with_it_and_stops_the_others(tmp_path, monkeypatch):
    """Models going on at once: a run dir that cannot be written in the flow's first rung ends the
    tune with that error (one line at the CLI) once the VAE's fits have stopped; the stop asked
    of them is cleared afterwards (a later fit in the process trains), and nothing waits forever."""
    import functools

    from genbench import runner
    from genbench.models import train
    from genbench.runner import fits as fits_mod

    monkeypatch.setattr(runner, "Plan", functools.partial(runner.Plan, side_by_side=True))
    fit_group = fits_mod.FitStore.fit_group

    def failing(self, chunk):
        if chunk[0][0].model.startswith("flow"):
            raise api.RunDirError("cannot write the flow's run dir (a full disk)")
        return fit_group(self, chunk)

    monkeypatch.setattr(fits_mod.FitStore, "fit_group", failing)
    with pytest.raises(api.RunDirError, match="full disk"):
        tune.run_tune(models=["vae", "flow"], datasets=["ring8"], seeds=[0], n_trials=4, studies=1, budget="quick",
                      out=tmp_path / "t", device="cpu", threads=1, jobs=1, seed=0, run=lambda r: r.run(),
                      groups_at_once=2, halving=2)
    assert not train.STOP.is_set() and fits_mod.SLOTS is None


@pytest.mark.slow
def test_a_trial_alone_in_its_setting_continues_too(tmp_path, monkeypatch):
    """On one seed, a rung's trial is often the only fit of its setting (a batch size no other trial
    drew): it is still fitted as a group (of one), keeps its state at its cap, and the next rung's
    fit continues it (before, it was fitted alone from step 0 and kept no state); the last rung's
    single trial is a group of one that continues its previous rung's fit."""
    import functools

    from genbench import runner
    from genbench.models.vae import VAE

    monkeypatch.setattr(VAE, "budgets", {**VAE.budgets, "converged": {"train_steps": 430}})
    monkeypatch.setattr(runner, "Plan", functools.partial(runner.Plan, side_by_side=True))
    tune.run_tune(models=["vae"], datasets=["ring8"], seeds=[0], n_trials=4, studies=1, budget="converged",
                  out=tmp_path, device="cpu", threads=1, jobs=1, seed=0, run=lambda r: r.run(), halving=2)
    fits = {f.stem: json.loads(f.read_text()) for f in (tmp_path / "trials" / "vae" / "fits").glob("*.json")}
    later = {n: r for n, r in fits.items() if not n.split("__")[0].endswith("~100")}
    assert len(later) == 3  # two trials at 200 steps, one at 430
    for name, record in later.items():
        steps = int(name.split("__")[0].rsplit("~", 1)[1])
        assert record["continued_from"] == name.replace(f"~{steps}__", f"~{ {200: 100, 430: 200}[steps]}__")
        assert record["resumed_step"] == {200: 100, 430: 200}[steps]


@pytest.mark.slow
def test_a_promoted_trial_whose_fit_converged_keeps_that_fit(tmp_path, monkeypatch):
    """Side by side at the converged budget (the VAE's cap cut to 6,000 steps, halving 2; the stopping
    rule made quick to stop: patience of one evaluation, from step 0, a short anneal): a promoted
    trial whose fit converged before its rung's cap keeps that fit at the next rung (its checkpoint
    and record, ``continued_from`` naming it) instead of training it again, and it stops where the
    tune that trains it again stops it, at the same kept step; a fit whose plateau came at its cap
    itself trains on (a longer cap anneals there)."""
    import functools

    from genbench import runner
    from genbench.models.vae import VAE
    from genbench.runner import fits as fits_mod

    monkeypatch.setattr(VAE, "budgets", {**VAE.budgets, "converged": {"train_steps": 6000}})
    monkeypatch.setattr(runner, "Plan", functools.partial(runner.Plan, side_by_side=True))
    for name, value in (("MIN_STEPS", 0), ("PATIENCE_EVALS", 1), ("PATIENCE_FACTOR", 1.0), ("ANNEAL_FRACTION", 0.1)):
        monkeypatch.setattr(monitor, name, value)

    def tune_into(out):
        tune.run_tune(models=["vae"], datasets=["ring8"], seeds=[0, 1], n_trials=4, studies=1, budget="converged",
                      out=out, device="cpu", threads=1, jobs=1, seed=0, run=lambda r: r.run(), halving=2)
        return {f.stem: json.loads(f.read_text()) for f in (out / "trials" / "vae" / "fits").glob("*.json")}

    kept = tune_into(tmp_path / "a")
    converged = {n for n, r in kept.items() if r["stop_reason"].startswith("converged")}
    before_cap = {n for n in converged if kept[n]["stopped_step"] < kept[n]["eval_cap"]}
    adopted = {n: r for n, r in kept.items() if r.get("continued_from") in before_cap}
    assert adopted, "no promoted trial's fit had converged: the test's stopping rule is not quick enough"
    for name, record in kept.items():  # a plateau found at the cap itself: the longer fit anneals there
        if record.get("continued_from") in converged - before_cap:
            assert record["steps"] > kept[record["continued_from"]]["steps"]
    for name, record in adopted.items():
        prev = kept[record["continued_from"]]
        own = ("continued_from", "checkpoint_sha256", "checksum")  # (the previous fit may have kept its own)
        assert {k: v for k, v in record.items() if k not in own} == {k: v for k, v in prev.items() if k not in own}
        assert (tmp_path / "a" / "trials" / "vae" / "checkpoints" / f"{name}.pt").read_bytes() == \
               (tmp_path / "a" / "trials" / "vae" / "checkpoints" / f"{record['continued_from']}.pt").read_bytes()
    # without adoption the fit is trained again (from step 0, in another stack of members), or, where
    # its group trained on to the cap, continued as a stopped member of the next rung's group: the
    # same stop and kept step. Compared where the fit it continues is the same in both tunes: without
    # adoption a rung's groups stack other members, and a stack of another size rounds otherwise,
    # which this quick stopping rule can turn into another stop of the fits before it (a stack's fits
    # under a longer cap, to the bit: tests/test_snapshots.py)
    monkeypatch.setattr(fits_mod.FitStore, "adopt", lambda self, unit, model: None)
    again = tune_into(tmp_path / "b")
    assert again.keys() == kept.keys()
    stop = lambda r: (r["stop_reason"], r["kept_step"])  # noqa: E731
    comparable = {n: r for n, r in adopted.items() if stop(again[r["continued_from"]]) == stop(kept[r["continued_from"]])}
    assert comparable, "no adopted fit continues a fit that is the same in both tunes"
    for name, record in comparable.items():
        assert stop(again[name]) == stop(record)


@pytest.mark.slow
def test_a_tune_is_assembled_model_by_model_from_its_rows_alone(tmp_path, monkeypatch):
    """A tune made over several invocations: one model's trials in the first, its directory kept
    without a checkpoint, a kept state or a snapshot (what a GPU machine's output can carry to the
    next one), then the tune with more models fits only the new models' trials, and the tuned
    configs are those of the same tune made at once."""
    import shutil

    from genbench.runner import fits as fits_mod

    def tune_into(out, models):
        _, results, best, _ = tune.run_tune(models=models, datasets=["ring8"], seeds=[0], n_trials=3, studies=1,
                                            budget="quick", out=out, device="cpu", threads=1, jobs=1, seed=0,
                                            run=lambda r: r.run(), halving=2)
        return results, best

    whole = tune_into(tmp_path / "whole", ["vae", "gan"])
    tune_into(tmp_path / "split", ["vae"])
    for p in list((tmp_path / "split").rglob("*")):
        if p.is_dir() and p.name in ("ends", "partial", "checkpoints"):
            shutil.rmtree(p)
    assert not list((tmp_path / "split").rglob("*.pt"))
    fitted = []
    save = fits_mod.FitStore.save
    monkeypatch.setattr(fits_mod.FitStore, "save", lambda self, unit, *a: fitted.append(unit.model) or save(self, unit, *a))
    split = tune_into(tmp_path / "split", ["vae", "gan"])
    assert fitted and all(m.startswith("gan~") for m in fitted)
    assert split == whole
