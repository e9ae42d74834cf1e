"""HUT, Hadamard Updated Transformation (Zhang, Zhou, Chen 2024, arXiv 2409.13501; specs/adapters/hut.md).

The adapted weight is a transformation of W0, not W0 + ΔW (§1):

    residual (default):  W' = W0 ⊙ (1 + s·U V)        pure:  W' = W0 ⊙ (U V)
    y = x W'ᵀ + b0,      U ∈ R^{d_out×r}, V ∈ R^{r×d_in},   s = 1, or alpha / r when alpha is set

U V is materialised once per forward (d_out·d_in·r multiply-adds, whatever the number of tokens) and the layer
runs ONE dense matmul with W' (Adapter.computes_layer_output: the base matmul is skipped, not done twice). The
merge is W' itself, so it keeps W0's zero pattern (§5). Backward forms the dense weight gradient G = ∂L/∂W' as
full fine-tuning does (§6), so a step costs about what LoRA's does, not less (measured 0.9-1.1x on CPU).
The pure form is PERP's ScaleLoRA (perp.md §4) with init_noise=0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ReparamError
from ..core.layers import LINEAR, Adapter, adapter_dtype, linear_dims, wide
from ..core.registry import MethodConfig, register
from .lora import as_matrix

MODES = ("residual", "pure")


@dataclass
class HutConfig(MethodConfig):
    r: int = 8
    alpha: float | None = None  # None: s = 1 (§1 default); otherwise s = alpha / r. Residual mode only.
    mode: str = "residual"  # "residual": W0 ⊙ (1 + s·U V); "pure": W0 ⊙ (U V), the paper-level form
    # Pure mode: ε of the perturbed all-ones init (§3, §8.1; value not in the spec, recommended choice: how far the
    # r components separate grows in proportion to ε, and W' = W0 at init whatever ε). 0 = the symmetric trap.
    init_noise: float = 0.1
    bias: bool = False  # True: the adapted modules' biases train, as a saved offset (§2 option)

    def __post_init__(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        self.check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r",
                   "must be a positive integer")
        self.check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
        self.check(self.alpha is None or number(self.alpha) and self.alpha > 0, "alpha", "must be > 0 or None (s = 1)")
        self.check(self.alpha is None or self.mode == "residual", "alpha",
                   "the pure mode W0 ⊙ (U V) has no scale; leave alpha unset")
        self.check(number(self.init_noise) and self.init_noise >= 0, "init_noise", "must be >= 0")
        self.check(isinstance(self.bias, bool), "bias", "must be true or false")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


class HutAdapter(Adapter):
    supported_kinds = (LINEAR,)
    computes_layer_output = True

    def __init__(self, layer, config: HutConfig, init: bool = True):
        super().__init__(layer, config)
        d_in, d_out = linear_dims(layer)
        self.pure = config.mode == "pure"
        self.scale = config.scale
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.hut_U = nn.Parameter(torch.zeros(d_out, config.r, **factory))
        self.hut_V = nn.Parameter(torch.zeros(config.r, d_in, **factory))
        self.bias_delta = None
        if config.bias and layer.bias is not None:
            self.bias_delta = nn.Parameter(torch.zeros(d_out, **factory))
        if init:
            self.initialise()

    @torch.no_grad()
    def initialise(self):
        """W' = W0 at init (§3)."""
        if not self.pure:  # U = 0, V as LoRA's A (§3, recommended)
            nn.init.kaiming_uniform_(self.hut_V, a=math.sqrt(5))
            return
        # §3 recommended choice, made exact: V = c·1 and U = c·1 + ε·N with zero-mean rows (c = 1/√r), so U V = 1
        # exactly while U's columns differ, which lets the r components separate (§8.1).
        c = 1.0 / math.sqrt(self.config.r)
        noise = torch.randn_like(self.hut_U) * self.config.init_noise
        self.hut_U.copy_(c + noise - noise.mean(dim=1, keepdim=True))
        self.hut_V.fill_(c)

    def multiplier(self) -> torch.Tensor:
        """1 + s·U V (residual) or U V (pure): d_out × d_in, float32 (float64 on a float64 model)."""
        M = wide(self.hut_U) @ wide(self.hut_V)
        return M if self.pure else M.mul_(self.scale).add_(1)  # in place: mm saves U, V, not its output

    def transformed(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """weight ⊙ multiplier, d_out × d_in (Conv1D stores weight as d_in × d_out), at least float32 (§8.3)."""
        return wide(as_matrix(layer, weight)) * self.multiplier()

    def layer_output(self, layer, x):
        bias = layer.bias
        if self.bias_delta is not None:
            bias = (wide(bias) + self.bias_delta).to(x.dtype)
        return F.linear(x, self.transformed(layer, layer.weight).to(x.dtype), bias)

    def forward(self, layer, x, out):
        """Used behind another unmerged adapter: add x (W' − W0)ᵀ (+ δb) to what the stack produced so far."""
        delta = self.transformed(layer, layer.weight) - wide(as_matrix(layer, layer.weight))
        out = out + F.linear(x, delta.to(out.dtype))
        return out if self.bias_delta is None else out + self.bias_delta.to(out.dtype)

    def delta_weight(self, layer):
        return as_matrix(layer, self.transformed(layer, layer.weight)) - wide(layer.weight)

    def delta_bias(self, layer):
        return None if self.bias_delta is None else wide(self.bias_delta)

    def merge_into(self, layer, weight):
        return as_matrix(layer, self.transformed(layer, weight))

    def unmerge_from(self, layer, weight):
        mult = self.multiplier()
        lost = int((mult.abs() < torch.finfo(mult.dtype).tiny).sum())
        if lost:  # W' = W0 ⊙ 0 there: the original entries cannot be recovered by division
            raise ReparamError(f"hut: cannot unmerge from {layer.reparam_name}: the multiplier is 0 at {lost} "
                               f"entries, where W0 is lost; reload the base model instead")
        return as_matrix(layer, as_matrix(layer, weight) / mult)


register("hut", HutConfig, HutAdapter,
         "HUT: W' = W0 ⊙ (1 + s·U V), a Hadamard transformation of W0 (mode=pure: W0 ⊙ (U V))")
