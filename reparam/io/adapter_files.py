"""reparam's own adapter files: `reparam_adapter.safetensors` holds the tensors and, in its metadata, the
config (method, fields, adapted modules, base fingerprint); `reparam_adapter.json` is a readable copy.
The safetensors file is the single source of truth and is replaced atomically, so a crash mid-save
leaves the previous adapter loadable."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..core.errors import AdapterFileError, BaseModelMismatch, ReparamError
from ..core.model import adapt, delete_adapter, get_record, records, weight_fingerprint
from ..core.registry import get_method
from .files import read_safetensors, write_json, write_safetensors

TENSORS_FILE = "reparam_adapter.safetensors"
CONFIG_FILE = "reparam_adapter.json"
FORMAT = "reparam-adapter/1"


def adapter_state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON-able config of adapter `name` (tensor keys: '<module>.<param>')."""
    rec = get_record(model, name)
    modules = dict(model.named_modules())
    tensors = {}
    for m in rec.modules:
        for k, v in modules[m].adapters[name].state_dict().items():
            tensors[f"{m}.{k}"] = v
    for m in rec.modules_to_save:
        for k, v in modules[m].state_dict().items():
            tensors[f"{m}.{k}"] = v
    config = {
        "format": FORMAT,
        "name": name,
        "method": rec.config.method,
        "config": rec.config.to_dict(),
        "modules": rec.modules,
        "modules_to_save": rec.modules_to_save,
        "base_fingerprint": rec.fingerprint,
        "base_model_class": type(model).__name__,
    }
    return tensors, config


def save_adapter(model: nn.Module, directory, name: str = "default") -> Path:
    """Save adapter `name` to `directory` (created if needed). Returns the tensors file's path."""
    directory = Path(directory)
    tensors, config = adapter_state(model, name)
    path = directory / TENSORS_FILE
    write_safetensors(path, tensors, {"reparam": json.dumps(config)})
    write_json(directory / CONFIG_FILE, config)
    return path


def read_adapter(directory) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    path = directory / TENSORS_FILE
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    if not path.is_file():
        hint = " (it holds a PEFT adapter: use reparam.import_peft)" if (directory / "adapter_config.json").exists() else ""
        raise AdapterFileError(f"{directory}: no {TENSORS_FILE} in this directory{hint}")
    tensors, metadata = read_safetensors(path)
    return tensors, parse_adapter_config(path, metadata)


def parse_adapter_config(path: Path, metadata: dict[str, str]) -> dict:
    """The adapter config stored in the metadata of the tensors file `path`, checked."""
    if "reparam" not in metadata:
        raise AdapterFileError(f"{path}: safetensors file has no reparam config in its metadata (not a reparam adapter)")
    try:
        config = json.loads(metadata["reparam"])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: reparam config in metadata is not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: unsupported format {config.get('format')!r}, expected {FORMAT!r}")
    for key in ("method", "config", "modules"):
        if key not in config:
            raise AdapterFileError(f"{path}: config has no {key!r} entry")
    return config


def verify_base(model: nn.Module, config: dict, source, strict: bool) -> None:
    modules = dict(model.named_modules())
    missing = [m for m in config["modules"] + config.get("modules_to_save", []) if m not in modules]
    if missing:
        raise BaseModelMismatch(f"{source}: adapted module(s) not in {type(model).__name__}: {', '.join(missing[:10])}"
                                + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    for m, fp in config.get("base_fingerprint", {}).items():
        layer = modules[m]
        weight = layer.adapters[layer.active_adapters[0]].base_weight(layer) \
            if getattr(layer, "active_adapters", None) else getattr(layer, "weight", None)
        if weight is None or list(weight.shape) != fp["shape"]:
            raise BaseModelMismatch(f"{source}: module {m} has weight shape "
                                    f"{None if weight is None else list(weight.shape)}, the adapter was trained on {fp['shape']}")
        if strict and weight_fingerprint(weight)["hash"] != fp["hash"]:
            raise BaseModelMismatch(
                f"{source}: module {m} has different weights than the base model the adapter was trained on "
                f"(content hash {weight_fingerprint(weight)['hash']} != {fp['hash']}); pass check_base=False to load anyway")


def load_state(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source) -> None:
    """Copy saved tensors into adapter `name` and its modules_to_save; every key must be used exactly once."""
    rec = get_record(model, name)
    modules = dict(model.named_modules())
    targets = {m: modules[m].adapters[name] for m in rec.modules}
    targets.update({m: modules[m] for m in rec.modules_to_save})
    expected = {f"{m}.{k}": (m, k) for m, mod in targets.items() for k in mod.state_dict()}
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"tensors matching nothing in the model: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        raise AdapterFileError(f"{source}: " + "; ".join(parts))
    with torch.no_grad():
        for key, (m, k) in expected.items():
            dest = targets[m].state_dict()[k]
            if tuple(dest.shape) != tuple(tensors[key].shape):
                raise AdapterFileError(f"{source}: tensor {key} has shape {list(tensors[key].shape)}, "
                                       f"the model expects {list(dest.shape)}")
            dest.copy_(tensors[key])
    for m in rec.modules:
        modules[m].adapters[name].restore(modules[m])


def load_adapter(model: nn.Module, directory, name: str | None = None, check_base: bool = True) -> nn.Module:
    """Load an adapter saved by save_adapter onto a fresh copy of its base model; it becomes active."""
    tensors, config = read_adapter(directory)
    source = Path(directory) / TENSORS_FILE
    name = name or config.get("name", "default")
    spec = get_method(config["method"])
    try:
        method_config = spec.config_cls.from_dict(config["config"])
    except ReparamError as e:
        raise AdapterFileError(f"{source}: {e}") from None
    verify_base(model, config, source, check_base)
    exact = ["re:" + re.escape(m) for m in config["modules"]]
    adapt(model, method_config, targets=exact, name=name, init=False,
          modules_to_save=["re:" + re.escape(m) for m in config.get("modules_to_save", [])] or None)
    records(model)[name].fingerprint = config.get("base_fingerprint", {})
    try:
        load_state(model, name, tensors, source)
    except BaseException:
        delete_adapter(model, name)
        raise
    return model
