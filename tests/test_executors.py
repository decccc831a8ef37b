"""The cluster executors: Ray (a local instance of 2 CPUs) and SLURM through submitit's local
executor, against the local process pool on the same plan."""
import json
import os
import sys

import pytest

from genbench.runner import executors

# a small plan with real training (the VAE, briefly) and an instant plugin, two seeds: four chains
PLAN = ["--models", "gauss,vae", "--seeds", "0,1", "--budget", "quick", "--param", "vae.train_steps=60",
        "--n-samples", "300", "--floor-draws", "2", "--threads", "1", "--device", "cpu"]
#: what differs between two runs of the same plan besides the figures: identity, provenance, timing
NOT_COMPARED = {"run_id", "executor", "jobs", "score_jobs", "host", "train_s", "teacher_train_s", "sample_s",
                "sample_s_min", "sample_s_iqr", "sample_calls", "sample_calls_per_block", "git_sha", "fit_sha256"}


def rows_of(path) -> dict:
    out = {}
    for line in (path / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["model"], r["dataset"], r["seed"], r["steps"])] = r
    return out


def assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        mine = {k: v for k, v in a[key].items() if k not in NOT_COMPARED}
        theirs = {k: v for k, v in b[key].items() if k not in NOT_COMPARED}
        assert mine == theirs, key


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, plugin_path):
    """The plan through the local pool (two processes), run once for the module."""
    import subprocess

    out = tmp_path_factory.mktemp("local") / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "genbench.cli", "run", *PLAN, "--jobs", "2", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return rows_of(out)


@pytest.fixture(scope="module")
def ray_cluster(plugin_path):
    """A local Ray instance of 2 CPUs for the module; its workers find the test plugin on PYTHONPATH."""
    ray = pytest.importorskip("ray")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugin_path), old or ""])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def test_ray_rows_equal_the_local_pool(ray_cluster, local_rows, cli, tmp_path):
    r = cli("run", *PLAN, "--executor", "ray", "--out", tmp_path / "ray")
    assert r.returncode == 0, r.stderr
    rows = rows_of(tmp_path / "ray")
    assert_same_rows(rows, local_rows)
    assert {row["executor"] for row in rows.values()} == {"ray"}
    assert all(row["host"] for row in rows.values())
    # the driver alone wrote the run dir: every artefact is there, and no task's scratch dir
    run = tmp_path / "ray"
    assert sorted(p.name for p in (run / "fits").glob("*.json")) == sorted(
        f"{m}__ring8__s{s}.json" for m in ("gauss", "vae") for s in (0, 1))
    assert len(list((run / "samples").glob("*.npz"))) == 4
    again = cli("run", *PLAN, "--executor", "ray", "--out", run)
    assert again.returncode == 0 and "4 of 4 cells were already done" in again.stderr


def test_a_killed_ray_worker_is_retried_or_becomes_an_error_row(ray_cluster, cli, tmp_path):
    marker = tmp_path / "die"
    plan = [*PLAN, "--param", "gauss.mode=die", "--param", f"gauss.marker={marker}", "--out", tmp_path / "run"]
    marker.touch()  # the first attempt of one gauss fit kills its worker; Ray runs the task again
    r = cli("run", *plan, "--executor", "ray")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert {row["status"] for row in rows_of(tmp_path / "run").values()} == {"done"}

    out = tmp_path / "run0"
    plan[-1] = out
    marker.touch()  # no retries: that fit's cell becomes an error row, the others finish
    r = cli("run", *plan, "--executor", "ray", "--retries", "0")
    assert r.returncode == 3, r.stderr
    rows = rows_of(out)
    failed = [k for k, row in rows.items() if row["status"] != "done"]
    assert len(failed) == 1 and failed[0][0] == "gauss", rows
    assert "died 1 time" in rows[failed[0]]["error"]
    done_before = {k: row["samples_sha256"] for k, row in rows.items() if row["status"] == "done"}
    lines_before = (out / "rows.jsonl").read_text().count("\n")
    r = cli("run", *plan, "--executor", "ray")  # resumes: only the failed cell runs again
    assert r.returncode == 0, r.stderr
    assert (out / "rows.jsonl").read_text().count("\n") == lines_before + 1
    after = rows_of(out)
    assert all(after[k]["samples_sha256"] == sha for k, sha in done_before.items())
    assert {row["status"] for row in after.values()} == {"done"}


