"""CUDA paths: run on a GPU machine, skipped cleanly where torch sees no GPU (as in CI)."""
import pytest
import torch

from genbench import datasets
from genbench.models.consistency import ConsistencyDistillation, ConsistencyTraining
from genbench.models.diffusion import Diffusion
from genbench.models.graphs import FusedSteps
from genbench.models.nets import TimeMLP
from genbench.runner import NFECounter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DATA = datasets.RING8.sample(20000, [0, 0])


@pytest.fixture(scope="module")
def trained():
    teacher = Diffusion(budget="quick")
    teacher.fit(DATA, device="cuda", seed=0)
    cd = ConsistencyDistillation(budget="quick")
    cd.fit(DATA, device="cuda", seed=0, teacher=teacher)
    ct = ConsistencyTraining(budget="quick")
    ct.fit(DATA, device="cuda", seed=0)
    return {"diffusion": teacher, "cm-cd": cd, "cm-ct": ct}


@pytest.mark.parametrize("name,sampler,steps", [("diffusion", "euler", 100), ("diffusion", "heun", 10),
                                                ("diffusion", "lms", 10), ("diffusion", "dpmpp_2m", 10),
                                                ("cm-cd", None, 1), ("cm-cd", None, 4), ("cm-ct", None, 2)])
def test_cuda_graph_gives_the_eager_samples(trained, name, sampler, steps):
    m = trained[name]
    if sampler:
        m.config.sampler = sampler
    m.config.cuda_graph = False
    eager = m.sample(2000, steps=steps, seed=3)
    m.config.cuda_graph = True
    try:
        with NFECounter(m.nfe_module) as c:
            first = m.sample(2000, steps=steps, seed=3)  # eager, counted
        assert c.count == m.nfe(steps)
        captured = m.sample(2000, steps=steps, seed=3)  # captures, then replays
        replayed = [m.sample(2000, steps=steps, seed=s) for s in (3, 4)]
    finally:
        m.config.cuda_graph = False
        m.config.sampler = "euler"
    for x in (first, captured, replayed[0]):
        torch.testing.assert_close(x, eager, rtol=1e-4, atol=1e-4)  # fused kernels round differently
    assert not torch.allclose(replayed[1], eager)  # new noise goes through the graph


