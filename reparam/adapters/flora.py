"""FLoRA (Si et al., 2024; specs/adapters/flora.md): a Tucker-decomposed update that keeps a weight's N modes.

    ΔT = G ×_1 U_in ×_2 U_out ×_3 U_k1 …     core G ∈ R^{r_in×r_out×r_k1…}, factor U^(n) ∈ R^{n_n×r_n}
    ΔW = s · ΔT with modes 0 and 1 swapped  (PyTorch layout [out, in, *kernel])
    y  = base(x) + op(dropout(x), ΔW)        op = linear, or the base conv (stride, padding, dilation, groups)

A convolution kernel is never flattened into a matrix: each kernel axis gets its own factor. A Linear is
the N = 2 case, ΔW = s · U_out Gᵀ U_inᵀ, i.e. LoRA with a trainable r×r core. G = 0 at init, so ΔW = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.layers import CONV, LINEAR, Adapter, adapter_dtype, layer_kind, linear_dims
from ..core.registry import MethodConfig, register
from .lora import as_matrix


@dataclass
class FloraConfig(MethodConfig):
    r: int = 8  # rank of the input and output modes, r_in = r_out
    kernel_r: int = 2  # rank of each kernel mode, capped at that kernel size (official example: r = [16, 16, 2, 2])
    scale: float = 1.0  # s, a plain multiplier (official example 4.0; spec §7: 1..4 for linear layers)
    dropout: float = 0.0  # on the update branch's input (official example 0.01)
    # conv(x, W0 + ΔW) in one convolution instead of base conv + update conv (spec §9: the cheaper default).
    conv_forward: str = "merged"  # "merged" | "separate"

    def __post_init__(self):
        self.check(isinstance(self.r, int) and self.r > 0, "r", "must be a positive integer")
        self.check(isinstance(self.kernel_r, int) and self.kernel_r > 0, "kernel_r", "must be a positive integer")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.conv_forward in ("merged", "separate"), "conv_forward", "must be merged or separate")


def tucker_to_tensor(core: torch.Tensor, factors) -> torch.Tensor:
    """G ×_1 U^(1) … ×_N U^(N): each tensordot consumes the core's leading mode with a factor's rank mode and
    appends that factor's size, so after N steps the modes are [n_1, …, n_N] in factor order."""
    full = core
    for factor in factors:
        full = torch.tensordot(full, factor, dims=([0], [1]))
    return full


class FloraAdapter(Adapter):
    supported_kinds = (LINEAR, CONV)  # the N = 1 embedding variant of the code is not a Tucker update (§10.5)

    def __init__(self, layer, config: FloraConfig, init: bool = True):
        super().__init__(layer, config)
        self.kind = layer_kind(layer)
        if self.kind == LINEAR:
            mode_sizes = list(linear_dims(layer))  # [d_in, d_out]
            ranks = [config.r, config.r]
        else:  # [C_in/groups, C_out, k…]: a grouped kernel's input mode is C_in/groups (spec §10.1)
            kernel = list(layer.kernel_size)
            mode_sizes = [layer.in_channels // layer.groups, layer.out_channels, *kernel]
            ranks = [config.r, config.r, *(min(config.kernel_r, k) for k in kernel)]  # r_k ≤ k (spec §7)
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.core = nn.Parameter(torch.zeros(ranks, **factory))
        self.factors = nn.ParameterList(nn.Parameter(torch.zeros(n, r, **factory)) for n, r in zip(mode_sizes, ranks))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        # The fused path needs no dropout on the update branch, and a float32/64 base (a bf16 base would round
        # W0 + ΔW; the separate branch keeps ΔW in float32).
        self.computes_layer_output = (self.kind == CONV and config.conv_forward == "merged" and self.dropout is None
                                      and layer.weight.dtype == factory["dtype"])
        if init:
            for factor in self.factors:  # official init; G = 0 keeps ΔW = 0 (factors get gradient once G ≠ 0)
                nn.init.kaiming_normal_(factor, a=math.sqrt(3))

    def delta_kernel(self) -> torch.Tensor:
        """s · ΔT with the in/out modes swapped: [out, in(/groups), *kernel], the adapter's dtype."""
        return self.config.scale * tucker_to_tensor(self.core, self.factors).transpose(0, 1)

    def delta_weight(self, layer) -> torch.Tensor:
        delta = self.delta_kernel()
        return as_matrix(layer, delta) if self.kind == LINEAR else delta.contiguous()

    def update_output(self, layer, x):
        """op(dropout(x), ΔW) in the adapter's dtype."""
        h = x.to(self.core.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        if self.kind == LINEAR:  # x ΔWᵀ = s · x U_in G U_outᵀ, never forming the d_out×d_in matrix
            U_in, U_out = self.factors
            return ((h @ U_in) @ (self.config.scale * self.core)) @ U_out.T
        return layer._conv_forward(h, self.delta_weight(layer), None)  # the base's stride/padding/groups/mode

    def forward(self, layer, x, out):
        # In place, as LoRA: conv and linear keep their input, not their output, for backward.
        return out.add_(self.update_output(layer, x).to(out.dtype))

    def layer_output(self, layer, x):
        """conv(x, W0 + ΔW) + b: one convolution instead of two (used when computes_layer_output is set)."""
        return layer._conv_forward(x, layer.weight + self.delta_weight(layer), layer.bias)


register("flora", FloraConfig, FloraAdapter, "FLoRA: Tucker core + one factor per mode; convs keep their N-D kernel")
