"""The training loop's host-side logic (the CUDA-graph path's GPU behaviour is in test_cuda.py)."""
import pytest
import torch

from genbench.models.consistency import ct_discretisation
from genbench.models.graphs import phase_segments
from genbench.models.nets import EMA
from genbench.models.train import at_most, replay_chunks


def test_phase_segments_cover_the_steps_in_runs_of_one_phase():
    assert phase_segments(7) == [(0, 7)] and phase_segments(0) == []
    steps = 1000
    phase = lambda k: ct_discretisation(k, steps, 10, 1280)  # noqa: E731
    segs = phase_segments(steps, phase)
    assert segs[0][0] == 0 and segs[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))  # contiguous
    assert all(len({phase(k) for k in range(s, e)}) == 1 for s, e in segs)  # one phase each
    assert len(segs) == len({phase(k) for k in range(steps)}) == 8  # N = 11, 21, ..., 1281


def test_window_replays_cover_the_steps_and_each_is_one_logged_window():
    """The captured loop's replays: every step once, in order; a multi-step replay exactly one logged
    window (the windows counted from the step the loop began at, a resumed fit's included), single
    steps where a phase begins or ends inside a window."""
    for begin, end, origin, width in [(2, 1000, 0, 50), (0, 1000, 0, 50), (7502, 15000, 0, 50), (1250, 1337, 1250, 50),
                                      (3, 40, 0, 50), (5, 17, 0, 1), (100, 260, 100, 50)]:
        chunks = replay_chunks(begin, end, origin, width)
        steps = [k + j for k, n in chunks for j in range(n)]
        assert steps == list(range(begin, end))
        for k, n in chunks:
            assert n in (1, width)
            if n > 1:
                assert (k - origin) % width == 0 and k + n <= end
        # a single step is left only where no whole window fits around it
        for k, n in chunks:
            if n == 1 and width > 1:
                start = origin + (k - origin) // width * width
                assert start < begin or start + width > end
    assert replay_chunks(2, 200, 0, 50) == [(k, 1) for k in range(2, 50)] + [(50, 50), (100, 50), (150, 50)]
    assert replay_chunks(0, 120, 0, 50) == [(0, 50), (50, 50)] + [(k, 1) for k in range(100, 120)]


def test_step_dependent_values_work_on_numbers_and_tensors():
    assert at_most(3, 2.0) == 2.0 and at_most(1.5, 2.0) == 1.5
    t = torch.tensor(5.0)
    assert at_most((1 + t) / (10 + t), 0.999).item() == torch.tensor(6 / 15).item()
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    e1, e2 = EMA(a, 0.9), EMA(a, 0.9)
    e1.update(b, 0.75)
    e2.update(b, torch.tensor(0.75))  # the captured step's form
    for p, q in zip(e1.model.parameters(), e2.model.parameters()):
        torch.testing.assert_close(p, q)