@pytest.mark.parametrize("depth,hidden,n", [(1, 40, 1001), (4, 96, 2000), (3, 128, 17)])
def test_thin_layer_kernels_give_the_cublas_step(depth, hidden, n):
    """The Triton first/last-layer kernels against addmm: widths not a power of two, row counts not
    a multiple of the block, depth 1 (no square layer, so the last kernel must not apply a second
    SiLU), and a step with a second state."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    net = TimeMLP(hidden=hidden, depth=depth).cuda()
    args = ([1.3, 0.7, 0.2], [0.5, -1.0, 2.0], [0.9, 1.0, 0.3], [0.4, -0.6, 1.2])
    kw = {"out_scale": 2.0, "out_shift": torch.tensor([0.1, -0.2], device="cuda")}
    kw["g"] = [0.0, 0.5, 0.0]  # step 1 adds 0.5 x0, as a Heun corrector does
    thin, ref = FusedSteps(net, *args, **kw, thin=True), FusedSteps(net, *args, **kw, thin=False)
    assert thin.kernels is not None and ref.kernels is None
    x, x0 = torch.randn(n, 2, device="cuda"), torch.randn(n, 2, device="cuda")
    with torch.no_grad():
        for i in range(3):
            second = x0 if i == 1 else None
            torch.testing.assert_close(thin(x, i, second), ref(x, i, second), rtol=1e-5, atol=1e-5)
            strided = x.t().contiguous().t()  # same values, not contiguous
            torch.testing.assert_close(thin(strided, i, second), ref(x, i, second), rtol=1e-5, atol=1e-5)


def test_run_on_cuda_end_to_end(tmp_path):
    from genbench.runner import Plan, run

    rows = run(Plan(models=["diffusion", "cm-cd"], steps=[1, 4], budget="quick", n_samples=500, device="cuda",
                    out=str(tmp_path / "run")))  # CUDA-graph sampling is the default on CUDA
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    assert all(r["sample_calls"] >= 5 and r["sample_s_min"] <= r["sample_s"] for r in rows)
    assert all(r["device"] == "cuda" and r["device_name"] for r in rows)
    assert all(r["cuda_version"] for r in rows)


def test_gpu_metrics_equal_the_cpu_ones():
    from genbench import metrics

    ds = datasets.get("moons")
    x, y = ds.sample(3000, 1), ds.sample(3000, 2) + 0.05
    assert metrics.energy(x, y, device="cuda") == pytest.approx(metrics.energy(x, y), rel=1e-9)
    assert metrics.sinkhorn(x[:1000], y[:1000], device="cuda") == pytest.approx(metrics.sinkhorn(x[:1000], y[:1000]), rel=1e-3)


def test_pf_ode_likelihood_on_cuda_matches_the_cpu(trained):
    m = trained["diffusion"]
    test = datasets.RING8.sample(500, [0, 2])
    gpu = m.evaluate(test)["nll"]
    cpu = Diffusion(budget="quick")
    cpu.load_state_dict(m.state_dict(), device="cpu")
    assert gpu == pytest.approx(cpu.evaluate(test)["nll"], abs=2e-3)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "flow"])
def test_graph_captured_training_matches_eager_training(name):
    """The same fit with the step captured in a CUDA graph and eagerly: the same loss curve and
    samples of the same quality (bit equality is not required: fused and foreach kernels round
    differently). cm-ct captures one graph per discretisation phase (8 at this budget)."""
    from genbench import metrics
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    data = datasets.RING8.sample(20000, [0, 1])
    ref = datasets.RING8.sample(2000, [0, 3])
    fits = {}
    for graph in (True, False):
        m = cls(budget="quick", params={"cuda_graph": str(graph).lower()})
        info = m.fit(data, device="cuda", seed=0)
        x = m.sample(2000, seed=1).cpu().numpy()
        fits[graph] = (info, metrics.w2(x, ref))
    (gi, gw), (ei, ew) = fits[True], fits[False]
    print(name, "losses graph/eager", gi.losses[-3:], ei.losses[-3:], "w2", gw, ew)
    assert len(gi.losses) == len(ei.losses) and gi.steps == ei.steps
    assert abs(gi.final_loss - ei.final_loss) <= 0.1 * abs(ei.final_loss) + 0.05
    assert abs(gw - ew) <= 0.1 * ew + 0.05


def test_graph_captured_cd_matches_eager(trained):
    """Consistency distillation (teacher calls inside the captured step) against its eager fit."""
    from genbench import metrics

    ref = datasets.RING8.sample(2000, [0, 3])
    out = {}
    for graph in (True, False):
        cd = ConsistencyDistillation(budget="quick", params={"cuda_graph": str(graph).lower()})
        info = cd.fit(DATA, device="cuda", seed=0, teacher=trained["diffusion"])
        out[graph] = (info.final_loss, metrics.w2(cd.sample(2000, seed=1).cpu().numpy(), ref))
    print("cm-cd graph/eager", out)
    assert abs(out[True][0] - out[False][0]) <= 0.1 * abs(out[False][0]) + 0.05
    assert abs(out[True][1] - out[False][1]) <= 0.1 * out[False][1] + 0.05


def test_fits_side_by_side_on_the_gpu_are_their_solo_fits():
    """The stacked fit in a captured graph against each member's solo fit on the GPU."""
    names, seeds = ("ring8", "moons", "grid25"), [0, 1, 2]
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in zip(names, seeds)]
    group = [Diffusion(budget="quick") for _ in seeds]
    infos = Diffusion.fit_side_by_side(group, datas, device="cuda", seeds=seeds)
    for member, info, data, seed in zip(group, infos, datas, seeds):
        solo = Diffusion(budget="quick")
        alone = solo.fit(data, device="cuda", seed=seed)
        print("side by side / solo final loss", info.final_loss, alone.final_loss)
        assert info.final_loss == pytest.approx(alone.final_loss, rel=1e-3)
        torch.testing.assert_close(member.sample(1000, steps=10, seed=4), solo.sample(1000, steps=10, seed=4),
                                   rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "gan"])
