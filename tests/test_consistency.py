import dataclasses
import math

import numpy as np
import pytest
import torch

from genbench import metrics
from genbench.models.consistency import (ConsistencyDistillation, ConsistencyFunction, ConsistencyTraining,
                                         ct_discretisation, lognormal_level_probs)
from genbench.models.diffusion import Diffusion, time_grid
from genbench.models.nets import EMA
from genbench.runner import NFECounter


def two_modes(n, seed):
    rng = np.random.default_rng(seed)
    x = np.stack([np.where(rng.random(n) < 0.5, -1.5, 1.5), np.zeros(n)], 1) + 0.1 * rng.normal(size=(n, 2))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def teacher_and_cd():
    data = two_modes(20000, 0)
    teacher = Diffusion(params={"train_steps": "800", "batch": "256"})
    teacher.fit(data, seed=0)
    untrained = ConsistencyDistillation(params={"train_steps": "1", "lr": "1e-12"})
    untrained.fit(data, seed=0, teacher=teacher)
    cd = ConsistencyDistillation(params={"train_steps": "2000", "batch": "256"})
    cd.fit(data, seed=0, teacher=teacher)
    return teacher, untrained, cd


@pytest.mark.parametrize("form", ["song", "linear"])
def test_boundary_condition_exact_untrained(form):
    f = ConsistencyFunction(64, 2, 32, eps=0.002, T=80.0, sd=0.5, form=form)
    x = torch.randn(100, 2) * 3
    assert torch.equal(f(x, torch.full((1, 1), 0.002)), x)
    assert not torch.allclose(f(x, torch.full((1, 1), 1.0)), x)


def test_boundary_condition_exact_trained(teacher_and_cd):
    _, _, cd = teacher_and_cd
    x = torch.randn(100, 2)
    for f in (cd.model, cd.ema.model):
        assert torch.equal(f(x, torch.full((1, 1), cd.config.sigma_min)), x)


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = EMA(a, 0.9)
    before = ema.model.weight.clone()
    ema.update(b)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * b.weight)
    ema.update(b, decay=0.0)
    assert torch.equal(ema.model.weight, b.weight)
    assert not ema.model.weight.requires_grad


def test_ct_curriculum_formula():
    K = 8000  # K' = floor(8000 / (log2(128) + 1)) = 1000
    assert [ct_discretisation(k, K) for k in (0, 999, 1000, 2999, 3000, 6999, 7000, 7999)] == \
        [11, 11, 21, 41, 81, 641, 1281, 1281]
    assert ct_discretisation(10**6, K) == 1281
    # a fixed stage length: the same curriculum under any budget
    assert [ct_discretisation(k, 60_000, stage=7500) for k in (0, 7499, 7500, 52_500)] == [11, 11, 21, 1281]
    assert all(ct_discretisation(k, 60_000, stage=7500) == ct_discretisation(k, 120_000, stage=7500)
               for k in range(0, 120_000, 500))


