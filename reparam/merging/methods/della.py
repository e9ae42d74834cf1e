"""DELLA (Deep et al. 2024): MAGPRUNE drops delta entries with keep probabilities that grow with their
magnitude rank (from density - epsilon for the smallest to density + epsilon for the largest, per row),
rescales survivors, then TIES sign election + disjoint merge (``della``) or a weighted sum (``della_linear``).

mergekit names and defaults: global ``normalize`` (true for ``della``, false for ``della_linear``),
``rescale`` (true), ``lambda`` (1.0), ``int8_mask`` (ignored); per model ``weight``, ``density`` (1.0) and
``epsilon`` (0.15). Rows are the last dimension (a 1-D tensor is one row; a row of length 1 has rank 1);
mergekit ranks along dim 1, which differs only for tensors with more than two dimensions.

Differences from mergekit: default ``rescale_mode`` ``inverse_keep`` divides each survivor by its own keep
probability (the DELLA authors' rule, E[output] = delta); current mergekit matches the L1 norm instead
(``rescale_mode: l1``). Masks are seeded per (seed, model, tensor) as in DARE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..params import check_range
from ..sparsify import magprune
from .base import MethodSpec
from .dare import DareParams
from .gta import random_sparsified_kernel


@dataclass
class DellaParams(DareParams):
    """DARE's global parameters; mergekit normalises DELLA-TIES by default."""

    normalize: bool = True


@dataclass
class DellaLinearParams(DellaParams):
    normalize: bool = False


@dataclass
class DellaModelParams:
    weight: float = 1.0
    density: float = 1.0
    epsilon: float = 0.15

    def __post_init__(self):
        check_range("density", self.density, 0.0, 1.0)
        check_range("epsilon", self.epsilon, 0.0, 1.0)
        if 0 < self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(f"epsilon must keep density - epsilon > 0 and density + epsilon < 1 "
                             f"(density={self.density}, epsilon={self.epsilon})")


def _kernel(consensus: bool):
    return random_sparsified_kernel(
        lambda delta, m, p, gen: magprune(delta, m.density, m.epsilon, gen, p.rescale_mode if p.rescale else "none"),
        consensus)


SPEC = MethodSpec("della", DellaParams, DellaModelParams, _kernel(True), randomized=True, casts_inputs=True,
                  description="magnitude-ranked random drop, sign election, disjoint mean")
SPEC_LINEAR = MethodSpec("della_linear", DellaLinearParams, DellaModelParams, _kernel(False), randomized=True,
                         casts_inputs=True,
                         description="magnitude-ranked random drop, then weighted sum")


def della_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
                density: float | Sequence[float], epsilon: float | Sequence[float] = 0.15,
                weights: Sequence[float] | None = None, linear: bool = False, lambda_: float = 1.0,
                seed: int = 0, **options) -> dict[str, torch.Tensor]:
    from ..engine import merge_state_dicts
    return merge_state_dicts("della_linear" if linear else "della", base, models, {"lambda": lambda_},
                             {"weight": weights, "density": density, "epsilon": epsilon}, seed=seed, **options)