def test_a_window_a_replay_trains_the_fits_a_step_a_replay_does(name, monkeypatch):
    """The captured loop replaying a logged window at once (``train.WINDOW_REPLAY``) against one step a
    replay: the same kernels in the same order and the same random numbers, so the same members to the
    bit (cm-ct: its curriculum's phases, each captured on its own)."""
    from genbench.models import train
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    seeds = [0, 1, 2]
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in zip(("ring8", "moons", "grid25"), seeds)]
    out = {}
    for window in (False, True):
        monkeypatch.setattr(train, "WINDOW_REPLAY", window)
        group = [cls(budget="quick", params={"train_steps": "1234"}) for _ in seeds]
        infos = cls.fit_side_by_side(group, datas, device="cuda", seeds=seeds)
        out[window] = ([i.losses for i in infos], [m.sample(500, seed=4).cpu() for m in group])
    assert out[True][0] == out[False][0]
    for a, b in zip(out[True][1], out[False][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["cm-ct", "vae", "flow"])
def test_other_families_side_by_side_on_the_gpu_match_their_solo_fits(name):
    """Members against their solo fits on the GPU, within the seed-to-seed spread of the solo fits:
    the flow's training amplifies the rounding differences of batched kernels (its loss spikes
    early), so there a member matches its solo fit as another fit of it would, not to the digit."""
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    params = {"lr": "1e-3"} if name == "flow" else {}  # at the quick budget's lr the flow's loss spikes early
    seeds = [0, 1]
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in zip(("ring8", "moons"), seeds)]
    group = [cls(budget="quick", params=params) for _ in seeds]
    infos = cls.fit_side_by_side(group, datas, device="cuda", seeds=seeds)
    for info, data, seed in zip(infos, datas, seeds):
        alone, other = (cls(budget="quick", params=params).fit(data, device="cuda", seed=s).final_loss
                        for s in (seed, seed + 100))
        spread = abs(alone - other)
        print(name, "side by side / solo / another seed", info.final_loss, alone, other)
        assert abs(info.final_loss - alone) <= max(0.05 * abs(alone), 3 * spread)


def test_cd_side_by_side_on_the_gpu_matches_its_solo_fits():
    """Distillation stacked over two members, each with its own teacher, in a captured graph."""
    seeds = [0, 1]
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in zip(("ring8", "moons"), seeds)]
    teachers = []
    for data, seed in zip(datas, seeds):
        t = Diffusion(budget="quick")
        t.fit(data, device="cuda", seed=seed)
        teachers.append(t)
    group = [ConsistencyDistillation(budget="quick") for _ in seeds]
    infos = ConsistencyDistillation.fit_side_by_side(group, datas, device="cuda", seeds=seeds, teachers=teachers)
    for member, info, data, seed, teacher in zip(group, infos, datas, seeds, teachers):
        solo = ConsistencyDistillation(budget="quick")
        alone = solo.fit(data, device="cuda", seed=seed, teacher=teacher)
        print("cm-cd side by side / solo", info.final_loss, alone.final_loss)
        assert info.final_loss == pytest.approx(alone.final_loss, rel=1e-2)
        torch.testing.assert_close(member.sample(1000, steps=2, seed=4), solo.sample(1000, steps=2, seed=4),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct"])
def test_evaluation_during_a_captured_fit_keeps_the_best_weights(name):
    """The converged budget's evaluations between replays of the captured training step: the
    kept weights are the best evaluation's, and the fit stops when told."""
    from test_stopping import KeepSecond

    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    model = cls(budget="quick", params={"train_steps": "400"})
    monitor = KeepSecond()
    info = model.fit(DATA, device="cuda", seed=0, monitor=monitor)
    assert len(monitor.samples) == 5 and info.steps == 250
    torch.testing.assert_close(model.sample_now(200, 7), monitor.samples[1])


def test_gan_captured_side_by_side_steps_are_its_eager_solo_steps():
    """The GAN's two players in one captured, stacked step (three steps replayed after the two
    eager ones) against an eager solo fit on the GPU: the same weights and batch-norm statistics
    up to float rounding (a GAN amplifies rounding over many steps, so few steps are compared)."""
    from genbench.models.gan import GAN

    params = {"train_steps": "5", "pack": "2", "g_hidden": "32", "g_depth": "2", "d_hidden": "16", "batch": "64"}
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in (("ring8", 0), ("grid25", 1))]
    group = [GAN(budget="quick", params=params) for _ in datas]
    GAN.fit_side_by_side(group, datas, device="cuda", seeds=[0, 1])
    for member, data, seed in zip(group, datas, (0, 1)):
        solo = GAN(budget="quick", params=params | {"cuda_graph": "false"})
        solo.fit(data, device="cuda", seed=seed)
        for (name, a), b in zip(member.net.state_dict().items(), solo.net.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_captured_members_each_train_at_their_own_learning_rate():
    """Per-member learning rates in a captured stacked step against eager solo fits on the GPU."""
    from genbench.models.vae import VAE

    data = [datasets.get("ring8").sample(20000, [s, 0]) for s in (0, 1)]
    rates = ["1e-3", "4e-3"]
    group = [VAE(budget="quick", params={"train_steps": "20", "lr": r}) for r in rates]
    VAE.fit_side_by_side(group, data, device="cuda", seeds=[0, 1])
    for member, d, seed, r in zip(group, data, (0, 1), rates):
        solo = VAE(budget="quick", params={"train_steps": "20", "lr": r, "cuda_graph": "false"})
        solo.fit(d, device="cuda", seed=seed)
        for a, b in zip(member.net.state_dict().values(), solo.net.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "flow"])
