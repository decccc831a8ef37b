"""Mid-fit snapshots: a fit stopped in its middle continues from its last snapshot, to the same
weights, loss curve, validation curve and kept checkpoint as the fit that was never stopped; a run
killed in the middle of a fit continues it on the re-run; a snapshot of other fits, or one that
cannot be read, is not used."""
import json

import pytest
import torch

from genbench import datasets
from genbench.models.train import Snapshots, join_states, member_states
from genbench.runner import monitor as monitor_mod
from genbench.runner.monitor import ValidationMonitor, validation_floor
from genbench.scoring import validation_sample
from genbench.store import RunDir

RING8 = datasets.get("ring8")


class Stop(Exception):
    """The kill: raised by the snapshot save after the n-th snapshot."""


def _monitor(seed=0, cap=600):
    val = validation_sample(RING8, seed)
    return ValidationMonitor(RING8, val, validation_floor(RING8, seed, val), cap=cap, log_every=50, seed=seed)


def _killed_after(n: int):
    """Snapshots every window whose save keeps the state and stops the fit after the n-th."""
    kept = []

    def save(state):
        kept.append(state)
        if len(kept) == n:
            raise Stop

    return Snapshots(None, save, every_s=0.0), kept


def _weights(model, prefix=""):
    """Every tensor of a model's checkpoint (nested dicts flattened)."""
    out = {}
    for k, v in (model.state_dict() if prefix == "" else model).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v.clone()
        elif isinstance(v, dict):
            out |= _weights(v, prefix + k + ".")
    return out


@pytest.fixture
def short_patience(monkeypatch):
    """Stops possible early, so that the fits below anneal and stop before their cap."""
    monkeypatch.setattr(monitor_mod, "MIN_STEPS", 150)


@pytest.mark.parametrize("name,params", [("diffusion", {"default_steps": "20"}), ("cm-ct", {"stage_steps": "100"}), ("flow", {})])
def test_a_fit_stopped_in_its_middle_continues_to_the_same_fit(name, params, short_patience):
    """Diffusion (an EMA copy), cm-ct (a target copy, curriculum phases), the flow (ActNorm's flag)."""
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    data = RING8.sample(4000, [0, 0])
    make = lambda: cls(budget="converged", params={"train_steps": "400"} | params)  # noqa: E731

    whole, m_whole = make(), _monitor(cap=400)
    info = whole.fit(data, seed=0, monitor=m_whole)

    first, kept = _killed_after(3)
    with pytest.raises(Stop):
        make().fit(data, seed=0, monitor=_monitor(cap=400), snapshots=first)
    assert kept[-1]["step"] == 150
    resumed, m_resumed = make(), _monitor(cap=400)
    again = Snapshots(kept[-1], lambda state: None, every_s=0.0)
    info2 = resumed.fit(data, seed=0, monitor=m_resumed, snapshots=again)

    assert again.resumed_at == 150
    assert info2.losses == info.losses and info2.steps == info.steps
    strip = lambda c: [{k: v for k, v in p.items() if k != "train_s"} for p in c]  # noqa: E731 - wall clock
    assert strip(m_resumed.curve) == strip(m_whole.curve)
    assert m_resumed.record()["kept_step"] == m_whole.record()["kept_step"]
    assert m_resumed.record()["stop_reason"] == m_whole.record()["stop_reason"]
    a, b = _weights(whole), _weights(resumed)
    assert len(a) > 2 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,each,together", [("vae", [{"lr": "3e-3"}, {"lr": "1e-3"}], False),
                                                ("gan", [{"beta1": "0.2"}, {"beta1": "0.8"}], False),  # MemberAdam
                                                # the members' best kept stacked (Keeper), as on a GPU
                                                ("vae", [{"lr": "3e-3"}, {"lr": "1e-3"}], True)])
