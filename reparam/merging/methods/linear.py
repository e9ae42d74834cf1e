"""Linear (weighted) average, "model soup": theta = sum_i w_i theta_i / sum_i w_i.

mergekit name ``linear``: global ``normalize`` (default true), per model ``weight``. No base model is used
(a ``base_model`` listed among ``models`` is an input like the others; one listed only as ``base_model`` just
provides non-float tensors and config files). Differences from mergekit: ``weight`` defaults to 1.0 instead of
being required; normalising with sum w_i = 0 is an error instead of silently dividing by 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .base import MethodSpec, TensorContext
from .task_arithmetic import WeightParams


@dataclass
class LinearParams:
    normalize: bool = True


def merge_tensor(base, tensors: Sequence[torch.Tensor], per_model: Sequence[WeightParams], params: LinearParams,
                 ctx: TensorContext) -> torch.Tensor:
    weights = [float(m.weight) for m in per_model]
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for w, t in zip(weights, tensors):
        if w == 1:  # a stored bf16 t (casts_inputs) is converted inside the addition: no float32 copy of t
            acc.add_(t)
        else:
            acc += w * t.float()
    if params.normalize:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ValueError(f"linear merge of {ctx.key!r}: weights sum to {total}; cannot normalise")
        acc /= total
    return acc


def check(params: LinearParams, per_model: Sequence[WeightParams], key: str) -> None:
    if params.normalize and abs(sum(float(m.weight) for m in per_model)) < 1e-8:
        raise ValueError(f"weights sum to 0 for tensor {key!r}; cannot normalise (set normalize: false)")


SPEC = MethodSpec("linear", LinearParams, WeightParams, merge_tensor, needs_base=False, check=check, casts_inputs=True,
                  description="weighted average of the models")


def linear_merge(models: Sequence[Mapping[str, torch.Tensor]], *, weights: Sequence[float] | None = None,
                 normalize: bool = True, **options) -> dict[str, torch.Tensor]:
    """Weighted average of in-memory state dicts."""
    from ..engine import merge_state_dicts
    return merge_state_dicts("linear", None, models, {"normalize": normalize}, {"weight": weights}, **options)