def test_members_side_by_side_each_train_at_their_own_learning_rate():
    """Two members at learning rates 1e-3 and 4e-3 against their solo fits (the stacked step is taken
    at rate 1 and each member's update scaled by its rate: Adam's update is linear in the rate)."""
    from genbench import datasets
    from genbench.models.vae import VAE

    data = [datasets.get("ring8").sample(4000, [s, 0]) for s in (0, 1)]
    rates = ["1e-3", "4e-3"]
    group = [VAE(budget="quick", params={"train_steps": "30", "lr": r}) for r in rates]
    infos = VAE.fit_side_by_side(group, data, device="cpu", seeds=[0, 1])
    for member, info, d, seed, r in zip(group, infos, data, (0, 1), rates):
        solo = VAE(budget="quick", params={"train_steps": "30", "lr": r})
        alone = solo.fit(d, seed=seed)
        assert info.losses == pytest.approx(alone.losses, rel=1e-4)
        for a, b in zip(member.net.state_dict().values(), solo.net.state_dict().values()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not torch.equal(group[0].net.dec[0].weight, group[1].net.dec[0].weight)


def test_members_side_by_side_each_train_at_their_own_member_fields():
    """Diffusion's and cm-ct's p_mean and the VAE's KL warm-up are member fields (tuning trials that
    differ in them share a stacked fit): each member's losses are its solo fit's at its own settings."""
    from genbench import datasets
    from genbench.models.diffusion import Diffusion

    data = [datasets.get("ring8").sample(4000, [s, 0]) for s in (0, 1)]
    params = [{"train_steps": "30", "p_mean": "-2.2", "lr": "1e-3"}, {"train_steps": "30", "p_mean": "-0.8", "lr": "3e-3"}]
    group = [Diffusion(budget="quick", params=p) for p in params]
    infos = Diffusion.fit_side_by_side(group, data, device="cpu", seeds=[0, 1])
    for info, d, seed, p in zip(infos, data, (0, 1), params):
        alone = Diffusion(budget="quick", params=p).fit(d, seed=seed)
        assert info.losses == pytest.approx(alone.losses, rel=1e-4)
    from genbench.models.vae import VAE

    vparams = [{"train_steps": "30", "kl_warmup": "0"}, {"train_steps": "30", "kl_warmup": "20", "lr": "4e-3"}]
    vgroup = [VAE(budget="quick", params=p) for p in vparams]  # the VAE's KL warm-up is a member field too
    for info, d, seed, p in zip(VAE.fit_side_by_side(vgroup, data, device="cpu", seeds=[0, 1]), data, (0, 1), vparams):
        assert info.losses == pytest.approx(VAE(budget="quick", params=p).fit(d, seed=seed).losses, rel=1e-4)
    from genbench.models.consistency import ConsistencyTraining

    cparams = [{"train_steps": "40", "p_mean": "-1.1"}, {"train_steps": "40", "p_mean": "-0.4", "lr": "2e-3"}]
    cgroup = [ConsistencyTraining(budget="quick", params=p) for p in cparams]  # cm-ct's level centre too
    for info, d, seed, p in zip(ConsistencyTraining.fit_side_by_side(cgroup, data, device="cpu", seeds=[0, 1]), data,
                                (0, 1), cparams):
        assert info.losses == pytest.approx(ConsistencyTraining(budget="quick", params=p).fit(d, seed=seed).losses,
                                            rel=1e-4)
    with pytest.raises(ValueError, match="hidden"):  # a field that is not a member field splits groups
        Diffusion.fit_side_by_side([Diffusion(budget="quick", params={"hidden": h}) for h in ("64", "96")], data,
                                   device="cpu", seeds=[0, 1])


@pytest.mark.parametrize("name", ["diffusion", "cm-ct", "vae", "flow"])
def test_members_of_other_batches_train_on_their_draws_repeated_as_their_solo_fits(name):
    """The batch is a member field of the families whose loss is a mean over it: a member whose batch
    divides the group's largest trains on its own draws repeated up to it, the same mean, so its
    losses and samples are its solo fit's (to float rounding: the sums run over more terms); a
    batch that does not divide the largest is refused (the runner groups by ``batch_groups``)."""
    from conftest import assert_members_are_solo_fits

    from genbench import datasets
    from genbench.registry import resolve

    cls = resolve([name])[0].cls
    assert_members_are_solo_fits(cls, [{"train_steps": "30", "batch": b} for b in ("128", "512", "256")],
                                 lambda m: m.sample(500, seed=4))
    data = [datasets.get("ring8").sample(4000, [s, 0]) for s in (0, 1)]
    with pytest.raises(ValueError, match="divide"):
        cls.fit_side_by_side([cls(params={"train_steps": "30", "batch": b}) for b in ("384", "512")], data,
                             device="cpu", seeds=[0, 1])


def test_batch_groups_are_the_fewest_whose_batches_divide_their_largest():
    from genbench.models.train import batch_groups

    assert batch_groups([256, 1024, 512, 1024]) == [0, 0, 0, 0]
    assert batch_groups([384, 256, 1024, 512]) == [1, 0, 0, 0]  # 384 divides no larger batch
    assert batch_groups([128, 384]) == [0, 0] and batch_groups([96, 64]) == [0, 1]
    assert batch_groups([]) == []


def test_the_rsqrt_schedule_does_not_depend_on_the_total_and_decays():
    from genbench.models.train import SCHEDULES

    rsqrt = SCHEDULES["rsqrt"]
    for k in (0, 50, 99, 1000, 4000, 9999):
        assert rsqrt(k, 10_000, 100) == rsqrt(k, 80_000, 100)  # a doubled cap leaves the path as it was
    assert rsqrt(99, 0, 100) == 1.0 and rsqrt(999, 0, 100) == 1.0  # warm-up, then flat to 10 warm-ups
    assert rsqrt(3999, 0, 100) == pytest.approx(0.5) and rsqrt(15_999, 0, 100) == pytest.approx(0.25)
    cosine = SCHEDULES["cosine"]
    assert cosine(5000, 10_000, 100) != cosine(5000, 20_000, 100)  # the cosine's does


def test_an_anneal_decays_each_fits_rate_linearly_to_its_floor():
    from genbench.models.train import ANNEAL_FLOOR, Anneal

    a = Anneal(2, "cpu")
    assert a.factor(10_000.0).tolist() == [1.0, 1.0]  # no decay before one is started
    a.start(1, step=100, length=200)
    f = lambda t: a.factor(float(t)).tolist()  # noqa: E731
    assert f(100) == [1.0, 1.0] and f(200)[1] == pytest.approx((1 + ANNEAL_FLOOR) / 2) and f(300)[1] == pytest.approx(ANNEAL_FLOOR)
    assert f(10_000) == [1.0, pytest.approx(ANNEAL_FLOOR)]


def test_a_plateau_verdict_anneals_the_fit_and_its_updates_shrink():
    """A monitor that asks for an anneal at step 100 (over 50 steps): the weights move far less over
    the last window (steps 150-200, each update at a twentieth of the rate; the net movement of a
    window is not a twentieth: unannealed steps partly cancel) than the same fit's without it."""
    from genbench import datasets
    from genbench.api import Monitor, Verdict
    from genbench.models.vae import VAE

    class AnnealAt100(Monitor):
        def __init__(self, anneal):
            self.anneal = anneal

        def due(self, step):
            return True

        def evaluate(self, step, sample, train_s=None):
            sample(10, 0)
            return Verdict(best=False, stop=False, anneal=50 if (self.anneal and step == 100) else 0)

    data = datasets.get("ring8").sample(4000, [0, 0])
    moved = {}
    for anneal in (False, True):
        model = VAE(budget="converged", params={"train_steps": "200"})
        snapshots = []
        orig = model.sample_now
        model.sample_now = lambda n, seed: (snapshots.append(model.net.dec[0].weight.detach().clone()), orig(n, seed))[1]
        model.fit(data, seed=0, monitor=AnnealAt100(anneal))
        moved[anneal] = (snapshots[-1] - snapshots[-2]).abs().mean().item()  # the last window's movement
    assert moved[True] < 0.5 * moved[False]


def test_per_member_products_are_the_broadcast_products_to_the_bit():
    """``PerMember`` multiplies stacked tensors by one value per member through one flat buffer: the
    same products as a broadcast multiply per tensor (the stacked step's clipping and member rates)."""
    from genbench.models.train import PerMember

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, *shape, generator=g) for shape in ((5,), (4, 6), (2, 1, 3))]
    values = torch.rand(3, generator=g) * 7
    expected = [t * values.reshape(-1, *[1] * (t.dim() - 1)) for t in tensors]
    spread = PerMember(tensors, 3)
    spread.mul_(tensors, values)
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)
    spread.mul_(tensors, torch.zeros(3))  # the buffer is refilled on every call
    assert all(not t.any() for t in tensors)


