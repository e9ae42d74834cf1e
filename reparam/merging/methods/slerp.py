"""SLERP: spherical linear interpolation between the base model (t = 0) and one other model (t = 1),
each tensor treated as one flattened vector.

mergekit name ``slerp``: global parameter ``t`` (required; a gradient list or ``{filter, value}`` list to
vary it by layer and tensor name). Exactly two models: ``base_model`` and one other.
Falls back to linear interpolation when the normalised vectors are (anti)parallel (|dot| > 0.9995).
Difference from mergekit: computed in float64 (mergekit: float32), then cast; results agree within
two float32 ulps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .base import MethodSpec, TensorContext

DOT_THRESHOLD = 0.9995


@dataclass
class SlerpParams:
    t: float | None = None

    def __post_init__(self):
        if self.t is None:
            raise ValueError("parameter 't' is required (0 = base model, 1 = the other model)")
        if not isinstance(self.t, (int, float)) or isinstance(self.t, bool):
            raise ValueError(f"t must be a number, got {self.t!r}")


@dataclass
class NoModelParams:
    pass


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Slerp between two tensors of the same shape; returns float32."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum())
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(max(-1.0, min(1.0, dot)))
        s = math.sin(theta)
        out = (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b
    return out.reshape(v0.shape).float()


def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], per_model, params: SlerpParams,
                 ctx: TensorContext) -> torch.Tensor:
    return slerp(float(params.t), base, tensors[0])


SPEC = MethodSpec("slerp", SlerpParams, NoModelParams, merge_tensor, min_models=1, max_models=1,
                  order_matters=True, description="spherical interpolation between base_model and one model")


def slerp_merge(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], t: float,
                **options) -> dict[str, torch.Tensor]:
    from ..engine import merge_state_dicts
    return merge_state_dicts("slerp", base, [other], {"t": t}, {}, **options)
