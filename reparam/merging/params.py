"""Method parameters: dataclass helpers and mergekit-style per-tensor values.

A parameter value in a config may be
* a scalar: used for every tensor;
* a list of numbers (a *gradient*): interpolated linearly over the relative layer position x in [0, 1]
  (``numpy.interp(x, linspace(0, 1, len(values)), values)``, as mergekit does);
* a list of ``{filter: substring, value: v}`` entries: the first entry whose filter is a substring of the
  tensor name wins; an entry without ``filter`` is the fallback. ``v`` may itself be a gradient.

Layer position: the block index found in the tensor name (``layers.N.``, ``h.N.``, ``layer.N.``,
``blocks.N.``, ``block.N.``) divided by (number of blocks - 1). Tensors outside the blocks (embeddings, final
norm, LM head) get x = 0, as mergekit 0.1.x plans them, so a mergekit YAML with a gradient gives the same
tensors here (older mergekit gave post-block tensors x = 1; a ``{filter: lm_head, value: ...}`` entry
reproduces that).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

from .errors import MergeConfigError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_EMBED_RE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings")


def field_name(f: dataclasses.Field) -> str:
    """Config name of a dataclass field (``lambda_`` is spelled ``lambda`` in configs)."""
    return f.name.rstrip("_")


def param_names(cls) -> list[str]:
    return [field_name(f) for f in dataclasses.fields(cls)]


def build_params(cls, values: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from config names; unknown names are an error naming the valid ones."""
    by_name = {field_name(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise MergeConfigError(f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                               f"valid: {', '.join(sorted(by_name))}")
    try:
        return cls(**{by_name[k].name: v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise MergeConfigError(f"{where}: {e}") from None


def block_index(key: str) -> int | None:
    """The block number in a tensor name (``...layers.3.mlp.weight`` -> 3), or None outside the blocks."""
    m = _LAYER_RE.search(key)
    return int(m.group(1)) if m else None


def layer_positions(keys: Iterable[str]) -> dict[str, float]:
    keys = list(keys)
    idx = {k: i for k in keys if (i := block_index(k)) is not None}
    n = max(idx.values()) + 1 if idx else 1
    out = {}
    for k in keys:
        if k in idx:
            out[k] = idx[k] / max(n - 1, 1)
        else:
            out[k] = 0.0
    return out


def _interp(x: float, values: list) -> float:
    if len(values) == 1:
        return values[0]
    pos = x * (len(values) - 1)
    i = min(int(pos), len(values) - 2)
    f = pos - i
    return (1 - f) * values[i] + f * values[i + 1]


def resolve_value(value: Any, key: str, x: float) -> Any:
    """Value of one parameter for tensor `key` at layer position `x` (see module docstring)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            flt = entry.get("filter")
            if flt is None or flt in key:
                return resolve_value(entry.get("value"), key, x)
        return None
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise MergeConfigError(f"parameter list {value!r} is neither a gradient of numbers "
                                   f"nor a list of {{filter, value}} entries")
        return float(_interp(x, value))
    return value


def resolve_all(values: dict[str, Any], key: str, x: float) -> dict[str, Any]:
    out = {}
    for name, v in values.items():
        r = resolve_value(v, key, x)
        if r is not None:
            out[name] = r
    return out


def check_choice(name: str, value: Any, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
