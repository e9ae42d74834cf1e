"""DARE (Yu et al. 2024): drop each delta entry with probability 1 - density, rescale the survivors, then
merge linearly (``dare_linear``) or with TIES sign election and disjoint merge (``dare_ties``, no trim).

mergekit names and defaults: global ``normalize`` (false for both), ``rescale`` (true), ``lambda`` (1.0),
``int8_mask`` (ignored); per model ``weight`` and ``density`` (1.0 = no drop). ``rescale: false`` is the
paper's DropOnly.

Randomness: each mask comes from a generator seeded by (seed, model index, tensor name), so runs are
reproducible and a streaming run equals an in-memory run bit for bit. The seed is the config's top-level
``seed`` (default 0).

Differences from mergekit: the default ``rescale_mode`` is ``inverse_keep`` (multiply survivors by
1/density, the paper's rule, so E[output] = delta); current mergekit matches the L1 norm of the delta
instead: set ``rescale_mode: l1`` for that. Masks cannot match mergekit's (different random streams).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..params import check_choice
from ..fused import KEEP_RANDOM, KeepRule
from ..sparsify import RESCALE_MODES, bernoulli
from .base import MethodSpec
from .gta import random_sparsified_kernel
from .ties import DensityParams


@dataclass
class DareParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = True
    int8_mask: bool = False
    rescale_mode: str = "inverse_keep"
    consensus_method: str = "sum"

    def __post_init__(self):
        check_choice("rescale_mode", self.rescale_mode, RESCALE_MODES)
        check_choice("consensus_method", self.consensus_method, ("sum", "count"))


def dare(delta: torch.Tensor, density: float, gen, rescale: bool = True,
         rescale_mode: str = "inverse_keep") -> torch.Tensor:
    """Drop-and-rescale one float32 delta (density = 1 - drop rate p)."""
    return bernoulli(delta, density, gen, rescale_mode if rescale else "none")


def keep_rule(m: DensityParams, p: DareParams, gen) -> KeepRule | None:
    """dare() as a fused KeepRule (norm-matching rescales need the whole tensor: torch path)."""
    mode = p.rescale_mode if p.rescale else "none"
    if m.density >= 1:
        return KeepRule()
    if mode not in ("inverse_keep", "none"):
        return None
    return KeepRule(KEEP_RANDOM, prob=max(m.density, 0.0), stream=gen,
                    scale=m.density if mode == "inverse_keep" and m.density > 0 else 1.0)


def _kernel(consensus: bool):
    return random_sparsified_kernel(
        lambda delta, m, p, gen: dare(delta, m.density, gen, p.rescale, p.rescale_mode), consensus, keep_rule)


SPEC_LINEAR = MethodSpec("dare_linear", DareParams, DensityParams, _kernel(False), randomized=True, casts_inputs=True,
                         description="random drop and rescale, then task arithmetic")
SPEC_TIES = MethodSpec("dare_ties", DareParams, DensityParams, _kernel(True), randomized=True, casts_inputs=True,
                       description="random drop and rescale, then TIES sign election")


def dare_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
               density: float | Sequence[float], weights: Sequence[float] | None = None, ties: bool = False,
               lambda_: float = 1.0, normalize: bool = False, rescale: bool = True,
               rescale_mode: str = "inverse_keep", seed: int = 0, **options) -> dict[str, torch.Tensor]:
    """DARE-linear (or DARE-TIES with ``ties=True``) over in-memory state dicts."""
    from ..engine import merge_state_dicts
    params = {"lambda": lambda_, "normalize": normalize, "rescale": rescale, "rescale_mode": rescale_mode}
    return merge_state_dicts("dare_ties" if ties else "dare_linear", base, models, params,
                             {"weight": weights, "density": density}, seed=seed, **options)
