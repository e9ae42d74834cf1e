"""Prefix tuning (Li & Liang 2021, in the unified view of He et al. 2022; specs/adapters/unified_adapters.md §1, §2.3).

Every adapted attention module attends to l learned key/value vectors in front of its own:
    Attn(q, [P_k; K], [P_v; V]),  the attention mask extended with zeros so the prefix is always visible (§7.3, §7.5)
Training reparameterises all layers' prefixes through one MLP (§2.3):
    P = Up(tanh(Down(E))),  E: Embedding(l, d),  Down: d -> d_mid,  Up: d_mid -> 2·Σ d_kv  (mlp=False: P learned directly)
collapse_prefix() computes P once and drops the MLP (§5); nothing merges into the base weights (§5).

Wiring into Hugging Face models: the adapter sits on each attention module's key projection (BERT `key`, Llama
`k_proj`), which names the attention module and its key width. The model's attention implementation becomes
"reparam_prefix_<sdpa|eager>", registered with transformers' AttentionInterface: it concatenates the prefix of the
active adapters to the keys and values (after RoPE and the KV cache, so the prefix carries no position and is
prepended anew at every generation step) and pads the mask, then calls the model's own sdpa or eager attention.
Masks come from transformers' eager mask builder (explicit 0 / -inf), so a causal mask is never left implicit.
Unlike PEFT (which feeds the prefix as past_key_values), positions of the real tokens are not shifted by l.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ReparamError, TargetError
from ..core.layers import LINEAR, Adapter, adapter_dtype, linear_dims
from ..core.registry import MethodConfig, register

KEY_PROJECTIONS = ("key", "k_proj")  # BERT/RoBERTa, Llama/Mistral/Qwen/...
KEY_PATTERN = r".*\.(" + "|".join(KEY_PROJECTIONS) + ")"  # the key projections as a target regex
IMPL = "reparam_prefix_"
SOURCE = "_reparam_prefix_keys"  # attention module -> its adapted key projection (set in the module's __dict__)
INNER = ("sdpa", "eager")
NO_MERGE = ("prefix tuning adds attention positions: it is input-dependent and cannot be merged into the weights "
            "(§5); collapse_prefix(model, name) replaces the MLP by the constant prefix, unload(model, "
            "merge_active=False) removes it")


@dataclass
class PrefixTuningConfig(MethodConfig):
    prefix_len: int = 200  # the prefix-tuning baseline of the reference scripts (§4); MAM uses 30
    mlp: bool = True  # the reparameterisation of §2.3; False: "prefix_nomlp", P learned directly
    mid_dim: int = 800
    dropout: float = 0.0  # on the prefix (§2.3: default 0)

    def __post_init__(self):
        for f in ("prefix_len", "mid_dim"):
            value = getattr(self, f)
            self.check(isinstance(value, int) and not isinstance(value, bool) and value > 0, f,
                       "must be a positive integer")
        self.check(isinstance(self.mlp, bool), "mlp", "must be true or false")
        self.check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


# --- §1: the concat form and its gated decomposition (the closed forms the tests check the wiring against) ---

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


class PrefixMLP(nn.Module):
    """P = Up(tanh(Down(E))) for all layers at once (§2.3); layer(i) computes only layer i's columns of Up."""

    def __init__(self, prefix_len: int, d_model: int, d_mid: int, widths: list[int], **factory):
        super().__init__()
        self.embedding = nn.Embedding(prefix_len, d_model, **factory)
        self.down = nn.Linear(d_model, d_mid, **factory)
        self.up = nn.Linear(d_mid, sum(widths), **factory)
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)

    def layer(self, i: int) -> torch.Tensor:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return F.linear(torch.tanh(self.down(self.embedding.weight)), self.up.weight[lo:hi], self.up.bias[lo:hi])


def prefix_param_count(prefix_len: int, d_model: int) -> int:
    """2·l·d per attention module once the MLP is collapsed (§3)."""
    return 2 * prefix_len * d_model


def mlp_param_count(prefix_len: int, d_model: int, d_mid: int, n_layers: int) -> int:
    """l·d + d·d_mid + d_mid + d_mid·2Ld + 2Ld for one attention type during training (§3)."""
    return prefix_len * d_model + d_model * d_mid + d_mid + d_mid * 2 * n_layers * d_model + 2 * n_layers * d_model


