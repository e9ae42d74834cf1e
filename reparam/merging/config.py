"""mergekit-style merge configs (YAML or dict), parsed into validated objects.

```yaml
merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, slerp,
                              # breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock
base_model: path/to/base      # HF folder or .safetensors file
models:
  - model: path/to/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: path/to/ft2
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true, lambda: 1.0}   # method parameters; per-model names here are defaults
dtype: float32                # tensors are cast to this on load (optional)
out_dtype: bfloat16           # output dtype (default: dtype, else each base tensor's dtype)
# reparam extensions:
seed: 0                       # randomised methods (DARE, DELLA)
exclude: ['.*classifier.*']   # regexes (re.search) of tensors copied from the base instead of merged
on_mismatch: error            # or "skip": tensors missing/mismatched in some model are copied from the base
on_vocab_mismatch: error      # or "truncate": embeddings/LM heads of different vocab sizes merge common rows
max_shard_size: 5GB
adapter_check_base: true      # models may be LoRA adapter folders on base_model (adapter_source.py)
output: model                 # or adapter: merge LoRA adapters into one PEFT adapter (adapter_merge.py)
adapter_rank: exact           # output: adapter only; exact (linear, task_arithmetic) or N (truncated SVD)
```
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import MergeConfigError
from .io import parse_size
from .params import param_names
from .registry import get_method

TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "exclude",
             "on_mismatch", "on_vocab_mismatch", "max_shard_size", "tokenizer_source", "name", "output",
             "adapter_rank", "adapter_check_base")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelEntry:
    path: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # global method parameters
    model_defaults: dict[str, Any] = field(default_factory=dict)  # per-model names given globally
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    seed: int = 0
    exclude: list[str] = field(default_factory=list)
    on_mismatch: str = "error"
    on_vocab_mismatch: str = "error"  # or "truncate" (keys.py)
    max_shard_size: int = 5 * 10**9
    output: str = "model"  # or "adapter": LoRA adapters merged into one PEFT adapter (adapter_merge.py)
    adapter_rank: int | str | None = None  # "exact" (concatenated factors) or the rank of a truncated SVD
    adapter_check_base: bool = True  # check a reparam adapter's base fingerprint when merging it
    raw: dict[str, Any] = field(default_factory=dict)


def _dtype(value, name: str) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in DTYPES:
        raise MergeConfigError(f"{name}: unknown dtype {value!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[key]


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _adapter_options(raw: dict) -> dict[str, Any]:
    output, rank, check = raw.get("output", "model"), raw.get("adapter_rank"), raw.get("adapter_check_base", True)
    if output not in ("model", "adapter"):
        raise MergeConfigError(f"output must be 'model' or 'adapter', got {output!r}")
    if rank is not None and output != "adapter":
        raise MergeConfigError("adapter_rank is only used with output: adapter")
    if rank is not None and rank != "exact" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise MergeConfigError(f"adapter_rank must be a positive integer or 'exact', got {rank!r}")
    if not isinstance(check, bool):
        raise MergeConfigError(f"adapter_check_base must be true or false, got {check!r}")
    return {"output": output, "adapter_rank": rank, "adapter_check_base": check}


def load_config(config: dict | str | Path | MergeConfig) -> MergeConfig:
    """Parse a dict or a YAML file path into a :class:`MergeConfig`; every error names the bad entry."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, (str, Path)):
        p = Path(config)
        if not p.is_file():
            raise MergeConfigError(f"merge config file {str(p)!r} does not exist")
        try:
            config = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise MergeConfigError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(config, dict):
        raise MergeConfigError("a merge config must be a mapping with merge_method and models")
    raw = dict(config)
    if "slices" in raw:
        raise MergeConfigError("'slices' configs are not supported yet; list whole models under 'models'")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise MergeConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                               f"valid: {', '.join(sorted(TOP_LEVEL))}")
    if "merge_method" not in raw:
        raise MergeConfigError("config has no 'merge_method'")
    spec = get_method(raw["merge_method"])
    if raw.get("tokenizer_source") not in (None, "base"):
        raise MergeConfigError(f"tokenizer_source {raw['tokenizer_source']!r} is not supported "
                               f"(only 'base': tokenizer files are copied from the base model)")
    models = []
    for i, m in enumerate(raw.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise MergeConfigError(f"models[{i}] must be a mapping with a 'model' path")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise MergeConfigError(f"models[{i}]: unknown key(s) {', '.join(map(repr, extra))}; "
                                   f"valid: 'model', 'parameters'")
        path = m["model"]
        if not isinstance(path, (str, Path)) or "+" in str(path) and not Path(str(path)).exists():
            raise MergeConfigError(f"models[{i}]: model {path!r} must be a local path (LoRA '+' syntax "
                                   f"and hub ids are not supported)")
        models.append(ModelEntry(str(path), _mapping(m.get("parameters"), f"models[{i}].parameters")))
    if not models:
        raise MergeConfigError("config lists no 'models'")

    global_names, model_names = param_names(spec.params_cls), param_names(spec.model_params_cls)
    parameters, model_defaults = {}, {}
    for k, v in _mapping(raw.get("parameters"), "parameters").items():
        if k in global_names:
            parameters[k] = v
        elif k in model_names:
            model_defaults[k] = v
        else:
            raise MergeConfigError(f"method {spec.name!r} has no parameter {k!r}; valid: "
                                   f"{', '.join(sorted(set(global_names) | set(model_names))) or '(none)'}")
    for i, m in enumerate(models):
        for k in m.parameters:
            if k not in model_names:
                raise MergeConfigError(f"models[{i}] ({m.path}): method {spec.name!r} has no per-model parameter "
                                       f"{k!r}; valid: {', '.join(sorted(model_names)) or '(none)'}")

    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MergeConfigError(f"seed must be an integer, got {seed!r}")
    exclude = raw.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    for pat in exclude:
        try:
            re.compile(pat)
        except (re.error, TypeError) as e:
            raise MergeConfigError(f"exclude pattern {pat!r} is not a valid regex ({e})") from None
    on_mismatch = raw.get("on_mismatch", "error")
    if on_mismatch not in ("error", "skip"):
        raise MergeConfigError(f"on_mismatch must be 'error' or 'skip', got {on_mismatch!r}")
    on_vocab_mismatch = raw.get("on_vocab_mismatch", "error")
    if on_vocab_mismatch not in ("error", "truncate"):
        raise MergeConfigError(f"on_vocab_mismatch must be 'error' or 'truncate', got {on_vocab_mismatch!r}")
    base = raw.get("base_model")
    if base is not None and not isinstance(base, (str, Path)):
        raise MergeConfigError(f"base_model must be a path, got {base!r}")
    return MergeConfig(
        merge_method=spec.name, models=models, base_model=None if base is None else str(base),
        parameters=parameters, model_defaults=model_defaults, dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"), seed=seed, exclude=list(exclude),
        on_mismatch=on_mismatch, on_vocab_mismatch=on_vocab_mismatch,
        max_shard_size=parse_size(raw.get("max_shard_size", 5 * 10**9)),
        **_adapter_options(raw), raw=raw)