def test_fits_side_by_side_stopped_in_their_middle_continue_to_the_same_fits(short_patience, name, each, together,
                                                                             monkeypatch):
    from genbench.models import train
    from genbench.registry import resolve

    if together:
        monkeypatch.setattr(train, "EVALUATE_TOGETHER_ON", ("cuda", "cpu"))
    cls = resolve([name])[0].cls
    datas = [RING8.sample(4000, [s, 0]) for s in (0, 1)]
    make = lambda: [cls(budget="converged", params={"train_steps": "400"} | e) for e in each]  # noqa: E731

    whole = make()
    infos = cls.fit_side_by_side(whole, datas, device="cpu", seeds=[0, 1], monitors=[_monitor(0, 400), _monitor(1, 400)])
    snaps, kept = _killed_after(3)
    with pytest.raises(Stop):
        cls.fit_side_by_side(make(), datas, device="cpu", seeds=[0, 1], monitors=[_monitor(0, 400), _monitor(1, 400)],
                             snapshots=snaps)
    resumed = make()
    infos2 = cls.fit_side_by_side(resumed, datas, device="cpu", seeds=[0, 1],
                                  monitors=[_monitor(0, 400), _monitor(1, 400)],
                                  snapshots=Snapshots(kept[-1], lambda s: None, every_s=0.0))
    for x, y, i, j in zip(whole, resumed, infos, infos2):
        assert i.losses == j.losses
        a, b = _weights(x), _weights(y)
        assert len(a) > 2 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,each", [("vae", [{"lr": "3e-3"}, {"lr": "1e-3"}, {}]),
                                       ("gan", [{"beta1": "0.2"}, {"beta1": "0.8"}, {}])])
def test_members_at_their_cap_continue_in_another_group_to_their_longer_fits(name, each):
    """A tune's promoted trial: each member's state at its cap (``Snapshots.at_cap``: before that
    window's evaluation), split off its group and stacked into another, continues to the fit the
    longer cap makes from the start: the same losses, evaluations and kept weights, to the bit (the
    converged budget's path does not depend on its cap)."""
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    seeds = order = [0, 1, 2]  # (another order gives the same fits to float rounding: a stack's numbers)
    datas = [RING8.sample(4000, [s, 0]) for s in seeds]

    def make(cap, idx):
        return [cls(budget="converged", params={"train_steps": str(cap)} | each[i]) for i in idx]

    def fit(models, idx, cap, saved=None, at_cap=None):
        monitors = [_monitor(seeds[i], cap) for i in idx]
        infos = cls.fit_side_by_side(models, [datas[i] for i in idx], device="cpu", seeds=[seeds[i] for i in idx],
                                     monitors=monitors, snapshots=Snapshots(saved, lambda s: None, 1e9, at_cap=at_cap))
        return infos, monitors

    whole = make(400, order)  # trained to 400 from the start
    infos, monitors = fit(whole, order, 400)
    ends = []
    fit(make(200, seeds), seeds, 200, at_cap=ends.append)  # (200: an evaluation the schedule has, made on continuing)
    assert [e["step"] for e in ends] == [200] and ends[0]["pending_log"]
    parts = member_states(ends[0], len(seeds))
    group = make(400, order)
    infos2, monitors2 = fit(group, order, 400, saved=join_states([parts[i] for i in order]))
    strip = lambda c: [{k: v for k, v in p.items() if k != "train_s"} for p in c]  # noqa: E731
    for j in range(len(order)):
        assert infos2[j].losses == infos[j].losses and infos2[j].steps == 400
        assert strip(monitors2[j].curve) == strip(monitors[j].curve) and monitors2[j].best_step == monitors[j].best_step
        a, b = _weights(whole[j]), _weights(group[j])
        assert len(a) > 2 and all(torch.equal(a[k], b[k]) for k in a)


def test_members_states_joined_in_any_order_split_back_to_themselves():
    """``join_states`` of members' states (``member_states``) from two groups, in another order:
    splitting the joined group gives each member's state back (its tensors, generator, curve,
    monitor, best weights, anneal), and the group's clock is its longest member's."""
    from genbench.models.vae import VAE

    ends = []
    for seeds in ([0, 1], [2]):
        group = [VAE(budget="converged", params={"train_steps": "150"}) for _ in seeds]
        VAE.fit_side_by_side(group, [RING8.sample(2000, [s, 0]) for s in seeds], device="cpu", seeds=seeds,
                             monitors=[_monitor(s, 150) for s in seeds],
                             snapshots=Snapshots(None, lambda s: None, 1e9, at_cap=ends.append))
    parts = member_states(ends[0], 2) + member_states(ends[1], 1)
    order = [2, 0, 1]
    back = member_states(join_states([parts[i] for i in order]), 3)

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    train_s = lambda p: p["loop"]["log"]["train_s"]  # noqa: E731
    for j, i in enumerate(order):
        mine, theirs = dict(back[j]), dict(parts[i])
        assert same(mine["keeper"], theirs["keeper"]) and same(mine["stacked"], theirs["stacked"])
        no_log = [{k: v for k, v in x["loop"].items() if k != "log"} for x in (mine, theirs)]
        assert same(*no_log)
        assert mine["loop"]["log"]["curves"] == theirs["loop"]["log"]["curves"]
    longest = max(parts, key=lambda p: p["loop"]["log"]["train_s"] - p["loop"]["log"]["paused"])
    assert all(train_s(b) == train_s(longest) for b in back)


