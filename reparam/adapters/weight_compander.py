"""Weight Compander (Cakaj, Mehnert, Yang 2023, arXiv 2306.16993; specs/adapters/weight_compander.md).

Every targeted weight is reparameterised element-wise through a compander f (§1):

    W = f(Θ; a, b),   tanh (default):  f(θ) = a·tanh(θ/b)          |f| < a,  f'(0) = a/b > 1
                      mulaw (option):  f(θ) = sign(θ)·a·ln(1+|θ|/b)          f'(0) = a/b

a = κ_a·σ, b = κ_b·σ with σ the std of the layer's weight W0 (§1). Θ = f⁻¹(clip(W0)) at init, so the model is
unchanged (§3); Θ (the full weight shape) trains instead of W: a regulariser, NOT a parameter-efficient method
(§2). The frozen base weight stays W0, so the adapter loads onto the original checkpoint. Weight decay set in
the optimizer acts on Θ, the trainable tensor (§4, library choice; W itself is never decayed, §7.4).
The paper's function and defaults were not found: f, κ_a = 3 and κ_b = 1.5 are the spec's library choices.
Biases and norms are not reparameterised (§1, library choice); train them with modules_to_save if wanted.
The forward materialises W = f(Θ) once and runs ONE matmul/convolution with it (computes_layer_output).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ReparamError
from ..core.layers import CONV, LINEAR, Adapter, adapter_dtype, wide
from ..core.registry import MethodConfig, register
from .lora import as_matrix

CLIP = 0.999  # §3: clip W0 to (−0.999a, 0.999a) before inverting tanh (artanh diverges at ±a, §7.2)


def compand(theta: torch.Tensor, a, b, function: str = "tanh") -> torch.Tensor:
    """f(Θ; a, b) element-wise (§1)."""
    if function == "tanh":
        return a * torch.tanh(theta / b)
    return torch.sign(theta) * a * torch.log1p(theta.abs() / b)


def expand(weight: torch.Tensor, a, b, function: str = "tanh") -> tuple[torch.Tensor, int]:
    """(Θ = f⁻¹(clip(W)), number of clipped entries); only tanh is bounded, so only tanh clips (§3)."""
    if function == "tanh":
        limit = CLIP * a
        clipped = int((weight.abs() > limit).sum())
        return b * torch.atanh(torch.clamp(weight, -limit, limit) / a), clipped
    return torch.sign(weight) * b * torch.expm1(weight.abs() / a), 0


@dataclass
class WeightCompanderConfig(MethodConfig):
    function: str = "tanh"  # "tanh": a·tanh(θ/b) (§1 default); "mulaw": sign(θ)·a·ln(1+|θ|/b) (§1 option)
    kappa_a: float = 3.0  # a = κ_a·σ (recommended choice, paper value not found)
    kappa_b: float = 1.5  # b = κ_b·σ (recommended choice, paper value not found)
    learn_scales: bool = False  # train log b and u, a = b·(1 + softplus(u)) > b (§1 learned mode)

    def __post_init__(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        self.check(self.function in ("tanh", "mulaw"), "function", "must be 'tanh' or 'mulaw'")
        self.check(number(self.kappa_b) and self.kappa_b > 0, "kappa_b", "must be > 0")
        self.check(number(self.kappa_a) and self.kappa_a > self.kappa_b, "kappa_a",
                   f"must be > kappa_b={self.kappa_b!r} so that f'(0) = a/b > 1 (expanding near 0, §1)")
        self.check(isinstance(self.learn_scales, bool), "learn_scales", "must be true or false")


class WeightCompanderAdapter(Adapter):
    supported_kinds = (LINEAR, CONV)
    computes_layer_output = True

    def __init__(self, layer, config: WeightCompanderConfig, init: bool = True):
        super().__init__(layer, config)
        self.function = config.function
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        W0 = layer.weight.detach().to(**factory)
        sigma = float(W0.std()) if W0.numel() > 1 else 0.0
        if not sigma > 0:
            raise ReparamError(f"weight_compander: {getattr(layer, 'reparam_name', 'layer')}: the weight has no "
                               f"spread (std {sigma}), so a = κ_a·σ and b = κ_b·σ are undefined")
        a, b = config.kappa_a * sigma, config.kappa_b * sigma
        self.wc_theta = nn.Parameter(torch.zeros_like(W0))
        if config.learn_scales:  # log-parameterised: b > 0 and a > b whatever the optimizer does (§1)
            self.wc_log_b = nn.Parameter(torch.tensor(math.log(b), **factory))
            self.wc_u = nn.Parameter(torch.tensor(math.log(math.expm1(a / b - 1)), **factory))  # softplus⁻¹
        else:  # persistent buffers: the file holds the exact a, b it was trained with
            self.register_buffer("wc_a", torch.tensor(a, **factory))
            self.register_buffer("wc_b", torch.tensor(b, **factory))
        self.clipped = 0
        self.premerge_weight = None  # the layer's weight before merge, to give it back on unmerge
        if init:
            with torch.no_grad():
                theta, self.clipped = expand(W0, *self.scales(), self.function)
                self.wc_theta.copy_(theta)
            if self.clipped:  # §3: report clipped entries; raise kappa_a to make it 0
                warnings.warn(f"weight_compander: {getattr(layer, 'reparam_name', 'layer')}: {self.clipped} of "
                              f"{W0.numel()} weights exceed {CLIP}·a and were clipped (raise kappa_a)")

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) as tensors: fixed buffers, or b = exp(log b), a = b·(1 + softplus(u)) when learned."""
        if self.config.learn_scales:
            b = self.wc_log_b.exp()
            return b * (1 + F.softplus(self.wc_u)), b
        return self.wc_a, self.wc_b

    def companded_weight(self) -> torch.Tensor:
        """W = f(Θ) in the layer's weight layout, float32 (float64 on a float64 model)."""
        return compand(wide(self.wc_theta), *self.scales(), self.function)

    def saturated_fraction(self, threshold: float = 3.0) -> float:
        """Share of latents with |Θ| > threshold·b, where tanh's gradient is < 1% of f'(0) (§7.3: monitor it)."""
        return float((self.wc_theta.detach().abs() > threshold * self.scales()[1].detach()).float().mean())

    @staticmethod
    def run_with(layer, x, weight, bias):
        """The layer's own operation with another weight (Linear / Conv1D / Conv1-3d)."""
        if hasattr(layer, "_conv_forward"):
            return layer._conv_forward(x, weight.to(x.dtype), bias)
        return F.linear(x, as_matrix(layer, weight).to(x.dtype), bias)

    def layer_output(self, layer, x):
        return self.run_with(layer, x, self.companded_weight(), layer.bias)

    def forward(self, layer, x, out):
        """Used behind another unmerged adapter: add the layer's op with f(Θ) − W0."""
        return out + self.run_with(layer, x, self.delta_weight(layer), None)

    def delta_weight(self, layer):
        return self.companded_weight() - wide(layer.weight)

    def merge_into(self, layer, weight):  # §5: W_export = f(Θ), computed once
        self.premerge_weight = weight.clone()
        return self.companded_weight()

    def unmerge_from(self, layer, weight):
        if self.premerge_weight is None:
            raise ReparamError(f"weight_compander: cannot unmerge {layer.reparam_name}: the weight before the "
                               f"merge was not kept (f(Θ) replaces W); reload the base model instead")
        weight, self.premerge_weight = self.premerge_weight, None
        return weight


register("weight_compander", WeightCompanderConfig, WeightCompanderAdapter,
         "Weight Compander: W = a·tanh(Θ/b) element-wise (full-size Θ trains; a regulariser, not PEFT)")
