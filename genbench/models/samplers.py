"""PF-ODE samplers as plain functions, each defined once (in the manner of k-diffusion's
``sampling.py``, written for this package).

Every sampler integrates ``dx/dt = (x - D(x; t)) / t`` along a decreasing time grid ``ts`` (a CPU
tensor ending at t_min > 0) and has the signature ``(denoise, x, ts, ts_device=None,
trajectory=None) -> x``; ``ts_device`` (its copy on x's device, shape [K + 1]) lets a loop run
without host transfers, so that it can be captured in a CUDA graph; every coefficient is a Python
float computed from the grid beforehand. ``SAMPLERS`` maps a name to the sampler and its network
evaluations per call for K steps.

- ``euler``: x' = lerp(D, x, t'/t), first order, K evaluations.
- ``heun``: Euler then the trapezoidal corrector (Karras et al. 2022, alg. 1), the last step
  Euler: 2K - 1 evaluations, second order.
- ``lms``: linear multistep (Adams-Bashforth on dx/dt, up to 4 past derivatives, the weights being
  the exact integrals of the Lagrange basis over each step): K evaluations.
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log time on the
  denoiser output, K evaluations. Its last step, down to t_min, is first order (the paper's
  "lower order final"): the grid's last step is the longest in log time, and extrapolating the
  denoiser over it overshot (baselines/README.md, "Samplers at low NFE").
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch


def euler_coefficients(t, t_next):
    """(a, b) of one Euler step of dx/dt = (x - d)/t from t to t': ``x + (t' - t)(x - d)/t = a x + b d``."""
    r = t_next / t
    return r, 1 - r


def heun_coefficients(t, t_next):
    """(a, b, c) of Heun's corrector, the mean of the slopes at (x, t) and at the Euler point
    (x_e, t'): ``x + (t' - t)/2 ((x - d)/t + (x_e - d_e)/t') = a x + b x_e + c d_e``, using
    ``(x - d)/t = (x_e - x)/(t' - t)``."""
    q = (t_next - t) / (2 * t_next)
    return 0.5, 0.5 + q, -q


def euler_step(x: torch.Tensor, d: torch.Tensor, t, t_next) -> torch.Tensor:
    """One Euler step (``euler_coefficients``), as one fused op: ``lerp(d, x, a)``."""
    return torch.lerp(d, x, euler_coefficients(t, t_next)[0])


def heun_correction(x: torch.Tensor, d: torch.Tensor, x_e: torch.Tensor, d_e: torch.Tensor, t, t_next) -> torch.Tensor:
    """Heun's corrector (``heun_coefficients``) from x, the Euler point x_e = euler_step(x, d) and
    the denoiser d_e there; d enters through x_e."""
    a, b, c = heun_coefficients(t, t_next)
    return a * x + b * x_e + c * d_e


def _grid(x: torch.Tensor, ts: torch.Tensor, ts_device: torch.Tensor | None):
    return ts.double().tolist(), (ts_device if ts_device is not None else ts.to(x.device)).reshape(-1, 1, 1)


def _keep(trajectory: list | None, x: torch.Tensor) -> None:
    if trajectory is not None:
        trajectory.append(x)


def euler(denoise, x, ts, ts_device=None, trajectory=None):
    t, tv = _grid(x, ts, ts_device)
    for i in range(len(t) - 1):
        x = euler_step(x, denoise(x, tv[i]), t[i], t[i + 1])
        _keep(trajectory, x)
    return x


def heun(denoise, x, ts, ts_device=None, trajectory=None):
    t, tv = _grid(x, ts, ts_device)
    for i in range(len(t) - 1):
        d = denoise(x, tv[i])
        x_e = euler_step(x, d, t[i], t[i + 1])
        x = x_e if i == len(t) - 2 else heun_correction(x, d, x_e, denoise(x_e, tv[i + 1]), t[i], t[i + 1])
        _keep(trajectory, x)
    return x


def lms_weights(t: list[float], i: int, order: int) -> list[float]:
    """The weights of the derivatives at t_i, t_{i-1}, ..., t_{i-order+1} in the step from t_i to
    t_{i+1}: the integral over that step of each node's Lagrange basis polynomial."""
    nodes = [t[i - k] for k in range(order)]
    out = []
    for j in range(order):
        basis = np.poly1d([1.0])
        for k in range(order):
            if k != j:
                basis *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
        integral = basis.integ()
        out.append(float(integral(t[i + 1]) - integral(t[i])))
    return out


def lms(denoise, x, ts, ts_device=None, trajectory=None, order: int = 4):
    t, tv = _grid(x, ts, ts_device)
    slopes: list[torch.Tensor] = []
    for i in range(len(t) - 1):
        slopes = [(x - denoise(x, tv[i])) / t[i], *slopes][:order]  # newest first
        x = x + sum(w * s for w, s in zip(lms_weights(t, i, len(slopes)), slopes))
        _keep(trajectory, x)
    return x


def dpmpp_2m(denoise, x, ts, ts_device=None, trajectory=None):
    t, tv = _grid(x, ts, ts_device)
    previous = None
    for i in range(len(t) - 1):
        d = denoise(x, tv[i])
        if previous is None or i == len(t) - 2:  # first order at the first and the last step (see above)
            target = d
        else:  # second order: the denoiser output extrapolated in lambda = -log t
            r = math.log(t[i - 1] / t[i]) / math.log(t[i] / t[i + 1])
            target = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * previous
        x = euler_step(x, target, t[i], t[i + 1])  # exact for a constant target: (t'/t) x + (1 - t'/t) target
        previous = d
        _keep(trajectory, x)
    return x


#: name -> (sampler, network evaluations per call for K steps)
SAMPLERS: dict[str, tuple[Callable, Callable[[int], int]]] = {
    "euler": (euler, lambda k: k),
    "heun": (heun, lambda k: 2 * k - 1),
    "lms": (lms, lambda k: k),
    "dpmpp_2m": (dpmpp_2m, lambda k: k),
}
#: the samplers whose step reads only the current state (no history): what ``FusedSteps`` folds and
#: what a distillation teacher's step can be
ONE_STEP = ("euler", "heun")
