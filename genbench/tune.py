"""Equal-budget tuning (``genbench tune``): every model gets the same number of trials from the
search space it declares (``Generator.search_space``), drawn quasirandomly (scrambled Sobol points,
``scipy.stats.qmc``), its defaults always trial 0 of each study; a model's trials are the
models of one ``genbench run`` per rung over the tuning datasets and seeds, in its run dir
``OUT/trials/MODEL`` (a killed tune re-run finishes only what is missing: finished cells are skipped by
the runner), where trials that differ only in their model's member fields
(``TorchGenerator.member_fields``: its learning rate, diffusion's noise-level centre, a batch size
whose draws are repeated up to the group's) are fitted as
one stacked network on a GPU, every model's rungs going on at once (no model waits for another's
rung to end), and a distilled model's teacher is trained once for all its trials; each trial is scored on the
**validation sample only** (the energy
distance to it and the fraction of samples off the support, each in units of the data's noise
floor, as the converged budget's stopping rule scores them: ``SELECTION_COLUMNS``), never on the
reference sample the tables use; the best trial per (model, dataset) and study is written to
``OUT/tuned.json``, which ``genbench run --tuned`` reads. With successive halving at the converged
budget, the rungs before the last sample no cell: a trial goes on by its fit's score at its kept
evaluation during training (the same score on the same validation sample; its evaluations there
from a quarter of the rung's steps on, ``PROMOTION_EVALUATIONS_FROM``), and its fits continue from
their states at the previous rung's cap where their model's path does not depend on it
(``Plan.continues``: side by side, ``Generator.continues_to_longer_caps``); the last rung's cells,
fresh samples of the kept weights, select.

The study store is the run dirs themselves (their rows are the trials' records) and ``tune.json``,
rewritten whole at the end: nothing else to keep consistent, and a trial's rows are as durable as
any run's (appended whole, checksummed artefacts).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .api import UsageError, check_space
from .store import atomic_write, cell_name, dumps, json_checksum

#: points each trial samples per cell and scores (the validation sample's size)
N_SAMPLES = 2000
#: the metrics a trial's cells are scored with: the validation sample's energy distance and the
#: on-support fraction (no reference-sample metric is needed, nor computed)
METRICS = ("validation", "support")
#: the row columns selection reads (a test checks that nothing else moves it)
SELECTION_COLUMNS = ("val_energy", "hq_frac")
#: ... and the one a rung before the last promotes by at the converged budget: the fit's validation
#: score at its kept evaluation (the same score, on the same validation sample, during training)
PROMOTION_COLUMNS = ("kept_score",)
#: ... from the evaluations at this fraction of the rung's steps or later: on the canonical tune's first
#: two rungs the same kept score in 1,773 of 1,792 fits and the same promotions in 620 of 621, from 46%
#: of the evaluations (benchmarks/evaluate_from.py on baselines/cuda-h200-tune-curves)
PROMOTION_EVALUATIONS_FROM = 0.25
TUNED_KIND = "genbench tuned configs"


@dataclass(frozen=True)
class Trial:
    model: str
    study: int
    index: int  # 0: the model's defaults
    params: dict  # field -> value as a string (``--param`` form)

    @property
    def key(self) -> str:
        """The trial's settings hash: its run dir's name (a setting drawn twice runs once)."""
        return hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]


def _text(v) -> str:
    return repr(v) if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def draws(space: dict, n: int, seed: int) -> list[dict]:
    """``n`` points of the space: the first n of a scrambled Sobol sequence (scipy.stats.qmc, seeded),
    each coordinate mapped through its field's range; the same seed gives the same points, and a
    larger n extends the same sequence."""
    if n <= 0:
        return []
    from scipy.stats import qmc

    sobol = qmc.Sobol(d=len(space), scramble=True, seed=seed)
    with warnings.catch_warnings():  # a power of two keeps Sobol's balance; the first n are taken
        warnings.simplefilter("ignore")
        u = sobol.random_base2(max(1, math.ceil(math.log2(n))))[:n]
    return [{name: s.value(float(x)) for (name, s), x in zip(space.items(), row)} for row in u]


def trials(cls, n: int, studies: int, seed: int, budget: str = "default") -> list[Trial]:
    """Each study's ``n`` trials of model class ``cls``: its defaults at ``budget`` first (the config
    ``run --budget`` would train), then n - 1 draws of its space (study s scrambles with ``seed + s``)."""
    check_space(cls)
    defaults = cls(budget=budget).config
    out = []
    for s in range(studies):
        first = {k: _text(getattr(defaults, k)) for k in cls.search_space}
        points = [first] + [{k: _text(v) for k, v in p.items()} for p in draws(cls.search_space, n - 1, seed + s)]
        out += [Trial(cls.name, s, i, p) for i, p in enumerate(points)]
    return out


def validation_scores(rows: list[dict], floors: dict) -> dict[tuple[str, int], float]:
    """Per (dataset, seed), the trial's validation score from its rows: the energy distance to the
    validation sample and the off-support fraction, each as its excess over the data's floor in
    units of the floor's spread (``floors``: (dataset, seed) -> runner.monitor.validation_floor),
    summed; infinite for a cell that did not finish. Reads only SELECTION_COLUMNS."""
    from .scoring import validation_score

    out: dict[tuple[str, int], float] = {}
    for row in rows:  # one row per cell: a trial samples each model at its default step count
        key = (row["dataset"], int(row["seed"]))
        e, hq = row.get("val_energy"), row.get("hq_frac")
        ok = row.get("status") == "done" and e is not None and hq is not None and math.isfinite(e) and math.isfinite(hq)
        out[key] = validation_score(e, 1.0 - hq, floors[key]) if ok else math.inf
    return out


def validation_floors(keys) -> dict:
    """{(dataset, seed): its validation metrics' floor} for ``keys`` (dataset, seed) pairs: the
    ``floors`` ``validation_scores`` reads (runner.monitor.validation_floor on the seed's validation
    sample, as the stopping rule computes it)."""
    from . import datasets as ds_mod
    from .runner.monitor import validation_floor
    from .scoring import validation_sample

    floors = {}
    for d, s in set(keys):
        ds = ds_mod.get(d)
        floors[(d, s)] = validation_floor(ds, s, validation_sample(ds, s))
    return floors


def kept_scores(rows: list[dict]) -> dict[tuple[str, int], float]:
    """Per (dataset, seed), the trial's validation score at its fit's kept evaluation (the converged
    budget's stopping rule scores each evaluation as ``validation_scores`` scores a cell); infinite
    for a fit that did not finish. Reads only PROMOTION_COLUMNS."""
    out: dict[tuple[str, int], float] = {}
    for row in rows:
        s = row.get("kept_score")
        ok = row.get("status") == "done" and isinstance(s, (int, float)) and math.isfinite(s)
        out[(row["dataset"], int(row["seed"]))] = float(s) if ok else math.inf
    return out


def select(results: list[dict]) -> dict:
    """The best trial per (model, dataset, study): among the trials that reached the highest rung
    on that dataset (``rungs``: successive halving's; one rung without it), the lowest mean
    validation score over the seeds there (a missing or failed cell scores infinity; ties go to
    the earlier trial, the defaults first)."""
    best: dict = {}
    for r in results:
        rungs = r.get("rungs") or [{"steps": None, "scores": r["scores"]}]
        for dataset, score in r["scores"].items():  # the score at the furthest rung reached there
            rung = max(i for i, g in enumerate(rungs) if dataset in g["scores"])
            k = (r["model"], dataset, r["study"])
            if k not in best or (-rung, score) < (-best[k]["rung"], best[k]["score"]):
                best[k] = {"params": r["params"], "score": score, "trial": r["index"], "study": r["study"],
                           "rung": rung, "steps": rungs[rung]["steps"]}
    return best


def halving_rungs(n: int, eta: int, cap: int, grain: int = 1) -> list[tuple[int, int | None]]:
    """Successive halving's rungs for ``n`` trials: (trials, training steps) per rung, each rung the
    best 1/eta of the one before on eta times its steps, the last at the ``cap`` (the budget's
    steps): for 32 trials and eta 3, 32 at cap/27, 11 at cap/9, 4 at cap/3, 2 at the cap. The rungs
    before the last end on a multiple of ``grain`` (``Generator.cap_grain``: there a longer fit
    continues as the fit from step 0 would), rounded down, at least ``grain``. eta 0 (no halving):
    every trial at the budget's own steps (None)."""
    if not eta:
        return [(n, None)]
    if eta < 2:
        raise UsageError(f"--halving {eta}: must be 0 (off) or at least 2")
    top = 0
    while eta ** (top + 1) <= n:
        top += 1
    return [(math.ceil(n / eta ** r), cap if r == top else max(grain, cap // eta ** (top - r) // grain * grain))
            for r in range(top + 1)]


def _chains_at_once(chain, entries, groups_at_once: int) -> None:
    """``chain(e)`` of every model at once, each in a thread of its own, their side-by-side groups
    sharing ``groups_at_once`` training slots (``runner.fits.Slots``: a freed slot to the chain
    that holds fewest, then to its longest group):
    each model goes to its next rung as soon as its own rung has ended. The first error a chain
    raises stops the others
    (``train.request_stop``: each fit in training saves a snapshot at its next logged window and
    ends) and is raised here once they have ended; an interrupt here is raised at once (the threads
    are daemons, as the groups' are)."""
    import threading

    from .models import train
    from .runner import fits

    errors: list[BaseException] = []

    def one(e) -> None:
        try:
            with fits.as_chain(e.name):
                chain(e)
        except BaseException as ex:  # noqa: BLE001 - raised in the calling thread below
            errors.append(ex)
            train.request_stop()
        finally:
            slots.leave(e.name)

    threads = [threading.Thread(target=one, args=(e,), daemon=True, name=f"genbench-tune-{e.name}") for e in entries]
    fits.SLOTS = slots = fits.Slots(groups_at_once, [e.name for e in entries])
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    finally:
        fits.SLOTS = None
        if errors:
            train.STOP.clear()  # (asked for by the chain that failed: a later fit in this process trains)
    if errors:
        raise errors[0]


def load_tuned(path: Path) -> dict:
    """A tuned file, checked (data only: JSON, its kind, its checksum). UsageError, one line, if not."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--tuned {path}: not a readable tuned file ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("kind") != TUNED_KIND or not isinstance(data.get("configs"), dict):
        raise UsageError(f"--tuned {path}: not a tuned file written by 'genbench tune'")
    body = {k: v for k, v in data.items() if k != "checksum"}
    if data.get("checksum") != json_checksum(body):
        raise UsageError(f"--tuned {path}: its checksum does not match (edited or torn); tune again")
    return data


def tuned_plan_fields(path: Path, models: list[str], datasets: list[str], seeds: list[int], budget: str) -> dict:
    """``Plan`` fields for ``run --tuned``: each (model, dataset) of the run its tuned config (study
    0's best), after checking the file against the run: the same budget, every model and dataset
    tuned, and no seed of the run among the tuning seeds (the tables re-run on fresh seeds)."""
    data = load_tuned(path)
    s = data["settings"]
    if s.get("budget") != budget:
        raise UsageError(f"--tuned {path}: tuned at budget {s.get('budget')!r}, this run is at {budget!r}; "
                         "run at the tuned budget, or tune at this one")
    overlap = sorted(set(seeds) & set(s.get("seeds", [])))
    if overlap:
        raise UsageError(f"--tuned {path}: seed(s) {', '.join(map(str, overlap))} tuned the configs; "
                         f"the tables re-run on fresh seeds (the tuning seeds were {s.get('seeds')})")
    tuned: dict = {}
    for m in models:
        for d in datasets:
            entry = data["configs"].get(m, {}).get(d)
            if entry is None:
                raise UsageError(f"--tuned {path}: no tuned config for {m} on {d} (it has: "
                                 f"{', '.join(f'{mm} on {dd}' for mm, v in data['configs'].items() for dd in v)})")
            tuned.setdefault(m, {})[d] = {k: str(v) for k, v in entry["params"].items()}
    return {"tuned": tuned, "tuned_source": f"{Path(path).name} {data['checksum'][:12]}"}


def write_results(out: Path, settings: dict, results: list[dict], best: dict) -> Path:
    """``tune.json`` (every trial and its scores) and ``tuned.json`` (study 0's best per model and
    dataset, with the settings it was tuned at), each written atomically; returns the tuned file."""
    atomic_write(out / "tune.json", dumps({"settings": settings, "trials": results}, indent=1).encode(), root=out)
    configs: dict = {}
    for (model, dataset, study), b in sorted(best.items()):
        if study == 0:
            configs.setdefault(model, {})[dataset] = b
    body = {"kind": TUNED_KIND, "genbench_version": __version__, "settings": settings, "configs": configs}
    path = out / "tuned.json"
    atomic_write(path, dumps(body | {"checksum": json_checksum(body)}, indent=1).encode(), root=out)
    return path


def space_table(entries) -> list[tuple[str, str, str, str]]:
    """(model, field, range, default) for every declared search space (``genbench list``, ``tune --help``)."""
    rows = []
    for e in entries:
        defaults = e.cls.Config()
        for name, space in getattr(e.cls, "search_space", {}).items():
            rows.append((e.name, name, str(space), _text(getattr(defaults, name))))
    return rows


def trial_name(model: str, key: str, steps: int | None = None) -> str:
    """A trial's name in its model's run dir (its rows' model, its files' prefix); at a rung of
    successive halving, with the rung's steps."""
    return f"{model}~{key}" + (f"~{steps}" if steps is not None else "")


def run_tune(*, models: list[str], datasets: list[str], seeds: list[int], n_trials: int, studies: int, budget: str,
             out: Path, device: str, threads: int, jobs: int, seed: int, run,
             groups_at_once: int = 1, halving: int = 0, max_members: int | None = None) -> tuple[Path, list[dict], dict, list]:
    """The tune: per model and rung, one run of the model's trials (each a model of its own there,
    named ``trial_name``, its config under ``params``; a student's teacher at its defaults beside
    them) in the model's run dir ``OUT/trials/MODEL``, each rung extending it. Fitting side by side,
    the trials that differ only in their model's member fields (its learning rate, ...) are one
    stacked fit; with ``groups_at_once`` above 1 every model's rungs go on at once, each model to
    its next rung as soon as its own has ended, their stacked fits sharing ``groups_at_once``
    slots (``_chains_at_once``); else the models one after another. Without ``halving`` there is one rung: every trial at the budget. With
    ``halving`` eta, successive halving (``halving_rungs``): per model, dataset and study, the best
    1/eta of a rung's trials on their validation score go on to the next, at eta times the steps;
    the fits' paths do not depend on their cap at the converged budget, so a rung's fit is the
    start of the next rung's. Every model's first rung is checked before anything trains (UsageError,
    one line). ``run(runner)`` runs one ``runner.Run`` and returns its rows (from several threads at
    once where the models go on at once). Writes tune.json and
    tuned.json into ``out``. Returns (the tuned file, the trials' results, the best per (model,
    dataset, study), notes for the user)."""
    from .registry import resolve
    from .runner import Plan, Run
    from .runner.plan import check

    if n_trials < 1 or studies < 1:
        raise UsageError(f"--trials {n_trials} --studies {studies}: both must be >= 1")
    entries = resolve(models)
    for e in entries:
        if not getattr(e.cls, "search_space", None):
            raise UsageError(f"model {e.name} declares no search space (Generator.search_space); it cannot be tuned")
    drawn = {e.name: trials(e.cls, n_trials, studies, seed, budget) for e in entries}  # each space checked
    rungs = {e.name: halving_rungs(n_trials, halving, m.config.train_steps,  # (where a rung's fits are continued)
                                   m.cap_grain() if m.continues_to_longer_caps() else 1)
             for e in entries for m in [e.cls(budget=budget)]}

    def plan_for(e, want: dict, cells: bool = True, continues: dict | None = None) -> "Plan":
        """Model ``e``'s plan of one rung, into its run dir OUT/trials/MODEL: ``want`` maps a trial's name
        to (its model, its params, the datasets it trains on), beside the model's teacher at its
        defaults (fitted once for all its trials); ``cells`` False: its fits' rows alone
        (``Plan.cells``), each fit's state at its cap kept for the next rung; ``continues``: a
        trial's name -> its name at the previous rung, whose fits it continues (``Plan.continues``)."""
        names = list(want)
        only = {n: tuple(d for d in datasets if d in ds) for n, (_, _, ds) in want.items() if set(ds) != set(datasets)}
        return Plan(models=([e.cls.teacher] if e.cls.teacher else []) + names, datasets=datasets, seeds=seeds,
                        budget=budget, n_samples=N_SAMPLES, metrics=METRICS, floor_draws=2,
                        params={n: p for n, (_, p, _) in want.items()},
                        trials={n: m for n, (m, _, _) in want.items()}, trial_datasets=only, device=device,
                        threads=threads, jobs=jobs, groups_at_once=groups_at_once, timed=False, cells=cells,
                        evaluate_from=0.0 if cells else PROMOTION_EVALUATIONS_FROM, keep_ends=not cells,
                        continues=continues or {}, **({"score_jobs": score_jobs} if score_jobs is not None else {}),
                        **({"max_members": max_members} if max_members is not None else {}),
                        out=str(out / "trials" / e.name))

    def rung_trials(e, r: int) -> dict:
        """Model ``e``'s trials at rung r: name -> (model, params, datasets), from its alive (study,
        dataset) -> indices."""
        want: dict = {}
        steps = rungs[e.name][r][1]
        for (study, d), idxs in alive[e.name].items():
            for i in idxs:
                t = drawn[e.name][study * n_trials + i]
                params = t.params if steps is None else t.params | {"train_steps": str(steps)}
                want.setdefault(trial_name(e.name, t.key, steps), (e.name, params, set()))[2].add(d)
        return want

    alive = {e.name: {(st, d): list(range(n_trials)) for st in range(studies) for d in datasets} for e in entries}
    score_jobs = None
    one = check(plan_for(entries[0], rung_trials(entries[0], 0)))
    # on a GPU every model's rungs go on at once, each model to its next rung as soon as its own
    # rung has ended (no model waits for another's), their groups sharing the run's groups_at_once
    at_once = one.side_by_side and groups_at_once > 1 and len(entries) > 1
    if at_once and one.plan.score_jobs:  # the scoring processes shared out among the models' runs
        score_jobs = max(1, one.plan.score_jobs // len(entries))
    first = {e.name: Run(plan_for(e, rung_trials(e, 0))) for e in entries}  # every first rung refused before anything trains
    last = len(rungs[entries[0].name]) - 1  # as many rungs for every model (halving_rungs)
    # at the converged budget the rungs before the last promote by each fit's kept validation score
    # (its evaluations during training): no cell is sampled there; the last rung's cells select
    by_kept = bool(last) and one.converged and all(e.cls.monitored for e in entries)
    floors = validation_floors((d, s) for d in datasets for s in seeds)
    # (model, study, index) -> per rung: {"steps": s, "scores": {dataset: mean validation score}}
    reached: dict = {}
    counts: dict = {}  # model -> [trials already done, trials, fits]

    def chain(e) -> None:
        """Model ``e``'s rungs, one after another: each rung's run, then its promotions."""
        runner, tally = first[e.name], counts.setdefault(e.name, [0, 0, 0])
        for r in range(last + 1):
            if r or by_kept:
                want = rung_trials(e, r)
                # a promoted trial's fits continue from their previous rung's (at the converged budget
                # their path does not depend on the cap): the rung trains only the steps it adds
                before = {trial_name(e.name, t.key, rungs[e.name][r][1]): trial_name(e.name, t.key, rungs[e.name][r - 1][1])
                          for t in drawn[e.name]} if by_kept and r else {}
                runner = Run(plan_for(e, want, cells=not (by_kept and r < last),
                                      continues={n: before[n] for n in want if n in before}))
            done = runner.ledger.done_cells()
            units = runner.r.units()
            names = [n for n in runner.plan.models if n in runner.plan.trials]
            finished = {n for n in names if all(c in done for c in runner.r.cells([u for u in units if u.model == n]))}
            rows = run(runner)
            tally[0] += len(finished)
            tally[1] += len(names)
            tally[2] += sum(1 for u in units if u.model in runner.plan.trials)
            score_of = (lambda rs: validation_scores(rs, floors)) if runner.plan.cells else kept_scores
            cell_scores = {n: score_of([row for row in rows if row["model"] == n]) for n in names}
            steps = rungs[e.name][r][1]
            for (study, d), idxs in alive[e.name].items():
                for i in idxs:
                    t = drawn[e.name][study * n_trials + i]
                    cells = cell_scores[trial_name(e.name, t.key, steps)]
                    score = float(sum(cells.get((d, s), math.inf) for s in seeds) / len(seeds))
                    rung = reached.setdefault((e.name, study, i), [])  # alive here: in every rung before
                    if len(rung) == r:
                        rung.append({"steps": steps, "scores": {}})
                    rung[r]["scores"][d] = score
            if r < last:  # the best of each (study, dataset) go on; ties: the earlier trial
                keep = rungs[e.name][r + 1][0]
                alive[e.name] = {k: sorted(idxs, key=lambda i, k=k: (reached[(e.name, k[0], i)][r]["scores"][k[1]], i))[:keep]
                                 for k, idxs in alive[e.name].items()}
            # the kept states (ends/) the next rung continues from stay; this rung's other trials' and
            # the previous rung's (all of them after the last rung) are removed: ~2 MB a fit. Only
            # those two rungs': a tune resumed replays its finished rungs, and the states that a
            # later rung, begun before the stop, continues from must outlive that replay
            going_on = {cell_name(trial_name(e.name, drawn[e.name][st * n_trials + i].key, steps), d, s)
                        for (st, d), idxs in alive[e.name].items() for i in idxs for s in seeds} if r < last else set()
            runner.store.drop_ends({cell_name(trial_name(e.name, t.key, rungs[e.name][x][1]), d, s)
                                    for x in {r, max(r - 1, 0)} for t in drawn[e.name]
                                    for d in datasets for s in seeds} - going_on)

    if at_once:
        _chains_at_once(chain, entries, groups_at_once)
    else:
        for e in entries:
            chain(e)
    results = []
    for e in entries:
        for t in drawn[e.name]:
            rung = reached[(e.name, t.study, t.index)]
            # each dataset's score at the furthest rung the trial reached there (what selection reads)
            furthest = {d: g["scores"][d] for g in rung for d in g["scores"]}
            results.append({"model": e.name, "study": t.study, "index": t.index, "key": t.key, "params": t.params,
                            "scores": furthest, **({"rungs": rung} if halving else {})})
    best = select(results)
    settings = {"budget": one.plan.budget, "n_samples": N_SAMPLES, "metrics": list(METRICS),
                "trials": n_trials, "studies": studies, "seeds": list(seeds), "datasets": list(datasets),
                "seed": seed, "halving": halving, "rungs": {m: [list(x) for x in v] for m, v in rungs.items()},
                "promoted_by": (f"kept evaluation (from {PROMOTION_EVALUATIONS_FROM:g} of each rung's steps)"
                                if by_kept else "cells"),
                "spaces": {e.name: {f: str(s) for f, s in e.cls.search_space.items()} for e in entries}}
    reused, total, fits = (sum(c[i] for c in counts.values()) for i in range(3))
    notes = [f"{reused} of {total} trials were already done (their cells in {out / 'trials'} reused)",
             f"{fits} fits in all" + (f" over {max(len(v) for v in rungs.values())} rungs of successive halving"
                                      if halving else "")]
    return write_results(out, settings, results, best), results, best, notes
