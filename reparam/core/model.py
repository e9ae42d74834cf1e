"""Model-level operations: adapt, switch, disable, delete, merge, unmerge, unload, summaries."""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, ReparamError, TargetError
from .layers import AdaptedLayer, layer_kind, make_adapted, restore_plain
from .registry import MethodConfig, get_method
from .svd import progress as svd_progress
from .targets import describe, normalise_targets, resolve_targets


@dataclass
class AdapterRecord:
    """What an adapter is: enough to rebuild it on a fresh copy of the base model."""

    name: str
    config: MethodConfig
    modules: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    if not hasattr(model, "reparam_adapters"):
        model.reparam_adapters = {}
    return model.reparam_adapters


def get_record(model: nn.Module, name: str) -> AdapterRecord:
    recs = records(model)
    if name not in recs:
        raise ReparamError(f"model has no adapter named {name!r}; it has: {sorted(recs) or 'none'}")
    return recs[name]


def adapted_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def weight_fingerprint(weight: torch.Tensor) -> dict:
    """Shape plus a cheap content hash: a strided sample of at most 4096 values, hashed exactly."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].float().cpu().contiguous().numpy().tobytes()
    return {"shape": list(weight.shape), "hash": hashlib.sha1(sample).hexdigest()[:16]}


def adapt(model: nn.Module, config: MethodConfig, targets=None, name: str = "default",
          modules_to_save=None, exclude=None, init: bool = True) -> nn.Module:
    """Adapt `model` in place with `config` on the modules `targets` selects; returns the model.

    modules_to_save: modules trained in full and saved with the adapter (a task head such as "classifier").
    init=False builds the adapter without its initialisation (used when loading saved tensors).
    """
    if not isinstance(config, MethodConfig):
        raise ConfigError(f"config must be a method config (see reparam.methods()), got {type(config).__name__}")
    if name in records(model):
        raise ReparamError(f"model already has an adapter named {name!r}; delete it or pick another name")
    if not name or "." in name:
        raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.'")
    spec = get_method(config.method)
    targets = spec.adapter_cls.default_targets(model) if targets is None else targets  # mostly "all-linear"
    matches = resolve_targets(model, targets, exclude)
    selected = set(config.select_layers({m.name: m.module for m in matches}))
    matches = [m for m in matches if m.name in selected]
    for m in matches:
        if layer_kind(m.module) not in spec.adapter_cls.supported_kinds:
            raise TargetError(
                f"module {m.name!r} is a {describe(m.module)}; method {config.method!r} adapts only "
                f"{', '.join(spec.adapter_cls.supported_kinds)} layers (matched by target {m.reason!r})"
            )
    save_names = [mm.name for mm in resolve_targets(model, modules_to_save)] if modules_to_save else []
    fingerprint = {}
    with svd_progress([m.module.weight for m in matches], f"{config.method}: SVD"):  # bar for large models
        for m in matches:
            layer = m.module
            fingerprint[m.name] = weight_fingerprint(
                layer.adapters[layer.active_adapters[0]].base_weight(layer) if isinstance(layer, AdaptedLayer)
                and layer.active_adapters else layer.weight)
            make_adapted(layer, m.name)
            adapter = spec.adapter_cls(layer, config, init=init)
            layer.adapters[name] = adapter.to(layer.weight.device).train(layer.training)  # eval model: no dropout
    records(model)[name] = AdapterRecord(name, config, [m.name for m in matches], save_names, fingerprint)
    try:
        spec.adapter_cls.attach_model(model, name, [m.module for m in matches])
    except BaseException:
        delete_adapter(model, name)  # a method that refuses the model leaves it as it was
        raise
    set_active(model, name)
    return model


def set_active(model: nn.Module, names) -> None:
    """Make `names` (one name or a list) the active adapters; only they (and modules_to_save) train."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        get_record(model, n)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_layers(model):
        layer.active_adapters = [n for n in names if n in layer.adapters]
        for n in layer.active_adapters:
            layer.adapters[n].requires_grad_(True)
    modules = dict(model.named_modules())
    for n in names:
        for m in get_record(model, n).modules_to_save:
            modules[m].requires_grad_(True)


