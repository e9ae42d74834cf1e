"""Generalized task arithmetic: the shared core of task arithmetic, TIES, DARE, Breadcrumbs and DELLA.

Per tensor, as in mergekit's ``generalized_task_arithmetic``:
  1. deltas tau_i = theta_i - theta_0 (float32), each sparsified by the method (trim / drop / breadcrumbs);
  2. weighted: w_i * tau_i;
  3. with a consensus method, sign election: gamma = +1 where sum_i w_i tau_i >= 0 else -1 ("sum"), or
     from the sum of signs ("count"); only entries whose sign equals gamma are kept, the divisor is the
     sum of the weights of the kept entries (0 -> 1); without consensus the divisor is sum_i w_i
     (|.| < 1e-8 -> 1);
  4. if normalize: divide by the divisor; multiply by lambda; add to theta_0.

Where :mod:`reparam.merging.fused` can take the tensors (float32/bfloat16 on the CPU, at most 4 models) and
the method says how each model is sparsified as a :class:`~reparam.merging.fused.KeepRule`, the merge runs
there in one fused pass, bit for bit equal to the torch code below, which serves everything else.

Difference from mergekit: everything is computed in float32 and cast once at the end (mergekit adds the
delta in the base dtype); `int8_mask` is accepted and ignored (it only saves memory in mergekit).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import fused
from ..sparsify import generator_for


def sum_models(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(terms).sum(0)``, bit for bit, without the stacked copy when there are at most 4 terms.

    torch reduces over the leading dim in order from +0.0 for up to 4 rows (tested against stack().sum(0));
    beyond that its cascade order differs, so more terms take the stacked path."""
    if len(terms) > 4:
        return torch.stack(list(terms)).sum(0)
    acc = terms[0] + 0.0  # the reduction starts from +0.0 (turns -0.0 into +0.0)
    for t in terms[1:]:
        acc += t
    return acc


def consensus_mask(weighted: Sequence[torch.Tensor], method: str) -> list[torch.Tensor]:
    """Per model, where its entry has the elected sign gamma (+1 where the sum / sign count is >= 0, else
    -1); zeros never agree (their sign is 0)."""
    total = sum_models(weighted) if method == "sum" else sum_models([x.sign() for x in weighted])
    positive = total >= 0
    agree = []
    for x in weighted:  # x > 0 where gamma = +1, x < 0 where gamma = -1, in bool ops (torch.where is slower)
        negative = x < 0
        agree.append((x > 0).logical_or_(negative).logical_and_(negative.logical_xor_(positive)))
    return agree


def gta_merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                     sparsify: Callable[[torch.Tensor, int], torch.Tensor] | None, consensus: str | None,
                     normalize: bool, lambda_: float, keep_rules: Callable | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`sparsify(delta, i)` trims model i's float32 delta (torch path); `keep_rules(base_array, model_arrays)`
    says the same as fused KeepRules, or None where the fused kernel cannot do it."""
    arrays = fused.inputs(base, tensors) if keep_rules is not None else None
    rules = keep_rules(*arrays) if arrays is not None else None
    if rules is not None:
        return fused.merge(*arrays, base.shape, rules, weights, consensus, normalize, lambda_, out_dtype)
    b = base.float()
    weighted = []
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    unweighted = bool((w == 1).all())
    for i, t in enumerate(tensors):
        d = t.to(torch.float32, copy=True).sub_(b)  # copy: `t` may already be float32 (the caller's tensor)
        d = sparsify(d, i) if sparsify is not None else d
        weighted.append(d if unweighted else d.mul_(w[i]))  # x * 1 == x: skip the multiply
    if not weighted:
        return b
    w = w.reshape(-1, *([1] * b.dim()))
    if consensus is not None:
        agree = consensus_mask(weighted, consensus)
        mask = torch.empty_like(weighted[0])
        for x, m in zip(weighted, agree):
            x.mul_(mask.copy_(m))  # in place on our own copies, by a 0/1 float mask (float*bool is slower)
        mixed = sum_models(weighted)
        if unweighted:  # the divisor is the number of agreeing models: count in small integers
            count = agree[0].to(torch.uint8 if len(agree) < 256 else torch.int32)
            for m in agree[1:]:
                count += m
            divisor = mask.copy_(count)
        else:
            divisor = sum_models([m * w[i] for i, m in enumerate(agree)])
        divisor.masked_fill_(divisor == 0, 1.0)
    else:
        mixed = sum_models(weighted)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1.0
    del weighted
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(b)


def random_sparsified_kernel(sparsify: Callable, consensus: bool, keep_rule: Callable | None = None) -> Callable:
    """A per-tensor kernel for DARE-style methods: each model's delta goes through
    sparsify(delta, model_params, params, generator) with a generator seeded by (seed, model, tensor), then the
    weighted sum (consensus=False) or TIES sign election (consensus=True). `keep_rule(model_params, params,
    generator)` is the same draw as a fused KeepRule (or None: the torch path)."""
    def merge_tensor(base, tensors, per_model, params, ctx):
        def stream(i):
            return generator_for(ctx.seed, ctx.model_indices[i], ctx.key)

        def one(delta, i):
            return sparsify(delta, per_model[i], params, stream(i))

        def rules(_base, _models):
            found = [keep_rule(m, params, stream(i)) for i, m in enumerate(per_model)]
            return None if any(r is None for r in found) else found

        return gta_merge_tensor(base, tensors, [m.weight for m in per_model], one,
                                params.consensus_method if consensus else None, params.normalize, params.lambda_,
                                rules if keep_rule is not None else None, ctx.out_dtype)
    return merge_tensor
