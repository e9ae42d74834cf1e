"""Per-model sidecar files: one extra tensor per model tensor (a diagonal Fisher, say) for the methods whose
:class:`~reparam.merging.methods.base.MethodSpec` names a ``sidecar`` per-model parameter (``fisher``).

In a config the parameter holds the path of a safetensors file (any layout a model may have: a file, a folder,
shards with an index); in :func:`~reparam.merging.engine.merge_state_dicts` it may also be an in-memory state
dict. A sidecar is memory-mapped like the weights and read key by key as each tensor is merged; the kernel gets
the tensors in ``ctx.sidecars``, as stored (no ``dtype`` cast: Fisher values underflow in half precision).

Validation runs from the headers together with the models', before anything is read or written. Every merged
tensor must be in each sidecar with the model's shape and a float32 or float64 dtype (float16 / bfloat16 flush
small Fisher values to zero, so everything would hit the floor). A merged tensor missing from a sidecar is an
error, like one missing from a model; with ``on_mismatch: skip`` it is copied from the first model instead.
Sidecar tensors that are not merged (excluded heads, buffers, names the model lacks) are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import MergeConfigError
from .io import DictSource, SafetensorsSource, Source
from .methods.base import MethodSpec

SIDECAR_DTYPES = (torch.float32, torch.float64)


def open_sidecars(spec: MethodSpec, inputs: Sequence[Source], model_params: Sequence[Mapping[str, Any]]) -> list[Source]:
    """One source per input model, from its ``spec.sidecar`` parameter (nothing when the method has none)."""
    if spec.sidecar is None:
        return []
    name = spec.sidecar
    out: list[Source] = []
    for src, mp in zip(inputs, model_params):
        value = mp.get(name)
        if value is None:
            raise MergeConfigError(f"merge_method {spec.name!r}: model {src.name} has no {name!r} parameter "
                                   f"(the path of its {name} sidecar, a safetensors file with the model's keys)")
        if isinstance(value, Mapping):
            out.append(DictSource(value, f"{name}[{src.name}]"))
        elif isinstance(value, (str, Path)):
            if not Path(value).exists():
                raise MergeConfigError(f"model {src.name}: {name} sidecar {str(value)!r} does not exist")
            out.append(SafetensorsSource(value))
        else:
            raise MergeConfigError(f"model {src.name}: parameter {name!r} must be the path of a safetensors "
                                   f"file, got {value!r}")
    return out


def sidecar_problems(spec: MethodSpec, sidecars: Sequence[Source], inputs: Sequence[Source], key: str,
                     shape: tuple[int, ...]) -> list[str]:
    """What is wrong with tensor `key` (model shape `shape`) in each model's sidecar, one line per problem."""
    problems = []
    for sc, src in zip(sidecars, inputs):
        if key not in _key_set(sc):
            problems.append(f"{spec.sidecar} sidecar {sc.name}: tensor {key!r} is missing "
                            f"(model {src.name} has it, shape {list(shape)})")
        elif tuple(sc.shape(key)) != tuple(shape):
            problems.append(f"tensor {key!r}: {spec.sidecar} sidecar {sc.where(key)} has shape "
                            f"{list(sc.shape(key))}, but model {src.name} has shape {list(shape)}")
        elif sc.dtype(key) not in SIDECAR_DTYPES:
            problems.append(f"tensor {key!r}: {spec.sidecar} sidecar {sc.where(key)} has dtype {sc.dtype(key)}; "
                            f"it must be float32 or float64 (half precision flushes small values to zero)")
    return problems


def _key_set(source: Source) -> set[str]:
    # cached on the source: build_plan asks once per merged tensor
    keys = getattr(source, "_sidecar_key_set", None)
    if keys is None:
        keys = set(source.keys())
        source._sidecar_key_set = keys
    return keys