def active_adapters(model: nn.Module) -> list[str]:
    seen = []
    for _, layer in adapted_layers(model):
        seen += [n for n in layer.active_adapters if n not in seen]
    return seen


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the plain base model inside the block (merged adapters are unmerged first, as PEFT does)."""
    unmerge(model)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapters_disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    rec = get_record(model, name)
    modules = dict(model.named_modules())
    for m in rec.modules:
        layer = modules[m]
        layer.unmerge_adapter(name)
        layer.adapters[name].detach_from(layer)
        del layer.adapters[name]
        if name in layer.active_adapters:
            layer.active_adapters.remove(name)
        if len(layer.adapters) == 0:
            restore_plain(layer)
    del records(model)[name]
    get_method(rec.config.method).adapter_cls.detach_model(model, name)


def merge(model: nn.Module, names=None) -> None:
    """Fold the active adapters (or `names`) into the base weights; forward then skips them."""
    for _, layer in adapted_layers(model):
        for n in (layer.active_adapters if names is None else [n for n in normalise_targets(names) if n in layer.adapters]):
            layer.merge_adapter(n)


def unmerge(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        for n in list(reversed(layer.merged_adapters)):
            layer.unmerge_adapter(n)


def unload(model: nn.Module, merge_active: bool = True) -> nn.Module:
    """Return the plain model: active adapters folded in (unless merge_active=False), all adapters removed."""
    if merge_active:
        merge(model)
    for _, layer in list(adapted_layers(model)):
        for adapter in layer.adapters.values():
            if not merge_active:
                adapter.detach_from(layer)
        restore_plain(layer)
    for rec in list(records(model).values()):
        records(model).pop(rec.name)
        get_method(rec.config.method).adapter_cls.detach_model(model, rec.name)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def regularizer(model: nn.Module, names=None) -> torch.Tensor:
    """Sum of the extra loss terms of the active adapters, or of those of them in `names` (0 when no method has
    one). An adapter's per-layer terms are summed, or averaged where its class has regularizer_reduction "mean"."""
    names = None if names is None else ([names] if isinstance(names, str) else list(names))
    terms: dict[str, list] = {}
    for _, layer in adapted_layers(model):
        for n in layer.active_adapters:
            if names is None or n in names:
                term = layer.adapters[n].regularizer(layer)
                if term is not None:
                    terms.setdefault(n, []).append((term, layer.adapters[n].regularizer_reduction))
    total = None
    for per_layer in terms.values():
        subtotal = sum((t for t, _ in per_layer[1:]), per_layer[0][0])
        if per_layer[0][1] == "mean":
            subtotal = subtotal / len(per_layer)
        total = subtotal if total is None else total + subtotal
    for n in active_adapters(model):
        if names is None or n in names:
            term = get_method(get_record(model, n).config.method).adapter_cls.model_regularizer(model, n)
            if term is not None:
                total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    per_module: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"]
        width = max((len(k) for k in self.per_module), default=10)
        lines += [f"  {k:<{width}}  {v:>10,}" for k, v in self.per_module.items()]
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    per_module: dict[str, int] = {}
    trainable = total = 0
    for pname, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            owner = pname.split(".adapters.")[0] if ".adapters." in pname else pname.rsplit(".", 1)[0]
            per_module[owner] = per_module.get(owner, 0) + p.numel()
    return TrainableSummary(trainable, total, per_module)


def explain(model: nn.Module, targets="all-linear", exclude=None) -> list[tuple[str, str]]:
    """(module name, kind and weight shape) for each module `targets` would adapt."""
    return [(m.name, describe(m.module)) for m in resolve_targets(model, targets, exclude)]
