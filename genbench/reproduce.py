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
