"""LoRA, rsLoRA and PiSSA (specs/adapters/lora.md).

    y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,   ΔW = s · B A,   s = α/r (LoRA) or α/√r (rsLoRA)

PiSSA initialises A, B from the top-r SVD of W0 and freezes the residual W_res = W0 − s·B0 A0 as the
base weight; the initial factors A0, B0 are kept (buffers, saved) so the adapter loads onto the
original checkpoint and exports to PEFT as a rank-2r LoRA on W0 (lora.md §2.3).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import (CONV, EMBEDDING, LINEAR, Adapter, adapter_dtype, is_fan_in_fan_out, layer_kind,
                           linear_dims, wide)
from ..core.registry import MethodConfig, register
from ..core.svd import svd_split

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def output_with_delta(layer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The whole output of Linear-family `layer` with a dense `delta` (d_out x d_in) added to its weight, computed in
    the delta's dtype (float32 or float64) and returned in x's: one matmul, for adapters whose dense update is
    cheaper than their factored one (SVFit at high rank, IncreLoRA while it scores)."""
    weight = wide(as_matrix(layer, layer.weight)) + delta
    return F.linear(x.to(weight.dtype), weight, None if layer.bias is None else wide(layer.bias)).to(x.dtype)


def check_conv(layer, method: str) -> None:
    """Low-rank conv updates (LoRA, AdaLoRA) factor a plain convolution only."""
    if layer.groups != 1 or layer.padding_mode != "zeros":
        raise ConfigError(f"{method} on {layer.reparam_name}: grouped or non-zero-padded convolutions are not "
                          f"supported")


def conv_update(layer, h, A, B, scale):
    """s · B A h for a conv layer: A a rank-r kernel with the layer's stride / padding / dilation, then B (1x1);
    the scale goes on the r-channel intermediate."""
    conv = _CONV_FN[A.dim() - 2]
    return conv(conv(h, A, None, layer.stride, layer.padding, layer.dilation) * scale, B)


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"  # "default" | "gaussian" | "pissa" | "pissa_niter_<k>"
    # Per-module r / alpha as PEFT's rank_pattern / alpha_pattern: {module-name regex: value}, first match wins
    # (see pattern_value). Named r_pattern because `rank_pattern` marks rank-allocator configs (cli/ranks.py).
    r_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check(isinstance(self.r, int) and self.r > 0, "r", "must be a positive integer")
        for name, valid in (("r_pattern", lambda v: isinstance(v, int) and v > 0),
                            ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))):
            patterns = getattr(self, name)
            self.check(isinstance(patterns, dict) and all(isinstance(k, str) and valid(v) for k, v in patterns.items()),
                       name, "must map module-name patterns to " + ("positive integers" if name == "r_pattern" else "numbers"))
            for k in patterns:
                try:
                    re.compile(k)
                except re.error as e:
                    self.check(False, name, f"key {k!r} is not a regular expression ({e})")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.init in ("default", "gaussian", "pissa") or self.init.startswith("pissa_niter_")
                   and self.init[12:].isdigit(), "init", "must be default, gaussian, pissa or pissa_niter_<k>")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_module(self, module_name: str) -> "LoraConfig":
        """This config with the r and alpha that r_pattern / alpha_pattern give `module_name`."""
        r = int(pattern_value(self.r_pattern, module_name, self.r))
        alpha = float(pattern_value(self.alpha_pattern, module_name, self.alpha))
        return self if (r, alpha) == (self.r, self.alpha) else dataclasses.replace(self, r=r, alpha=alpha)


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key): the value of the first key k that matches
    the whole name or a dotted suffix of it, i.e. re.match(r'(.*\\.)?(k)$', name); `default` if none does."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", module_name):
            return v
    return default


@dataclass
class RsLoraConfig(LoraConfig):
    use_rslora: bool = True


@dataclass
class PissaConfig(LoraConfig):
    init: str = "pissa"


def as_matrix(layer, weight: torch.Tensor) -> torch.Tensor:
    """A Linear-family weight in d_out x d_in layout (Conv1D stores d_in x d_out)."""
    return weight.T if is_fan_in_fan_out(layer) else weight