def test_captured_members_each_train_at_their_own_batch(name):
    """Members of other batches (their draws repeated up to the group's largest, inside the captured
    step) against eager solo fits on the GPU."""
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    data = [datasets.get("ring8").sample(20000, [s, 0]) for s in (0, 1)]
    batches = ["128", "512"]
    group = [cls(budget="quick", params={"train_steps": "20", "batch": b}) for b in batches]
    cls.fit_side_by_side(group, data, device="cuda", seeds=[0, 1])
    weights = lambda m: [t for v in m.state_dict().values() for t in (v.values() if isinstance(v, dict) else [v])  # noqa: E731
                         if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for member, d, seed, b in zip(group, data, (0, 1), batches):
        solo = cls(budget="quick", params={"train_steps": "20", "batch": b, "cuda_graph": "false"})
        solo.fit(d, device="cuda", seed=seed)
        for x, y in zip(weights(member), weights(solo), strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=f"{name} batch {b}")


def test_captured_members_each_train_at_their_own_beta1():
    """Per-member Adam beta1 (``MemberAdam``) in a captured stacked step against eager solo fits
    (torch's fused Adam) on the GPU."""
    from genbench.models.gan import GAN

    tiny = {"g_hidden": "16", "g_depth": "2", "d_hidden": "16", "d_depth": "2", "batch": "64", "train_steps": "10"}
    data = [datasets.get("ring8").sample(4000, [s, 0]) for s in (0, 1)]
    params = [tiny | {"beta1": "0.0", "lr": "1e-3"}, tiny | {"beta1": "0.8"}]
    group = [GAN(budget="quick", params=p) for p in params]
    GAN.fit_side_by_side(group, data, device="cuda", seeds=[0, 1])
    for member, d, seed, p in zip(group, data, (0, 1), params):
        solo = GAN(budget="quick", params=p | {"cuda_graph": "false"})
        solo.fit(d, device="cuda", seed=seed)
        for (name, a), b in zip(member.net.state_dict().items(), solo.net.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


def test_an_anneal_in_a_captured_fit_is_the_eager_fits():
    """The plateau schedule's anneal, started between replays, against the eager fit on the GPU."""
    from genbench.api import Monitor, Verdict
    from genbench.models.vae import VAE

    class AnnealAt100(Monitor):
        def due(self, step):
            return True

        def evaluate(self, step, sample, train_s=None):
            return Verdict(best=False, stop=False, anneal=50 if step == 100 else 0)

    data = datasets.get("ring8").sample(20000, [0, 0])
    fits = []
    for graph in ("true", "false"):
        model = VAE(budget="converged", params={"train_steps": "200", "cuda_graph": graph})
        model.fit(data, device="cuda", seed=0, monitor=AnnealAt100())
        fits.append(model)
    for a, b in zip(fits[0].net.state_dict().values(), fits[1].net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)


def test_groups_trained_at_once_on_streams_are_the_groups_trained_one_after_another(tmp_path):
    """Every model's group at once, each on its own stream and captured from its own thread, with
    evaluation during training (the converged budget at small caps): the same loss curves,
    validation curves and kept steps as one group after another."""
    import json

    from genbench.runner import Plan, run

    caps = {"diffusion": 1200, "cm-cd": 600, "vae": 1200, "flow": 600}
    curves = {}
    for at_once in (1, 4):
        out = tmp_path / f"run{at_once}"
        rows = run(Plan(models=["diffusion", "cm-cd", "vae", "flow"], datasets=["ring8", "moons"], seeds=[0, 1],
                        steps_by_model={"diffusion": [4], "cm-cd": [1]}, budget="converged", n_samples=500,
                        metrics=("energy",), floor_draws=2, device="cuda", groups_at_once=at_once, score_jobs=0,
                        params={m: {"train_steps": str(c)} for m, c in caps.items()}, out=str(out)))
        assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
        assert {r["groups_at_once"] for r in rows} == {at_once}
        curves[at_once] = {p.name: json.loads(p.read_text()) for p in sorted((out / "fits").glob("*.json"))}
    assert curves[1].keys() == curves[4].keys() and len(curves[1]) == 16
    for name, one in curves[1].items():
        four = curves[4][name]
        assert one["kept_step"] == four["kept_step"] and one["stop_reason"] == four["stop_reason"], name
        torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(four["losses"]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name} losses: {m}")
        # the validation curves: the energy to float precision; the support fraction to a sample or
        # two of the 500 (a loss equal to 1e-5, not to the bit, can move a sample across the
        # support's edge, and the score counts a sample as a couple of units)
        for key, tol in (("energy", dict(rtol=1e-3, atol=1e-5)), ("hq_frac", dict(rtol=0, atol=2.5 / 500))):
            torch.testing.assert_close(torch.tensor([p[key] for p in one["eval_curve"]]),
                                       torch.tensor([p[key] for p in four["eval_curve"]]), **tol, msg=f"{name} {key}")


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "flow"])
def test_a_captured_fit_stopped_in_its_middle_continues_to_the_same_fit(name, monkeypatch):
    """A captured fit (side by side, with evaluation and its curriculum's phases) continued from a
    mid-fit snapshot: the CUDA generators' states, Adam's device-side step and the schedule's
    position are restored, so its losses and weights are those of the fit never stopped."""
    from genbench.models.train import Snapshots
    from genbench.registry import resolve
    from genbench.runner import monitor as monitor_mod
    from genbench.runner.monitor import ValidationMonitor, validation_floor
    from genbench.scoring import validation_sample

    monkeypatch.setattr(monitor_mod, "MIN_STEPS", 200)
    ds = datasets.get("ring8")
    cls = resolve([name])[0].cls
    datas = [ds.sample(4000, [s, 0]) for s in (0, 1)]
    params = {"train_steps": "600"} | ({"stage_steps": "150"} if name == "cm-ct" else {})

    def monitors():
        vals = [validation_sample(ds, s) for s in (0, 1)]
        return [ValidationMonitor(ds, v, validation_floor(ds, s, v), cap=600, log_every=50, seed=s, device="cuda")
                for s, v in zip((0, 1), vals)]

    def fit(snapshots=None):
        group = [cls(budget="converged", params=params) for _ in datas]
        infos = cls.fit_side_by_side(group, datas, device="cuda", seeds=[0, 1], monitors=monitors(),
                                     **({"snapshots": snapshots} if snapshots else {}))
        return group, infos

    whole, infos = fit()
    kept = []

    class Stop(Exception):
        pass

    def save(state):
        kept.append(state)
        if len(kept) == 4:
            raise Stop

    with pytest.raises(Stop):
        fit(Snapshots(None, save, every_s=0.0))
    resumed, infos2 = fit(Snapshots(kept[-1], lambda s: None, every_s=0.0))
    for a, b, i, j in zip(whole, resumed, infos, infos2):
        assert i.losses == j.losses
        from test_snapshots import _weights

        sa, sb = _weights(a), _weights(b)
        assert len(sa) > 2 and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "gan"])
