"""Unified view of PEFT (He et al., ICLR 2022; specs/adapters/unified_adapters.md): bottleneck adapters and MAM.

    Adapter(z) = s · Up(Dropout(ReLU(Down(LN_in?(z)))))  (LN on the output instead with layernorm="out")  §2.1

Placement on an adapted layer y = f(x) (§2.2):
    sequential (Houlsby):  y ← y + Adapter(y)        input = the sub-layer's OUTPUT
    parallel:              y ← y + s·Adapter(h)      input = the INPUT h of the whole sub-layer (scaled parallel: s > 1)
Only Linears can be adapted, so a parallel adapter sits on the sub-layer's output projection and reads the
sub-layer's input through a forward pre-hook (input_from="auto"): on BERT's FFN output `output.dense` that is the
input of `intermediate` (h1, the post-attention-LN state), so the block computes LN(h1 + FFN(h1) + s·Adapter(h1))
exactly as §2.2 / pitfall 1 ask; on Llama / GPT-2 `mlp.down_proj` / `mlp.c_proj` the input of `mlp`; on the
attention output projection the attention block's input (§2.2 adds Adapter(x) before out_proj, which is the same
function class: out_proj is linear). Any other module reads its own input (a Linear that is the whole FFN: §8.3).

MAM (§2.4) is adapters/mam.py: prefix tuning (adapters/prefix.py) plus the scaled parallel adapter at the FFN.
Adapters are non-linear (ReLU), so they cannot be merged (§5): merge raises a clear error; unload(merge_active=False)
removes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ReparamError, TargetError
from ..core.layers import LINEAR, Adapter, adapter_dtype, linear_dims
from ..core.registry import MethodConfig, register

LAYERNORM_OPTIONS = ("none", "in", "out")
INIT_OPTIONS = ("lora", "bert")
# input_from="auto": (suffix of the adapted output projection, module whose input a parallel adapter reads), the
# module looked up beside the nearest enclosing block; first match wins
SUBLAYER_INPUTS = (("attention.output.dense", "attention"), ("output.dense", "intermediate"),  # BERT / RoBERTa
                   ("self_attn.o_proj", "self_attn"), ("mlp.down_proj", "mlp"),  # Llama / Mistral / Qwen
                   ("attn.c_proj", "attn"), ("mlp.c_proj", "mlp"))  # GPT-2


@dataclass
class BottleneckConfig(MethodConfig):
    r: int = 64
    scale: float | str = 1.0  # s; "learnable": a trainable scalar initialised to 1 (§2.1)
    layernorm: str = "none"  # "in" | "out" | "none" (§2.1)
    init: str = "lora"  # "lora": Up = 0, exact base model at init; "bert": N(0, 0.02) weights (§2.1, §7.2)
    dropout: float = 0.0
    input_from: str = "auto"  # parallel only: "auto" (the sub-layer's input, see above), "self", or a module name
    placement = "parallel"  # class attribute: fixed by the registered name

    def __post_init__(self):
        self.check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r",
                   "must be a positive integer")
        self.check(self.scale == "learnable" or isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool),
                   "scale", "must be a number or 'learnable'")
        self.check(self.layernorm in LAYERNORM_OPTIONS, "layernorm", f"must be one of {', '.join(LAYERNORM_OPTIONS)}")
        self.check(self.init in INIT_OPTIONS, "init", f"must be one of {', '.join(INIT_OPTIONS)}")
        self.check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        self.check(isinstance(self.input_from, str) and self.input_from, "input_from",
                   "must be 'auto', 'self' or a module name")


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


def sublayer_input(name: str, input_from: str) -> str | None:
    """The module name (relative to an enclosing block) whose input a parallel adapter on `name` reads; None: its own."""
    if input_from == "auto":
        return next((src for suffix, src in SUBLAYER_INPUTS if name == suffix or name.endswith("." + suffix)), None)
    return None if input_from == "self" else input_from


class BottleneckAdapter(Adapter):
    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: BottleneckConfig, init: bool = True):
        super().__init__(layer, config)
        d_in, d_out = linear_dims(layer)
        self.sequential = config.placement == "sequential"
        self.reads = None if self.sequential else sublayer_input(layer.reparam_name, config.input_from)
        # the sub-layer's input is the residual stream, as wide as the output projection's output
        self.bottleneck = Bottleneck(d_out if self.sequential or self.reads else d_in, d_out, config,
                                     dtype=adapter_dtype(layer), device=layer.weight.device)
        self.block_input, self.handles = None, []
        if init:
            self.bottleneck.initialise(config.init)

    @classmethod
    def attach_model(cls, model, name, layers):
        attach_inputs(model, name, layers, [layer.adapters[name] for layer in layers])

    def hook(self, source: nn.Module, active) -> None:
        def before(_m, args, kwargs):
            if active():
                self.block_input = args[0] if args else kwargs["hidden_states"]
        self.handles = [source.register_forward_pre_hook(before, with_kwargs=True)]

    def forward(self, layer, x, out):
        z = out if self.sequential else x
        if self.reads:
            z, self.block_input = self.block_input, None  # no activation kept after use
            if z is None or z.shape[-1] != self.bottleneck.down.in_features:
                raise ReparamError(f"{self.config.method} on {layer.reparam_name}: no {self.bottleneck.down.in_features}"
                                   f"-wide input from {self.reads!r} in this forward (got "
                                   f"{None if z is None else list(z.shape)}); set input_from")
        return out + self.bottleneck(z.to(self.bottleneck.down.weight.dtype)).to(out.dtype)

    def delta_weight(self, layer):
        raise ReparamError(f"{self.config.method}: the adapter on {layer.reparam_name} is non-linear (ReLU) and has "
                           f"no weight delta; it cannot be merged (use unload(model, merge_active=False) to remove it)")

    def merge_into(self, layer, weight):
        return self.delta_weight(layer)

    def detach_from(self, layer):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_inputs(model, name, layers, adapters) -> None:
    """Hook each reading adapter to the input of its sub-layer: `reads` beside the nearest enclosing module."""
    modules = dict(model.named_modules())
    for layer, adapter in zip(layers, adapters):
        if not adapter.reads:
            continue
        parts = layer.reparam_name.split(".")
        source = next((modules[n] for k in range(len(parts) - 1, -1, -1)
                       if (n := ".".join(parts[:k] + [adapter.reads])) in modules), None)
        if source is None:
            raise TargetError(f"{adapter.config.method}: no module {adapter.reads!r} beside {layer.reparam_name!r} to "
                              f"read the sub-layer input from; set input_from ('self' reads the module's own input)")
        adapter.hook(source, lambda layer=layer: name in layer.active_adapters and not layer.adapters_disabled)


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
