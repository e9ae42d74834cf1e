"""What every merge method declares: its parameter dataclasses, its per-tensor kernel, its needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class TensorContext:
    """Per-tensor information a kernel may use besides the tensors themselves."""

    key: str
    seed: int | None = None
    model_indices: list[int] = field(default_factory=list)  # position of each input model in the config
    thresholds: list | None = None  # global-scope statistics, one entry per model (TIES: trim threshold)
    sidecars: list | None = None  # one extra tensor per model for this key (MethodSpec.sidecar), e.g. Fisher
    out_dtype: torch.dtype | None = None  # the output's dtype: a kernel may return it directly instead of float32


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params_cls: type  # global parameters (dataclass)
    model_params_cls: type  # per-model parameters (dataclass)
    kernel: Callable[..., torch.Tensor]  # (base, tensors, per_model, params, ctx) -> float32 tensor
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    order_matters: bool = False
    global_stats: Callable[[Any], bool] | None = None  # params -> True when a statistics pass is needed
    stats: Callable[[Any], list] | None = None  # (engine.StatsRun) -> ctx.thresholds; None: TIES thresholds
    check: Callable[[Any, list, str], None] | None = None  # (params, per_model, key) -> raise ValueError
    check_keys: Callable[[list, list], None] | None = None  # (merged keys, first key's per_model) -> raise
    sidecar: str | None = None  # per-model parameter naming a file with one extra tensor per key
    takes_base: bool = True  # False: a base_model in the config is an error
    # The kernel turns each input into float32 itself (gta's delta copy, linear's accumulator): with dtype float32
    # the engine hands it the stored tensors (bf16, ...) and the cast happens once, inside the kernel's own pass.
    casts_inputs: bool = False
    description: str = ""