def test_slurm_through_submitit_local_gives_the_same_rows(local_rows, cli, tmp_path, plugin_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    r = cli("run", *PLAN, "--executor", "slurm", "--slurm", "cluster=local", "--slurm", "time=10",
            "--out", tmp_path / "slurm")
    assert r.returncode == 0, r.stderr
    rows = rows_of(tmp_path / "slurm")
    assert_same_rows(rows, local_rows)
    assert {row["executor"] for row in rows.values()} == {"slurm"}
    # every task's scratch dir was collected and removed; the jobs' logs stay
    assert sorted(p.name for p in (tmp_path / "slurm" / "slurm").iterdir()) == ["logs"]


def test_a_rerun_slurm_driver_collects_tasks_that_finished_without_it(cli, tmp_path, plugin_path, monkeypatch):
    """A driver that went away after submitting: its jobs finished meanwhile; the next driver
    collects their scratch dirs instead of submitting them again."""
    pytest.importorskip("submitit")
    import functools

    from genbench.runner import Plan, Run, core

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(plugin_path))
    plan = dict(models=["gauss"], seeds=[0, 1], n_samples=300, floor_draws=2, executor="slurm",
                slurm={"cluster": "local"}, out=str(tmp_path / "run"))
    run = Run(Plan(**plan))
    ex = run.r.executor
    run.store.lock()
    run.ledger.open()
    ex.folder = run.store.path / "slurm"
    submitter = ex.submitter(run.r.device)
    fn = functools.partial(core.run_task, run.plan, run.r.device, 0)
    jobs = [ex.submit(submitter, fn, executors.Task(units, core.task_id(run.plan, units), run.ledger.task_inputs(units)))
            for units in run.r.tasks(set())]
    for job in jobs:
        job.wait()
    run.store.unlock()  # the driver is gone; nothing was collected
    assert not (tmp_path / "run" / "rows.jsonl").exists()
    logs = set((tmp_path / "run" / "slurm" / "logs").iterdir())

    r = cli("run", "--models", "gauss", "--seeds", "0,1", "--n-samples", "300", "--floor-draws", "2",
            "--executor", "slurm", "--slurm", "cluster=local", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert set((tmp_path / "run" / "slurm" / "logs").iterdir()) == logs  # no job submitted again
    assert {row["status"] for row in rows_of(tmp_path / "run").values()} == {"done"}
    assert len(rows_of(tmp_path / "run")) == 2


@pytest.mark.parametrize("args, message", [
    (["--executor", "dask"], "--executor 'dask'; valid: local, ray, slurm"),
    (["--address", "auto"], "--address auto: only --executor ray joins a cluster"),
    (["--slurm", "partition=gpu"], "--slurm: only --executor slurm submits jobs"),
    (["--executor", "slurm", "--slurm", "nodes=2"], "--slurm nodes=2: unknown key; valid: partition"),
    (["--executor", "slurm", "--slurm", "time=soon"], "--slurm time=soon: expected a positive integer (minutes)"),
    (["--executor", "slurm", "--slurm", "cluster=k8s"], "--slurm cluster=k8s; valid: slurm, local, debug"),
    (["--executor", "slurm", "--slurm", "partition"], "--slurm 'partition': expected KEY=VALUE"),
    (["--executor", "slurm"], "--executor slurm: no SLURM here ('srun' is not on PATH)"),
    (["--executor", "ray", "--task-gpus", "2"], "--task-gpus 2.0: give the share of one GPU a task uses"),
    (["--executor", "ray", "--retries", "-1"], "--retries -1: must be >= 0"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing accepts connections there"),
    (["--executor", "ray", "--address", "headnode"], "--address headnode: expected auto, HOST:PORT or ray://HOST:PORT"),
])
def test_bad_executor_options_are_one_line_exit_2(cli, tmp_path, monkeypatch, args, message):
    executor = args[args.index("--executor") + 1] if "--executor" in args else None
    if executor in ("ray", "slurm"):  # its options are checked once its extra is installed (else: the extra is named)
        pytest.importorskip({"ray": "ray", "slurm": "submitit"}[executor])
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)  # no SLURM on this machine, wherever it runs
    r = cli("run", "--models", "gauss", "--out", tmp_path / "run", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, extra", [("ray", "genbench[ray]"), ("submitit", "genbench[slurm]")])
def test_a_missing_cluster_package_names_its_extra(cli, tmp_path, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    r = cli("run", "--models", "gauss", "--executor", "slurm" if module == "submitit" else "ray",
            "--out", tmp_path / "run")
    assert r.returncode == 2 and f"pip install '{extra}'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_task_cannot_write_outside_the_run_dirs_artefacts(tmp_path):
    from genbench.store import RunDir

    rd = RunDir(tmp_path)
    for bad in ["../rows.jsonl", "rows.jsonl", "manifest.json", "samples/../../x.npz", "fits/.hidden.json",
                "checkpoints/a.json", "/etc/passwd", "samples/a/b.npz", 3]:
        with pytest.raises(ValueError):
            rd.artefact_path(bad)
    assert rd.artefact_path("samples/vae__ring8__s0.npz") == tmp_path / "samples/vae__ring8__s0.npz"


@pytest.mark.slow
def test_ctrl_c_on_the_ray_driver_cancels_and_keeps_what_finished(cli_process, tmp_path, plugin_path):
    """The driver (with a local Ray instance of its own) is interrupted while one task still fits:
    it exits 130 with one line, and the rows of the tasks that finished stay."""
    import signal
    import subprocess
    import time

    pytest.importorskip("ray")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    args = ["run", "--models", "gauss,vae", "--budget", "quick", "--param", "vae.train_steps=200000",
            "--n-samples", "300", "--floor-draws", "2", "--device", "cpu", "--executor", "ray", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "genbench.cli", *args], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((out / "rows.jsonl").exists() and (out / "rows.jsonl").read_text()):
            assert p.poll() is None, p.communicate()
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted; finished cells are kept" in err
    rows = rows_of(out)
    assert list(rows) == [("gauss", "ring8", 0, None)] and rows[("gauss", "ring8", 0, None)]["status"] == "done"


def test_tasks_cover_the_plan_once_grouped_for_side_by_side_fits(tmp_path):
    import dataclasses

    from genbench.runner import Plan, check

    plan = Plan(models=["cm-cd", "diffusion", "vae"], datasets=["ring8", "moons"], seeds=[0, 1, 2],
                steps_by_model={"diffusion": [1, 5], "cm-cd": [1]}, device="cpu", side_by_side=True,
                out=str(tmp_path / "run"))
    runner = check(plan)
    every = set(runner.cells(runner.units()))
    for spread in (1, 2, 4):
        tasks = runner.tasks(set(), spread)
        cells = [k for t in tasks for k in runner.cells(t)]
        assert sorted(cells, key=str) == sorted(every, key=str)  # each cell in exactly one task
        for t in tasks:
            models = [m for m, _, _ in t]
            assert len({m for m in models}) <= 2 and len(t) <= 2 * -(-6 // spread)
            if "cm-cd" in models:  # a student's chain travels with its teacher's, teachers first
                assert models == sorted(models, key=lambda m: m != "diffusion")
                assert {(d, s) for m, d, s in t if m == "cm-cd"} == {(d, s) for m, d, s in t if m == "diffusion"}
        sizes = [len(set(runner.cells(t))) for t in tasks]
        assert sizes == sorted(sizes, reverse=True)  # the largest first
    assert len(runner.tasks(set(), 2)) == 4
    done = set(runner.cells([("vae", "ring8", 0)]))
    assert all(("vae", "ring8", 0) not in t for t in runner.tasks(done, 4))  # finished chains are not sent
    assert len(check(dataclasses.replace(plan, side_by_side=False)).tasks(set())) == 12  # one chain each


def test_side_by_side_each_models_groups_fit_right_before_its_cells(tmp_path, monkeypatch):
    """Fitting side by side, a model's cells are sampled (and sent to the scoring processes) before
    the next model trains; one by one, the units keep the plan's order."""
    import dataclasses

    from genbench.runner import Plan, Session, check, core, fits

    calls = []
    monkeypatch.setattr(fits.FitStore, "fit_group", lambda self, chunk: calls.append(("fit", chunk[0][0].model, len(chunk))))
    monkeypatch.setattr(core.Session, "run_unit", lambda self, unit, model, steps, **_: calls.append(("cells", unit.model)))
    plan = Plan(models=["cm-cd", "diffusion", "vae"], datasets=["ring8", "moons"], seeds=[0, 1],
                steps_by_model={"diffusion": [1, 5], "cm-cd": [1]}, device="cpu", side_by_side=True,
                out=str(tmp_path / "run"))
    runner = check(plan)
    Session(runner).run_units(runner.units(), set())
    assert calls == [("fit", "diffusion", 4), *[("cells", "diffusion")] * 4, ("fit", "vae", 4), *[("cells", "vae")] * 4,
                     ("fit", "cm-cd", 4), *[("cells", "cm-cd")] * 4]
    calls.clear()
    one_by_one = check(dataclasses.replace(plan, side_by_side=False))
    Session(one_by_one).run_units(one_by_one.units(), set())
    assert calls == [("cells", m) for m in ["diffusion"] * 4 + ["vae"] * 4 + ["cm-cd"] * 4]


def test_groups_at_once_overlap_and_a_student_waits_for_its_teacher(tmp_path, monkeypatch):
    """With groups_at_once, every model's groups are fitted that many at a time in threads (here
    two overlap), the student's group starts only after its teacher's ended, each group's cells are
    sampled (untimed) in the run's thread as soon as it ends, while the others train, and every
    cell is timed after the last group."""
    import threading
    import time

    from genbench.runner import Plan, Session, check, core, fits

    spans, lock = {}, threading.Lock()
    started = threading.Barrier(2, timeout=10)  # diffusion and vae must be in flight together
    teacher_sampled = threading.Event()  # the student's group ends only once its teacher's cells are sampled

    def fit_group(self, chunk):
        model = chunk[0][0].model
        with lock:
            spans[model] = [time.perf_counter(), None]
        if model in ("diffusion", "vae"):
            started.wait()
        if model == "cm-cd":  # no wall-clock race: it waits for the event (set only by sampling while it trains)
            teacher_sampled.wait(60)
        time.sleep(0.05)
        with lock:
            spans[model][1] = time.perf_counter()
        for unit, _ in chunk:  # each fit handed over as _fit_group does: (unit, its model, its record)
            self._fitted.put((unit, object(), {}))

    sampled, timed = [], []

    def run_unit(self, unit, model, steps, timed=True, record=None):
        assert not timed and threading.current_thread() is threading.main_thread()
        sampled.append((unit.model, time.perf_counter()))
        if unit.model == "diffusion":
            teacher_sampled.set()
        return [({"sample_s": None}, k, None) for k in steps]

    monkeypatch.setattr(fits.FitStore, "fit_group", fit_group)
    monkeypatch.setattr(core.Session, "run_unit", run_unit)
    monkeypatch.setattr(core.Session, "time_unit", lambda self, unit, cells, model: timed.append((unit.model, time.perf_counter())))
    plan = Plan(models=["cm-cd", "diffusion", "vae"], datasets=["ring8", "moons"], seeds=[0, 1],
                steps_by_model={"diffusion": [1, 5], "cm-cd": [1]}, device="cpu", side_by_side=True,
                groups_at_once=2, out=str(tmp_path / "run"))
    runner = check(plan)
    Session(runner).run_units(runner.units(), set())
    assert set(spans) == {"diffusion", "vae", "cm-cd"} and len(sampled) == len(timed) == 12
    assert spans["cm-cd"][0] >= spans["diffusion"][1]  # the teacher's group ended first
    assert spans["vae"][0] < spans["diffusion"][1] and spans["diffusion"][0] < spans["vae"][1]  # they overlapped
    for model, t in sampled:  # each group's cells sampled once it ended; the teacher's while its student trains
        assert t >= spans[model][1]
    assert min(t for m, t in sampled if m == "diffusion") < spans["cm-cd"][1]
    last_fit = max(end for _, end in spans.values())
    assert all(t >= last_fit for _, t in timed)  # every cell timed on a quiet device


def test_a_unit_whose_fit_failed_is_not_refitted_to_be_timed(tmp_path, monkeypatch):
    """Its rows were written as errors when its group ended: the timing pass has nothing to do."""
    from genbench.runner import Plan, Session, check, fits

    calls = []
    monkeypatch.setattr(fits.FitStore, "fit_or_load", lambda self, *args, **kwargs: calls.append(args))
    runner = check(Plan(models=["vae"], datasets=["ring8"], seeds=[0], device="cpu", out=str(tmp_path / "run")))
    session = Session(runner)
    session.time_unit(runner.units()[0], [], None)
    assert calls == [] and session.notes == []


def test_a_group_that_raises_ends_the_run_without_hanging_the_others(tmp_path, monkeypatch):
    """A run-dir error in one group's thread is raised in the run's thread once the others ended;
    the student of a failed teacher is not started."""
    from genbench.api import RunDirError
    from genbench.runner import Plan, Session, check, fits

    seen = []

    def fit_group(self, chunk):
        model = chunk[0][0].model
        seen.append(model)
        if model == "diffusion":
            raise RunDirError("disk full")

    monkeypatch.setattr(fits.FitStore, "fit_group", fit_group)
    plan = Plan(models=["cm-cd", "diffusion", "vae"], datasets=["ring8"], seeds=[0, 1], device="cpu",
                side_by_side=True, groups_at_once=3, out=str(tmp_path / "run"))
    runner = check(plan)
    with pytest.raises(RunDirError, match="disk full"):
        Session(runner).fits.fit_side_by_side(runner.units(), set())
    assert "cm-cd" not in seen and "diffusion" in seen


def test_groups_fitted_at_once_are_the_groups_fitted_one_after_another(tmp_path):
    """Real fits (quick budget, CPU): the same fit records and samples with groups at once as one
    after another, the distilled model's teacher included; rows record the setting."""
    import json

    from genbench.runner import Plan, run

    def go(at_once, score_jobs=0):
        plan = Plan(models=["cm-cd", "diffusion", "vae"], datasets=["ring8"], seeds=[0, 1], budget="quick",
                    steps_by_model={"diffusion": [2], "cm-cd": [1]}, n_samples=200, metrics=("energy",),
                    floor_draws=2, device="cpu", side_by_side=True, groups_at_once=at_once, jobs=1,
                    score_jobs=score_jobs, out=str(tmp_path / f"run{at_once}-{score_jobs}"))
        rows = run(plan)
        assert all(r["status"] == "done" and r["sample_s"] > 0 and r["nfe"] >= 1 for r in rows), [(r["status"], r.get("sample_s"), r.get("error")) for r in rows]  # timed, later
        fits_dir = tmp_path / f"run{at_once}-{score_jobs}" / "fits"
        losses = {p.name: json.loads(p.read_text())["losses"] for p in sorted(fits_dir.glob("*.json"))}
        return {(r["model"], r["seed"]): (r["energy"], r["samples_sha256"], r["groups_at_once"]) for r in rows}, losses

    one, one_losses = go(1)
    for score_jobs in (0, 2):  # rows held back until timed: scored here, or by scoring processes
        three, three_losses = go(3, score_jobs)
        assert one_losses == three_losses and len(one_losses) == 6
        assert {k: v[:2] for k, v in one.items()} == {k: v[:2] for k, v in three.items()}
        assert {v[2] for v in one.values()} == {1} and {v[2] for v in three.values()} == {3}


def test_seeded_blocks_in_threads_draw_what_they_draw_alone():
    """Groups trained at once build their networks from threads: a seeded block is not reseeded
    by another thread's in its middle (it would be without the process-wide lock)."""
    import threading
    import time

    import torch

    from genbench.models.nets import seeded

    def draw(seed):
        with seeded(seed):
            first = torch.randn(50)
            time.sleep(0.02)  # another thread's block would seed torch's RNG here
            return torch.cat([first, torch.randn(50)])

    alone = {s: draw(s) for s in range(4)}
    got = {}
    threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, draw(s))) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[s], alone[s]) for s in range(4))