def test_a_members_kept_state_holds_its_own_rows_only():
    """A member's state (``member_states``) saved to bytes weighs one member's tensors, not its
    group's: a view's ``torch.save`` writes its whole storage (a tune's kept states filled a disk)."""
    from genbench.models.vae import VAE
    from genbench.store import torch_bytes

    seeds, ends = list(range(6)), []
    group = [VAE(budget="converged", params={"train_steps": "100"}) for _ in seeds]
    VAE.fit_side_by_side(group, [RING8.sample(2000, [s, 0]) for s in seeds], device="cpu", seeds=seeds,
                         monitors=[_monitor(s, 100) for s in seeds],
                         snapshots=Snapshots(None, lambda s: None, 1e9, at_cap=ends.append))
    whole, one = len(torch_bytes(ends[0])), len(torch_bytes(member_states(ends[0], len(seeds))[0]))
    assert one < 1.5 * whole / len(seeds), (one, whole)


@pytest.mark.parametrize("side_by_side", [False, True])
def test_a_run_killed_in_the_middle_of_a_fit_continues_it(tmp_path, monkeypatch, short_patience, side_by_side):
    """In one process: the first run stops (as a killed one would) right after the fit's (or the
    group of fits side by side's) second snapshot; the re-run continues it from that step (the fit
    records say so) and writes the rows of a run that was never stopped."""
    from genbench.runner import fits as fits_mod
    from genbench.runner.core import run
    from genbench.runner.plan import Plan

    monkeypatch.setattr(fits_mod, "SNAPSHOT_EVERY_S", 0.0)
    seeds = (0, 1) if side_by_side else (0,)
    plan = lambda out: Plan(models=("vae",), datasets=("ring8",), seeds=seeds, device="cpu", budget="converged",  # noqa: E731
                            params={"vae": {"train_steps": "300"}}, n_samples=300, floor_draws=2, score_jobs=0,
                            side_by_side=side_by_side, out=str(out))
    saves = []
    real = fits_mod.RunDir.save_partial

    def save_then_die(self, name, state):
        real(self, name, state)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fits_mod.RunDir, "save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(plan(tmp_path / "a"))
    assert list((tmp_path / "a" / "partial").glob("*.pt"))
    monkeypatch.setattr(fits_mod.RunDir, "save_partial", real)
    rows = run(plan(tmp_path / "a"))
    for seed in seeds:
        record = json.loads((tmp_path / "a" / "fits" / f"vae__ring8__s{seed}.json").read_text())
        assert record["resumed_step"] == saves[1] == 100
        assert record.get("side_by_side", 0) == (len(seeds) if side_by_side else 0)
    assert not (tmp_path / "a" / "partial").exists()  # each gone once its fit is saved, the folder at the end
    whole = run(plan(tmp_path / "b"))
    assert len(rows) == len(whole) == len(seeds)
    for a, b in zip(sorted(rows, key=lambda r: r["seed"]), sorted(whole, key=lambda r: r["seed"])):
        for key in ("w2", "energy", "hq_frac", "kept_step", "train_steps", "final_loss"):
            assert a[key] == b[key], key


def test_a_snapshot_of_other_fits_or_unreadable_is_not_used(tmp_path, monkeypatch):
    from genbench.runner import fits as fits_mod
    from genbench.runner.fits import FitStore
    from genbench.runner.plan import Plan, Unit, check
    from genbench.store import RunDir

    monkeypatch.setattr(fits_mod, "SNAPSHOT_EVERY_S", 0.0)
    r = check(Plan(models=("vae",), datasets=("ring8",), seeds=(0,), device="cpu", out=str(tmp_path / "run")))
    notes, said = [], []
    store = RunDir(tmp_path / "run")
    fits = FitStore(store, r, type("P", (), {"update": lambda self, d: said.append(d)})(), notes)
    unit, model = Unit("vae", "ring8", 0), r.model("vae", "ring8")
    snaps = fits.snapshots("x", [unit], [model], "vae: training")
    snaps.add("part", lambda: {"w": torch.ones(2)}, lambda saved: None)
    snaps.due(1500)
    assert said == [f"vae: training: step 1,500 of {model.config.train_steps:,}"]  # a long fit's sign of life
    assert fits.snapshots("x", [unit], [model], "").saved["step"] == 1500  # its own: used
    assert fits.snapshots("x", [Unit("vae", "ring8", 1)], [model], "").saved is None  # another unit's
    (tmp_path / "run" / "partial" / "x.pt").write_bytes(b"torn")
    assert fits.snapshots("x", [unit], [model], "").saved is None and "could not be read" in notes[-1]


