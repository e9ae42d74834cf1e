"""Resize trainable parameters during training: rank allocators remove components (AdaLoRA) or add them
(IncreLoRA, TriAdaptLoRA), so that parameter count, optimizer state and compute follow the rank budget.

The nn.Parameter object is kept and only its storage is replaced, so every reference to it stays valid: the
optimizer's param_groups and state (keyed by the parameter), the training loop's list of parameters to clip,
a Hugging Face Trainer's optimizer. What must change shape with it (its .grad, and the optimizer state tensors
shaped like it: Adam's exp_avg / exp_avg_sq, AdamR's theta0, SGD's momentum_buffer) is cut the same way, so
surviving components keep their optimizer statistics. Scalar state (Adam's `step`) is per parameter and kept.
DistributedDataParallel fixes its gradient buckets at wrap time, so resize only outside DDP training.
"""
from __future__ import annotations

import torch
from torch import nn


def cut_rows(t: torch.Tensor, dim: int, keep: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Slices `keep` of `t` along `dim`, then `extra` appended (None: nothing)."""
    kept = t.index_select(dim, keep.to(t.device))
    return kept if extra is None else torch.cat([kept, extra.to(device=t.device, dtype=t.dtype)], dim)


def _replace_data(param: nn.Parameter, data: torch.Tensor) -> None:
    """Give `param` data of another shape, keeping the Python object. `param.data = data` alone is not enough:
    while a previous step's graph is alive (the loop still holds its last loss), the autograd node that
    accumulates param's gradient stays cached with the old shape, and the next backward fails. PyTorch drops that
    node when the dtype changes, so the data passes through an empty tensor of another dtype first.
    (torch.utils.swap_tensors would refuse parameters that a live graph saved or that something holds a weakref to.)"""
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data


@torch.no_grad()
def resize_rows(param: nn.Parameter, dim: int, keep, new: torch.Tensor | None = None, optimizer=None) -> None:
    """Keep the slices `keep` (indices, in the order given) of `param` along `dim`, then append `new` (slices
    to add along `dim`; None to only remove). In place: `param` stays the same object.

    Appended slices start with a zero gradient and zero optimizer state; a growing method whose new components
    need fresh Adam statistics (their own step count) should create new parameters and add them with
    optimizer.add_param_group instead.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
    old_shape = param.shape
    zeros = None if new is None else torch.zeros_like(new)
    _replace_data(param, cut_rows(param.data, dim, keep, new))
    if param.grad is not None:
        param.grad = cut_rows(param.grad, dim, keep, zeros)
    state = optimizer.state.get(param) if optimizer is not None else None
    for key, value in (state or {}).items():
        if torch.is_tensor(value) and value.shape == old_shape and value.dim() > 0:
            state[key] = cut_rows(value, dim, keep, zeros)
    # Per-parameter state kept outside the optimizer (e.g. DeltaL2's theta_0) registers a callback here.
    for on_resize in getattr(param, "reparam_on_resize", ()):
        on_resize(dim, keep, new)