class PrefixPart(nn.Module):
    """One attention module's prefix: its own (l, 2·d_kv) parameter, or its slice of the shared PrefixMLP, which
    lives in the first layer's part (saved once; the others hold a plain reference, set by attach)."""

    def __init__(self, layer, config, init: bool):
        super().__init__()
        (self.d_model, self.d_kv), self.index = linear_dims(layer), 0
        self.factory = dict(dtype=adapter_dtype(layer), device=layer.weight.device)
        self.dropout = nn.Dropout(config.dropout)
        if not config.mlp:
            self.prefix = nn.Parameter(torch.empty(config.prefix_len, 2 * self.d_kv, **self.factory))
            if init:
                nn.init.normal_(self.prefix, std=0.02)  # not given by the spec; small, as for embeddings

    def flat(self) -> torch.Tensor:
        """(l, 2·d_kv): keys then values."""
        return self.prefix if hasattr(self, "prefix") else self.__dict__["mlp_owner"].mlp.layer(self.index)

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.dropout(self.flat())
        return p[:, :self.d_kv], p[:, self.d_kv:]


def is_key_projection(name: str) -> bool:
    return name.rpartition(".")[2] in KEY_PROJECTIONS


def attach_prefixes(model: nn.Module, layers: list, parts: list[PrefixPart], config) -> None:
    """Number the parts, build the shared MLP on the first, and route each attention module to its key layer."""
    modules = dict(model.named_modules())
    register_attention()
    for i, (layer, part) in enumerate(zip(layers, parts)):
        parent_name = layer.reparam_name.rpartition(".")[0]
        attention = modules.get(parent_name)
        impl = getattr(getattr(attention, "config", None), "_attn_implementation", "missing")
        if not is_key_projection(layer.reparam_name) or impl == "missing":
            raise TargetError(f"{config.method}: module {layer.reparam_name!r} is not the key projection of a Hugging "
                              f"Face attention module; target the key projections ({', '.join(KEY_PROJECTIONS)})")
        inner = (impl or "eager").removeprefix(IMPL)
        if inner not in INNER:
            raise ReparamError(f"{config.method}: {parent_name} uses attention implementation {impl!r}; prefix tuning "
                               f"runs on {' or '.join(INNER)} (load the model with attn_implementation='sdpa')")
        attention.config._attn_implementation = IMPL + inner
        attention.__dict__[SOURCE] = layer
        part.index = i
    if config.mlp and parts:
        owner = parts[0]
        owner.mlp = PrefixMLP(config.prefix_len, owner.d_model, config.mid_dim, [2 * p.d_kv for p in parts],
                              **owner.factory)
        for p in parts:
            p.__dict__["mlp_owner"] = owner  # a plain reference: the MLP's tensors belong to the first part only


def detach_prefixes(model: nn.Module) -> None:
    """After a prefix adapter is removed: unroute attention modules left without one, restore the implementation."""
    configs = {}
    for module in model.modules():
        layer = module.__dict__.get(SOURCE)
        if layer is None:
            continue
        if any(prefix_of(a) is not None for a in getattr(layer, "adapters", {}).values()):
            configs[id(module.config)] = None  # still in use
            continue
        del module.__dict__[SOURCE]
        configs.setdefault(id(module.config), module.config)
    for cfg in configs.values():
        if cfg is not None and (cfg._attn_implementation or "").startswith(IMPL):
            cfg._attn_implementation = cfg._attn_implementation.removeprefix(IMPL)


def prefix_of(adapter) -> PrefixPart | None:
    """The PrefixPart an adapter holds (prefix tuning, MAM's attention side), or None."""
    part = getattr(adapter, "prefix_part", None)
    return part if isinstance(part, PrefixPart) else None


