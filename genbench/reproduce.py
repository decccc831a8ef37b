"""Published tables that ``genbench reproduce`` re-runs, with the publication's own figures beside
them (they name the models they compare: the one place outside the models and the registry's
alias table that does)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Headline:
    """A published comparison that ``genbench reproduce`` re-runs: the models with their step counts,
    the (model, steps) cell every sampling time is divided by, and the publication's own figures."""
    dataset: str
    n_samples: int
    steps: dict[str, list[int]]
    reference: tuple[str, int]
    published: dict[tuple[str, int], dict[str, float]]  # (model, steps) -> nfe, sample_s
    published_ratio: float
    source: str


#: the source report: diffusion (100 Euler steps) against consistency models (1 and 2 steps) on ring8; the
#: diffusion ladder below 100 steps is for the matched-quality comparison (fewest steps as good)
HEADLINE = Headline(
    dataset="ring8", n_samples=2000, steps={"diffusion": [1, 2, 5, 10, 20, 50, 100], "cm-cd": [1, 2], "cm-ct": [1, 2]},
    reference=("diffusion", 100),
    published={("diffusion", 100): {"nfe": 99, "sample_s": 1.14}, ("cm-cd", 1): {"nfe": 1, "sample_s": 0.018},
               ("cm-ct", 1): {"nfe": 1, "sample_s": 0.018}},
    published_ratio=65.0, source="~65x wall time and ~100x NFE (99 vs 1)")


@dataclass(frozen=True)
class PacGANTable:
    """PacGAN's Table 1 (Lin, Khetan, Fanti, Oh; NeurIPS 2018; code github.com/fjxmlzn/PacGAN,
    ``synthetic_data_experiments``): a GAN and PacGAN2/3/4 on its 2D ring and grid, 10 trials, mean
    +- standard error of the modes captured, the high-quality fraction and the reverse KL."""
    model: str
    packs: tuple[int, ...]
    datasets: dict[str, str]  # the paper's column group -> genbench's preset dataset
    seeds: int
    n_samples: int
    epochs: int
    examples_per_epoch: int
    #: the paper's settings as the model's config fields (its code's config.py and pacgan_task.py)
    params: dict[str, str]
    #: (pack, column group) -> {"modes" | "hq" | "rkl": (mean, standard error)}, hq as a fraction
    published: dict[tuple[int, str], dict[str, tuple[float, float]]]
    source: str

    def steps(self, epochs: int | None = None) -> int:
        """Training steps of ``epochs`` passes over the paper's training set (one batch a step)."""
        return (self.epochs if epochs is None else epochs) * self.examples_per_epoch // int(self.params["batch"])

    def label(self, pack: int) -> str:
        return "GAN" if pack == 1 else f"PacGAN{pack}"


def _t(modes, hq, rkl):
    return {"modes": modes, "hq": (hq[0] / 100, hq[1] / 100), "rkl": rkl}


PACGAN = PacGANTable(
    model="gan", packs=(1, 2, 3, 4), datasets={"ring": "pacgan-ring", "grid": "pacgan-grid"}, seeds=10,
    n_samples=2500, epochs=400, examples_per_epoch=100_000,
    params={"latent": "2", "g_hidden": "400", "g_depth": "4", "d_hidden": "200", "d_depth": "3", "maxout": "5",
            "init_std": "0.02", "bn_momentum": "0.05", "lr": "1e-4", "beta1": "0.8", "beta2": "0.999",
            "batch": "100", "warmup": "1", "schedule": "constant", "clip": "0", "standardize": "false"},
    published={
        (1, "ring"): _t((6.3, 0.5), (98.2, 0.2), (0.45, 0.09)), (1, "grid"): _t((17.3, 0.8), (94.8, 0.7), (0.70, 0.07)),
        (2, "ring"): _t((7.9, 0.1), (95.6, 2.0), (0.07, 0.03)), (2, "grid"): _t((23.8, 0.7), (91.3, 0.8), (0.13, 0.04)),
        (3, "ring"): _t((7.8, 0.1), (97.7, 0.3), (0.10, 0.02)), (3, "grid"): _t((24.6, 0.4), (94.2, 0.4), (0.06, 0.02)),
        (4, "ring"): _t((7.8, 0.1), (95.9, 1.4), (0.07, 0.02)), (4, "grid"): _t((24.8, 0.2), (93.6, 0.6), (0.04, 0.01)),
    },
    source="Lin et al. 2018, Table 1 (results/Table1.png of its code)")
