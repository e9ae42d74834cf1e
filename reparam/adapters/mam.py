"""MAM adapter (Mix-And-Match; He et al., ICLR 2022, specs/adapters/unified_adapters.md §2.4).

Prefix tuning at every attention (adapters/prefix.py: l = 30, MLP-reparameterised) + a scaled parallel adapter at
every FFN (adapters/unified_adapters.py: r = 512, s = 4, LoRA init, no LN, reading the FFN input h1). One adapter
name over two kinds of targets: on a key projection it holds that attention's prefix, elsewhere the FFN adapter.
Not mergeable (§5); collapse_prefix(model, name) drops the prefix MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ReparamError, TargetError
from ..core.layers import LINEAR, Adapter
from ..core.registry import MethodConfig, register
from .prefix import (KEY_PATTERN, KEY_PROJECTIONS, NO_MERGE, PrefixPart, PrefixTuningConfig, attach_prefixes,
                     detach_prefixes, is_key_projection)
from .unified_adapters import BottleneckAdapter, ScaledParallelAdapterConfig, attach_inputs


@dataclass
class MamConfig(MethodConfig):
    """MAM adapter (§2.4, the XSum / en-ro scripts of §4): a 30-vector prefix at every attention, MLP-reparameterised
    (mid 800), and a scaled parallel adapter at every FFN (r 512, s 4, LoRA init, no LN) reading h1."""
    prefix_len: int = 30
    prefix_mlp: bool = True
    mid_dim: int = 800
    r: int = 512
    scale: float | str = 4.0
    input_from: str = "auto"

    def __post_init__(self):
        self.prefix_config(), self.ffn_config()  # the same checks, the same messages

    def prefix_config(self):
        return PrefixTuningConfig(prefix_len=self.prefix_len, mlp=self.prefix_mlp, mid_dim=self.mid_dim)

    def ffn_config(self):
        return ScaledParallelAdapterConfig(r=self.r, scale=self.scale, input_from=self.input_from)


class MamAdapter(Adapter):
    """On a key projection: that attention's prefix (PrefixPart); elsewhere: the scaled parallel FFN adapter."""

    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: MamConfig, init: bool = True):
        super().__init__(layer, config)
        if is_key_projection(layer.reparam_name):
            self.prefix_part = PrefixPart(layer, config.prefix_config(), init)
        else:
            self.ffn = BottleneckAdapter(layer, config.ffn_config(), init)

    @classmethod
    def default_targets(cls, model):
        return f"re:{KEY_PATTERN}|.*(?<!attention)\\.output\\.dense|.*\\.mlp\\.(down_proj|c_proj)"

    @classmethod
    def attach_model(cls, model, name, layers):
        config = layers[0].adapters[name].config
        keys = [layer for layer in layers if hasattr(layer.adapters[name], "prefix_part")]
        ffns = [layer for layer in layers if hasattr(layer.adapters[name], "ffn")]
        if not keys or not ffns:
            raise TargetError(f"mam_adapter needs attention key projections ({', '.join(KEY_PROJECTIONS)}) and FFN "
                              f"output projections among its targets; got {[layer.reparam_name for layer in layers]}")
        attach_prefixes(model, keys, [layer.adapters[name].prefix_part for layer in keys], config.prefix_config())
        attach_inputs(model, name, ffns, [layer.adapters[name].ffn for layer in ffns])

    @classmethod
    def detach_model(cls, model, name):
        detach_prefixes(model)

    def forward(self, layer, x, out):
        return self.ffn(layer, x, out) if hasattr(self, "ffn") else out

    def delta_weight(self, layer):
        if hasattr(self, "prefix_part"):
            raise ReparamError(f"mam_adapter on {layer.reparam_name}: {NO_MERGE}")
        return self.ffn.delta_weight(layer)

    def detach_from(self, layer):
        if hasattr(self, "ffn"):
            self.ffn.detach_from(layer)


register("mam_adapter", MamConfig, MamAdapter,
         "MAM adapter (He et al. 2022): prefix tuning (l=30) at attention + scaled parallel FFN adapter (r=512, s=4)")