def test_a_snapshot_without_every_part_of_the_fit_starts_it_over():
    loaded = []
    snaps = Snapshots({"step": 50, "loop": {}}, lambda state: None)
    snaps.add("loop", lambda: {}, loaded.append)
    snaps.add("keeper", lambda: {}, loaded.append)  # a part the saved state does not have
    assert snaps.restore() == 0 and loaded == [] and snaps.resumed_at is None


@pytest.mark.slow
def test_a_sigterm_saves_the_fit_in_training_and_the_rerun_continues_it(tmp_path):
    """A SIGTERM (a command's time limit, a cluster taking the node back) ends the run, not its fit's
    6,000 steps first, with one line and exit 130, and the fit in training saves where it was first
    (not at its last timed snapshot, a minute apart): the re-run continues it from that step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, started = tmp_path / "run", tmp_path / "training"
    args = ["run", "--models", "vae", "--datasets", "ring8", "--seeds", "0", "--device", "cpu", "--budget", "converged",
            "--param", "vae.train_steps=6000", "--n-samples", "300", "--floor-draws", "2", "--score-jobs", "0",
            "--out", str(out)]
    # the CLI as a user runs it, but saying when its fit's loop begins (a marker file), so that the
    # signal lands in the training however slow the machine is, not after a guessed delay
    marked = ("import sys, pathlib; from genbench.models import train; loop = train.fit_loop\n"
              "def fit_loop(*a, **k):\n"
              f"    pathlib.Path({str(started)!r}).touch()\n"
              "    return loop(*a, **k)\n"
              "train.fit_loop = fit_loop; from genbench.cli import main; sys.argv = ['genbench'] + sys.argv[1:]; main()")
    proc = subprocess.Popen([sys.executable, "-c", marked, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    deadline = time.time() + 300
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the fit never began"
    time.sleep(1)  # into its 6,000 steps (tens of seconds here)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # a run that goes on training meets this timeout
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "the fits in training where they were" in err, err
    assert list((out / "partial").glob("vae__ring8__s0*"))  # saved at the signal: timed ones come a minute apart
    again = subprocess.run([sys.executable, "-m", "genbench.cli", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    record = json.loads((out / "fits" / "vae__ring8__s0.json").read_text())
    assert record["resumed_step"] > 0 and record["resumed_step"] % 50 == 0 and record["steps"] == 6000


def test_a_stop_request_saves_at_the_next_window_and_ends_the_fit():
    """``request_stop``: False where no fit keeping snapshots is training (the caller stops at once);
    in a fit that keeps them, the next window's end saves a snapshot, not waiting for its timer, and
    the fit ends with ``Stopped`` (an interruption); a re-run with the saved state continues it."""
    from genbench.models import train
    from genbench.models.vae import VAE

    data = RING8.sample(5000, [0, 0])
    saved = []
    try:
        assert train.request_stop() is False
        train.STOP.clear()

        def save(state):
            saved.append(state)

        asked = []

        class AskOnLog(Snapshots):
            def due(self, step):
                if step == 150:
                    asked.append(train.request_stop())  # a fit is in its loop: it is asked to end
                super().due(step)

        with pytest.raises(train.Stopped):
            VAE(budget="quick", params={"train_steps": "600"}).fit(data, seed=0, snapshots=AskOnLog(None, save, 1e9))
        assert asked == [True] and [s["step"] for s in saved] == [150]
    finally:
        train.STOP.clear()
    model = VAE(budget="quick", params={"train_steps": "600"})
    model.fit(data, seed=0, snapshots=Snapshots(saved[0], lambda s: None))
    whole = VAE(budget="quick", params={"train_steps": "600"})
    whole.fit(data, seed=0)
    a, b = _weights(model), _weights(whole)
    assert len(a) > 2 and all(torch.equal(a[k], b[k]) for k in a)


def test_members_that_converged_before_their_cap_are_the_fits_of_a_longer_cap(monkeypatch):
    """What a tune's promoted trial whose fit converged keeps (``FitStore.adopt``): members that
    stopped before their cap (the stopping rule made quick: patience of one evaluation, from step 0,
    a short anneal) are, under a cap twice as long, the same fits: the same losses, evaluations,
    stop and kept weights, to the bit."""
    from genbench.models.vae import VAE

    for name, value in (("MIN_STEPS", 0), ("PATIENCE_EVALS", 1), ("PATIENCE_FACTOR", 1.0), ("ANNEAL_FRACTION", 0.1)):
        monkeypatch.setattr(monitor_mod, name, value)
    seeds = [0, 1, 2]
    datas = [RING8.sample(4000, [s, 0]) for s in seeds]

    def fit(cap):
        models = [VAE(budget="converged", params={"train_steps": str(cap)}) for _ in seeds]
        monitors = [_monitor(s, cap) for s in seeds]
        infos = VAE.fit_side_by_side(models, datas, device="cpu", seeds=seeds, monitors=monitors)
        return models, infos, monitors

    (short, infos, mons), (long_, infol, monl) = fit(1500), fit(3000)
    strip = lambda c: [{k: v for k, v in p.items() if k != "train_s"} for p in c]  # noqa: E731
    for j in range(len(seeds)):
        assert mons[j].stop_reason.startswith("converged") and mons[j].curve[-1]["step"] < 1500, mons[j].stop_reason
        assert (monl[j].stop_reason, monl[j].best_step) == (mons[j].stop_reason, mons[j].best_step)
        assert strip(monl[j].curve) == strip(mons[j].curve) and infol[j].losses == infos[j].losses
        a, b = _weights(short[j]), _weights(long_[j])
        assert len(a) > 2 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def early_stops(monkeypatch):
    """Plateaus found and annealed within a few hundred steps, and a group sheds its stopped fits
    however few steps are left: members of one group stop hundreds of steps apart."""
    from genbench.runner import fits as fits_mod

    for name, value in (("MIN_STEPS", 150), ("PATIENCE_FACTOR", 1.2), ("PATIENCE_EVALS", 2), ("ANNEAL_FRACTION", 0.1)):
        monkeypatch.setattr(monitor_mod, name, value)
    monkeypatch.setattr(fits_mod, "SHED_STEPS_LEFT", 0)


def _shed_plan(out, shed: bool, device: str = "cpu"):
    from genbench.runner.plan import Plan

    return Plan(models=("vae",), datasets=("circles", "grid25", "ring8"), seeds=(0,), device=device, budget="converged",
                params={"vae": {"train_steps": "900"}}, n_samples=300, floor_draws=2, score_jobs=0, side_by_side=True,
                timed=False, shed=shed, out=str(out))


def _records(out) -> dict:
    from genbench.store import RunDir

    return {d: RunDir(out).load_json("fits", f"vae__{d}__s0") for d in ("circles", "grid25", "ring8")}


def test_a_group_sheds_its_stopped_fits_and_the_others_go_on(tmp_path, early_stops):
    """A group whose fits stop at different steps (by the stopping rule) ends at the step a quarter
    of them has stopped; the stopped fits are saved as they were (the same records, weights and
    scores as in a group that trains every member to its last one's stop), the others go on as a
    smaller group from the group's state: the same loss curve up to that step, then the same fit to
    the stacked arithmetic's rounding. A fit's train_s is its share of each group it trained in."""
    from genbench.runner.core import run

    rows = {s: {r["dataset"]: r for r in run(_shed_plan(tmp_path / str(s), s))} for s in (False, True)}
    kept, shed = _records(tmp_path / "False"), _records(tmp_path / "True")
    stops = {d: r["train_steps"] for d, r in rows[True].items()}
    assert stops["circles"] < stops["grid25"] < 900 == stops["ring8"]  # (what this test needs of the fits)
    assert [shed[d]["side_by_side"] for d in ("circles", "grid25", "ring8")] == [3, 2, 1]  # each its last group's size
    assert [kept[d]["side_by_side"] for d in ("circles", "grid25", "ring8")] == [3, 3, 3]
    first = stops["circles"] // 50  # windows before the first shed
    for d in ("circles", "grid25", "ring8"):
        assert shed[d]["losses"][:first] == kept[d]["losses"][:first], d
    for key in ("stop_reason", "kept_step", "energy", "hq_frac", "w2"):
        assert rows[True]["circles"][key] == rows[False]["circles"][key], key
    assert shed["grid25"]["losses"][first] == pytest.approx(kept["grid25"]["losses"][first], rel=1e-5)
    assert rows[True]["grid25"]["stop_reason"] == rows[False]["grid25"]["stop_reason"]
    # each fit's seconds: its share of each group it trained in (the first to stop, a third of its
    # group's until then; the others add their shares of the smaller groups), where a group that
    # trains all to the last stop charges every member the same (no wall-clock ratio asserted)
    assert shed["circles"]["train_s"] == pytest.approx(shed["circles"]["group_train_s"] / 3)
    assert shed["circles"]["train_s"] < shed["grid25"]["train_s"] < shed["ring8"]["train_s"]
    assert kept["circles"]["train_s"] == kept["grid25"]["train_s"] == kept["ring8"]["train_s"]
    assert not (tmp_path / "True" / "partial").exists()


def test_a_fit_that_its_group_sheds_is_handed_over_as_it_is_shed(tmp_path, early_stops, monkeypatch):
    """The fits a group sheds are handed over (to be sampled and scored while the group trains on)
    when they are shed, with the models the group fitted; the group's last fits as it ends."""
    from genbench.runner import fits as fits_mod
    from genbench.runner import check
    from genbench.runner.core import Session

    waiting = []  # the fits handed over but not yet taken, each time the group sheds
    regroup = fits_mod.FitStore._regroup
    monkeypatch.setattr(fits_mod.FitStore, "_regroup",
                        lambda self, *a: waiting.append(self._fitted.qsize()) or regroup(self, *a))
    r = check(_shed_plan(tmp_path / "run", True))
    handed = []
    Session(r).fits.fit_side_by_side(r.units(), set(), on_ended=handed.append)
    assert waiting == [1, 2]  # circles when the group shed it, then grid25 (one thread: taken after the group)
    assert [[u.dataset for u, _, _ in call] for call in handed] == [["circles", "grid25", "ring8"]]
    store = RunDir(tmp_path / "run")
    for unit, model, record in handed[0]:
        assert record == _records(tmp_path / "run")[unit.dataset] | {"refit_reason": None,
                                                                     "fit_sha256": store.sha("fits", f"vae__{unit.dataset}__s0", ".json")}
        assert record["side_by_side"] == {"circles": 3, "grid25": 2, "ring8": 1}[unit.dataset]
        saved = torch.utils._pytree.tree_leaves(store.load_checkpoint(f"vae__{unit.dataset}__s0", record["checkpoint_sha256"], "cpu"))
        mine = torch.utils._pytree.tree_leaves(model.state_dict())
        assert len(mine) == len(saved) > 2 and sum(torch.is_tensor(a) for a in mine) > 2
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(mine, saved))


