import numpy as np
import pytest
import torch

from genbench import datasets
from genbench.models.diffusion import Diffusion, pf_ode, time_grid
from genbench.runner import NFECounter


@pytest.fixture(scope="module")
def model():
    m = Diffusion(budget="quick")
    info = m.fit(datasets.RING8.sample(20000, [0, 0]), seed=0)
    m.info = info
    return m


def test_dsm_loss_decreases(model):
    losses = model.info.losses
    assert len(losses) >= 5 and np.mean(losses[-2:]) < 0.85 * losses[0]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_nfe_counted_equals_declared(model, sampler, k):
    model.config.sampler = sampler
    try:
        with NFECounter(model.nfe_module) as c:
            x = model.sample(300, steps=k, seed=0)
        assert c.count == model.nfe(k) == (k if sampler == "euler" else 2 * k - 1)
        assert x.shape == (300, 2) and torch.isfinite(x).all()
    finally:
        model.config.sampler = "euler"


def test_time_grids():
    t = time_grid(10, 0.002, 80.0, "karras", 7.0)
    assert len(t) == 11 and t[0] == pytest.approx(80.0) and t[-1] == pytest.approx(0.002)
    assert (t[1:] < t[:-1]).all()
    i = 0.3
    expected = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. eq. 5
    assert time_grid(10, 0.002, 80.0)[3].item() == pytest.approx(expected, rel=1e-5)
    u = time_grid(4, 1.0, 5.0, "uniform")
    assert u.tolist() == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="unknown grid"):
        time_grid(4, 1.0, 5.0, "cosine")


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 40)])
@pytest.mark.parametrize("grid", ["karras", "uniform"])
def test_exact_score_gaussian_lands_on_mean_and_covariance(sampler, steps, grid):
    """Train-free: for Gaussian data N(mu, diag(s^2)) the ideal denoiser is analytic,
    D(x; t) = mu + s^2/(s^2 + t^2) (x - mu); the PF-ODE must carry N(0, T^2) onto the data."""
    mu = torch.tensor([1.0, -0.5])
    s2 = torch.tensor([0.3, 0.6]) ** 2
    T, eps = 80.0, 0.002
    if grid == "uniform":
        T, steps = 20.0, steps * 10  # a uniform grid needs many more steps near eps
    denoise = lambda x, t: mu + s2 / (s2 + t**2) * (x - mu)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = pf_ode(denoise, T * torch.randn(20000, 2, generator=g), time_grid(steps, eps, T, grid), sampler)
    assert x.mean(0).tolist() == pytest.approx(mu.tolist(), abs=0.03)
    cov = torch.cov(x.T)
    assert cov.diagonal().tolist() == pytest.approx(s2.tolist(), rel=0.04)
    assert abs(cov[0, 1].item()) < 0.01


def test_trajectory_and_checkpoint(model):
    x, traj = model.sample(50, steps=7, seed=3, trajectory=True)
    assert traj.shape == (8, 50, 2)
    assert torch.allclose(traj[-1], x) and torch.allclose(x, model.sample(50, steps=7, seed=3))
    clone = Diffusion(budget="quick")
    clone.load_state_dict(model.state_dict())
    assert torch.allclose(clone.sample(50, steps=7, seed=3), x)


def test_pf_ode_likelihood_of_the_exact_gaussian_denoiser_is_exact():
    """For Gaussian data N(mu, diag(s^2)) the PF-ODE from eps to T is the linear map
    x_T = mu + sqrt((s^2 + T^2)/(s^2 + eps^2)) (x - mu), so log p(x) = log N(x_T; 0, T^2 I) + log|det|."""
    import math

    from genbench.models.diffusion import pf_ode_log_prob

    mu, s2 = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 0.6]) ** 2
    T, eps = 20.0, 0.002
    denoise = lambda x, t: mu + s2 / (s2 + t**2) * (x - mu)  # noqa: E731
    x = mu + s2.sqrt() * torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    logp, calls = pf_ode_log_prob(denoise, x, eps, T)
    a = ((s2 + T**2) / (s2 + eps**2)).sqrt()
    x_T = mu + a * (x - mu)
    exact = -0.5 * (x_T**2).sum(1) / T**2 - 2 * math.log(T) - math.log(2 * math.pi) + a.log().sum()
    assert (logp - exact).abs().max() < 2e-4 and calls > 10


def test_diffusion_reports_a_finite_test_nll(model):
    out = model.evaluate(datasets.RING8.sample(300, [0, 2]))
    # ring8's true NLL (entropy) is about -1.07 nats; a quick model is worse but finite
    assert np.isfinite(out["nll"]) and out["nll"] > -1.2 and out["nll_nfe"] > 10


def test_fits_side_by_side_are_their_solo_fits():
    """Three members stacked into one network: each one's loss curve and samples are its solo fit's
    (the same seed streams and schedule; only the batched arithmetic's rounding may differ)."""
    from conftest import assert_members_are_solo_fits

    assert_members_are_solo_fits(Diffusion, {"train_steps": "200", "batch": "128"},
                                 lambda m: m.sample(500, steps=10, seed=4))