def test_members_side_by_side_each_train_at_their_own_beta1():
    """The GAN's Adam beta1 is a member field (tuning trials that differ in it share a stacked fit,
    ``MemberAdam``): each member's losses and weights are its solo fit's (torch's fused Adam) at its
    own beta1 and learning rate; at one beta1 the group keeps torch's Adam. (Ten steps: further on,
    a gradient within rounding of 0 can flip its sign between the two, and Adam's normalised update
    turns that into a step of the rate's size at beta1 = 0.)"""
    from genbench import datasets
    from genbench.models.gan import GAN
    from genbench.models.train import MemberAdam

    tiny = {"g_hidden": "16", "g_depth": "2", "d_hidden": "16", "d_depth": "2", "batch": "64", "train_steps": "10"}
    data = [datasets.get("ring8").sample(4000, [s, 0]) for s in (0, 1, 2)]
    params = [tiny | {"beta1": "0.0"}, tiny | {"beta1": "0.5", "lr": "1e-3"}, tiny | {"beta1": "0.8"}]
    group = [GAN(budget="quick", params=p) for p in params]
    made = []
    init = MemberAdam.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MemberAdam, "__init__", lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
        infos = GAN.fit_side_by_side(group, data, device="cpu", seeds=[0, 1, 2])
    assert made == [1]
    for member, info, d, seed, p in zip(group, infos, data, (0, 1, 2), params):
        solo = GAN(budget="quick", params=p)
        alone = solo.fit(d, seed=seed)
        assert info.losses == pytest.approx(alone.losses, rel=1e-4)
        for (name, a), b in zip(member.net.state_dict().items(), solo.net.state_dict().values()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    same = [GAN(budget="quick", params=tiny | {"beta1": "0.5"}) for _ in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MemberAdam, "__init__", lambda *a, **k: pytest.fail("one beta1: torch's Adam"))
        GAN.fit_side_by_side(same, data[:2], device="cpu", seeds=[0, 1])


@pytest.mark.parametrize("steps,first,phase,stop_at", [(1000, 0, None, None), (1234, 0, None, 600), (1000, 350, None, None),
                                                       (1000, 0, lambda k: k // 130, None), (90, 0, None, None)])
def test_the_captured_loop_makes_the_same_steps_and_windows_a_window_a_replay(monkeypatch, steps, first, phase, stop_at):
    """``_replay_segments`` with the CUDA calls faked (a capture records its function, a replay runs it):
    a window a replay runs every step once and reads every logged window at the same step as one step
    a replay does, from a resumed step and across phases too, and stops at the same window."""
    import contextlib

    from genbench.models import graphs, train

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self, fn):
            self.fn, self.replays = fn, 0

        def replay(self):
            self.replays += 1
            self.fn()

    graphs_made = []

    def capture(fn, generators=()):
        graphs_made.append(Graph(fn))
        return graphs_made[-1]

    monkeypatch.setattr(graphs, "capture_step", capture)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())

    def run(window: bool):
        monkeypatch.setattr(train, "WINDOW_REPLAY", window)
        graphs_made.clear()
        made = [first]  # the device's step counter: one_step advances it, whatever Python k it was given
        log = type("Log", (), {"log_every": 50, "stop": False})()
        logged, read = [first], []

        def one_step(k):
            made[0] += 1

        def log_upto(k):  # _fit_graphed's: a window read where it ends
            assert made[0] == k  # the steps made so far are the ones the loop says
            if k - logged[0] == log.log_every or k == steps:
                read.append(k)
                logged[0] = k
                log.stop = stop_at is not None and k >= stop_at
            return log.stop

        opt = type("Opt", (), {"zero_grad": lambda self, set_to_none=True: None})()
        train._replay_segments(Stream(), steps, first, phase, opt, one_step, log_upto, log, (),
                               window_start=lambda k: k == logged[0])
        return made[0], read, sum(g.replays for g in graphs_made)

    step_by_step, windowed = run(False), run(True)
    assert windowed[:2] == step_by_step[:2]
    end = steps if stop_at is None else -(-stop_at // 50) * 50
    assert step_by_step[0] == end and step_by_step[1][-1] == end
    if steps - first >= 200 and phase is None:
        assert windowed[2] < step_by_step[2] / 10  # far fewer replays
