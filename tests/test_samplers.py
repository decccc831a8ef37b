"""The PF-ODE samplers against a known answer: for Gaussian data N(mu, s^2 I) the denoiser is
exact, D(x; t) = mu + s^2 / (s^2 + t^2) (x - mu), and the PF-ODE path from x_T is
x(t) = mu + (x_T - mu) sqrt(s^2 + t^2) / sqrt(s^2 + T^2)."""
import pytest
import torch

from genbench.models.diffusion import time_grid
from genbench.models.samplers import SAMPLERS, lms_weights

MU, S, T, T_MIN = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, 20.0, 0.002


class Counted:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return MU + S**2 / (S**2 + t**2) * (x - MU)


def error(name: str, steps: int) -> tuple[float, int]:
    x_T = T * torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + (x_T - MU) * ((S**2 + T_MIN**2) / (S**2 + T**2)) ** 0.5
    ts = time_grid(steps, T_MIN, T).double()
    D = Counted()
    x = SAMPLERS[name][0](D, x_T, ts, ts_device=ts)
    return float((x - exact).norm(dim=1).max()), D.calls


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_converges_with_its_declared_evaluations(name):
    errs = []
    for k in (8, 16, 32):
        e, calls = error(name, k)
        assert calls == SAMPLERS[name][1](k)
        errs.append(e)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.15, errs  # paths start at |x_T| ~ 20


def test_higher_order_samplers_beat_euler_at_equal_steps():
    """At 16 steps: every second-order or multistep method is far closer to the exact path than
    Euler, and DPM-Solver++(2M) and LMS converge faster than first order when the steps double."""
    e = {name: [error(name, k)[0] for k in (16, 32)] for name in SAMPLERS}
    for name in ("heun", "lms", "dpmpp_2m"):
        assert e[name][0] < e["euler"][0] / 2.5, e
    assert e["euler"][0] / e["euler"][1] < 2.6  # first order: about 2x per doubling
    for name in ("dpmpp_2m", "lms"):
        assert e[name][0] / e[name][1] > 3.0, e  # at least second order


def test_lms_weights_integrate_polynomials_exactly():
    """The weights of ``order`` nodes integrate every polynomial of degree < order exactly over the step."""
    t = [5.0, 3.0, 2.0, 1.2, 0.7]
    for order in (1, 2, 3, 4):
        w = lms_weights(t, 3, order)
        nodes = [t[3 - k] for k in range(order)]
        for degree in range(order):
            exact = (t[4] ** (degree + 1) - t[3] ** (degree + 1)) / (degree + 1)
            assert abs(sum(wi * n**degree for wi, n in zip(w, nodes)) - exact) < 1e-9, (order, degree)
