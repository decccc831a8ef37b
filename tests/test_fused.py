"""The fused step arithmetic that the CUDA-graph path captures, checked on the CPU (CI has no GPU):
the same samples as the module's own eager loop."""
import pytest
import torch

from genbench import datasets
from genbench.models.consistency import ConsistencyTraining
from genbench.models.diffusion import Diffusion

DATA = datasets.RING8.sample(5000, [0, 0])


@pytest.mark.parametrize("sampler,all_steps", [("euler", (1, 7, 100)), ("heun", (1, 2, 7, 50))])
def test_fused_pf_ode_equals_eager_loop(sampler, all_steps):
    m = Diffusion(budget="quick", params={"train_steps": "50", "sampler": sampler})
    m.fit(DATA, seed=0)
    for steps in all_steps:
        x = m.prior(500, seed=1)
        eager = m.sample(500, steps=steps, seed=1)
        loop = m._fused(m.grid(steps), sampler)
        assert len(loop.fused.a) == m.nfe(steps)  # one fused step per network evaluation
        fused = loop(x)
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
        assert torch.equal(x, m.prior(500, seed=1))  # the caller's tensor is not overwritten


def test_fused_step_requires_x0_exactly_where_g_is_set():
    m = Diffusion(budget="quick", params={"train_steps": "1"})
    m.fit(DATA, seed=0)
    fs = m._fused(m.grid(3), "heun").fused
    x = m.prior(10, seed=0)
    with pytest.raises(ValueError, match="pass x0"):
        fs(x, 1)  # a corrector step
    with pytest.raises(ValueError, match="pass x0"):
        fs(x, 0, x0=x)  # an Euler step


def test_fused_consistency_multistep_equals_eager_loop():
    m = ConsistencyTraining(budget="quick", params={"train_steps": "50"})
    m.fit(DATA, seed=0)
    for steps in (1, 2, 4):
        noise = torch.randn(steps, 500, 2, generator=torch.Generator().manual_seed(2))
        eager = m.sample(500, steps=steps, seed=2)
        fused = m._fused(*m.levels(steps))(noise.clone())
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