def active_prefixes(module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layer = module.__dict__.get(SOURCE)
    if layer is None or layer.adapters_disabled:
        return []
    parts = [prefix_of(layer.adapters[n]) for n in layer.active_adapters]
    return [p.prefix_kv() for p in parts if p is not None]


def prefix_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The attention implementation reparam_prefix_<inner>: [P_k; K], [P_v; V], mask [0; mask], then <inner>."""
    inner = module.config._attn_implementation.removeprefix(IMPL)
    if inner == "eager":
        attend = sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager attention
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        attend = ALL_ATTENTION_FUNCTIONS[inner]
    prefixes = active_prefixes(module)
    if prefixes:
        b, h_kv, n_ctx, d_head = key.shape
        q_len = query.shape[-2]
        # (l, d_kv) -> (b, h_kv, l, d_head): split into the key heads as the projections' outputs are
        p_k, p_v = (torch.cat([p[i] for p in prefixes]).to(key.dtype).view(-1, h_kv, d_head).transpose(0, 1)
                    .expand(b, -1, -1, -1) for i in (0, 1))
        key, value = torch.cat([p_k, key], dim=2), torch.cat([p_v, value], dim=2)
        if attention_mask is None and getattr(module, "is_causal", False) and q_len > 1:
            # causal, aligned to the last query (a cache in front): -inf above diagonal n_ctx - q_len
            attention_mask = torch.full((q_len, n_ctx), torch.finfo(query.dtype).min, dtype=query.dtype,
                                        device=query.device).triu(n_ctx - q_len + 1)
        if attention_mask is not None:
            pad = torch.zeros(*attention_mask.shape[:-1], p_k.shape[2], dtype=attention_mask.dtype,
                              device=attention_mask.device)
            attention_mask = torch.cat([pad.logical_not() if attention_mask.dtype == torch.bool else pad,
                                        attention_mask], dim=-1)
    return attend(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    for inner in INNER:
        AttentionInterface.register(IMPL + inner, prefix_attention_forward)
        AttentionMaskInterface.register(IMPL + inner, eager_mask)


class PrefixAdapter(Adapter):
    """Prefix tuning on one attention module, held by its key projection (whose own output is left unchanged)."""

    supported_kinds = (LINEAR,)

    def __init__(self, layer, config: PrefixTuningConfig, init: bool = True):
        super().__init__(layer, config)
        self.prefix_part = PrefixPart(layer, config, init)

    @classmethod
    def default_targets(cls, model):
        return "re:" + KEY_PATTERN

    @classmethod
    def attach_model(cls, model, name, layers):
        attach_prefixes(model, layers, [layer.adapters[name].prefix_part for layer in layers],
                        layers[0].adapters[name].config)

    @classmethod
    def detach_model(cls, model, name):
        detach_prefixes(model)

    def forward(self, layer, x, out):
        return out

    def delta_weight(self, layer):
        raise ReparamError(f"{self.config.method} on {layer.reparam_name}: {NO_MERGE}")


def collapse_prefix(model: nn.Module, name: str = "default") -> None:
    """Replace adapter `name`'s prefix MLP by the constant prefix it computes (§2.3, §5): same outputs, fewer
    parameters (2·l·d_kv per attention module), and the adapter then saves and loads in that form."""
    import dataclasses

    from ..core.model import get_record

    record = get_record(model, name)
    field = "prefix_mlp" if hasattr(record.config, "prefix_mlp") else "mlp"
    modules = dict(model.named_modules())
    parts = [p for p in (prefix_of(modules[m].adapters[name]) for m in record.modules) if p is not None]
    if not parts or not getattr(record.config, field):
        raise ReparamError(f"adapter {name!r} has no prefix MLP to collapse")
    with torch.no_grad():
        values = [p.flat().detach().clone() for p in parts]
    for p, v in zip(parts, values):
        p.prefix = nn.Parameter(v, requires_grad=p.__dict__["mlp_owner"].mlp.up.weight.requires_grad)
        p.__dict__.pop("mlp_owner")
    del parts[0].mlp
    record.config = dataclasses.replace(record.config, **{field: False})
    for layer_name in record.modules:
        modules[layer_name].adapters[name].config = record.config


register("prefix_tuning", PrefixTuningConfig, PrefixAdapter,
         "prefix tuning: learned keys/values in front of every attention (MLP-reparameterised; target key "
         "projections; not mergeable, collapse_prefix drops the MLP)")
