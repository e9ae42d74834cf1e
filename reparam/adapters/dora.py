"""DoRA (Liu et al., ICML 2024): weight-decomposed LoRA, numerically as PEFT's `use_dora=True`.

    W' = m · (W0 + s·B A) / ‖W0 + s·B A‖_row,   y = x W'ᵀ + b

m (one magnitude per output feature) starts at ‖W0‖_row, so the output equals the base at init. As in
the paper (§4.3) and PEFT, the norm is treated as a constant in backward (detached), which saves memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LINEAR, wide
from ..core.registry import register
from .lora import LoraAdapter, LoraConfig, as_matrix


@dataclass
class DoraConfig(LoraConfig):
    pass


class DoraAdapter(LoraAdapter):
    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: DoraConfig, init: bool = True):
        super().__init__(layer, config, init)
        self.magnitude = nn.Parameter(self.weight_norm(layer, wide(as_matrix(layer, layer.weight))))

    def weight_norm(self, layer, W0: torch.Tensor) -> torch.Tensor:
        """‖W0 + s·B A‖ per output row, float32, detached."""
        return torch.linalg.norm(wide(W0) + self.delta_matrix().detach(), dim=1).detach()

    def forward(self, layer, x, out):
        W0 = as_matrix(layer, layer.weight)
        mag_scale = (self.magnitude / self.weight_norm(layer, W0)).to(out.dtype)
        lora = self.lora_output(layer, x).to(out.dtype)
        if self.dropout is None and len(layer.active_adapters) == 1:
            base = out if layer.bias is None else out - layer.bias  # out is x W0ᵀ + b: no second matmul
        else:
            h = self.dropout(x) if self.dropout is not None else x
            base = F.linear(h, W0)
        return out + (mag_scale - 1) * base + mag_scale * lora

    def merge_into(self, layer, weight):
        W0 = as_matrix(layer, weight)
        self.merged_norm = self.weight_norm(layer, W0)  # kept so unmerge can invert exactly
        merged = (wide(self.magnitude) / self.merged_norm)[:, None] * (W0 + self.delta_matrix())
        return as_matrix(layer, merged)

    def unmerge_from(self, layer, weight):
        W = as_matrix(layer, weight)
        W0 = W * (self.merged_norm / wide(self.magnitude))[:, None] - self.delta_matrix()
        return as_matrix(layer, W0)

    def delta_weight(self, layer):
        W0 = wide(as_matrix(layer, layer.weight))
        merged = (wide(self.magnitude) / self.weight_norm(layer, W0))[:, None] * (W0 + self.delta_matrix())
        return as_matrix(layer, merged - W0)


register("dora", DoraConfig, DoraAdapter, "DoRA: LoRA direction with a learned per-row magnitude")
