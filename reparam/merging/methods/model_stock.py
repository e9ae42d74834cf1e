"""Model Stock (Jang et al. 2024): move from the base toward the average of N >= 2 fine-tuned models by the
ratio t = N cos / (1 + (N - 1) cos), cos = mean pairwise cosine of their offsets from the base.

mergekit name ``model_stock``: global ``filter_wise`` (default false: one ratio per tensor; true: one per
row, 1-D tensors as one row). Needs ``base_model`` and at least two other models; no per-model parameters.
Pairwise cosine = <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clamped to [-1, 1] (dot products and norms in
float64). With ``filter_wise`` a tensor of more than two dimensions gets one ratio per output channel
(dim 0); mergekit uses one per vector along the last dimension there.
Extension: ``clamp_ratio`` (default false, as mergekit) clamps t to [0, 1]; where the denominator
1 + (N - 1) cos is ~0 (|.| < 1e-6) the base tensor is kept (mergekit divides by ~0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .base import MethodSpec, TensorContext
from .slerp import NoModelParams


@dataclass
class ModelStockParams:
    filter_wise: bool = False
    clamp_ratio: bool = False


def merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], per_model, params: ModelStockParams,
                 ctx: TensorContext) -> torch.Tensor:
    shape = base.shape
    w0 = base.float()
    if params.filter_wise and w0.dim() > 1:
        w0 = w0.reshape(w0.shape[0], -1)
    else:
        w0 = w0.reshape(1, -1)
    ws = [t.float().reshape(w0.shape) for t in tensors]
    offs = [w - w0 for w in ws]
    n = len(ws)
    norms = [o.double().norm(dim=-1) for o in offs]
    cos_sum = torch.zeros(w0.shape[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dot = (offs[i].double() * offs[j].double()).sum(-1)
            cos_sum += (dot / torch.clamp(norms[i] * norms[j], min=1e-6)).clamp(-1, 1).float()
            pairs += 1
    cos = cos_sum / pairs
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), n * cos / torch.where(denom == 0, 1.0, denom))
    if params.clamp_ratio:
        t = t.clamp(0, 1)
    t = t.unsqueeze(-1)
    avg = torch.stack(ws).mean(0)
    return (t * avg + (1 - t) * w0).reshape(shape)


SPEC = MethodSpec("model_stock", ModelStockParams, NoModelParams, merge_tensor, min_models=2,
                  description="interpolate base toward the fine-tuned average by the Model Stock ratio")


def model_stock_merge(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *,
                      filter_wise: bool = False, **options) -> dict[str, torch.Tensor]:
    from ..engine import merge_state_dicts
    return merge_state_dicts("model_stock", base, models, {"filter_wise": filter_wise}, {}, **options)