def test_captured_members_at_their_cap_continue_to_their_longer_fits(name):
    """A tune's promoted trials on CUDA: a captured group's members' states at their cap (before that
    window's evaluation: ``Snapshots.at_cap``), split and stacked again (``member_states``,
    ``join_states``), continue to the fits the longer cap makes from step 0: the same losses,
    evaluations and weights, to the bit (cm-ct across its curriculum's stages)."""
    from genbench.models.train import Snapshots, join_states, member_states
    from genbench.registry import resolve
    from genbench.runner.monitor import ValidationMonitor, validation_floor
    from genbench.scoring import validation_sample

    ds = datasets.get("ring8")
    cls = resolve([name])[0].cls
    seeds = [0, 1, 2]
    datas = [ds.sample(4000, [s, 0]) for s in seeds]

    def fit(cap, saved=None, at_cap=None):
        params = {"train_steps": str(cap)} | ({"stage_steps": "150"} if name == "cm-ct" else {})
        group = [cls(budget="converged", params=params) for _ in seeds]
        monitors = [ValidationMonitor(ds, v, validation_floor(ds, s, v), cap=cap, log_every=50, seed=s, device="cuda")
                    for s, v in ((s, validation_sample(ds, s)) for s in seeds)]
        infos = cls.fit_side_by_side(group, datas, device="cuda", seeds=seeds, monitors=monitors,
                                     snapshots=Snapshots(saved, lambda st: None, 1e9, at_cap=at_cap))
        return group, infos, monitors

    whole, infos, monitors = fit(600)
    ends = []
    fit(300, at_cap=ends.append)
    group, infos2, monitors2 = fit(600, saved=join_states(member_states(ends[0], len(seeds))))
    from test_snapshots import _weights

    strip = lambda c: [{k: v for k, v in p.items() if k != "train_s"} for p in c]  # noqa: E731
    for j in range(len(seeds)):
        assert infos2[j].losses == infos[j].losses
        assert strip(monitors2[j].curve) == strip(monitors[j].curve)
        sa, sb = _weights(whole[j]), _weights(group[j])
        assert len(sa) > 2 and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "flow", "gan"])
