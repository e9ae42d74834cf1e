"""Model Breadcrumbs (Davari & Belilovsky 2023): per tensor, drop the `gamma` fraction of largest-magnitude
delta entries (outliers) and the smallest ones, keeping `density` of the entries, then task arithmetic
(``breadcrumbs``) or TIES sign election + disjoint merge (``breadcrumbs_ties``).

mergekit names and defaults: global ``normalize`` (false), ``rescale`` (false), ``lambda`` (1.0),
``int8_mask`` (ignored); per model ``weight``, ``density`` (1.0) and ``gamma`` (0.01).
Ties at the cut points are broken by index (mergekit's unstable sort leaves them unspecified). With
``rescale: true`` the default ``rescale_mode`` is ``l1`` as in mergekit.
When int(gamma * numel) == 0 (small tensors such as biases and norms with the default gamma) the
``density`` fraction is kept as the method intends; mergekit before 0.1.x dropped the whole delta there
(slice ``indices[n_bot:-0]``), mergekit 0.1.5 keeps it too (tests/merging/test_mergekit_parity.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..params import check_range
from ..sparsify import magnitude_outliers
from .base import MethodSpec, TensorContext
from .dare import DareParams
from .gta import gta_merge_tensor


@dataclass
class BreadcrumbsParams(DareParams):
    """DARE's global parameters; Breadcrumbs does not rescale by default (mergekit)."""

    rescale: bool = False
    rescale_mode: str = "l1"


@dataclass
class BreadcrumbsModelParams:
    weight: float = 1.0
    density: float = 1.0
    gamma: float = 0.01

    def __post_init__(self):
        check_range("density", self.density, 0.0, 1.0)
        check_range("gamma", self.gamma, 0.0, 1.0)


def _kernel(consensus: bool):
    def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     per_model: Sequence[BreadcrumbsModelParams], params: BreadcrumbsParams,
                     ctx: TensorContext) -> torch.Tensor:
        mode = params.rescale_mode if params.rescale else "none"

        def crumbs(delta: torch.Tensor, i: int) -> torch.Tensor:
            return magnitude_outliers(delta, per_model[i].density, per_model[i].gamma, mode)

        return gta_merge_tensor(base, tensors, [m.weight for m in per_model], crumbs,
                                params.consensus_method if consensus else None, params.normalize, params.lambda_)
    return merge_tensor


SPEC = MethodSpec("breadcrumbs", BreadcrumbsParams, BreadcrumbsModelParams, _kernel(False), casts_inputs=True,
                  description="drop outliers and small deltas, then task arithmetic")
SPEC_TIES = MethodSpec("breadcrumbs_ties", BreadcrumbsParams, BreadcrumbsModelParams, _kernel(True), casts_inputs=True,
                       description="drop outliers and small deltas, then TIES sign election")


def breadcrumbs_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
                      density: float | Sequence[float], gamma: float | Sequence[float] = 0.01,
                      weights: Sequence[float] | None = None, ties: bool = False, lambda_: float = 1.0,
                      normalize: bool = False, **options) -> dict[str, torch.Tensor]:
    from ..engine import merge_state_dicts
    return merge_state_dicts("breadcrumbs_ties" if ties else "breadcrumbs", base, models,
                             {"lambda": lambda_, "normalize": normalize},
                             {"weight": weights, "density": density, "gamma": gamma}, **options)