@pytest.mark.slow
def test_a_run_killed_after_its_group_shed_fits_continues_the_smaller_group(tmp_path, monkeypatch, early_stops):
    """The smaller group's state is saved the moment it is made: a run killed in it continues it on
    the re-run (the fits saved before are reused), to the rows of a run never stopped."""
    from genbench.runner import fits as fits_mod
    from genbench.runner.core import run

    monkeypatch.setattr(fits_mod, "SNAPSHOT_EVERY_S", 1e9)  # no snapshot but the regrouping's own
    real, saved = fits_mod.RunDir.save_partial, []

    def save_then_die(self, name, state):
        real(self, name, state)
        saved.append((name, state["step"]))
        raise KeyboardInterrupt

    monkeypatch.setattr(fits_mod.RunDir, "save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(_shed_plan(tmp_path / "a", True))
    assert len(saved) == 1 and "__group2__" in saved[0][0]
    monkeypatch.setattr(fits_mod.RunDir, "save_partial", real)
    rows = {r["dataset"]: r for r in run(_shed_plan(tmp_path / "a", True))}
    whole = {r["dataset"]: r for r in run(_shed_plan(tmp_path / "b", True))}
    records = _records(tmp_path / "a")
    assert records["grid25"]["resumed_step"] == records["ring8"]["resumed_step"] == saved[0][1]
    assert "resumed_step" not in _records(tmp_path / "b")["ring8"]
    for d in whole:
        for key in ("stop_reason", "kept_step", "train_steps", "energy", "hq_frac", "final_loss"):
            assert rows[d][key] == whole[d][key], (d, key)
