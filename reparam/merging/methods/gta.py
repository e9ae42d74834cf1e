"""Generalized task arithmetic: the shared core of task arithmetic, TIES, DARE, Breadcrumbs and DELLA.

Per tensor, as in mergekit's ``generalized_task_arithmetic``:
  1. deltas tau_i = theta_i - theta_0 (float32), each sparsified by the method (trim / drop / breadcrumbs);
  2. weighted: w_i * tau_i;
  3. with a consensus method, sign election: gamma = +1 where sum_i w_i tau_i >= 0 else -1 ("sum"), or
     from the sum of signs ("count"); only entries whose sign equals gamma are kept, the divisor is the
     sum of the weights of the kept entries (0 -> 1); without consensus the divisor is sum_i w_i
     (|.| < 1e-8 -> 1);
  4. if normalize: divide by the divisor; multiply by lambda; add to theta_0.

Difference from mergekit: everything is computed in float32 and cast once at the end (mergekit adds the
delta in the base dtype); `int8_mask` is accepted and ignored (it only saves memory in mergekit).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..sparsify import generator_for


def consensus_mask(weighted: torch.Tensor, method: str) -> torch.Tensor:
    sign = weighted.sign()
    total = weighted.sum(0) if method == "sum" else sign.sum(0)
    majority = torch.where(total >= 0, 1.0, -1.0)
    return sign == majority


def gta_merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                     sparsify: Callable[[torch.Tensor, int], torch.Tensor] | None, consensus: str | None,
                     normalize: bool, lambda_: float) -> torch.Tensor:
    b = base.float()
    deltas = []
    for i, t in enumerate(tensors):
        d = t.float() - b
        deltas.append(sparsify(d, i) if sparsify is not None else d)
    if not deltas:
        return b
    stacked = torch.stack(deltas)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).reshape(-1, *([1] * b.dim()))
    weighted = stacked * w
    del stacked, deltas
    if consensus is not None:
        mask = consensus_mask(weighted, consensus)
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1.0
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1.0
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return b + mixed


def random_sparsified_kernel(sparsify: Callable, consensus: bool) -> Callable:
    """A per-tensor kernel for DARE-style methods: each model's delta goes through
    sparsify(delta, model_params, params, generator) with a generator seeded by (seed, model, tensor), then the
    weighted sum (consensus=False) or TIES sign election (consensus=True)."""
    def merge_tensor(base, tensors, per_model, params, ctx):
        def one(delta, i):
            return sparsify(delta, per_model[i], params, generator_for(ctx.seed, ctx.model_indices[i], ctx.key))

        return gta_merge_tensor(base, tensors, [m.weight for m in per_model], one,
                                params.consensus_method if consensus else None, params.normalize, params.lambda_)
    return merge_tensor
