"""The fused step arithmetic that the CUDA-graph path captures, checked on the CPU (CI has no GPU):
the same samples as the module's own eager loop."""
import torch

from genbench import datasets
from genbench.models.consistency import ConsistencyTraining
from genbench.models.diffusion import Diffusion

DATA = datasets.RING8.sample(5000, [0, 0])


def test_fused_euler_equals_eager_loop():
    m = Diffusion(budget="quick", params={"train_steps": "50"})
    m.fit(DATA, seed=0)
    for steps in (1, 7, 100):
        x = m.prior(500, seed=1)
        eager = m.sample(500, steps=steps, seed=1)
        fused = m._fused_euler(m.grid(steps))(x)
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
        assert torch.equal(x, m.prior(500, seed=1))  # the caller's tensor is not overwritten


def test_fused_consistency_multistep_equals_eager_loop():
    m = ConsistencyTraining(budget="quick", params={"train_steps": "50"})
    m.fit(DATA, seed=0)
    c = m.config
    for steps in (1, 2, 4):
        noise = torch.randn(steps, 500, 2, generator=torch.Generator().manual_seed(2))
        taus = m.taus(steps)
        scales = [c.sigma_max] + [(tau**2 - c.sigma_min**2) ** 0.5 for tau in taus]
        eager = m.sample(500, steps=steps, seed=2)
        fused = m._fused(scales, [c.sigma_max, *taus])(noise.clone())
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
