"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0).

mergekit name ``task_arithmetic``; global parameters ``normalize`` (default false: divide by sum w_i),
``lambda`` (1.0), ``rescale`` and ``int8_mask`` (accepted, no effect); per model ``weight``.
Negation is a negative weight. Difference from mergekit: ``weight`` defaults to 1.0 instead of being
required.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..fused import KeepRule
from .base import MethodSpec, TensorContext
from .gta import gta_merge_tensor


@dataclass
class TaskArithmeticParams:
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = False
    int8_mask: bool = False


@dataclass
class WeightParams:
    weight: float = 1.0


def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], per_model: Sequence[WeightParams],
                 params: TaskArithmeticParams, ctx: TensorContext) -> torch.Tensor:
    return gta_merge_tensor(base, tensors, [m.weight for m in per_model], None, None, params.normalize,
                            params.lambda_, lambda _base, models: [KeepRule()] * len(models), ctx.out_dtype)


SPEC = MethodSpec("task_arithmetic", TaskArithmeticParams, WeightParams, merge_tensor, casts_inputs=True,
                  description="theta_0 + lambda * sum_i w_i tau_i")


def task_arithmetic(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
                    weights: Sequence[float] | None = None, lambda_: float = 1.0, normalize: bool = False,
                    **options) -> dict[str, torch.Tensor]:
    """Task arithmetic over in-memory state dicts (see :func:`reparam.merging.merge_state_dicts`)."""
    from ..engine import merge_state_dicts
    return merge_state_dicts("task_arithmetic", base, models, {"lambda": lambda_, "normalize": normalize},
                             {"weight": weights}, **options)
