"""TIES-merging (Yadav et al. 2023): trim each delta to its largest-magnitude fraction `density`, elect a
sign per coordinate, average the agreeing entries, scale by lambda, add to the base.

mergekit name ``ties``: global ``normalize`` (default true: disjoint *weighted mean*; false: disjoint sum),
``lambda`` (1.0), ``rescale`` (false), ``int8_mask`` (ignored); per model ``weight`` and ``density`` (1.0).
Sign election as mergekit: gamma = +1 where sum_i w_i trim(tau_i) >= 0, else -1.

Extensions (reparam names, not in mergekit):
* ``scope``: ``tensor`` (default, mergekit/PEFT) trims inside each tensor; ``global`` trims with one
  magnitude threshold per model over all merged tensors (the TIES paper/reference code), computed by an
  extra statistics pass (exact, histogram based, see :mod:`reparam.merging.threshold`). Global scope needs a
  scalar density per model.
* ``topk_mode``: ``exact`` (default) keeps floor(density*d) entries (ties broken by lower index; mergekit
  uses an unstable argsort, so only tied magnitudes can differ; mergekit 0.1.5 also keeps one entry when
  density*d < 1, where the spec's count is 0); ``threshold`` keeps |tau| >= the (d-n)-th smallest, the
  reference code's rule (one more entry).
* ``consensus_method``: ``sum`` (default) or ``count`` (sign of the sum of signs).
* ``rescale_mode`` when ``rescale`` is true: ``l1`` (default, current mergekit), ``l2``, ``linf``,
  ``inverse_keep`` (1/density, older mergekit).

Not implemented: the reference code's fallback for an exactly-zero sign sum (majority of gamma over the
model): zero sums elect +1 as in mergekit; the dis-max aggregation; PEFT's unweighted election.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..fused import KEEP_MAGNITUDE, KeepRule, magnitude_thresholds
from ..params import check_choice, check_range
from ..sparsify import RESCALE_MODES, magnitude
from .base import MethodSpec, TensorContext
from .gta import gta_merge_tensor


@dataclass
class TiesParams:
    normalize: bool = True
    lambda_: float = 1.0
    rescale: bool = False
    int8_mask: bool = False
    scope: str = "tensor"
    topk_mode: str = "exact"
    consensus_method: str = "sum"
    rescale_mode: str = "l1"

    def __post_init__(self):
        check_choice("scope", self.scope, ("tensor", "global"))
        check_choice("topk_mode", self.topk_mode, ("exact", "threshold"))
        check_choice("consensus_method", self.consensus_method, ("sum", "count"))
        check_choice("rescale_mode", self.rescale_mode, RESCALE_MODES)


@dataclass
class DensityParams:
    weight: float = 1.0
    density: float = 1.0

    def __post_init__(self):
        check_range("density", self.density, 0.0, 1.0)


def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], per_model: Sequence[DensityParams],
                 params: TiesParams, ctx: TensorContext) -> torch.Tensor:
    mode = params.rescale_mode if params.rescale else "none"

    def trim(delta: torch.Tensor, i: int) -> torch.Tensor:
        thr = ctx.thresholds[i] if (params.scope == "global" and ctx.thresholds is not None) else None
        if params.scope == "global" and thr is None:
            return delta  # density >= 1 for this model: nothing trimmed
        return magnitude(delta, per_model[i].density, threshold=thr, topk_mode=params.topk_mode,
                         rescale_mode=mode, inplace=True)  # the delta is gta_merge_tensor's own copy

    def rules(base_array, model_arrays):
        if params.rescale:
            return None  # norm matching needs the whole trimmed tensor: torch path
        found, to_trim = [], {}
        for i, x in enumerate(model_arrays):
            if params.scope == "global":
                thr = ctx.thresholds[i] if ctx.thresholds is not None else None
                found.append(KeepRule() if thr is None else KeepRule(KEEP_MAGNITUDE, thr, x.size))
                continue
            keep = int(per_model[i].density * x.size)
            if per_model[i].density >= 1 or (params.topk_mode == "threshold" and keep >= x.size):
                found.append(KeepRule())
            elif keep <= 0 and params.topk_mode == "exact":
                found.append(KeepRule(KEEP_MAGNITUDE, float("inf"), 0))
            else:
                to_trim[i] = keep
                found.append(None)
        if to_trim:  # one sweep finds every model's threshold
            at = magnitude_thresholds(tuple(model_arrays[i] for i in to_trim), base_array, list(to_trim.values()),
                                      params.topk_mode)
            if at is None:
                return None  # inf / NaN deltas: torch path
            for i, (t, cut) in zip(to_trim, at):
                found[i] = KeepRule(KEEP_MAGNITUDE, t, cut)
        return found

    return gta_merge_tensor(base, tensors, [m.weight for m in per_model], trim, params.consensus_method,
                            params.normalize, params.lambda_, rules, ctx.out_dtype)


SPEC = MethodSpec("ties", TiesParams, DensityParams, merge_tensor, casts_inputs=True,
                  global_stats=lambda p: p.scope == "global",
                  description="trim, elect sign, disjoint merge")


def ties_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
               weights: Sequence[float] | None = None, density: float | Sequence[float] = 1.0,
               lambda_: float = 1.0, normalize: bool = True, scope: str = "tensor", topk_mode: str = "exact",
               consensus_method: str = "sum", **options) -> dict[str, torch.Tensor]:
    """TIES over in-memory state dicts; `density` and `weights` may be per model."""
    from ..engine import merge_state_dicts
    params = {"lambda": lambda_, "normalize": normalize, "scope": scope, "topk_mode": topk_mode,
              "consensus_method": consensus_method}
    return merge_state_dicts("ties", base, models, params, {"weight": weights, "density": density}, **options)
