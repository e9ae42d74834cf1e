"""Unified view of PEFT (He et al., ICLR 2022; specs/adapters/unified_adapters.md): bottleneck adapters.

    Adapter(z) = s · Up(Dropout(ReLU(Down(LN_in?(z)))))  (LN on the output instead with layernorm="out")  §2.1

Placement on an adapted layer y = f(x) (§2.2):
    sequential (Houlsby):  y ← y + Adapter(y)        input = the sub-layer's OUTPUT
    parallel:              y ← y + Adapter(x)        input = the sub-layer's INPUT (s·Adapter: scaled parallel)
Target the sub-layer's output projection for Houlsby (BERT "attention.output.dense,output.dense", Llama
"o_proj,down_proj"). The parallel form uses the input of the module it adapts; on a module that is the whole FFN
(a toy block, or any Linear FFN) this is exactly LN(h1 + FFN(h1) + s·Adapter(h1)) (§2.2, §8.3). On BERT/Llama,
whose FFN is two Linears, only Linears can be adapted, so a parallel adapter on the FFN output projection reads
that projection's input (the d_ff activation), NOT h1 (§7.1): a known deviation, see the report.

Adapters are non-linear (ReLU), so they cannot be merged (§5): merge raises a clear error; unload(merge_active=False)
removes them. Prefix tuning (§1, §2.3) is given here as its attention math (concat form and the gated decomposition)
and the MLP-reparameterised prefix with its collapse to a constant; it is not yet wired into HF attention modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ReparamError
from ..core.layers import LINEAR, Adapter, adapter_dtype, linear_dims
from ..core.registry import MethodConfig, register

LAYERNORM_OPTIONS = ("none", "in", "out")
INIT_OPTIONS = ("lora", "bert")


@dataclass
class BottleneckConfig(MethodConfig):
    r: int = 64
    scale: float | str = 1.0  # s; "learnable": a trainable scalar initialised to 1 (§2.1)
    layernorm: str = "none"  # "in" | "out" | "none" (§2.1)
    init: str = "lora"  # "lora": Up = 0, exact base model at init; "bert": N(0, 0.02) weights (§2.1, §7.2)
    dropout: float = 0.0
    placement = "parallel"  # class attribute: fixed by the registered name

    def __post_init__(self):
        self.check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r",
                   "must be a positive integer")
        self.check(self.scale == "learnable" or isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool),
                   "scale", "must be a number or 'learnable'")
        self.check(self.layernorm in LAYERNORM_OPTIONS, "layernorm", f"must be one of {', '.join(LAYERNORM_OPTIONS)}")
        self.check(self.init in INIT_OPTIONS, "init", f"must be one of {', '.join(INIT_OPTIONS)}")
        self.check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class SequentialAdapterConfig(BottleneckConfig):
    r: int = 200  # Houlsby baseline of the reference scripts: bn 200, bert init, s = 1 (§4)
    init: str = "bert"
    placement = "sequential"


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    pass


@dataclass
class ScaledParallelAdapterConfig(BottleneckConfig):
    r: int = 512  # MAM's FFN adapter: ffn_bn=512, ffn_adapter_scalar=4, lora init, no LN (§2.4, §4)
    scale: float | str = 4.0


class Bottleneck(nn.Module):
    """Adapter(z) = s · Up(Dropout(ReLU(Down(LN_in?(z))))), LN_out after the scale when layernorm="out" (§2.1)."""

    def __init__(self, d_in: int, d_out: int, config: BottleneckConfig, dtype=torch.float32, device=None):
        super().__init__()
        factory = dict(dtype=dtype, device=device)
        self.layernorm = config.layernorm
        self.norm = nn.LayerNorm(d_in if config.layernorm == "in" else d_out, **factory) \
            if config.layernorm != "none" else None
        self.down = nn.Linear(d_in, config.r, **factory)
        self.up = nn.Linear(config.r, d_out, **factory)
        self.dropout = nn.Dropout(config.dropout)
        if config.scale == "learnable":
            self.scale = nn.Parameter(torch.ones((), **factory))
        else:
            self.register_buffer("scale", torch.tensor(float(config.scale), **factory), persistent=False)

    @torch.no_grad()
    def initialise(self, init: str) -> None:
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        else:  # lora: Down as LoRA's A, Up = 0, so Adapter(z) = 0 at init
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)

    def forward(self, z):
        if self.layernorm == "in":
            z = self.norm(z)
        h = self.up(self.dropout(F.relu(self.down(z)))) * self.scale
        return self.norm(h) if self.layernorm == "out" else h


class BottleneckAdapter(Adapter):
    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: BottleneckConfig, init: bool = True):
        super().__init__(layer, config)
        d_in, d_out = linear_dims(layer)
        self.sequential = config.placement == "sequential"
        self.bottleneck = Bottleneck(d_out if self.sequential else d_in, d_out, config,
                                     dtype=adapter_dtype(layer), device=layer.weight.device)
        if init:
            self.bottleneck.initialise(config.init)

    def forward(self, layer, x, out):
        z = out if self.sequential else x
        return out + self.bottleneck(z.to(self.bottleneck.down.weight.dtype)).to(out.dtype)

    def delta_weight(self, layer):
        raise ReparamError(f"{self.config.method}: the adapter on {layer.reparam_name} is non-linear (ReLU) and has "
                           f"no weight delta; it cannot be merged (use unload(model, merge_active=False) to remove it)")

    def merge_into(self, layer, weight):
        return self.delta_weight(layer)


register("sequential_adapter", SequentialAdapterConfig, BottleneckAdapter,
         "Houlsby adapter: y + Adapter(y) on the sub-layer output (target attention/FFN output projections)")
register("parallel_adapter", ParallelAdapterConfig, BottleneckAdapter,
         "parallel adapter: y + s·Adapter(x) from the adapted module's input (not mergeable)")
register("scaled_parallel_adapter", ScaledParallelAdapterConfig, BottleneckAdapter,
         "scaled parallel adapter (He et al. 2022): parallel, s = 4, r = 512, LoRA init, no LN")


def bottleneck_param_count(d: int, r: int, layernorm: bool = False, d_out: int | None = None) -> int:
    """2·d·r + r + d (+ 2d with a LayerNorm) per insertion (§3); d_in·r + r + r·d_out + d_out when they differ."""
    d_out = d if d_out is None else d_out
    return d * r + r + r * d_out + d_out + (2 * d if layernorm else 0)


# --- prefix tuning (§1, §2.3): attention math and the reparameterised prefix ----------------------------------

def prefix_attention(q, K, V, P_k, P_v, scale: float, mask=None):
    """softmax(q [P_k; K]ᵀ·scale + [0; mask]) [P_v; V]: the prefix is always visible (§2.3, §7.3, §7.5).
    q: (..., n, d_h); K, V: (..., m, d_h); P_k, P_v: (..., l, d_h); mask: additive, broadcastable to (..., n, m)."""
    P_k, P_v = (p.expand(*V.shape[:-2], -1, -1) for p in (P_k, P_v))  # one prefix for the batch (and beams)
    scores = torch.cat([q @ P_k.transpose(-1, -2), q @ K.transpose(-1, -2)], dim=-1) * scale
    if mask is not None:
        zeros = torch.zeros(*mask.shape[:-1], P_k.shape[-2], dtype=mask.dtype, device=mask.device)
        scores = scores + torch.cat([zeros.expand(*scores.shape[:-1], -1),
                                     mask.expand(*scores.shape[:-1], -1)], dim=-1)
    return scores.softmax(-1) @ torch.cat([P_v, V], dim=-2)


def gated_prefix_attention(q, K, V, P_k, P_v, scale: float, mask=None):
    """(1 − λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v), λ = Σexp(prefix scores) / Σexp(all scores), with the same
    scale and mask inside every exp (§1, §7.4); λ = sigmoid(logsumexp_prefix − logsumexp_context) is stable."""
    context = q @ K.transpose(-1, -2) * scale
    if mask is not None:
        context = context + mask
    prefix = q @ P_k.transpose(-1, -2) * scale
    lam = torch.sigmoid(prefix.logsumexp(-1, keepdim=True) - context.logsumexp(-1, keepdim=True))
    return (1 - lam) * (context.softmax(-1) @ V) + lam * (prefix.softmax(-1) @ P_v)


class PrefixEncoder(nn.Module):
    """Prefix keys/values for L layers of one attention type: P = MLP(E) during training (§2.3), or learned
    directly (mlp=False, "prefix_nomlp"). collapse() gives the constant prefix that replaces the MLP after training."""

    def __init__(self, prefix_len: int, d_model: int, n_layers: int, n_heads: int, d_mid: int = 800,
                 mlp: bool = True, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ReparamError(f"prefix: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.shape = (prefix_len, n_layers, 2, n_heads, d_model // n_heads)
        if mlp:
            self.embedding = nn.Embedding(prefix_len, d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, d_mid), nn.Tanh(), nn.Linear(d_mid, 2 * n_layers * d_model))
        else:
            self.prefix = nn.Parameter(torch.randn(prefix_len, 2 * n_layers * d_model) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def flat(self) -> torch.Tensor:
        if hasattr(self, "prefix"):
            return self.prefix
        return self.mlp(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        """[L, 2, n_heads, l, d_head]: per layer, (P_k, P_v) split into heads."""
        return self.dropout(self.flat()).view(self.shape).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def collapse(self) -> "PrefixEncoder":
        """The equivalent MLP-free encoder holding the constant P (§2.3, §5)."""
        l, L, _, h, dh = self.shape
        out = PrefixEncoder(l, h * dh, L, h, mlp=False, dropout=self.dropout.p).to(self.flat().dtype)
        out.prefix.copy_(self.flat())
        return out


def prefix_param_count(prefix_len: int, d_model: int) -> int:
    """2·l·d per attention module once the MLP is collapsed (§3)."""
    return 2 * prefix_len * d_model