class LoraAdapter(Adapter):
    supported_kinds = (LINEAR, CONV, EMBEDDING)

    def __init__(self, layer, config: LoraConfig, init: bool = True):
        if isinstance(config, LoraConfig):  # per-module r / alpha (SoMA passes its own per-module config)
            config = config.for_module(layer.reparam_name)
        super().__init__(layer, config)
        self.kind = layer_kind(layer)
        self.scale = config.scale
        r = config.r
        if self.kind == LINEAR:
            d_in, d_out = linear_dims(layer)
            a_shape, b_shape = (r, d_in), (d_out, r)
        elif self.kind == CONV:
            check_conv(layer, "LoRA")
            k = tuple(layer.kernel_size)
            a_shape, b_shape = (r, layer.in_channels, *k), (layer.out_channels, r, *(1,) * len(k))
        else:
            a_shape, b_shape = (r, layer.num_embeddings), (layer.embedding_dim, r)
        factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.lora_A = nn.Parameter(torch.zeros(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None  # Identity costs a call
        self.pissa = self.svd_init() is not None  # A, B from an SVD of W0, residual frozen (PiSSA, SoMA)
        if self.pissa:
            if self.kind != LINEAR:
                raise ValueError(f"PiSSA init needs a Linear-family weight; {layer.reparam_name} is a {self.kind} layer")
            if r > min(a_shape[1], b_shape[0]):
                raise ValueError(f"PiSSA on {layer.reparam_name}: r={r} exceeds min(d_in, d_out)={min(a_shape[1], b_shape[0])}")
            self.register_buffer("lora_A0", torch.zeros(a_shape, **factory))
            self.register_buffer("lora_B0", torch.zeros(b_shape, **factory))
        if init:
            self.initialise(layer)

    @torch.no_grad()
    def initialise(self, layer):
        init = self.config.init
        if self.pissa:
            self.initialise_from_svd(layer, as_matrix(layer, layer.weight))
        elif self.kind == EMBEDDING:  # as loralib / PEFT: A = 0, B ~ N(0, 1)
            nn.init.normal_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def svd_init(self) -> tuple[str, int | None] | None:
        """(part, niter) of svd_split when A, B start from the SVD of W0 (PiSSA: principal), else None."""
        init = self.config.init
        if not init.startswith("pissa"):
            return None
        return "principal", int(init[12:]) if init.startswith("pissa_niter_") else None

    @torch.no_grad()
    def initialise_from_svd(self, layer, W: torch.Tensor):
        """A = diag(√(σ_r/s)) V_rᵀ, B = U_r diag(√(σ_r/s)); W (W0, d_out x d_in) minus s·B A becomes the weight."""
        part, niter = self.svd_init()
        U_r, S_r, Vh_r, W_res = svd_split(W, self.config.r, part, self.lora_A.dtype, niter)
        root = torch.sqrt(S_r / self.scale)
        self.lora_A.copy_(root[:, None] * Vh_r)
        self.lora_B.copy_(U_r * root[None, :])
        self.lora_A0.copy_(self.lora_A)
        self.lora_B0.copy_(self.lora_B)
        layer.weight.copy_(as_matrix(layer, W_res).to(layer.weight.dtype))

    def lora_output(self, layer, x):
        """s · B A x for this layer kind, in the adapter's dtype."""
        A, B = self.lora_A, self.lora_B
        if self.kind == EMBEDDING:
            h = F.embedding(x, A.T, layer.padding_idx, layer.max_norm, layer.norm_type,
                            layer.scale_grad_by_freq, layer.sparse)
            return F.linear(h, B) * self.scale
        h = x.to(A.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        if self.kind == LINEAR:
            # The scale goes on the r-wide intermediate: r multiplies per token instead of d_out.
            return F.linear(F.linear(h, A) * self.scale, B)
        return conv_update(layer, h, A, B, self.scale)

    def forward(self, layer, x, out):
        # In place: the base layer's output is not saved for its backward (linear, conv and embedding keep
        # their inputs), so adding into it is safe and saves one d_out-wide temporary per adapted layer.
        return out.add_(self.lora_output(layer, x).to(out.dtype))

    def delta_matrix(self) -> torch.Tensor:
        """s · B A in float32, d_out x d_in (LINEAR only)."""
        return self.scale * (wide(self.lora_B) @ wide(self.lora_A))

    def delta_weight(self, layer) -> torch.Tensor:
        if self.kind == LINEAR:
            return as_matrix(layer, self.delta_matrix())
        if self.kind == EMBEDDING:
            return self.delta_matrix().T
        B = wide(self.lora_B).flatten(1)
        return self.scale * torch.einsum("or,r...->o...", B, wide(self.lora_A))

    def initial_delta(self, layer) -> torch.Tensor:
        """s · B0 A0: what PiSSA moved out of W0 (zero for other inits)."""
        return as_matrix(layer, self.scale * (wide(self.lora_B0) @ wide(self.lora_A0)))

    def base_weight(self, layer):
        if not self.pissa:
            return layer.weight
        return (wide(layer.weight) + self.initial_delta(layer)).to(layer.weight.dtype)

    @torch.no_grad()
    def restore(self, layer):
        if self.pissa:  # loaded onto the original W0: rebuild the residual from the saved initial factors
            layer.weight.copy_((wide(layer.weight) - self.initial_delta(layer)).to(layer.weight.dtype))

    @torch.no_grad()
    def detach_from(self, layer):
        if self.pissa:
            layer.weight.copy_(self.base_weight(layer))


register("lora", LoraConfig, LoraAdapter, "LoRA: ΔW = (α/r)·B A, B = 0 at init")
register("rslora", RsLoraConfig, LoraAdapter, "rank-stabilised LoRA: scale α/√r")
register("pissa", PissaConfig, LoraAdapter, "LoRA initialised from the top-r SVD of W0, residual frozen")
