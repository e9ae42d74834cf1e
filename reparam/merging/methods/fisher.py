"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022; spec fisher.md): with a diagonal Laplace posterior
per model, the merge that maximises sum_i lambda_i log N(theta; theta_i, F_i^-1) is, per coordinate j,

    theta*(j) = sum_i c_i F_i(j) theta_i(j) / sum_i c_i F_i(j),      c_i = lambda_i (/ ||F_i|| when normalised)

reparam name ``fisher`` (not in mergekit). The first model is the *target*: tensors that are not merged (integer
buffers, heads left out with ``exclude``) are copied from it, and ``favor_target`` floors only its Fisher. No
base model (a ``base_model`` is an error: the reference keeps the target's head, not a base's).

Per model: ``weight`` (lambda_i, 1.0; only ratios matter) and ``fisher``, the path of the model's Fisher sidecar
(a safetensors file with the model's keys, float32; written by ``reparam fisher``; see
:mod:`reparam.merging.sidecars` for its validation). Global, with the reference defaults (mmatena/model_merging):

* ``normalize`` (true): c_i = lambda_i / ||F_i||, the L2 norm of F_i over all merged tensors, so each Fisher
  counts as unit-norm. The norms come from a statistics pass over the sidecars (float64 sums, key order).
* ``floor`` (1e-6): F <- max(F, floor), applied to the target's Fisher only when ``favor_target`` (true) -- where
  every Fisher is ~0 (parameters the loss never uses) the target's value wins -- else to every Fisher, and there
  the result is the lambda-weighted average.
* ``epsilon`` (0): added to every Fisher and to every norm. MergeLM's variant (DARE paper baselines) is
  ``epsilon: 1e-6, floor: 0, favor_target: false`` (it renormalises 1/(||F_i|| + eps) to sum to 1, which only
  rescales numerator and denominator alike).

Isotropic merging is the special case F_i = 1 without normalisation: the ``linear`` method.
The statistics pass also logs (level INFO) the fraction of each Fisher's coordinates below the floor (unused
embedding rows are legitimately 0) and warns when all of them are: then the floor alone decides the merge.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import MergeConfigError, MergeValidationError
from .base import MethodSpec, TensorContext

log = logging.getLogger(__name__)


def _check_number(name: str, value, lo: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise ValueError(f"{name} must be a finite number >= {lo}, got {value!r}")


@dataclass
class FisherParams:
    normalize: bool = True
    floor: float = 1e-6
    favor_target: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        for name in ("normalize", "favor_target"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_number("floor", self.floor)
        _check_number("epsilon", self.epsilon)


@dataclass
class FisherModelParams:
    weight: float = 1.0
    fisher: Any = None  # sidecar path (or an in-memory state dict); opened by the engine

    def __post_init__(self):
        _check_number("weight", self.weight)


def merge_tensor(base, tensors: Sequence[torch.Tensor], per_model: Sequence[FisherModelParams],
                 params: FisherParams, ctx: TensorContext) -> torch.Tensor:
    num = torch.zeros(tensors[0].shape, dtype=torch.float32)
    den = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for i, (theta, fisher, m) in enumerate(zip(tensors, ctx.sidecars, per_model)):
        f = fisher.float()
        if params.epsilon:
            f = f + params.epsilon
        if i == 0 or not params.favor_target:
            f = f.clamp(min=params.floor)
        c = m.weight / (ctx.thresholds[i] + params.epsilon) if params.normalize else m.weight
        num += (c * f) * theta.float()
        den += c * f
    # den is 0 only where the target's weight is 0 (or floor = epsilon = 0) and no model has Fisher mass: 0/0 in
    # the reference. Not found; recommended choice: keep the target's value there.
    return torch.where(den > 0, num / den, tensors[0].float())


def fisher_norms(run) -> list[float]:
    """Statistics pass (engine.StatsRun): ||F_i|| over the merged tensors, and the fraction at the floor."""
    sidecars, merged = run.plan.sidecars, run.merged
    squares = [0.0] * len(sidecars)
    floored = [0] * len(sidecars)
    bar = tqdm(total=len(merged), desc="fisher norms", unit="tensor", disable=not run.progress)
    for kp in merged:
        for i, src in enumerate(sidecars):
            f = src.get(kp.key).double()
            squares[i] += float((f * f).sum())
            floored[i] += int((f + kp.params.epsilon < kp.params.floor).sum())
        bar.update(1)
    bar.close()
    norms = [math.sqrt(s) for s in squares]
    for src, norm, n_floor in zip(sidecars, norms, floored):
        frac = n_floor / max(run.total, 1)
        log.info("fisher sidecar %s: L2 norm %.6g, %.1f%% of %d coordinates below the floor", src.name, norm,
                 100 * frac, run.total)
        if n_floor == run.total:
            warnings.warn(f"fisher sidecar {src.name}: all merged coordinates are below the floor, so the floor "
                          f"alone decides the merge (was the Fisher stored in half precision, or computed on "
                          f"another model?)", stacklevel=2)
    normalizing = any(kp.params.normalize for kp in merged)
    for src, norm in zip(sidecars, norms):
        if normalizing and norm + merged[0].params.epsilon == 0:
            raise MergeValidationError(f"fisher sidecar {src.name} is zero on every merged tensor; cannot "
                                       f"normalise it (set normalize: false, or check the sidecar)")
    return norms


def check(params: FisherParams, per_model: Sequence[FisherModelParams], key: str) -> None:
    if sum(m.weight for m in per_model) <= 0:
        raise ValueError(f"weights sum to 0 for tensor {key!r}; at least one model needs a positive weight")


SPEC = MethodSpec("fisher", FisherParams, FisherModelParams, merge_tensor, needs_base=False, takes_base=False,
                  order_matters=True, global_stats=lambda p: True, stats=fisher_norms, check=check,
                  sidecar="fisher", description="Fisher-weighted average (per-coordinate diagonal Fisher weights)")


def fisher_merge(models: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence, *,
                 weights: Sequence[float] | None = None, normalize: bool = True, floor: float = 1e-6,
                 favor_target: bool = True, epsilon: float = 0.0, **options) -> dict[str, torch.Tensor]:
    """Fisher-weighted average of in-memory state dicts; models[0] is the target.

    fishers: one per model, a state dict of float32 tensors with the model's keys, or a sidecar path.
    options: ``exclude`` (regexes of tensors copied from the target, e.g. heads), ``on_mismatch``, ``dtype``,
    ``out_dtype`` as for :func:`~reparam.merging.engine.merge_state_dicts`.
    """
    from ..engine import merge_state_dicts
    if len(fishers) != len(models):
        raise MergeConfigError(f"fisher_merge: {len(fishers)} Fisher(s) for {len(models)} model(s)")
    params = {"normalize": normalize, "floor": floor, "favor_target": favor_target, "epsilon": epsilon}
    return merge_state_dicts("fisher", None, models, params, {"weight": weights, "fisher": list(fishers)},
                             **options)