def test_lognormal_level_probs_formula():
    s = time_grid(10, 0.002, 80.0).flip(0)
    p = lognormal_level_probs(s, -1.1, 2.0)
    assert p.shape == (10,) and p.sum().item() == pytest.approx(1.0, abs=1e-6)
    i = 4
    cdf = lambda v: 0.5 * (1 + math.erf((math.log(v) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    norm = cdf(s[-1].item()) - cdf(s[0].item())
    assert p[i].item() == pytest.approx((cdf(s[i + 1].item()) - cdf(s[i].item())) / norm, rel=1e-4)


class _Recorder(torch.nn.Module):
    """Stands in for f: returns zeros and records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.clone(), float(t)))
        return torch.zeros_like(x)


def test_multistep_noise_scale(teacher_and_cd):
    _, _, cd = teacher_and_cd
    real = cd.ema.model
    cd.ema.model = rec = _Recorder()
    try:
        cd.config.tau_max = 0.5
        cd.sample(100000, steps=3, seed=0)
    finally:
        cd.ema.model, cd.config.tau_max = real, 0.1
    eps = cd.config.sigma_min
    taus = [t for _, t in rec.calls]
    assert taus[0] == pytest.approx(cd.config.sigma_max) and taus[1] == pytest.approx(0.5)
    assert taus == sorted(taus, reverse=True) and len(taus) == 3
    for x, tau in rec.calls[1:]:  # f returned 0, so its next input is pure re-noising
        assert x.std().item() == pytest.approx(math.sqrt(tau**2 - eps**2), rel=0.01)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_nfe_counted_equals_declared(teacher_and_cd, k):
    _, _, cd = teacher_and_cd
    with NFECounter(cd.nfe_module) as c:
        cd.sample(200, steps=k, seed=0)
    assert c.count == cd.nfe(k) == k


def test_cd_converges_toward_the_teachers_samples(teacher_and_cd):
    teacher, untrained, cd = teacher_and_cd
    ref = teacher.sample(1000, steps=50, seed=1).numpy()
    before = metrics.w2(untrained.sample(1000, seed=2).numpy(), ref)
    after = metrics.w2(cd.sample(1000, seed=2).numpy(), ref)
    assert before > 0.8  # the teacher-initialised student maps x_T to the data mean
    assert after < 0.35 * before


def test_ct_trains_and_counts():
    ct = ConsistencyTraining(budget="quick")
    info = ct.fit(two_modes(5000, 1), seed=0)
    assert math.isfinite(info.final_loss) and info.steps == 300
    with NFECounter(ct.nfe_module) as c:
        x = ct.sample(100, steps=2, seed=0)
    assert c.count == 2 and torch.isfinite(x).all()


def test_cd_takes_its_teachers_shape_without_changing_its_config():
    """init_from_teacher: the student's network has the teacher's shape and starts from its weights;
    the config stays as given, and a checkpoint restores the same model."""
    data = two_modes(2000, 0)
    teacher = Diffusion(params={"train_steps": "30", "hidden": "32", "depth": "2"})
    teacher.fit(data, seed=0)
    cd = ConsistencyDistillation(params={"train_steps": "1", "lr": "1e-12"})
    before = dataclasses.replace(cd.config)
    cd.fit(data, seed=0, teacher=teacher)
    assert cd.config == before and cd.config.hidden == 96
    assert (cd.model.net.hidden, cd.model.net.depth) == (32, 2)
    w = teacher.pf_ode_denoiser().net.point.weight
    assert torch.allclose(cd.ema.model.net.point.weight, w, atol=1e-6)
    again = ConsistencyDistillation()
    again.load_state_dict(cd.state_dict())
    assert torch.equal(again.sample(50, steps=2, seed=3), cd.sample(50, steps=2, seed=3))


def test_cd_refuses_a_teacher_without_a_pf_ode():
    from genbench.models.vae import VAE

    with pytest.raises(ValueError, match="provides pf_ode_denoiser"):
        ConsistencyDistillation().fit(two_modes(100, 0), teacher=VAE())


@pytest.mark.slow
def test_cd_distils_an_exact_pf_ode_teacher_of_another_class(plugin_path, monkeypatch):
    """The teacher protocol: a plugin teacher with the exact denoiser of a Gaussian (not the built-in
    diffusion) is distilled from scratch to a one-step sampler of that Gaussian."""
    monkeypatch.syspath_prepend(str(plugin_path))
    import toyplug

    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.8], [0.8, 0.5]])
    data = (rng.standard_normal((4000, 2)) @ np.linalg.cholesky(cov).T + [1.0, -2.0]).astype(np.float32)
    teacher = toyplug.GaussTeacher()
    teacher.fit(data)
    cd = toyplug.GaussCD(params={"train_steps": "2500"})
    cd.fit(data, seed=0, teacher=teacher)
    x = cd.sample(20000, steps=1, seed=1).numpy()
    got = np.cov(x.T)
    assert np.abs(x.mean(0) - [1.0, -2.0]).max() < 0.05
    assert np.corrcoef(x.T)[0, 1] == pytest.approx(0.8 / math.sqrt(2 * 0.5), abs=0.05)
    assert 0.35 < np.trace(got) / np.trace(cov) < 1.1  # from scratch, the variance is recovered last


def test_ct_fits_side_by_side_are_their_solo_fits():
    """iCT stacked over three members, its curriculum's 8 phases included: each member's loss curve
    and samples are its solo fit's."""
    from conftest import assert_members_are_solo_fits

    params = {"train_steps": "160", "batch": "128"}
    assert len({ConsistencyTraining(params=params).phase(k) for k in range(160)}) == 8
    assert_members_are_solo_fits(ConsistencyTraining, params, lambda m: m.sample(500, steps=2, seed=4))

def test_cd_fits_side_by_side_are_their_solo_fits():
    """Consistency distillation stacked over three members, each distilling its own teacher (the
    teachers' denoisers stacked, frozen), with its target network and EMA: each member's loss curve
    and samples are its solo fit's."""
    from genbench import datasets

    seeds = [0, 1, 2]
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in zip(("ring8", "moons", "grid25"), seeds)]
    teachers = []
    for data, seed in zip(datas, seeds):
        t = Diffusion(params={"train_steps": "60", "batch": "128"})
        t.fit(data, seed=seed)
        teachers.append(t)
    params = {"train_steps": "120", "batch": "128", "teacher_solver": "heun"}
    group = [ConsistencyDistillation(params=params) for _ in seeds]
    infos = ConsistencyDistillation.fit_side_by_side(group, datas, device="cpu", seeds=seeds, teachers=teachers)
    for member, info, data, seed, teacher in zip(group, infos, datas, seeds, teachers):
        solo = ConsistencyDistillation(params=params)
        alone = solo.fit(data, seed=seed, teacher=teacher)
        np.testing.assert_allclose(info.losses, alone.losses, rtol=1e-4)
        torch.testing.assert_close(member.sample(500, steps=2, seed=4), solo.sample(500, steps=2, seed=4),
                                   rtol=1e-4, atol=1e-4)


def test_cd_members_side_by_side_each_move_their_target_at_their_own_decay(teacher_and_cd):
    """The target network's decay is a member field of cm-cd (tuning trials that differ in it share a
    stacked fit): each member's losses are its solo fit's, a decay of 0 (the online net's
    stop-gradient) among them."""
    teacher = teacher_and_cd[0]
    data = two_modes(4000, 1)
    params = [{"train_steps": "30", "target_decay": "0.0"}, {"train_steps": "30", "target_decay": "0.95", "lr": "3e-3"}]
    group = [ConsistencyDistillation(budget="quick", params=p) for p in params]
    infos = ConsistencyDistillation.fit_side_by_side(group, [data, data], device="cpu", seeds=[0, 1],
                                                     teachers=[teacher, teacher])
    for info, seed, p in zip(infos, (0, 1), params):
        alone = ConsistencyDistillation(budget="quick", params=p).fit(data, seed=seed, teacher=teacher)
        assert info.losses == pytest.approx(alone.losses, rel=1e-4)
    assert infos[0].losses != pytest.approx(infos[1].losses, rel=1e-3)