def test_members_evaluated_at_once_on_cuda_sample_what_each_samples_alone(name, monkeypatch):
    """On CUDA a stacked fit's members draw their evaluation samples in one vmapped pass (no
    member's own ``sample_now``): each is the sample its kept weights give alone, to float rounding
    (batched matmuls need not round as one member's do)."""
    from test_stopping import FirstEvaluation

    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    group = [cls(budget="quick", params={"train_steps": "100"}) for _ in range(3)]
    datas = [datasets.get(d).sample(2000, [s, 0]) for d, s in (("ring8", 0), ("moons", 1), ("ring8", 2))]
    calls = []
    own = cls.sample_now
    monkeypatch.setattr(cls, "sample_now", lambda self, n, seed: (calls.append(n), own(self, n, seed))[1])
    monitors = [FirstEvaluation() for _ in group]
    cls.fit_side_by_side(group, datas, device="cuda", seeds=[0, 1, 2], monitors=monitors)
    assert calls == []
    for member, monitor in zip(group, monitors):
        torch.testing.assert_close(monitor.x, own(member, *monitor.sample_args), rtol=1e-3, atol=1e-3)


def test_own_stream_never_hands_out_a_stream_held():
    """torch's streams come from a pool of 32, round-robin: a stream made later can be one a thread
    still trains or captures on. ``own_stream`` skips those."""
    import contextlib

    from genbench.models.graphs import own_stream

    assert len({torch.cuda.Stream().cuda_stream for _ in range(40)}) <= 32  # torch's own repeat
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(own_stream()).cuda_stream for _ in range(8)]
        for _ in range(40):
            torch.cuda.Stream()  # the pool wraps around
        more = [stack.enter_context(own_stream()).cuda_stream for _ in range(8)]
        assert len(set(held + more)) == 16
        rest = [stack.enter_context(own_stream()).cuda_stream for _ in range(40)]  # past the pool of 32
        assert len(set(held + more + rest)) == 56
        with pytest.raises(RuntimeError, match="groups-at-once"):
            for _ in range(16):
                stack.enter_context(own_stream())


