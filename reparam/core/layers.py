"""The shared mechanism every method plugs into: an adapted layer and the adapter interface.

Adapting a module keeps the module object and its parameters where they are and swaps its class to
a subclass whose forward adds the active adapters' contributions. So `...query.weight` keeps its name
(base checkpoints, FSDP wrap policies and tied weights need no remapping), `isinstance(m, nn.Linear)`
still holds, and the adapters live beside the weight as `...query.adapters.<name>.<param>`.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ReparamError
from .targets import conv1d_class

LINEAR, CONV, EMBEDDING = "linear", "conv", "embedding"


def layer_kind(layer: nn.Module) -> str | None:
    base = getattr(layer, "reparam_base_class", type(layer))
    c1d = conv1d_class()
    if issubclass(base, nn.Linear) or (c1d is not None and issubclass(base, c1d)):
        return LINEAR
    if issubclass(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if issubclass(base, nn.Embedding):
        return EMBEDDING
    return None


def is_fan_in_fan_out(layer: nn.Module) -> bool:
    c1d = conv1d_class()
    return c1d is not None and isinstance(layer, c1d)


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it already is: deltas and merges are computed at least in float32."""
    return t if t.dtype == torch.float64 else t.float()


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Adapters train in float32 whatever the base dtype; a float64 base (exactness tests) keeps float64."""
    return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32


def factory_like(params, fallback: dict) -> dict:
    """dtype and device for new parameters of a growing adapter: those of the first of `params`, so growth follows
    model.to(...) (the layer's at construction would leave it behind); `fallback` while there are none yet."""
    first = next(iter(params), None)
    return fallback if first is None else dict(dtype=first.dtype, device=first.device)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D."""
    d0, d1 = layer.weight.shape
    return (d0, d1) if is_fan_in_fan_out(layer) else (d1, d0)


class Adapter(nn.Module):
    """One named adapter on one layer. Methods subclass this; the defaults cover additive deltas.

    forward(layer, x, out) returns the layer output with this adapter applied, given the input x and
    the output `out` so far. delta_weight(layer) is the float32 update in the layer's weight layout.
    """

    is_reparam_adapter = True
    # How reparam.regularizer combines this adapter's per-layer terms: "sum", or "mean" over the layers for a
    # method whose loss is defined as a mean over the adapted matrices (SORSA).
    regularizer_reduction = "sum"

    @classmethod
    def training_callbacks(cls) -> list:
        """Callbacks (reparam.training.Callback) a training loop must run for this method, e.g. SORSA's
        regulariser step between clipping and optimizer.step; reparam.training.train adds them itself."""
        return []

    def __init__(self, layer: nn.Module, config, init: bool = True):
        super().__init__()
        self.config = config

    @classmethod
    def default_targets(cls, model: nn.Module):
        """What adapt and `reparam finetune` target when none are given (prefix tuning: the key projections)."""
        return "all-linear"

    @classmethod
    def attach_model(cls, model: nn.Module, name: str, layers: list) -> None:
        """Called by adapt once adapter `name` is on `layers`, for methods that need the whole model (Moment
        Probing reads the backbone's hidden states through hooks; detach_from removes them)."""

    @classmethod
    def detach_model(cls, model: nn.Module, name: str) -> None:
        """Called once adapter `name` is off every layer: undo what attach_model changed outside the layers."""

    def forward(self, layer, x, out):
        raise NotImplementedError

    def delta_weight(self, layer) -> torch.Tensor:
        raise NotImplementedError

    # A method that transforms the weight instead of adding to the output (HUT: W0 ⊙ (1 + s·U V)) sets this and
    # implements layer_output; as the first unmerged active adapter it then computes the whole output in one
    # matmul, so the layer's own (discarded) base matmul is skipped. Elsewhere in the stack forward() is used.
    computes_layer_output = False

    def layer_output(self, layer, x) -> torch.Tensor:
        """The layer's whole output with this adapter applied (only where computes_layer_output is set)."""
        raise NotImplementedError

    def merge_into(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """Return the merged weight (float32 in, float32 out)."""
        return weight + self.delta_weight(layer)

    def unmerge_from(self, layer, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(layer)

    def regularizer(self, layer) -> torch.Tensor | None:
        return None

    @classmethod
    def model_regularizer(cls, model, name: str) -> torch.Tensor | None:
        """A model-level loss term of adapter `name` (not per layer), added by reparam.regularizer; e.g. PELA's
        feature distillation from a teacher forward. None: nothing."""
        return None

    def delta_bias(self, layer) -> torch.Tensor | None:
        """What this adapter adds to the layer's bias (float32), merged and unmerged with the weight; None: nothing."""
        return None

    def restore(self, layer) -> None:
        """Called after loading saved tensors into an adapter built with init=False."""

    def detach_from(self, layer) -> None:
        """Called when the adapter is removed unmerged: undo any rewrite of the base weight."""

    def base_weight(self, layer) -> torch.Tensor:
        """The original pretrained weight W0 as seen by this adapter (methods that rewrite it override)."""
        return layer.weight


class ResidualAdapter(Adapter):
    """An adapter that moves part of W0 into itself and leaves the residual W0 − initial_part(layer) frozen as
    the layer's weight (PiSSA-style SVD splits). initial_part must come from the adapter's saved tensors, so the
    adapter loads onto the original checkpoint (restore) and gives W0 back when removed unmerged."""

    def initial_part(self, layer) -> torch.Tensor:
        """What was moved out of W0, float32, in the layer's weight layout."""
        raise NotImplementedError

    def base_weight(self, layer):
        return (wide(layer.weight) + self.initial_part(layer)).to(layer.weight.dtype)

    @torch.no_grad()
    def restore(self, layer):  # loaded onto the original W0: rebuild the residual
        layer.weight.copy_((wide(layer.weight) - self.initial_part(layer)).to(layer.weight.dtype))

    @torch.no_grad()
    def detach_from(self, layer):
        layer.weight.copy_(self.base_weight(layer))


class AdaptedLayer:
    """Mixin put in front of the original class. Holds `adapters` (ModuleDict) and the switch state."""

    def forward(self, x, *args, **kwargs):
        pending = [] if self.adapters_disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        if pending and self.adapters[pending[0]].computes_layer_output:
            out = self.adapters[pending.pop(0)].layer_output(self, x)
        else:
            out = super().forward(x, *args, **kwargs)
        for name in pending:
            out = self.adapters[name](self, x, out)
        return out

    def extra_repr(self) -> str:
        names = ", ".join(f"{n}:{a.config.method}" for n, a in self.adapters.items())
        return f"{super().extra_repr()}, adapters=[{names}], active={self.active_adapters}"

    @torch.no_grad()
    def merge_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        adapter = self.adapters[name]
        merged = adapter.merge_into(self, wide(self.weight.detach()))
        bias = adapter.delta_bias(self)
        if not torch.isfinite(merged).all() or bias is not None and not torch.isfinite(bias).all():
            raise ReparamError(f"refusing to merge adapter '{name}' into {self.reparam_name}: its delta has NaN/Inf")
        # Computed in float32 and rounded once, so bf16/fp16 merges lose no more than one rounding.
        self.weight.copy_(merged.to(self.weight.dtype))
        if bias is not None:
            self.bias.copy_((wide(self.bias.detach()) + bias).to(self.bias.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge_adapter(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        adapter = self.adapters[name]
        self.weight.copy_(adapter.unmerge_from(self, wide(self.weight.detach())).to(self.weight.dtype))
        bias = adapter.delta_bias(self)
        if bias is not None:
            self.bias.copy_((wide(self.bias.detach()) - bias).to(self.bias.dtype))
        self.merged_adapters.remove(name)


_ADAPTED_CLASSES: dict[type, type] = {}


def adapted_class(base_cls: type) -> type:
    """The AdaptedLayer subclass of base_cls, made once per class and registered in this module so that
    pickling an adapted model finds it by name."""
    if base_cls not in _ADAPTED_CLASSES:
        name = f"Adapted{base_cls.__name__}"
        cls = type(name, (AdaptedLayer, base_cls), {"__module__": __name__, "reparam_base_class": base_cls})
        cls.__qualname__ = name
        globals().setdefault(name, cls)
        _ADAPTED_CLASSES[base_cls] = cls
    return _ADAPTED_CLASSES[base_cls]


def make_adapted(layer: nn.Module, name: str) -> nn.Module:
    if not isinstance(layer, AdaptedLayer):
        layer.__class__ = adapted_class(type(layer))
        layer.adapters = nn.ModuleDict()
        layer.active_adapters = []
        layer.merged_adapters = []
        layer.adapters_disabled = False
        layer.reparam_name = name
    return layer


def restore_plain(layer: nn.Module) -> None:
    layer.__class__ = layer.reparam_base_class
    for attr in ("adapters", "active_adapters", "merged_adapters", "adapters_disabled", "reparam_name"):
        delattr(layer, attr)


for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding):
    adapted_class(_cls)