def test_groups_start_teachers_first_students_last_and_the_longest_first_between():
    """When fewer groups train at once than there are, the order they start in: a teacher's group
    first, its students' last (they wait for it), the others by most training steps, ties in order."""
    from genbench.runner.fits import longest_first

    chunks = ["vae 8", "cm-cd 50", "flow 3", "diffusion-teacher 80", "gan 2", "vae 8b", "cm-ct 4"]
    steps = {c: int(c.split()[1].rstrip("b")) for c in chunks}
    order = longest_first(chunks, steps.get, lambda c: "teacher" in c, lambda c: c.startswith("cm-cd"))
    assert order == ["diffusion-teacher 80", "vae 8", "vae 8b", "cm-ct 4", "flow 3", "gan 2", "cm-cd 50"]


@pytest.mark.parametrize("at_once", [1, 2])
def test_cells_are_sampled_and_timed_on_the_model_their_group_fitted(tmp_path, monkeypatch, at_once):
    """Units fitted side by side (groups one after another, or at once) are sampled and timed on the
    models their groups fitted, not on copies read back from their checkpoints (a read per unit,
    in the main thread while the other groups train); those models are their checkpoints: a re-run
    that reads them back samples the same points."""
    from genbench.runner import Plan, run
    from genbench.store import RunDir

    loaded = []
    load = RunDir.load_checkpoint
    monkeypatch.setattr(RunDir, "load_checkpoint", lambda self, name, *a, **k: loaded.append(name) or load(self, name, *a, **k))
    plan = Plan(models=["vae", "flow"], datasets=["ring8", "moons"], seeds=[0], budget="quick", device="cpu",
                params={m: {"train_steps": "40"} for m in ("vae", "flow")}, n_samples=300, metrics=("energy",),
                floor_draws=2, side_by_side=True, groups_at_once=at_once, jobs=1, score_jobs=0, out=str(tmp_path / "run"))
    rows = run(plan)
    assert loaded == []
    assert len(rows) == 4 and all(r["sample_s"] > 0 and r.get("error") is None for r in rows)
    (tmp_path / "run" / "rows.jsonl").unlink()  # the cells again, the fits reused: their models read back, once
    again = run(plan)
    assert sorted(loaded) == sorted(f"{m}__{d}__s0" for m in plan.models for d in plan.datasets)
    assert {(r["model"], r["dataset"]): r["samples_sha256"] for r in again} == \
        {(r["model"], r["dataset"]): r["samples_sha256"] for r in rows}