def test_a_tune_of_models_at_once_on_cuda_is_the_tune_of_one_after_another(tmp_path, monkeypatch):
    """A halving tune at the converged budget at small caps on CUDA, `cm-cd` (with its teacher), the
    VAE and the flow: their chains of rungs at once (their captured groups on streams of their own,
    sharing two slots; promoted fits continued from their states at the previous rung's cap),
    against the models one after another: every trial's first-rung score to float rounding (groups
    at once are their one-after-another fits to 1e-5, above), a finite score for every trial at
    every rung it reached, and the same number of trials at each rung."""
    import math

    from genbench import tune
    from genbench.registry import resolve

    for name, cap in (("diffusion", 1200), ("cm-cd", 600), ("vae", 600), ("flow", 600)):
        cls = resolve([name])[0].cls
        monkeypatch.setattr(cls, "budgets", {**cls.budgets, "converged": {**cls.budgets["converged"], "train_steps": cap}})
    results = {}
    for at_once in (2, 1):
        _, res, _, _ = tune.run_tune(models=["cm-cd", "vae", "flow"], datasets=["ring8"], seeds=[0], n_trials=4,
                                     studies=1, budget="converged", out=tmp_path / f"t{at_once}", device="cuda",
                                     threads=1, jobs=1, seed=0, run=lambda r: r.run(), groups_at_once=at_once,
                                     halving=2)
        results[at_once] = res
        assert (tmp_path / f"t{at_once}" / "tuned.json").exists()
        assert all(math.isfinite(s) for t in res for g in t["rungs"] for s in g["scores"].values())
    for a, b in zip(results[2], results[1], strict=True):
        assert (a["model"], a["index"]) == (b["model"], b["index"])
        assert a["rungs"][0]["scores"]["ring8"] == pytest.approx(b["rungs"][0]["scores"]["ring8"], rel=1e-3)
    reached = {k: sorted(len(t["rungs"]) for t in res) for k, res in results.items()}
    assert reached[2] == reached[1]


def test_a_captured_group_sheds_its_stopped_fits(tmp_path, monkeypatch):
    """On CUDA (captured steps, a window a replay): a group whose first fit stops long before the
    others' sheds it and goes on smaller; the fit that stopped first is the one a group that trains
    every member on makes (the same record and scores), and every fit ends with a stop reason."""
    from test_snapshots import _records, _shed_plan

    from genbench.runner import fits as fits_mod
    from genbench.runner import monitor as monitor_mod
    from genbench.runner.core import run

    for name, value in (("MIN_STEPS", 150), ("PATIENCE_FACTOR", 1.2), ("PATIENCE_EVALS", 2), ("ANNEAL_FRACTION", 0.1)):
        monkeypatch.setattr(monitor_mod, name, value)
    monkeypatch.setattr(fits_mod, "SHED_STEPS_LEFT", 0)
    rows = {s: {r["dataset"]: r for r in run(_shed_plan(tmp_path / str(s), s, "cuda"))} for s in (False, True)}
    kept, shed = _records(tmp_path / "False"), _records(tmp_path / "True")
    first = min(rows[True], key=lambda d: rows[True][d]["train_steps"])
    assert rows[True][first]["train_steps"] < max(r["train_steps"] for r in rows[True].values())  # (what it needs)
    assert shed[first]["side_by_side"] == 3 and min(r["side_by_side"] for r in shed.values()) < 3
    assert all(r["side_by_side"] == 3 for r in kept.values())
    for key in ("stop_reason", "kept_step", "energy", "hq_frac", "w2"):
        assert rows[True][first][key] == rows[False][first][key], key
    assert all(r["stop_reason"] for r in rows[True].values())


def test_a_teachers_group_trains_on_a_high_priority_stream(tmp_path, monkeypatch):
    """Groups at once: the teacher's group (its students' groups wait for it) trains on a stream of
    the high-priority pool, the others on normal ones."""
    from genbench.runner import Plan, check, fits
    from genbench.runner.core import Session

    priority = {}
    fit_group = fits.FitStore.fit_group

    def noted(self, chunk):
        priority[chunk[0][0].model] = torch.cuda.current_stream().priority
        fit_group(self, chunk)

    monkeypatch.setattr(fits.FitStore, "fit_group", noted)
    plan = Plan(models=["cm-cd", "diffusion", "vae"], datasets=["ring8"], seeds=[0, 1], budget="quick", device="cuda",
                params={m: {"train_steps": "20"} for m in ("diffusion", "cm-cd", "vae")}, side_by_side=True,
                groups_at_once=3, out=str(tmp_path / "run"))
    r = check(plan)
    Session(r).fits.fit_side_by_side(r.units(), set())
    assert priority.keys() == {"diffusion", "cm-cd", "vae"}
    assert priority["diffusion"] < priority["cm-cd"] == priority["vae"] == 0  # (lower numbers: higher priority)
